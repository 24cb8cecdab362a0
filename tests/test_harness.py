"""Benchmark harness: timing core, stats, memory, environment, runners (REAL onnxruntime and
OpenVINO), accuracy/perplexity/agreement, and the on-board entry point run as a subprocess."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import benchmarks.board.accuracy as acc
from benchmarks.board.calib import load_eval_npz
from benchmarks.board.harness import MeasureConfig, capture_env, latency_stats, measure, peak_memory
from benchmarks.board.runner_base import UnsupportedBatch, parse_shape, random_feeds
from benchmarks.board.runner_onnxruntime import OnnxRuntimeRunner
from benchmarks.board.runner_openvino import OpenVINORunner
from benchmarks.board.runners import open_runner
from benchmarks.board.errors import UserError
from onnx_models import make_cnn

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# tiny artifacts built here (no torch needed)
# ---------------------------------------------------------------------------------------------


def make_lm(path: Path, vocab: int = 7, seq: int = 6, seed: int = 1) -> tuple[Path, np.ndarray]:
    """input_ids[B,seq] (int64) -> Gather(table[vocab,vocab]) -> logits[B,seq,vocab]: a bigram LM."""
    table = np.random.default_rng(seed).standard_normal((vocab, vocab)).astype(np.float32)
    t = numpy_helper.from_array(table, "T")
    g = helper.make_graph([helper.make_node("Gather", ["T", "input_ids"], ["logits"], axis=0)], "bigram",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", seq])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", seq, vocab])], [t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path, table


def to_ir(onnx_path: Path, xml: Path) -> Path:
    import openvino as ov

    # keep fp32 weights (save_model compresses them to fp16 by default)
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    dyn = make_cnn(d / "cnn_dyn.onnx")
    static = make_cnn(d / "cnn_b1.onnx", batch=1)
    xml = to_ir(dyn, d / "cnn.xml")
    return {"dyn": dyn, "static": static, "xml": xml, "dir": d}


@pytest.fixture(scope="module")
def eval_npz(models):
    """64 samples; labels = the model's own argmax with 8 of them deliberately wrong."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    with OnnxRuntimeRunner(models["dyn"], threads=1) as r:
        r.set_batch(64)
        ref = r.infer({"x": x})[0]
    y = ref.argmax(1).copy()
    y[:8] = (y[:8] + 1) % 10
    path = models["dir"] / "eval.npz"
    np.savez(path, x=x, y=y, ref_logits=ref, baseline_top1=np.array(90.0))
    return path


# ---------------------------------------------------------------------------------------------
# timing core
# ---------------------------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when the timed function "runs" (``step_ns`` per call): what measure()
    decides from its timings is checked exactly, whatever the machine's load."""

    def __init__(self, step_ns: int):
        self.now, self.step_ns, self.calls = 0, step_ns, 0

    def __call__(self) -> int:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.now += self.step_ns


def test_measure_needs_both_min_iterations_and_min_duration():
    fast = FakeClock(1_000_000)  # 1 ms per call: 200 calls reach the 0.2 s minimum, well past min_iters 5
    m = measure(fast.fn, MeasureConfig(warmup_s=0.05, min_iters=5, min_duration_s=0.2), clock=fast)
    assert m.times_ns == [1_000_000] * 200 and m.wall_s == 0.2  # duration was the binding limit
    assert m.warmup_iters == 50 and fast.calls == 250

    slow = FakeClock(10_000_000)  # 10 ms per call: 15 calls are 0.15 s, past the 0.01 s minimum
    m = measure(slow.fn, MeasureConfig(warmup_s=0.0, min_iters=15, min_duration_s=0.01), clock=slow)
    assert m.times_ns == [10_000_000] * 15  # count was the binding limit
    assert m.warmup_iters == 1  # warm-up always runs at least once


