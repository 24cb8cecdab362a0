"""Bad input and lost data (issue 13, item 6): every case gives one line naming the fix, a non-zero
exit, and leaves the user's files exactly as they were. Fast: the checks fire before any heavy work."""

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from benchmarks.board.atomic import MARKER, FolderLock, atomic_dir, check_out_dir
from benchmarks.board.errors import UserError
from sglp_edge.cli import app
from tests.onnx_models import make_cnn

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stderr


def one_line_error(code, err, needle, status=2):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]


def user_folder(tmp_path, name="d"):
    d = tmp_path / name
    d.mkdir()
    (d / "notes.txt").write_text("my notes\n")
    return d


def unwritable(tmp_path) -> Path:
    """A folder this process cannot write into (root ignores permissions: use /proc)."""
    if os.geteuid() == 0:
        return Path("/proc/sglp-edge-test-nowrite")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d


# ---- --out never deletes what is there ----------------------------------------------------------
def test_compile_into_the_inputs_folder_keeps_the_users_files(tmp_path):
    d = user_folder(tmp_path)  # the example: mkdir d; echo x > d/notes.txt; cp model.onnx d/
    make_cnn(d / "model.onnx")
    before = (d / "model.onnx").read_bytes()
    code, err = cli("compile", d / "model.onnx", "--backend", "onnxruntime", "--out", d)
    one_line_error(code, err, "holds the input")
    code, err = cli("compile", d / "model.onnx", "--backend", "onnxruntime", "--out", d, "--force")
    one_line_error(code, err, "holds the input")  # not even with --force
    assert (d / "notes.txt").read_text() == "my notes\n" and (d / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in d.iterdir()) == ["model.onnx", "notes.txt"]


@pytest.mark.parametrize("cmd", [
    ["prune", "cifar_resnet20", "--keep", "6"],
    ["compile", "MODEL", "--backend", "onnxruntime"],
    ["export", "cifar_resnet20"],
    ["finetune", "cifar_resnet20", "--teacher", "cifar_resnet20", "--steps", "1"],
    ["train", "cifar_resnet20", "--steps", "1"],
])
def test_non_empty_user_folder_is_refused_even_with_force(tmp_path, cmd):
    model = make_cnn(tmp_path / "m.onnx")
    d = user_folder(tmp_path)
    args = [model if a == "MODEL" else a for a in cmd]
    if cmd[0] == "export":  # export writes one file: an existing folder is never a file target
        code, err = cli(*args, "--out", d)
        one_line_error(code, err, "is a folder")
    else:
        for extra in ([], ["--force"]):
            code, err = cli(*args, "--out", d, *extra)
            one_line_error(code, err, "sglp-edge did not write")
    assert [p.name for p in d.iterdir()] == ["notes.txt"] and (d / "notes.txt").read_text() == "my notes\n"


def test_bench_and_run_refuse_a_user_folder(tmp_path):
    d = user_folder(tmp_path)
    model = make_cnn(tmp_path / "m.onnx")
    code, err = cli("bench", model, "--device", "local-cpu-ort", "--out", d)
    one_line_error(code, err, "sglp-edge did not write")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "cifar_resnet20", "prune": {"keep": 6}}))
    code, err = cli("run", "--config", cfg, "--out", d)
    one_line_error(code, err, "sglp-edge did not write")
    assert [p.name for p in d.iterdir()] == ["notes.txt"]


def test_an_existing_file_never_becomes_a_folder(tmp_path):
    f = tmp_path / "out"
    f.write_text("precious\n")
    model = make_cnn(tmp_path / "m.onnx")
    for cmd in (["prune", "cifar_resnet20", "--keep", "6"], ["compile", model, "--backend", "onnxruntime"]):
        code, err = cli(*cmd, "--out", f, "--force")
        one_line_error(code, err, "existing file")
    with pytest.raises(UserError, match="existing file"):  # the atomic writer itself refuses too
        with atomic_dir(f) as tmp:
            (tmp / "x").write_text("x")
    assert f.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out"]  # no .out.old.PID copy


def test_current_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    code, err = cli("prune", "cifar_resnet20", "--keep", "6", "--out", ".", "--force")
    one_line_error(code, err, "current folder")
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_earlier_sglp_output_needs_force_then_is_replaced(tmp_path):
    model = make_cnn(tmp_path / "m.onnx")
    out = tmp_path / "ort"
    code, err = cli("compile", model, "--backend", "onnxruntime", "--out", out)
    assert code == 0, err
    assert (out / MARKER).is_file()
    code, err = cli("compile", model, "--backend", "onnxruntime", "--out", out)
    one_line_error(code, err, "--force")
    (out / "stale.txt").write_text("from the earlier run")
    code, err = cli("compile", model, "--backend", "onnxruntime", "--out", out, "--force")
    assert code == 0, err
    assert (out / "model.onnx").is_file() and not (out / "stale.txt").exists()


