"""A full disk (issue 24, item 11): every writing command ends in one line naming the disk, exit
status 4 (the environment, not the input; `run` never answers 1 for it), and nothing half-written
is left. A real 30 MB tmpfs is filled (root only: the test skips with the reason elsewhere), and the
libraries' own ways of saying "disk full" (OSError 28, safetensors' IoError, OpenVINO's and
ONNX's C++ streams) are each produced for real."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from benchmarks.board.atomic import atomic_path
from benchmarks.board.diskspace import free_bytes
from benchmarks.board.errors import EXIT_ENVIRONMENT, EnvironmentFault
from sglp_edge.cli import app

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")
LEFT = 96 << 10  # bytes left free on the filled disk: less than any model here needs


@pytest.fixture
def full_disk(tmp_path):
    """A 30 MB tmpfs filled up to LEFT bytes free; unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 30 MB tmpfs here (needs root): {r.stderr.strip()}")
    try:
        with open(mnt / "fill", "wb") as f:
            f.write(b"\1" * max(0, free_bytes(mnt) - LEFT))
        assert free_bytes(mnt) <= LEFT
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _only_fill(mnt: Path) -> None:
    assert sorted(p.name for p in mnt.rglob("*")) == ["fill"], "a half-written file or folder was left"


def _one_disk_line(r) -> str:
    err = r.stderr
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.lstrip().startswith(("⠋", "⠙", "⠹", "⠸",
                                                                                                   "⠼", "⠴", "⠦", "⠧",
                                                                                                   "⠇", "⠏"))]
    assert r.exit_code == EXIT_ENVIRONMENT, (r.exit_code, err)
    assert "Traceback" not in err and "Errno" not in err, err
    errs = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errs) == 1 and "disk" in errs[0], err
    return errs[0]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---- each library's way of saying "disk full" becomes one EnvironmentFault --------------------
def _big_array() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MB


def test_onnx_save_on_a_full_disk(full_disk):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("Identity", ["W"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512, 1024])],
                          [numpy_helper.from_array(_big_array(), "W")])
    with pytest.raises(EnvironmentFault, match="out of disk space"):
        with atomic_path(full_disk / "m.onnx") as tmp:
            onnx.save(helper.make_model(g), str(tmp))
    _only_fill(full_disk)


def test_safetensors_save_on_a_full_disk(full_disk):
    import torch
    from safetensors.torch import save_file

    with pytest.raises(EnvironmentFault, match="out of disk space"):
        with atomic_path(full_disk / "model.safetensors") as tmp:
            save_file({"w": torch.from_numpy(_big_array())}, str(tmp))
    _only_fill(full_disk)


def test_torch_save_on_a_full_disk(full_disk):
    import torch

    with pytest.raises(EnvironmentFault, match="out of disk space"):
        with atomic_path(full_disk / "state.pt") as tmp:
            torch.save({"w": torch.from_numpy(_big_array())}, tmp)
    _only_fill(full_disk)


def test_openvino_save_on_a_full_disk(full_disk, tmp_path):
    import openvino as ov

    src = tmp_path / "src.onnx"
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
                          [numpy_helper.from_array(_big_array(), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(src))
    model = ov.Core().read_model(str(src))
    with pytest.raises(EnvironmentFault, match="out of disk space"):
        with atomic_path(full_disk / "model.xml") as tmp:
            ov.save_model(model, str(tmp), compress_to_fp16=False)
    for p in full_disk.iterdir():  # OpenVINO writes the .bin beside the .xml itself
        if p.name != "fill":
            p.unlink()
    _only_fill(full_disk)


# ---- the commands: one line, exit 4, nothing left -----------------------------------------------
def test_export_on_a_full_disk(full_disk):
    r = cli("export", "default", "--out", full_disk / "x.onnx")
    _one_disk_line(r)
    _only_fill(full_disk)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_compile_on_a_full_disk(full_disk, tmp_path, backend):
    big = _big_cnn(tmp_path / "big.onnx")
    r = cli("compile", big, "--backend", backend, "--out", full_disk / "c")
    _one_disk_line(r)
    _only_fill(full_disk)


def _big_cnn(path: Path) -> Path:
    """make_cnn's graph with a 2 MB classifier: bigger than what the full disk has left."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W")
    f = numpy_helper.from_array(rng.standard_normal((8, 65536)).astype(np.float32), "F")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "F"], ["logits"])]
    g = helper.make_graph(nodes, "big_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 65536])], [w, f])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


@needs_data
def test_prune_on_a_full_disk(full_disk):
    r = cli("prune", "default", "--keep", "20", "--calib-batches", "1", "--batch-size", "16", "--out", full_disk / "p")
    _one_disk_line(r)
    _only_fill(full_disk)


@needs_data
def test_run_on_a_full_disk_is_not_a_failed_constraint(full_disk, tmp_path):
    cfg = {"name": "t", "model": "cifar_resnet20", "data": "fashion-mnist",
           "prune": {"keep": 6, "calib_batches": 1, "batch_size": 16},
           "finetune": {"steps": 1, "batch_size": 16}, "eval": {"samples": 32, "calib_samples": 32},
           "devices": ["local-cpu-ort"], "bench": {"min_duration_s": 0.1, "min_iters": 5, "warmup_s": 0.05}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("run", "--config", tmp_path / "run.yaml", "--out", full_disk / "r")
    assert r.exit_code != 1
    _one_disk_line(r)
    _only_fill(full_disk)