def test_warmup_is_by_time():
    c = FakeClock(2_000_000)  # 2 ms per call: 0.1 s of warm-up is 50 calls
    m = measure(c.fn, MeasureConfig(warmup_s=0.1, min_iters=1, min_duration_s=0.0), clock=c)
    assert m.warmup_s == 0.1 and m.warmup_iters == 50 and len(m.times_ns) == 1


def test_measure_times_a_real_function_with_the_real_clock():
    """The default clock end to end: what holds for any load (each time is positive and the
    iterations add up to at most the wall time), no bound on a time."""
    m = measure(lambda: time.sleep(0.001), MeasureConfig(warmup_s=0.0, min_iters=5, min_duration_s=0.0))
    assert len(m.times_ns) == 5 and all(t > 0 for t in m.times_ns)
    assert sum(m.times_ns) / 1e9 <= m.wall_s and m.warmup_iters >= 1


def test_caps_stop_the_loop():
    c = FakeClock(1_000_000)  # 100 calls are 0.1 s: the iteration cap binds before the 5 s
    m = measure(c.fn, MeasureConfig(warmup_s=0, min_iters=1, min_duration_s=5.0, max_duration_s=5.0, max_iters=100),
                clock=c)
    assert len(m.times_ns) == 100
    c = FakeClock(100_000_000)  # 0.1 s per call: the 5 s duration cap binds before 100 iterations
    m = measure(c.fn, MeasureConfig(warmup_s=0, min_iters=1, min_duration_s=5.0, max_duration_s=5.0, max_iters=100),
                clock=c)
    assert len(m.times_ns) == 50 and m.wall_s == 5.0


def test_sync_before_every_clock_read():
    """GPU backends pass their stream synchronise: every timestamp must follow a sync."""
    events: list[str] = []
    ticks = iter(range(0, 10**12, 1000))

    def clock() -> int:
        events.append("clock")
        return next(ticks)

    m = measure(lambda: events.append("fn"), MeasureConfig(warmup_s=0, min_iters=20, min_duration_s=0),
                sync=lambda: events.append("sync"), clock=clock)
    assert len(m.times_ns) == 20
    first_fn = events.index("fn")
    # in the measured part, each clock read is immediately preceded by a sync
    loop = events[events.index("clock", first_fn):]
    for i, e in enumerate(loop):
        if e == "clock" and i > 0:
            assert loop[i - 1] == "sync", loop[max(0, i - 3): i + 1]
    assert events.count("fn") == m.warmup_iters + 20