def test_export_does_not_overwrite_a_file_without_force(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_text("not yours to overwrite\n")
    code, err = cli("export", "cifar_resnet20", "--out", f)
    one_line_error(code, err, "--force")
    assert f.read_text() == "not yours to overwrite\n"


def test_unwritable_out_and_parent_that_is_a_file(tmp_path):
    model = make_cnn(tmp_path / "m.onnx")
    ro = unwritable(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": "cifar_resnet20", "prune": {"keep": 6}}))
    cmds = [["prune", "cifar_resnet20", "--keep", "6"], ["export", "cifar_resnet20"],
            ["compile", model, "--backend", "onnxruntime"], ["bench", model, "--device", "local-cpu-ort"],
            ["run", "--config", cfg]]
    for cmd in cmds:
        code, err = cli(*cmd, "--out", ro / "out")
        one_line_error(code, err, "not writable")
        code, err = cli(*cmd, "--out", blocker / "out")
        one_line_error(code, err, "is a file")
    assert blocker.read_text() == "x"


def test_check_out_dir_lets_a_command_reuse_its_own_folder(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / MARKER).write_text("{}")
    (d / "summary.json").write_text("{}")  # the marker AND a result of ours (a bare marker is not enough)
    (d / "board").mkdir()
    assert check_out_dir(d, reuse=True) == d
    with pytest.raises(UserError, match="--force"):
        check_out_dir(d)


# ---- numbers and names checked before the work --------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "-5"], "--batch-size must be >= 0"),
    (["--beam-width", "0"], "--beam-width must be >= 1"),
    (["--grad-batches", "0"], "--grad-batches must be >= 1"),
    (["--calib-batches", "0"], "--calib-batches must be >= 1"),
    (["--protocol", "natrual"], "unknown protocol"),
    (["--allocation", "even"], "unknown allocation"),
])
def test_prune_numbers_and_names(tmp_path, args, needle):
    out = tmp_path / "out"
    code, err = cli("prune", "cifar_resnet20", "--keep", "6", *args, "--out", out)
    one_line_error(code, err, needle)
    assert not out.exists()


def test_finetune_negative_batch_size(tmp_path):
    code, err = cli("finetune", "cifar_resnet20", "--teacher", "cifar_resnet20", "--steps", "1", "--batch-size", "-5",
                    "--out", tmp_path / "o")
    one_line_error(code, err, "--batch-size must be > 0")


@pytest.mark.parametrize("model,opt,needle", [
    ("default", ["--weights", "/nonexistent/w.pt"], "does not exist"),
    ("cifar_resnet20", ["--weights", "/nonexistent/w.pt"], "does not exist"),
    ("default", ["--weights", "W"], "--weights applies to an architecture"),
    ("default", ["--units", "layer1.*"], "--units applies to an architecture"),
    ("CKPT", ["--units", "layer1.*"], "--units applies to an architecture"),
])
def test_weights_and_units_are_never_silently_ignored(tmp_path, model, opt, needle):
    from sglp_edge.models.registry import load_model, save_checkpoint

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"")
    ck = tmp_path / "ck"
    if model == "CKPT":
        lm = load_model("cifar_resnet20")
        save_checkpoint(lm.model, lm.adapter, ck)
    opt = [str(w) if o == "W" else o for o in opt]
    code, err = cli("prune", ck if model == "CKPT" else model, "--keep", "6", *opt, "--out", tmp_path / "out")
    one_line_error(code, err, needle)


# ---- run: validated before the prune -------------------------------------------------------------
BASE = {"name": "t", "model": "cifar_resnet20", "data": "fashion-mnist",
        "prune": {"keep": 6, "calib_batches": 1, "batch_size": 16}, "finetune": {"steps": 2, "batch_size": 16}}


def _run_cfg(tmp_path, **changes):
    cfg = json.loads(json.dumps(BASE))
    for k, v in changes.items():
        cur = cfg
        *head, last = k.split("__")
        for h in head:
            cur = cur.setdefault(h, {})
        cur[last] = v
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("changes,extra,needle", [
    ({}, ["--device", "nosuchboard"], "nosuchboard"),
    ({"finetune__steps": -5}, [], "finetune.steps"),
    ({"prune__method": "sglpp"}, [], "prune.method"),
    ({"prune__protocol": "natrual"}, [], "prune.protocol"),
    ({"prune__allocation": "even"}, [], "prune.allocation"),
    ({"prune__batch_size": -5}, [], "prune.batch_size"),
])
def test_run_rejects_bad_settings_before_any_stage(tmp_path, changes, extra, needle):
    run = tmp_path / "run"
    code, err = cli("run", "--config", _run_cfg(tmp_path, **changes), "--out", run, *extra)
    one_line_error(code, err, needle)
    assert not run.exists()  # not even an empty run folder


