"""sglp_edge/export/onnx_export.py: PyTorch -> ONNX with the real exporters and ONNX Runtime (no mocks)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from exporters import onnx_utils as ou
from benchmarks.board.errors import UserError
from sglp_edge.export.onnx_export import export_onnx
from sglp_edge.models.cifar_resnet import cifar_resnet


def _sess(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export (dynamo) refuses it, the tracing exporter records
    the branch taken."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x).relu().mean((2, 3))
        if y.sum() > -1e9:  # always true, but data-dependent
            y = y * 2
        return self.fc(y)


def test_dynamo_fallback_to_legacy_is_recorded(tmp_path):
    torch.manual_seed(0)
    m = Branchy().eval()
    x = torch.randn(6, 3, 8, 8)
    r = export_onnx(m, x[:1], tmp_path / "b.onnx", parity_inputs=x, progress=False)
    assert r.exporter == "legacy" and r.fallback_reason.startswith("dynamo:")
    assert any("used the legacy exporter" in w for w in r.warnings)
    meta = ou.read_metadata(tmp_path / "b.onnx")
    assert meta["export"]["exporter"] == "legacy" and meta["export"]["fallback_reason"]
    assert r.parity["max_abs"] < 1e-5 and r.parity["passed"]
    assert _sess(tmp_path / "b.onnx").run(None, {"input": x[:5].numpy()})[0].shape == (5, 3)  # dynamic batch
    with pytest.raises(UserError, match="ONNX export failed .*dynamo"):
        export_onnx(m, x[:1], tmp_path / "d.onnx", exporter="dynamo", progress=False)
    assert not (tmp_path / "d.onnx").exists()


class Unexportable(nn.Module):
    def forward(self, x):
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]  # no ONNX translation in either exporter


def test_failed_export_leaves_no_file(tmp_path):
    with pytest.raises(UserError) as e:
        export_onnx(Unexportable(), torch.randn(2, 3, 4, 4), tmp_path / "u.onnx", progress=False)
    assert "dynamo:" in str(e.value) and "legacy:" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    m = cifar_resnet(20)
    x = torch.randn(2, 3, 32, 32)
    for kw, msg in (({"exporter": "tflite"}, "unknown exporter"), ({"simplify": "polygraphy"}, "unknown simplifier"),
                    ({"kind": "audio"}, "unknown input kind"), ({"opset": 99}, "out of range")):
        with pytest.raises(UserError, match=msg):
            export_onnx(m, x, tmp_path / "m.onnx", progress=False, **kw)
    with pytest.raises(UserError, match="must end in .onnx"):
        export_onnx(m, x, tmp_path / "m.bin", progress=False)
    with pytest.raises(UserError, match="integer input_ids"):
        export_onnx(m, x, tmp_path / "m.onnx", kind="tokens", progress=False)


def test_tiny_llama_dynamic_batch_and_sequence(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (6, 24))
    r = export_onnx(lm, ids[:2, :16], tmp_path / "lm.onnx", kind="tokens", parity_inputs=ids, progress=False)
    assert r.exporter == "dynamo" and r.opset == 18 and r.kind == "tokens"
    assert r.io["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert r.io["outputs"][0]["shape"] == ["batch", "sequence", 256]
    assert r.parity["max_abs"] < 1e-4 and r.parity["top1_agree"] == 1.0 and r.parity["top1_rows"] == 6 * 24
    m = onnx.load(tmp_path / "lm.onnx")
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)  # one file
    assert [p.name for p in tmp_path.iterdir()] == ["lm.onnx"]
    s = _sess(tmp_path / "lm.onnx")
    for b, t in ((1, 5), (3, 40)):  # shapes never seen at export time
        x = torch.randint(0, 256, (b, t))
        with torch.inference_mode():
            ref = lm(input_ids=x, use_cache=False).logits.numpy()
        np.testing.assert_allclose(s.run(None, {"input_ids": x.numpy()})[0], ref, atol=1e-4, rtol=1e-4)