def test_latency_stats_known_values():
    t = np.arange(1, 101, dtype=float)  # 1..100 ms
    s = latency_stats(t, batch_size=4)
    assert s["iterations"] == 100
    assert s["p50_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01) and s["min_ms"] == 1 and s["max_ms"] == 100
    assert s["mean_ms"] == pytest.approx(50.5) and s["std_ms"] == pytest.approx(29.011491975882016)
    assert s["throughput_items_per_s"] == pytest.approx(4 * 100 / 5.050)  # 5050 ms total
    with pytest.raises(ValueError):
        latency_stats([])


def test_measure_config_validation_is_a_user_error():
    with pytest.raises(UserError, match="min iterations"):
        MeasureConfig(min_iters=0).validate()
    with pytest.raises(UserError, match="max duration"):
        MeasureConfig(min_duration_s=3, max_duration_s=1).validate()


def test_peak_memory_sees_a_large_allocation():
    """In a fresh child process (as run_bench runs): the peak starts small even though this test
    process is large (ru_maxrss would inherit the parent's peak across fork+exec), and a 200 MiB
    allocation raises it."""
    import json
    import subprocess
    import sys

    code = ("import json, numpy as np; from benchmarks.board.harness import peak_memory; b = peak_memory(); "
            "x = np.ones(200 * (1 << 20) // 8); a = peak_memory(); print(json.dumps([b, a]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    before, after = json.loads(out.stdout)
    assert before["peak_rss_mb"] < 150
    assert after["peak_rss_mb"] >= before["peak_rss_mb"] + 150
    assert after["peak_rss_mb"] == after["vmhwm_mb"]


def test_environment_is_recorded():
    env = capture_env()
    assert env["cpu_model"] and env["numpy"] == np.__version__ and env["cpu_count"] >= 1
    assert env["machine"] in ("x86_64", "aarch64", "arm64", "AMD64")


# ---------------------------------------------------------------------------------------------
# runners: real onnxruntime and openvino
# ---------------------------------------------------------------------------------------------


def test_ort_and_openvino_agree_and_record_threads(models):
    x = random_feeds(OnnxRuntimeRunner(models["dyn"], threads=2).inputs, seed=5)
    with OnnxRuntimeRunner(models["dyn"], threads=2) as ort_r, \
            OpenVINORunner(models["xml"], threads=2, streams=1, precision="fp32") as ov_r:
        a = ort_r.infer(x)[0]
        b = ov_r.infer(x)[0]
        assert a.shape == b.shape == (1, 10)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        oi, vi = ort_r.info(), ov_r.info()
    assert oi["threads_used"] == 2 and oi["providers"] == ["CPUExecutionProvider"]
    assert vi["threads_used"] == 2 and vi["streams_used"] == 1
    assert vi["precision_used"] == "f32"  # read back from the compiled model
    assert vi["performance_hint"] == "LATENCY"


@pytest.mark.parametrize("backend,key", [("onnxruntime", "dyn"), ("openvino", "xml")])
def test_batch_sweep_and_timed_binding(models, backend, key):
    r = open_runner(backend, models[key], threads=1)
    try:
        for b in (1, 4):
            r.set_batch(b)
            fn = r.bind(random_feeds(r.inputs))
            m = measure(fn, MeasureConfig(warmup_s=0.02, min_iters=5, min_duration_s=0.05), sync=r.sync, batch_size=b)
            st = m.stats()
            assert st["iterations"] >= 5 and st["p50_ms"] > 0
            assert st["throughput_items_per_s"] == pytest.approx(b * st["throughput_batches_per_s"])
            assert r.infer(random_feeds(r.inputs))[0].shape == (b, 10)
    finally:
        r.close()


def test_static_batch_onnx_cannot_sweep_in_ort(models):
    r = OnnxRuntimeRunner(models["static"], threads=1)
    with pytest.raises(UnsupportedBatch, match="static batch"):
        r.set_batch(4)
    # OpenVINO reshapes the same static model (as benchmark_app -b does)
    v = OpenVINORunner(models["static"], threads=1)
    v.set_batch(4)
    assert v.infer(random_feeds(v.inputs))[0].shape == (4, 10)


def test_shape_errors_are_user_errors(models):
    with pytest.raises(UserError, match="fixed at"):
        OnnxRuntimeRunner(models["dyn"], input_shapes={"": [1, 3, 64, 64]})
    with pytest.raises(UserError, match="unknown input"):
        OnnxRuntimeRunner(models["dyn"], input_shapes={"nope": [1, 3, 32, 32]})
    with pytest.raises(UserError, match="positive"):
        parse_shape("1x0x3")
    with pytest.raises(UserError, match="lacks"):
        OnnxRuntimeRunner(models["dyn"], providers=["NoSuchExecutionProvider"])
    with pytest.raises(UserError, match="not found"):
        open_runner("openvino", models["dir"] / "missing.xml")


def test_tensorrt_missing_package_names_the_fix(models, tmp_path):
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        eng = tmp_path / "m.engine"
        eng.write_bytes(b"not an engine")
        with pytest.raises(UserError, match="tensorrt"):
            open_runner("tensorrt", eng)
    else:  # pragma: no cover - only on a TensorRT machine
        pytest.skip("TensorRT is installed here; the missing-package path cannot be exercised")


# ---------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------


def test_classification_top1_drop_and_agreement(models, eval_npz):
    data = load_eval_npz(eval_npz)
    with OpenVINORunner(models["xml"], threads=1) as r:
        res = acc.evaluate(r, data, batch_size=5, precision="fp32")  # 64 = 12*5 + 4: padded last batch
    assert res["samples"] == 64
    assert res["top1_pct"] == pytest.approx(100.0 * 56 / 64)  # 8 labels planted wrong
    assert res["reference_top1_pct"] == pytest.approx(100.0 * 56 / 64)
    assert res["accuracy_drop_pct"] == pytest.approx(90.0 - 100.0 * 56 / 64)
    ag = res["agreement"]
    assert ag["top1_agreement_pct"] == 100.0 and ag["allclose"] and ag["max_abs_diff"] < 1e-3
    assert ag["tolerance"] == {"rtol": 1e-3, "atol": 1e-3}


def test_agreement_detects_a_different_model(models, eval_npz, tmp_path):
    other = make_cnn(tmp_path / "other.onnx", seed=42)
    data = load_eval_npz(eval_npz)
    with OnnxRuntimeRunner(other, threads=1) as r:
        res = acc.evaluate(r, data, batch_size=16, precision="fp32")
    assert res["agreement"]["allclose"] is False
    assert res["agreement"]["top1_agreement_pct"] < 60


def test_perplexity_matches_a_direct_computation(tmp_path):
    lm, table = make_lm(tmp_path / "lm.onnx")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, size=(5, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[4, 3:] = 0  # padded tail of the last sequence
    np.savez(tmp_path / "lm.npz", input_ids=ids, attention_mask=mask, baseline_ppl=np.array(5.0))
    # the model has no attention_mask input: the npz carries it for the metric only
    data = load_eval_npz(tmp_path / "lm.npz")
    assert data.task == "lm"
    with OnnxRuntimeRunner(lm, threads=1) as r:
        res = acc.evaluate(r, data, batch_size=2)  # 5 = 2+2+1: padded last batch
    nll, n = 0.0, 0
    for row, mrow in zip(ids, mask):
        for t in range(5):
            if not (mrow[t] and mrow[t + 1]):
                continue
            logits = table[row[t]].astype(float)
            lse = math.log(sum(math.exp(v) for v in logits))
            nll += lse - logits[row[t + 1]]
            n += 1
    assert res["tokens"] == n == 22
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert res["ppl_increase_pct"] == pytest.approx(100 * (math.exp(nll / n) / 5.0 - 1), rel=1e-6)
    # mask handling in the metric itself
    s_all, c_all = acc.lm_nll(table[ids], ids)
    s_m, c_m = acc.lm_nll(table[ids], ids, mask)
    assert c_all == 25 and c_m == 22 and s_m < s_all


def test_exporters_npz_layout_is_accepted(models, tmp_path):
    """benchmarks/board/calib.py writes x / y / logits; token ids as integer x mean a language model."""
    x = np.random.default_rng(2).standard_normal((6, 3, 32, 32)).astype(np.float32)
    with OnnxRuntimeRunner(models["dyn"], threads=1) as r:
        r.set_batch(6)
        ref = r.infer({"x": x})[0]
        np.savez(tmp_path / "c.npz", x=x, y=ref.argmax(1), logits=ref)
        res = acc.evaluate(r, load_eval_npz(tmp_path / "c.npz"), batch_size=3)
    assert res["agreement"]["allclose"] and res["top1_pct"] == 100.0
    lm, _ = make_lm(tmp_path / "lm.onnx")
    np.savez(tmp_path / "t.npz", x=np.random.default_rng(0).integers(0, 7, (4, 6)))
    data = load_eval_npz(tmp_path / "t.npz")
    assert data.task == "lm"
    with OnnxRuntimeRunner(lm, threads=1) as r:
        assert acc.evaluate(r, data, batch_size=2)["tokens"] == 20


def test_bad_eval_data_is_a_user_error(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 2)), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(UserError, match="labels"):
        load_eval_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 2)))
    with pytest.raises(UserError, match="task"):
        load_eval_npz(tmp_path / "b.npz")
    (tmp_path / "c.npz").write_text("not a zip")
    with pytest.raises(UserError, match="npz"):
        load_eval_npz(tmp_path / "c.npz")