@needs_data
def test_run_checks_units_and_data_shape_before_the_prune(tmp_path):
    run = tmp_path / "run"
    code, err = cli("run", "--config", _run_cfg(tmp_path, units="nosuch.*"), "--out", run)
    one_line_error(code, err, "matches no module")
    f = tmp_path / "mlp.py"
    f.write_text("from torch import nn\n"
                 "def build():\n"
                 "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 16), nn.Sequential(nn.Linear(16, 16)),"
                 " nn.Linear(16, 10))\n")
    code, err = cli("run", "--config", _run_cfg(tmp_path, model=f"{f}:build", units="2"), "--out", run)
    one_line_error(code, err, "does not take --data fashion-mnist inputs of shape [3, 32, 32]")
    assert not run.exists()


def test_corrupt_run_manifest_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("{}")  # a run folder of ours (a bare manifest.json is the user's: refused untouched)
    (run / "manifest.json").write_text('{"stages": {"prune": ')
    code, err = cli("run", "--config", _run_cfg(tmp_path), "--out", run)
    one_line_error(code, err, "corrupt")
    (run / "manifest.json").write_text('[1, 2]')
    code, err = cli("run", "--config", _run_cfg(tmp_path), "--out", run)
    one_line_error(code, err, "not an sglp-edge run manifest")


def test_a_second_run_into_a_locked_folder_refuses(tmp_path):
    from sglp_edge.pipeline.stages import StageRunner

    run = tmp_path / "run"
    with FolderLock(run):  # a lock alone (a run that has just started)
        code, err = cli("run", "--config", _run_cfg(tmp_path), "--out", run)
        one_line_error(code, err, "in use by another sglp-edge process")
    first = StageRunner(run, log=lambda m: None)  # what a running `sglp-edge run` holds
    try:
        code, err = cli("run", "--config", _run_cfg(tmp_path), "--out", run)
        one_line_error(code, err, "in use by another sglp-edge process")
    finally:
        first.close()
    assert not (run / "manifest.json").exists()


# ---- bench: the data is checked before the latency pass ------------------------------------------
def test_bench_wrong_shape_and_out_of_range_labels(tmp_path):
    import numpy as np

    model = make_cnn(tmp_path / "m.onnx")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 1, 28, 28), np.float32), y=np.zeros(4, np.int64))
    code, err = cli("bench", model, "--device", "local-cpu-ort", "--data", bad, "--out", tmp_path / "b")
    one_line_error(code, err, "takes ['N', 3, 32, 32]")
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((4, 3, 32, 32), np.float32), y=np.array([0, 3, 12, 1], np.int64))
    code, err = cli("bench", model, "--device", "local-cpu-ort", "--data", labels, "--out", tmp_path / "b")
    one_line_error(code, err, "labels up to 12")
    assert not (tmp_path / "b").exists()


@needs_data
def test_prune_out_of_range_labels(tmp_path):
    code, err = cli("prune", "cifar_resnet20", "--num-classes", "5", "--keep", "6", "--calib-batches", "1",
                    "--batch-size", "16", "--out", tmp_path / "o")
    one_line_error(code, err, "--num-classes 10")


def test_outputs_follow_the_umask(tmp_path):
    from benchmarks.board.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "o") as tmp:
            (tmp / "sub").mkdir()
            fd = os.open(tmp / "secret-style", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors writes
            os.close(fd)
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "o" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "o" / "secret-style").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_trtexec_script_fails_when_trtexec_fails(tmp_path):
    """The generated build script must not let `| tee` hide trtexec's exit status."""
    import subprocess

    model = make_cnn(tmp_path / "m.onnx")
    out = tmp_path / "trt"
    code, err = cli("compile", model, "--backend", "tensorrt", "--precision", "fp16", "--trtexec-only",
                    "--trt-version", "10.3", "--out", out)
    assert code == 0, err
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "trtexec").write_text("#!/bin/sh\necho 'trtexec: cannot build'\nexit 3\n")
    (fake / "trtexec").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "trtexec_build.sh"], cwd=out, capture_output=True, text=True, env=env)
    assert r.returncode == 3 and "cannot build" in (out / "trtexec.log").read_text()


def test_a_calibration_batch_that_cannot_fit_in_memory_is_refused_first():
    import torch

    from sglp_edge.models.registry import load_model
    from sglp_edge.pipeline.calibration import check_memory

    lm = load_model("cifar_resnet20")
    small = (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    check_memory(lm, small, 16)  # fits
    with pytest.raises(UserError, match=r"needs about .* GiB .* use --batch-size \d+"):
        check_memory(lm, small, 10**9)
