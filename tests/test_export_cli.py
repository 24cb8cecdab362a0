"""`sglp-edge export` / `sglp-edge compile` end to end (real exporters, ONNX Runtime, OpenVINO)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from exporters import onnx_utils as ou
from exporters import trt_ops
from benchmarks.board.calib import save_npz
from sglp_edge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_export")
    res = runner.invoke(app, ["export", "cifar_resnet20", "--out", str(d / "r20.onnx"), "--parity-samples", "64",
                              "--simplify", "onnxsim"])
    assert res.exit_code == 0, res.output
    return d, res.output


def test_export_cli_writes_one_checked_file(exported):
    d, output = exported
    path = d / "r20.onnx"
    assert "parity vs PyTorch on 64 samples" in output and "opset=18" in output
    meta = ou.read_metadata(path)
    par = meta["parity_vs_pytorch"]
    assert par["passed"] and par["max_abs"] < 1e-4 and par["top1_agree"] == 1.0
    assert par["inputs"].startswith("Fashion-MNIST test images")  # real images, not noise
    assert meta["export"]["simplify"]["method"] == "onnxsim" and meta["export"]["dynamic_axes"]["input"] == {"0": "batch"}
    assert meta["model"]["source"] == "cifar_resnet20"
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert s.run(None, {"input": np.zeros((5, 3, 32, 32), np.float32)})[0].shape == (5, 10)
    assert [p.name for p in d.iterdir()] == ["r20.onnx"]  # no side data, no temporary files
    report = trt_ops.check_graph(path, trt_version="10.3")  # ResNet ops are all parseable by TensorRT 10.3
    assert report.ok, report.problems()


def test_compile_cli_openvino(exported, tmp_path):
    d, _ = exported
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    save_npz(tmp_path / "eval.npz", x)
    res = runner.invoke(app, ["compile", str(d / "r20.onnx"), "--backend", "openvino", "--precision", "fp32",
                              "--eval", str(tmp_path / "eval.npz"), "--out", str(tmp_path / "ov")])
    assert res.exit_code == 0, res.output
    assert "runtime precision: f32" in res.output and "parity on 16" in res.output
    m = json.loads((tmp_path / "ov" / "manifest.json").read_text())
    assert m["parity"]["max_abs"] < 1e-4 and m["source"]["parity_vs_pytorch"]["passed"] is True


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxruntime", "--precision", "fp16"], "precision fp16 is not supported by the onnxruntime backend"),
    (["--backend", "openvino", "--precision", "int8"], "INT8 needs calibration data"),
    (["--backend", "onnxruntime", "--precision", "int8", "--calib", "nowhere.npz"], "does not exist"),
])
def test_compile_cli_errors_are_one_line(exported, tmp_path, args, message):
    d, _ = exported
    res = runner.invoke(app, ["compile", str(d / "r20.onnx"), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()


def test_compile_cli_truncated_onnx(exported, tmp_path):
    d, _ = exported
    data = (d / "r20.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) * 2 // 3])
    res = runner.invoke(app, ["compile", str(tmp_path / "cut.onnx"), "--backend", "openvino", "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error: ONNX file") and res.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.onnx"]


def test_export_cli_unknown_model(tmp_path):
    res = runner.invoke(app, ["export", "no_such_model", "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and res.output.startswith("error: unknown model")
    assert not (tmp_path / "x.onnx").exists()
