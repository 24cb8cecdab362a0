"""Targets: local, SSH board, emulated ARM board (the aarch64 runtimes under qemu-aarch64).

The emulated checks are real: the board harness runs in an aarch64 Python with the ARM build of
ONNX Runtime under QEMU. They need the set-up cached in ~/.cache/sglp-edge/arm64 (made once by
``sglp-edge bench --emulate`` or ``python benchmarks/experiments/arm_emulated.py``, about half a minute) and
skip with that reason when it is absent; the set-up from scratch is the ``slow`` test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.board.errors import UserError
from onnx_models import make_cnn
from sglp_edge.profiles.schema import DeviceProfile
from sglp_edge.targets import arm64_env
from sglp_edge.targets.base import EMULATION_NOT_HELD, BenchJob, held_constraints
from sglp_edge.targets.factory import make_target

ARM = DeviceProfile.model_validate({
    "name": "arm-test", "arch": "aarch64", "backend": "onnxruntime", "threads": 1,
    "inputs": [{"shape": [1, 3, 32, 32]}],
    "bench": {"warmup_s": 0.0, "min_iters": 2, "min_duration_s": 0.0, "batch_sizes": [1], "eval_batch": 8},
    "constraints": ["latency_p90_ms <= 0.001", "accuracy_drop_pct <= 1.5", "model_size_mb <= 5",
                    "peak_memory_mb <= 1"],
})
needs_arm = pytest.mark.skipif(not arm64_env.ready(("onnxruntime",)),
                               reason="emulated ARM board not set up here: run `python benchmarks/experiments/arm_emulated.py` "
                                      "or `sglp-edge bench --emulate` once, or `make arm64-env`")


def _eval(model: Path, path: Path, n: int = 16) -> Path:
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((n, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(path, x=x, y=ref.argmax(1).astype(np.int64), logits=ref, baseline_top1=np.float64(100.0))
    return path


def test_emulated_latency_and_memory_are_never_held():
    m = {"latency_p90_ms": 500.0, "accuracy_drop_pct": 0.2, "model_size_mb": 9.0, "peak_memory_mb": 300.0}
    emu = {r.metric: r for r in held_constraints(ARM, m, emulated=True)}
    real = {r.metric: r for r in held_constraints(ARM, m, emulated=False)}
    assert real["latency_p90_ms"].passed is False and real["peak_memory_mb"].passed is False
    for k in ("latency_p90_ms", "peak_memory_mb"):
        assert k in EMULATION_NOT_HELD
        assert emu[k].passed is None and emu[k].measured is None and emu[k].note.startswith("not measured: emulated")
    assert emu["accuracy_drop_pct"].passed is True  # accuracy on the ARM build is held
    assert emu["model_size_mb"].passed is False  # so is the artifact's size


def test_make_target_kinds_and_contradictions():
    assert make_target(ARM).kind == "local"
    t = make_target(ARM, emulate=True)
    assert t.kind == "emulated" and t.emulated and t.describe()["where"] == "emulated:qemu-aarch64"
    assert make_target(ARM.model_copy(update={"emulate": "qemu-aarch64"})).emulated  # from the profile
    with pytest.raises(UserError, match="contradict"):
        make_target(ARM, host="u@board", emulate=True)
    with pytest.raises(UserError, match="unknown emulator"):
        make_target(ARM, emulate="qemu-riscv64")
    x86 = ARM.model_copy(update={"arch": "x86_64", "name": "x86"})
    with pytest.raises(UserError, match="aarch64 boards only"):
        make_target(x86, emulate=True)


def test_tensorrt_has_no_emulated_runtime():
    t = make_target(ARM.model_copy(update={"backend": "tensorrt"}), emulate=True)
    with pytest.raises(UserError, match="no aarch64 build that runs under emulation"):
        t.prepare("tensorrt")


def test_setup_failure_is_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no aarch64 build is known for runtime 'tflite'"):
        arm64_env.ensure(("tflite",), root=tmp_path)
    # a version PyPI does not have: pip fails, the error names the step and the fix, nothing half-made
    with pytest.raises(UserError) as e:
        arm64_env.install_wheels(tmp_path, "numpy", "0.0.0.1")
    msg = str(e.value)
    assert "\n" not in msg and "pip download" in msg and "aarch64" in msg
    assert not (tmp_path / "site" / "numpy").exists()


@needs_arm
def test_emulated_board_runs_the_harness_on_the_arm_runtime(tmp_path):
    model = make_cnn(tmp_path / "tiny.onnx")
    data = _eval(model, tmp_path / "eval.npz")
    target = make_target(ARM, emulate=True)
    run = target.bench(BenchJob(artifact=model, data=data, profile=ARM, out_dir=tmp_path / "out"))
    assert run.ok, run.error
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["env"]["machine"] == "aarch64"  # the harness really ran on the ARM build
    assert doc["target"]["kind"] == "emulated" and doc["target"]["qemu_cpu"] == "neoverse-n1"
    assert doc["target"]["aarch64_versions"]["onnxruntime"] == arm64_env.host_version("onnxruntime")
    agr = doc["accuracy"]["agreement"]
    assert agr["top1_agreement_pct"] == 100.0 and agr["max_abs_diff"] < 1e-4  # vs host ORT x86
    assert "latency_p90_ms" in doc["emulated_metrics"]
    cons = {c.metric: c for c in target.constraints(ARM, doc["metrics"])}
    assert cons["latency_p90_ms"].passed is None  # 0.001 ms would fail: emulated latency is not held


@pytest.mark.slow
def test_emulated_setup_from_scratch(tmp_path):
    info = arm64_env.ensure(("onnxruntime",), root=tmp_path / "arm64")
    assert Path(info["python"]).is_file() and info["versions"]["onnxruntime"] == arm64_env.host_version("onnxruntime")
    import subprocess

    out = subprocess.run([info["python"], "-c", "import platform, onnxruntime; print(platform.machine())"],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "aarch64", out.stderr
    again = arm64_env.ensure(("onnxruntime",), root=tmp_path / "arm64")
    assert again["setup_s"] < 5  # cached: nothing is fetched twice


@pytest.mark.slow  # the fast real check is test_emulated_board_runs_the_harness_on_the_arm_runtime
@needs_arm
def test_bench_cli_emulate(tmp_path):
    from typer.testing import CliRunner

    from sglp_edge.cli import app

    model = make_cnn(tmp_path / "tiny.onnx")
    data = _eval(model, tmp_path / "eval.npz", n=8)
    res = CliRunner().invoke(app, ["bench", str(model), "--device", "raspberry-pi-5", "--emulate", "--data", str(data),
                                   "--out", str(tmp_path / "o"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    b = json.loads((tmp_path / "o" / "summary.json").read_text())["boards"][0]
    assert b["target"]["kind"] == "emulated" and b["metrics"]["top1_pct"] == 100.0
    verdicts = {c["metric"]: (c["passed"], c["note"]) for c in b["constraints"]}
    assert verdicts["latency_p90_ms"][0] is None and "emulated" in verdicts["latency_p90_ms"][1]
    assert verdicts["model_size_mb"] == (True, "")
    assert "not measured: emulated" in " ".join(res.output.split())
    # an x86 profile cannot be emulated
    res = CliRunner().invoke(app, ["bench", str(model), "--device", "local-cpu-ort", "--emulate"])
    assert res.exit_code == 2 and "aarch64" in res.output


def test_run_emulate_checks_the_devices_before_any_work(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for dev, why in (("local-cpu-ort", "x86_64 / onnxruntime"), ("jetson-orin-nano", "aarch64 / tensorrt")):
        p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "run", "--config", str(root / "configs" / "default.yaml"),
                            "--device", dev, "--emulate", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and why in p.stderr and p.stderr.count("\n") == 1
        assert not (tmp_path / "r").exists()