# ---------------------------------------------------------------------------------------------
# the on-board entry point, as a subprocess, with torch made unimportable
# ---------------------------------------------------------------------------------------------

NO_TORCH = ("import sys; sys.modules['torch'] = None; "
            "from benchmarks.board.run_bench import main; sys.exit(main(sys.argv[1:]))")


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=env)


def test_run_bench_end_to_end_without_torch(models, eval_npz, tmp_path):
    out = tmp_path / "res" / "result.json"
    p = run_bench("--artifact", str(models["xml"]), "--threads", "2", "--data", str(eval_npz),
                  "--batch-sizes", "1,4", "--warmup-s", "0.05", "--min-iters", "5", "--min-duration-s", "0.2",
                  "--eval-batch", "8", "--out", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["status"] == "complete" and doc["backend"] == "openvino"
    assert not (tmp_path / "res" / "result.partial.json").exists()
    assert [e["batch_size"] for e in doc["latency"]] == [1, 4]
    lat = doc["latency"][0]
    assert len(lat["raw_ms"]) == lat["iterations"] >= 5
    assert lat["p50_ms"] == pytest.approx(float(np.percentile(lat["raw_ms"], 50)), rel=1e-4)
    m = doc["metrics"]
    assert m["latency_p90_ms"] == lat["p90_ms"] and m["peak_memory_mb"] > 10
    assert m["model_size_mb"] == pytest.approx(sum(f.stat().st_size for f in (models["xml"], models["xml"].with_suffix(".bin"))) / 2**20)
    assert m["top1_pct"] == pytest.approx(87.5) and m["accuracy_drop_pct"] == pytest.approx(2.5)
    assert doc["runtime"]["threads_used"] == 2 and doc["runtime"]["precision_used"] == "f32"
    assert doc["env"]["cpu_model"] and doc["power"]["available"] is False
    assert "@@sglp-progress" in p.stdout


def test_run_bench_tensorrt_from_onnx_names_what_to_install(models, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "r.json"
    p = run_bench("--artifact", str(models["dyn"]), "--backend", "tensorrt", "--precision", "fp16", "--out", str(out))
    assert p.returncode == 2 and "error:" in p.stderr and "TensorRT" in p.stderr and "install" in p.stderr
    assert not out.exists()


def test_run_bench_user_errors_leave_no_result(models, tmp_path):
    out = tmp_path / "r.json"
    p = run_bench("--artifact", str(tmp_path / "nope.onnx"), "--out", str(out))
    assert p.returncode == 2 and p.stderr.strip().startswith("error: artifact not found")
    assert not out.exists()
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(4, np.int64))
    p = run_bench("--artifact", str(models["dyn"]), "--data", str(bad), "--min-duration-s", "0.05",
                  "--warmup-s", "0", "--out", str(out))
    assert p.returncode == 2 and "expects [3, 32, 32]" in p.stderr
    assert not out.exists()
    part = json.loads((tmp_path / "r.partial.json").read_text())
    assert part["status"] == "failed" and part["metrics"]["latency_p50_ms"] > 0  # finished stage kept


@pytest.mark.slow
def test_harness_fidelity_script_prints_its_summary_line_last():
    """Short version of `python benchmarks/experiments/harness_fidelity.py` (the real run uses -t 10, 3 rounds)."""
    import re

    p = subprocess.run([sys.executable, "benchmarks/experiments/harness_fidelity.py", "--duration", "2", "--rounds", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"fidelity openvino ours_p50_ms=([0-9.]+) benchmark_app_p50_ms=([0-9.]+) ratio=([0-9.]+)", last)
    assert m, last
    ours, theirs, ratio = map(float, m.groups())
    assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, rel=1e-3)
