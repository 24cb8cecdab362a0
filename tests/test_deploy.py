"""``sglp-edge deploy`` against the REAL local sshd "board" (tests/test_remote_ssh.py's fixture):
hash-verified atomic install, previous version kept for rollback, an interrupted copy leaves the
running version in place, the minimal runner answers on the board, failed artifacts are refused.
The same on the emulated ARM board (its python is the aarch64 build under qemu) when set up."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.board.errors import UserError
from onnx_models import make_cnn
from sglp_edge.targets.deploy import deploy, pack, pick_release, rollback, run_in_place
from sglp_edge.targets.ssh_transport import SSHTarget
from test_remote_ssh import sshd  # noqa: F401  (the real sshd fixture)

DEVICE = "raspberry-pi-5"


def make_run(d: Path, passed=True, seed=0) -> Path:
    comp = d / "compile-onnxruntime-fp32" / "pruned"
    comp.mkdir(parents=True, exist_ok=True)
    make_cnn(comp / "model.onnx", seed=seed)
    (comp / "manifest.json").write_text(json.dumps({"backend": {"name": "onnxruntime"}}))
    cons = [{"metric": "latency_p90_ms", "op": "<=", "limit": 25, "measured": 3.0, "passed": passed},
            {"metric": "accuracy_drop_pct", "op": "<=", "limit": 1.5, "measured": 0.2, "passed": True}]
    (d / "report.json").write_text(json.dumps({"targets": [{
        "device": DEVICE, "backend": "onnxruntime", "precision": "fp32", "measured": passed is not None,
        "compile": {"stage": "compile-onnxruntime-fp32"}, "constraints": cons,
        "results": {"pruned": {"accuracy": {"top1": 91.0}}}}]}))
    return d


def board(sshd, python=sys.executable) -> SSHTarget:  # noqa: F811
    return SSHTarget(host=sshd["host"], port=sshd["port"], identity=str(sshd["key"]),
                     known_hosts=str(sshd["known_hosts"]), ssh_config="/dev/null", python=python, connect_timeout_s=5)


def test_deploy_verify_keep_previous_and_rollback(sshd, tmp_path):  # noqa: F811
    to = str(tmp_path / "board" / "model")
    r1 = deploy(pick_release(make_run(tmp_path / "run1"), DEVICE), board(sshd), to)
    cur = Path(to) / "current"
    assert cur.is_symlink() and (cur / "model.onnx").is_file() and (cur / "run_model.py").is_file()
    assert json.loads((cur / "eval.json").read_text())["verdict"] == "passed every constraint"
    assert r1["runner"]["runtime"] == "onnxruntime" and r1["runner"]["output_shape"] == [1, 10]
    assert r1["runner"]["finite"]
    first = (cur / "model.onnx").read_bytes()
    r2 = deploy(pick_release(make_run(tmp_path / "run2", seed=1), DEVICE), board(sshd), to, check=False)
    assert r2["release"] != r1["release"] and (cur / "model.onnx").read_bytes() != first
    assert (Path(to) / "previous" / "model.onnx").read_bytes() == first  # kept for --rollback
    assert sorted(p.name for p in (Path(to) / "releases").iterdir()) == sorted([r1["release"], r2["release"]])
    rollback(board(sshd), to)
    assert (cur / "model.onnx").read_bytes() == first
    assert run_in_place(board(sshd), to)["output_shape"] == [1, 10]  # the runner answers in place


def test_interrupted_or_corrupted_copy_leaves_the_running_version(sshd, tmp_path):  # noqa: F811
    to = str(tmp_path / "board" / "model")
    good = pick_release(make_run(tmp_path / "run1"), DEVICE)
    deploy(good, board(sshd), to, check=False)
    cur = Path(to) / "current"
    before = (cur.resolve(), (cur / "model.onnx").read_bytes())
    new = pick_release(make_run(tmp_path / "run2", seed=1), DEVICE)
    data, _ = pack(new)
    with pytest.raises(UserError, match="keeps its current version"):
        deploy(new, board(sshd), to, payload=data[: len(data) // 2], check=False)  # the link died mid-copy
    # same files, one byte changed in the model but the sums of the original: caught on the board
    src = tarfile.open(fileobj=io.BytesIO(data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m in src.getmembers():
            blob = src.extractfile(m).read()
            if m.name == "model.onnx":
                blob = blob[:-1] + bytes([blob[-1] ^ 1])
            out.addfile(m, io.BytesIO(blob))
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        deploy(new, board(sshd), to, payload=buf.getvalue(), check=False)
    assert (cur.resolve(), (cur / "model.onnx").read_bytes()) == before
    assert not list(Path(to).glob(".incoming.*"))  # no half-copied release left behind


def test_failed_or_unmeasured_artifacts_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"refusing .* FAILED latency_p90_ms .*--force"):
        pick_release(make_run(tmp_path / "bad", passed=False), DEVICE)
    with pytest.raises(UserError, match="not measured"):
        pick_release(make_run(tmp_path / "nm", passed=None), DEVICE)
    rel = pick_release(make_run(tmp_path / "bad2", passed=False), DEVICE, force=True)
    assert rel.verdict.startswith("FAILED") and rel.eval_doc["forced"]
    with pytest.raises(UserError, match="no results for device 'jetson-orin-nano'"):
        pick_release(tmp_path / "bad", "jetson-orin-nano")


def test_cli_refuses_a_failed_artifact_before_connecting(tmp_path):
    run = make_run(tmp_path / "bad", passed=False)
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "deploy", str(run), "--device", DEVICE,
                        "--host", "pi@192.0.2.1", "--to", "/opt/model"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "refusing to deploy" in p.stderr and p.stderr.count("\n") == 1


def test_deploy_to_the_emulated_arm_board(sshd, tmp_path):  # noqa: F811
    from sglp_edge.targets import arm64_env

    if not arm64_env.ready(("onnxruntime",)):
        pytest.skip("emulated ARM board not set up here: run `python benchmarks/experiments/arm_emulated.py` once")
    arm_python = str(arm64_env.cache_root() / "bin" / "python3")
    to = str(tmp_path / "pi" / "model")
    res = deploy(pick_release(make_run(tmp_path / "run"), DEVICE), board(sshd, python=arm_python), to)
    assert res["runner"]["machine"] == "aarch64" and res["runner"]["runtime"] == "onnxruntime"
    assert res["runner"]["output_shape"] == [1, 10] and res["runner"]["finite"]
