"""The one-command pipeline on a small CIFAR ResNet-20 with real Fashion-MNIST data, real ONNX
Runtime and OpenVINO: every stage, report.json / report.html, skip-on-rerun and resume."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.board.errors import UserError
from sglp_edge.pipeline.config import load_config
from sglp_edge.pipeline.run import Pipeline

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")

CFG = {
    "name": "t", "model": "cifar_resnet20", "data": "fashion-mnist",
    "prune": {"keep": 6, "calib_batches": 2, "batch_size": 32},
    "finetune": {"steps": 6, "batch_size": 32, "lr": 0.02},
    "eval": {"samples": 128, "calib_samples": 100},
    "devices": ["local-cpu-ort", "local-cpu-openvino"],
    "bench": {"min_duration_s": 0.2, "min_iters": 10, "warmup_s": 0.1, "batch_sizes": [1]},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    (d / "run.yaml").write_text(yaml.safe_dump(CFG))
    rep = Pipeline(load_config(d / "run.yaml"), d / "run", log=lambda m: None).run()
    return d, rep


def test_all_stages_and_report(run_dir):
    d, rep = run_dir
    run = d / "run"
    assert rep["stages"]["ran"] == ["prune", "finetune", "eval_data", "export", "compile-onnxruntime-fp32",
                                    "bench-local-cpu-ort", "compile-openvino-fp32", "bench-local-cpu-openvino"]
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["prune"]["n_units_after"] == 6
    assert [t["device"] for t in on_disk["targets"]] == ["local-cpu-ort", "local-cpu-openvino"]
    for t in on_disk["targets"]:
        assert {c["metric"] for c in t["constraints"]} >= {"latency_p90_ms", "accuracy_drop_pct", "model_size_mb"}
        for c in t["constraints"]:
            assert c["measured"] is not None
            assert c["passed"] == ((c["measured"] <= c["limit"]) if c["op"] == "<=" else (c["measured"] >= c["limit"]))
        for which in ("original", "pruned"):
            r = t["results"][which]
            assert r["latency_ms"]["p50"] > 0 and len(r["raw_ms"]) >= 10
            assert r["agreement"] >= 99.0  # fp32 artifact agrees with PyTorch on held-out images
        # the pruned artifact is smaller than the original one
        assert t["results"]["pruned"]["size_mb"] < t["results"]["original"]["size_mb"]
    assert on_disk["passed"] == all(t["passed"] for t in on_disk["targets"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" and s["files"] for s in manifest["stages"].values())
    html = (run / "report.html").read_text()
    assert "id='constraints'" in html and html.count("<img class='plot'") >= 3


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed (scripts/system-deps.sh)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from sglp_edge.report.check import check_report

    d, _ = run_dir
    info = check_report(d / "run" / "report.html", screenshot=tmp_path / "shot.png")
    assert info["constraint_rows"] == 8 and info["result_rows"] == 4  # 2 devices x 4 constraints; 2 x (orig, pruned)
    assert {p["id"] for p in info["plots"]} == {"plot-cka", "plot-units", "plot-latency", "plot-acc-latency"}
    assert info["ok"] and (tmp_path / "shot.png").stat().st_size > 10_000


def test_rerun_skips_and_a_damaged_stage_reruns_alone(run_dir):
    d, _ = run_dir
    run = d / "run"
    rep = Pipeline(load_config(d / "run.yaml"), run, log=lambda m: None).run()
    assert rep["stages"]["ran"] == []
    # tamper with one compiled artifact: only that stage and the benchmark that consumed it re-run
    xml = run / "compile-openvino-fp32" / "pruned" / "model.xml"
    xml.write_text(xml.read_text() + "\n")
    rep = Pipeline(load_config(d / "run.yaml"), run, log=lambda m: None).run()
    ran = rep["stages"]["ran"]
    assert ran[0] == "compile-openvino-fp32"
    assert set(ran) <= {"compile-openvino-fp32", "bench-local-cpu-openvino"}  # nothing upstream, no other device
    assert json.loads((run / "manifest.json").read_text())["stages"]["compile-openvino-fp32"]["status"] == "done"


def test_killed_run_resumes_at_the_unfinished_stage(run_dir, tmp_path):
    d, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(d / "run", run)
    # a run killed during the ORT benchmark: its stage never finished
    m = json.loads((run / "manifest.json").read_text())
    m["stages"]["bench-local-cpu-ort"] = {"status": "running"}
    (run / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(run / "bench-local-cpu-ort")
    rep = Pipeline(load_config(d / "run.yaml"), run, log=lambda m: None).run()
    assert rep["stages"]["ran"] == ["bench-local-cpu-ort"]


def test_config_errors_are_one_line(tmp_path):
    bad = dict(CFG, prune={"keep": 6, "target_macs": 0.5})
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="exactly one of prune.keep or prune.target_macs"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(dict(CFG, prune={"keep": 6, "kep": 3})))
    with pytest.raises(UserError, match="prune.kep"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_exit_code_follows_constraints(run_dir, tmp_path):
    """A profile with an impossible latency limit makes `sglp-edge run` exit 1, with the table."""
    d, _ = run_dir
    prof = yaml.safe_load((Path(__file__).parents[1] / "devices" / "local-cpu-ort.yaml").read_text())
    prof["name"] = "impossible-cpu"
    prof["constraints"] = [{"metric": "latency_p50_ms", "op": "<=", "limit": 0.000001}]
    devdir = tmp_path / "devs"
    devdir.mkdir()
    (devdir / "impossible-cpu.yaml").write_text(yaml.safe_dump(prof))
    shutil.copytree(d / "run", tmp_path / "run")
    cfg = dict(CFG, devices=["impossible-cpu"])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**__import__("os").environ, "SGLP_EDGE_DEVICES": str(devdir)}
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "run", "--config", str(tmp_path / "run.yaml"),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "FAIL" in p.stdout and "latency_p50_ms" in p.stdout
    assert "skip" in p.stderr  # earlier stages were reused


def test_every_prune_config_field_reaches_the_prune_job():
    import dataclasses

    from sglp_edge.pipeline.config import PruneSection
    from sglp_edge.pipeline.prune_job import PruneJob

    assert set(PruneSection.model_fields) <= {f.name for f in dataclasses.fields(PruneJob)}


def test_the_shipped_default_config_validates():
    from sglp_edge.pipeline.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    assert cfg.model == "default" and cfg.prune.keep and cfg.devices


def test_jetson_without_a_board_ends_with_finish_on_board(run_dir, tmp_path):
    """A TensorRT device and no --host: everything the host can do lands in the run folder, the
    report says "not measured: needs the board", and the run exits 3 with the command that finishes it."""
    d, _ = run_dir
    shutil.copytree(d / "run", tmp_path / "run")
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "run", "--config", str(d / "run.yaml"),
                        "--device", "jetson-orin-nano", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 3, p.stderr[-3000:]
    run = tmp_path / "run"
    comp = run / "compile-tensorrt-fp16" / "pruned"
    assert (comp / "model.onnx").is_file() and (comp / "trt_op_check.json").is_file()
    script = (comp / "trtexec_build.sh").read_text()
    assert "trtexec --onnx=model.onnx" in script and "--fp16" in script
    assert "--minShapes=" in script and "--optShapes=" in script and "--maxShapes=" in script
    assert '"--timingCacheFile=$TIMING_CACHE"' in script and "$HOME/.cache/sglp-edge/tensorrt" in script
    assert not (comp / "model.engine").exists()  # never built on the workstation
    for which in ("original", "pruned"):
        assert (run / "bench-jetson-orin-nano" / f"bundle-{which}.tar.gz").stat().st_size > 0
    rep = json.loads((run / "report.json").read_text())
    t = rep["targets"][0]
    assert rep["passed"] is None and rep["verdict"] == "not measured: needs the board"
    assert t["needs_board"] and all(c["passed"] is None and c["note"] == "not measured: needs the board"
                                    for c in t["constraints"])
    assert "all constraints met" not in (run / "report.html").read_text()
    assert "--host USER@BOARD" in p.stdout and "--device jetson-orin-nano" in p.stdout
    assert "every measured constraint is met" not in p.stdout + p.stderr


@pytest.mark.slow  # minutes: two models through the aarch64 runtime under emulation
@pytest.mark.skipif(not __import__("sglp_edge.targets.arm64_env", fromlist=["x"]).ready(("onnxruntime",)),
                    reason="emulated ARM board not set up: run `python benchmarks/experiments/arm_emulated.py` once")
def test_emulated_arm_device_completes_with_latency_marked_emulated(run_dir, tmp_path):
    d, _ = run_dir
    shutil.copytree(d / "run", tmp_path / "run")
    cfg = dict(CFG, bench={**CFG["bench"], "max_eval": 24, "eval_batch": 8})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "run", "--config", str(tmp_path / "run.yaml"),
                        "--device", "raspberry-pi-5", "--emulate", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    t = rep["targets"][0]
    assert t["target"]["kind"] == "emulated" and t["target"]["emulator"] == "qemu-aarch64"
    cons = {c["metric"]: c for c in t["constraints"]}
    assert cons["latency_p90_ms"]["passed"] is None and "emulated" in cons["latency_p90_ms"]["note"]
    assert cons["accuracy_drop_pct"]["measured"] is not None  # accuracy on the ARM runtime is held
    doc = json.loads((tmp_path / "run" / "bench-raspberry-pi-5_at_emulated" / "pruned" / "result.json").read_text())
    assert doc["env"]["machine"] == "aarch64" and doc["accuracy"]["agreement"]["top1_agreement_pct"] >= 99.0
    assert p.returncode == (1 if any(c["passed"] is False for c in t["constraints"]) else 0)
