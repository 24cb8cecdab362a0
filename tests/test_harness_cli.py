"""`sglp-edge bench` run locally (the benchmark itself runs in a child process, as on a board)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_models import make_cnn
from sglp_edge.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import onnxruntime as ort

    d = tmp_path_factory.mktemp("cli")
    model = make_cnn(d / "tiny.onnx")
    x = np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    y = ref.argmax(1)
    y[:4] = (y[:4] + 1) % 10  # top-1 = 75 %
    np.savez(d / "eval.npz", x=x, y=y, ref_logits=ref, baseline_top1=np.array(76.0))
    prof = d / "fast-cpu.yaml"
    prof.write_text(
        "# One profile = one backend\narch: x86_64\nbackend: onnxruntime\nthreads: 1\n"
        "inputs: [{shape: [1, 3, 32, 32]}]\n"
        "bench: {warmup_s: 0.05, min_iters: 5, min_duration_s: 0.2, batch_sizes: [1, 4], eval_batch: 4}\n"
        "constraints: ['latency_p90_ms <= 1000', 'accuracy_drop_pct <= 1.5', 'model_size_mb <= 5', 'energy_mj <= 3']\n")
    tight = d / "tight-cpu.yaml"
    tight.write_text(prof.read_text().replace("accuracy_drop_pct <= 1.5", "accuracy_drop_pct <= 0.5"))
    return {"dir": d, "model": model, "data": d / "eval.npz", "profile": prof, "tight": tight}


def invoke(*args: str):
    return CliRunner().invoke(app, ["bench", *args])


def test_local_bench_reports_constraint_by_constraint(setup, tmp_path):
    res = invoke(str(setup["model"]), "--device", str(setup["profile"]), "--data", str(setup["data"]),
                 "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "latency_p90_ms <= 1000" in out and "pass" in out and "not measured" in out
    assert "fast-cpu: meets every measured constraint; not measured: energy_mj" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    b = summary["boards"][0]
    assert b["where"] == "local" and b["ok"]
    verdicts = {c["metric"]: c["passed"] for c in b["constraints"]}
    assert verdicts == {"latency_p90_ms": True, "accuracy_drop_pct": True, "model_size_mb": True, "energy_mj": None}
    assert b["metrics"]["top1_pct"] == 75.0 and b["metrics"]["accuracy_drop_pct"] == pytest.approx(1.0)
    doc = json.loads((tmp_path / "o" / "fast-cpu" / "result.json").read_text())
    assert [e["batch_size"] for e in doc["latency"]] == [1, 4]
    assert doc["runtime"]["threads_used"] == 1


def test_failed_constraint_exits_1_and_strict_counts_not_measured(setup, tmp_path):
    res = invoke(str(setup["model"]), "--device", str(setup["tight"]), "--data", str(setup["data"]),
                 "--out", str(tmp_path / "o"))
    assert res.exit_code == 1
    assert "FAIL" in res.output and "does NOT meet its target" in res.output
    res = invoke(str(setup["model"]), "--device", str(setup["profile"]), "--data", str(setup["data"]),
                 "--out", str(tmp_path / "o2"), "--strict", "--batch-sizes", "1")
    assert res.exit_code == 1  # energy_mj was not measured here


@pytest.mark.parametrize(
    "args,needle",
    [
        (["nope.onnx", "--device", "local-cpu"], "error: artifact not found"),
        (["{model}", "--device", "no-such-board"], "error: no device profile named 'no-such-board'"),
        (["{model}", "--device", "local-cpu-ort", "--data", "missing.npz"], "error: eval data not found"),
        (["{model}", "--device", "intel-core-cpu", "--host", "a@b", "--port", "0"], "error: bad SSH port 0"),
        (["{model}"], "error: give a device profile with --device"),
        (["{model}", "--device", "local-cpu", "--host", "-oProxyCommand=x"], "error: bad host"),
        (["{model}", "--device", "local-cpu", "--host", "a@b", "--identity", "/no/key"], "identity file not found"),
    ],
)
def test_usage_errors_exit_2_with_one_line(setup, tmp_path, args, needle):
    args = [a.replace("{model}", str(setup["model"])) for a in args]
    res = invoke(*args, "--out", str(tmp_path / "o"))
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert len([l for l in res.output.splitlines() if l.startswith("error:")]) == 1
    assert not (tmp_path / "o" / "summary.json").exists()


def test_wrong_shape_data_is_refused_before_the_latency_pass(setup, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 3, 16, 16), np.float32), y=np.zeros(2, np.int64))
    res = invoke(str(setup["model"]), "--device", str(setup["profile"]), "--data", str(bad),
                 "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "takes ['N', 3, 32, 32]" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()  # nothing ran


def test_a_failing_local_run_keeps_partial_results(setup, tmp_path):
    bad = tmp_path / "bad.npz"  # right inputs, but reference logits of the wrong width: fails after the latency pass
    np.savez(bad, x=np.zeros((2, 3, 32, 32), np.float32), y=np.zeros(2, np.int64), logits=np.zeros((2, 7), np.float32))
    res = invoke(str(setup["model"]), "--device", str(setup["profile"]), "--data", str(bad),
                 "--out", str(tmp_path / "o"))
    assert res.exit_code == 1, res.output
    part = json.loads((tmp_path / "o" / "fast-cpu" / "result.partial.json").read_text())
    assert part["status"] == "failed" and part["metrics"]["latency_p50_ms"] > 0
    assert (tmp_path / "o" / "fast-cpu" / "stderr.log").read_text().strip().startswith("error:")


def test_list_devices():
    res = invoke("--list-devices")
    assert res.exit_code == 0
    for n in ("jetson-orin-nano", "raspberry-pi-5", "local-cpu-openvino"):
        assert n in res.output


def test_board_side_packages_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import benchmarks, benchmarks.board.harness, benchmarks.board.runners, benchmarks.board.accuracy, benchmarks.board.tegrastats, "
            "benchmarks.board.runner_openvino, benchmarks.board.runner_onnxruntime, benchmarks.board.runner_tensorrt, "
            "benchmarks.board.run_bench, benchmarks.board.trt_build, benchmarks.experiments.harness_fidelity, benchmarks.board.atomic, "
            "benchmarks.board.errors, benchmarks.board.tensorrt_engine, benchmarks.board.tensorrt_plan\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
