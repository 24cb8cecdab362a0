"""LM export past 2 GB: external weight data on every LM route, and a parity check that does not
hold two copies of the weights (issue 27).

A tiny random Llama (tied embeddings, as the SmolLM2 family) is exported with external data forced,
the path a model of 2 GB or more takes: the folder must hold model.onnx + model.onnx.data, load on
ONNX Runtime from any working directory and from a moved folder (a relative data path), reproduce
PyTorch's logits on a held-out block, and record the parity and the sizes in its manifest."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.board.errors import UserError  # noqa: E402
from exporters.onnx_utils import read_metadata  # noqa: E402
from sglp_edge.export.lm import (PARITY_ATOL, export_causal_lm, io_names, parity_session,  # noqa: E402
                                 read_lm_meta, shared_initializers)
from sglp_edge.export.onnx_export import export_onnx  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_llama():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    yield m
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def block():
    return torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def exported(tiny_llama, block, tmp_path_factory):
    out = tmp_path_factory.mktemp("large") / "lm"
    return out, export_causal_lm(tiny_llama, out, parity_ids=block, external_data=True)


def _feed(names, ids: np.ndarray, kvh: int, hd: int) -> dict[str, np.ndarray]:
    b, t = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((b, t), np.int64),
            "position_ids": np.arange(t, dtype=np.int64)[None].repeat(b, 0)}
    feed.update({n: np.zeros((b, kvh, 0, hd), np.float32) for n in names[3:]})
    return feed


def test_folder_has_graph_and_external_data(exported, tiny_llama):
    out, meta = exported
    names = {f.name for f in out.iterdir() if f.is_file()}
    assert {"model.onnx", "model.onnx.data", "lm.json"} <= names
    assert meta["external_data"] is True and meta["files"] == ["model.onnx", "model.onnx.data", "lm.json"]
    assert meta["size_bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    assert meta["memory"]["weights_bytes"] == sum(p.numel() * 4 for p in tiny_llama.parameters())
    assert (out / "model.onnx.data").stat().st_size >= 0.95 * meta["memory"]["weights_bytes"]  # the weights are out
    assert meta["memory"]["process_peak_rss_bytes"] > 0
    # every external reference is the one relative file name, never an absolute path
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locs = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"model.onnx.data"}


def test_parity_recorded_on_the_held_out_block(exported, block):
    out, meta = exported
    p = meta["parity_vs_pytorch"]
    assert p["passed"] is True and p["greedy_equal"] is True
    assert p["block_tokens"] == block.shape[1] and p["prefill_tokens"] + p["decode_tokens"] == block.shape[1]
    assert 0 <= p["full_block_max_abs"] <= PARITY_ATOL and 0 <= p["max_abs"] <= PARITY_ATOL
    assert p["shared_initializers"] >= 1  # the tied embedding / LM head: ONNX Runtime used the torch tensor
    assert read_lm_meta(out)["parity_vs_pytorch"] == json.loads(json.dumps(p))
    assert read_metadata(onnx.load(str(out / "model.onnx"), load_external_data=False))["parity_vs_pytorch"]["passed"]


@pytest.mark.parametrize("moved", [False, True])
def test_ort_loads_from_another_directory_and_matches_pytorch(exported, tiny_llama, block, tmp_path, monkeypatch,
                                                               moved):
    out, meta = exported
    folder = out
    if moved:  # a copied folder still finds its data file: the path inside model.onnx is relative
        folder = tmp_path / "elsewhere" / "copy"
        shutil.copytree(out, folder)
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    assert os.getcwd() != str(folder)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == io_names(TINY["num_hidden_layers"])[0]
    logits = sess.run(None, _feed(names, block.numpy(), meta["kv_heads"], meta["head_dim"]))[0]
    with torch.no_grad():
        ref = tiny_llama(input_ids=block).logits.numpy()
    assert np.abs(logits - ref).max() <= PARITY_ATOL


def test_parity_session_shares_only_unchanged_tensors(exported, tiny_llama, tmp_path):
    out, _ = exported
    wrapped = nn.Module()
    wrapped.model = tiny_llama  # the names the exporter gives the parameters: "model." + the model's own
    shared = shared_initializers(out / "model.onnx", wrapped)
    assert "model.lm_head.weight" in shared
    assert np.shares_memory(shared["model.lm_head.weight"], tiny_llama.lm_head.weight.detach().numpy())
    sess = parity_session(out / "model.onnx", wrapped)
    assert set(sess.sglp_shared) == set(shared)
    # a data file whose bytes differ from the torch tensor: nothing is shared, the file's weights are used
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    proto = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    init = next(t for t in proto.graph.initializer if t.name == "model.lm_head.weight")
    offset = int(next(e.value for e in init.external_data if e.key == "offset"))
    with open(bad / "model.onnx.data", "r+b") as f:
        f.seek(offset + 8)
        f.write(b"\x00\x00\x80\x7f")  # one float: +inf
    assert "model.lm_head.weight" not in shared_initializers(bad / "model.onnx", wrapped)


def test_auto_external_data_below_the_limit_stays_one_file(tiny_llama, block, tmp_path):
    meta = export_causal_lm(tiny_llama, tmp_path / "small", parity_ids=block)
    assert meta["external_data"] is False and meta["files"] == ["model.onnx", "lm.json"]
    assert meta["size_bytes"] == (tmp_path / "small" / "model.onnx").stat().st_size
    assert meta["parity_vs_pytorch"]["passed"] and meta["parity_vs_pytorch"]["shared_initializers"] == 0


def test_image_export_refuses_2gb_up_front(tmp_path):
    with torch.device("meta"):  # 2.1 GiB of weights that are never allocated
        big = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2_940_000))
    with pytest.raises(UserError, match="must stay below 2 GiB.*model.onnx.data") as e:
        export_onnx(big, torch.zeros(1, 3, 8, 8), tmp_path / "big.onnx", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "big.onnx").exists()


def test_openvino_route_records_sizes_and_full_block_parity(tiny_llama, block, tmp_path):
    pytest.importorskip("openvino")
    from sglp_edge.export.lm_openvino import export_causal_lm_openvino

    meta = export_causal_lm_openvino(tiny_llama, tmp_path / "ov", parity_ids=block)
    files = ["openvino_model.bin", "openvino_model.xml"]
    assert meta["files"] == files + ["lm.json"]
    assert meta["size_bytes"] == sum((tmp_path / "ov" / f).stat().st_size for f in files)
    p = meta["parity_vs_pytorch"]
    assert p["passed"] is True and p["full_block_max_abs"] <= PARITY_ATOL and p["block_tokens"] == block.shape[1]
