"""TensorRT backend pieces that need no TensorRT: flag mapping per version, trtexec command line,
calibrator batching, the parsers (on real trtexec output, see tests/data/trtexec_SOURCES.md) and the
static operator check. Tests that need the library carry the ``tensorrt`` marker and skip without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters.tensorrt_compile as tc

import benchmarks.board.tensorrt_engine as te

import benchmarks.board.tensorrt_plan as tp

import benchmarks.board.trtexec_parse as tx
from exporters import trt_ops
from benchmarks.board.calib import CalibData
from benchmarks.board.errors import UserError

DATA = Path(__file__).parent / "data"
IMG = [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
TOK = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]


# --------------------------------------------------------------------------------- flag mapping
@pytest.mark.parametrize("major, precision, qdq, fp16graph, net, setf, clear, calib, variant", [
    (10, "fp32", False, False, [], [], ["TF32"], None, "source"),
    (10, "fp16", False, False, [], ["FP16"], [], None, "source"),
    # TensorRT 10 INT8: Q/DQ placed on the host, weakly typed with FP16 fallback (never strongly typed)
    (10, "int8", False, False, [], ["INT8", "FP16"], [], None, "qdq"),
    (10, "int8", True, False, [], ["INT8", "FP16"], [], None, "qdq"),
    (11, "fp32", False, False, ["STRONGLY_TYPED"], [], ["TF32"], None, "source"),
    (11, "fp16", False, False, ["STRONGLY_TYPED"], [], [], None, "fp16"),
    (11, "fp16", False, True, ["STRONGLY_TYPED"], [], [], None, "source"),
    (11, "int8", False, False, ["STRONGLY_TYPED"], [], [], None, "qdq"),
])
def test_plan_per_version(major, precision, qdq, fp16graph, net, setf, clear, calib, variant):
    p = tp.plan_build(tp.TrtOptions(precision=precision), major, graph_has_qdq=qdq, graph_is_fp16=fp16graph)
    assert (p.network_flags, p.set_flags, p.clear_flags, p.calibrator, p.onnx_variant) == (net, setf, clear, calib, variant)
    if major == 11:  # the 11.x API has no precision flags and no calibrator
        assert not {"FP16", "INT8"} & set(p.set_flags) and p.calibrator is None
    else:
        assert "STRONGLY_TYPED" not in p.network_flags


def test_trt10_implicit_calibrator_only_when_asked():
    p = tp.plan_build(tp.TrtOptions(precision="int8", int8_calibrator=True), 10)
    assert p.calibrator == "IInt8EntropyCalibrator2" and p.set_flags == ["INT8", "FP16"] and p.onnx_variant == "source"
    # a graph that already holds Q/DQ never goes through the calibrator
    p = tp.plan_build(tp.TrtOptions(precision="int8", int8_calibrator=True), 10, graph_has_qdq=True)
    assert p.calibrator is None and p.onnx_variant == "qdq"
    p = tp.plan_build(tp.TrtOptions(precision="int8", int8_calibrator=True), 11)  # 11.x: no calibrator API
    assert p.calibrator is None and p.network_flags == ["STRONGLY_TYPED"]


def test_plan_dla_and_errors():
    p = tp.plan_build(tp.TrtOptions(precision="int8", dla_core=1, int8_fp16_fallback=False), 10)
    assert p.dla == {"core": 1, "gpu_fallback": True, "static_batch": 1} and p.set_flags == ["INT8", "GPU_FALLBACK"]
    assert any("GPU fallback ON" in n for n in p.notes) and any("min = opt = max" in n for n in p.notes)
    p = tp.plan_build(tp.TrtOptions(precision="fp16", dla_core=0, gpu_fallback=False), 10)
    assert "GPU_FALLBACK" not in p.set_flags and any("GPU fallback OFF" in n for n in p.notes)
    with pytest.raises(UserError, match="DLA runs FP16 or INT8 only"):
        tp.plan_build(tp.TrtOptions(precision="fp32", dla_core=0), 10)
    with pytest.raises(UserError, match="precisions fp32, fp16, int8"):
        tp.plan_build(tp.TrtOptions(precision="bf16"), 10)
    with pytest.raises(UserError, match="10.x"):
        tp.plan_build(tp.TrtOptions(), 8)
    assert tp.version_major("10.3.0.30") == 10 and tp.version_major("11") == 11
    with pytest.raises(UserError, match="not supported"):
        tp.version_major("8.6.1")


# ----------------------------------------------------------------------------- trtexec command
def _cmd(major, **kw):
    opts = tp.TrtOptions(**{"timing_cache": "timing.cache", **kw})
    plan = tp.plan_build(opts, major)
    return tp.trtexec_command("m.onnx", "m.engine", plan, opts, tp.profile_shapes(IMG, opts), times_json="t.json")


def test_trtexec_command_10x():
    c = _cmd(10, precision="int8", calib_cache="calib.cache", workspace_mb=2048, max_batch=16, int8_calibrator=True)
    assert c[:4] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.engine", "--memPoolSize=workspace:2048M"]
    for flag in ("--timingCacheFile=timing.cache", "--minShapes=input:1x3x32x32", "--optShapes=input:1x3x32x32",
                 "--maxShapes=input:16x3x32x32", "--int8", "--fp16", "--calib=calib.cache", "--exportTimes=t.json"):
        assert flag in c, flag
    assert "--stronglyTyped" not in c
    qdq = _cmd(10, precision="int8", calib_cache="calib.cache")  # default: Q/DQ, no calibrator, no --calib
    assert "--int8" in qdq and "--fp16" in qdq and not any(x.startswith("--calib") for x in qdq)


def test_dla_build_has_a_static_profile_and_reports_fallback():
    c = _cmd(10, precision="fp16", dla_core=0, max_batch=16, opt_batch=4)
    # DLA: min = opt = max, or TensorRT silently runs the "DLA" engine on the GPU
    for flag in ("--minShapes=input:4x3x32x32", "--optShapes=input:4x3x32x32", "--maxShapes=input:4x3x32x32",
                 "--useDLACore=0", "--allowGPUFallback", "--verbose"):
        assert flag in c, flag
    s = tp.profile_shapes(IMG, tp.TrtOptions(dla_core=1, opt_batch=2, max_batch=32))
    lo, opt, hi = s["input"]
    assert lo == opt == hi == [2, 3, 32, 32]
    assert tp.max_batch(s) == 2  # parity batches stay inside the static profile
    nofb = _cmd(10, precision="int8", dla_core=1, gpu_fallback=False)
    assert "--useDLACore=1" in nofb and "--allowGPUFallback" not in nofb


def test_dla_layer_placement_from_the_build_log():
    log = """[11/30/2026-07:00:00] [I] [TRT] ---------- Layers Running on DLA ----------
[11/30/2026-07:00:00] [I] [TRT] [DlaLayer] {ForeignNode[/conv1/Conv.../layer3/Relu]}
[11/30/2026-07:00:00] [I] [TRT] [DlaLayer] {ForeignNode[/fc/Gemm]}
[11/30/2026-07:00:00] [I] [TRT] ---------- Layers Running on GPU ----------
[11/30/2026-07:00:00] [I] [TRT] [GpuLayer] SHUFFLE: /Flatten
[11/30/2026-07:00:00] [I] [TRT] [GpuLayer] REDUCE: /avgpool/GlobalAveragePool
[11/30/2026-07:00:01] [I] [TRT] Total Activation Memory: 1048576
"""
    r = tx.parse_dla_layers(log)
    assert r == {"dla": 2, "gpu": 2, "gpu_layers": ["SHUFFLE: /Flatten", "REDUCE: /avgpool/GlobalAveragePool"],
                 "found": True}
    assert tx.parse_dla_layers("[I] [TRT] Engine built in 3 s")["found"] is False


def test_set_input_shape_is_checked():
    class Ctx:  # TensorRT's IExecutionContext answers False for a shape outside the profile
        def __init__(self, ok):
            self.ok, self.calls = ok, []

        def set_input_shape(self, name, shape):
            self.calls.append((name, shape))
            return self.ok

    ok = Ctx(True)
    tp.check_set_input_shape(ok, "input", [8, 3, 32, 32])
    assert ok.calls == [("input", (8, 3, 32, 32))]
    with pytest.raises(UserError, match="outside the engine's optimisation profile"):
        tp.check_set_input_shape(Ctx(False), "input", [64, 3, 32, 32])


def test_timing_cache_lives_outside_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SGLP_EDGE_TRT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = tp.timing_cache_path("NVIDIA Jetson Orin Nano Developer Kit", "10.3.0.30")
    assert p == tmp_path / "home" / ".cache" / "sglp-edge" / "tensorrt" / \
        "timing-nvidia-jetson-orin-nano-developer-kit-trt10.3.0.30.cache"
    assert tp.timing_cache_path("Orin", "10.3") != tp.timing_cache_path("Orin", "10.7")  # keyed by version
    assert tp.timing_cache_path("Orin", "10.3") != tp.timing_cache_path("AGX Orin", "10.3")  # and by device
    monkeypatch.setenv("SGLP_EDGE_TRT_CACHE", str(tmp_path / "c"))
    assert tp.timing_cache_path("x", "11.0").parent == tmp_path / "c"
    fp32 = _cmd(10, precision="fp32")
    assert "--noTF32" in fp32 and "--fp16" not in fp32 and "--int8" not in fp32


def test_trtexec_command_11x_has_no_precision_flags():
    for prec in ("fp32", "fp16", "int8"):
        c = _cmd(11, precision=prec)
        assert not {"--fp16", "--int8", "--best", "--stronglyTyped"} & set(c)
        assert not any(x.startswith("--calib") for x in c)
    line = tp.command_line(_cmd(11, precision="fp16"))
    assert line.startswith("trtexec --onnx=m.onnx --saveEngine=m.engine")


def test_trtexec_command_qdq_on_10x_is_weakly_typed_with_fp16_fallback():
    opts = tp.TrtOptions(precision="int8")
    plan = tp.plan_build(opts, 10, graph_has_qdq=True)
    c = tp.trtexec_command("q.onnx", "q.engine", plan, opts, tp.profile_shapes(TOK, opts))
    assert "--stronglyTyped" not in c and "--int8" in c and "--fp16" in c
    assert "--minShapes=input_ids:1x1" in c and "--maxShapes=input_ids:32x512" in c and "--optShapes=input_ids:1x128" in c


def test_profile_shapes():
    assert tp.profile_shapes([{"name": "x", "dtype": "float32", "shape": [4, 3, 8, 8]}], tp.TrtOptions()) == {}
    s = tp.profile_shapes(IMG, tp.TrtOptions(opt_batch=8, max_batch=64))
    assert s == {"input": ([1, 3, 32, 32], [8, 3, 32, 32], [64, 3, 32, 32])}
    with pytest.raises(UserError, match="cannot size"):
        tp.profile_shapes([{"name": "x", "dtype": "float32", "shape": ["b", 3, "h", "w"]}], tp.TrtOptions())
    with pytest.raises(UserError, match="opt"):
        tp.profile_shapes(IMG, tp.TrtOptions(opt_batch=64, max_batch=8))


# ------------------------------------------------------------------------------- calibrator data
def test_calib_batcher_fixed_batches():
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    b = te.CalibBatcher(x, 5)
    got = list(b)
    assert b.n_batches == 4 and [g.shape for g in got] == [(5, 2)] * 4  # the short tail is dropped
    np.testing.assert_array_equal(np.concatenate(got), x[:20])
    assert all(g.flags["C_CONTIGUOUS"] for g in got) and b.nbytes == 5 * 2 * 4
    assert b.next_batch() is None  # exhausted: the calibrator then returns None to TensorRT
    b.reset()
    np.testing.assert_array_equal(b.next_batch(), x[:5])
    assert te.CalibBatcher(x, 5, max_batches=2).n_batches == 2
    with pytest.raises(UserError, match="fewer than one batch"):
        te.CalibBatcher(x[:3], 5)


# ------------------------------------------------------------------------------- trtexec parsers
def test_parse_full_trtexec_10_16_log():
    r = tx.parse_trtexec_log((DATA / "trtexec_10.16_rtx6000ada_fp32.txt").read_text())
    assert r["status"] == "passed" and r["trt_version"] == "10.16.0"
    assert r["command"].startswith("trtexec --onnx=") and r["precision"] == "FP32"
    assert r["device"] == "NVIDIA RTX 6000 Ada Generation" and r["compute_capability"] == "8.9"
    assert r["throughput_qps"] == 18392.0
    assert (r["warmup_queries"], r["warmup_ms"], r["timed_queries"], r["timed_s"]) == (3349, 200.0, 55177, 3.00005)
    assert r["metrics"]["gpu_compute"] == {"min": 0.0266113, "max": 0.7229, "mean": 0.0334352, "median": 0.0297852,
                                           "percentiles": {"90": 0.0378418, "95": 0.0429688, "99": 0.0952148}}
    assert set(r["metrics"]) == {"latency", "enqueue", "h2d", "gpu_compute", "d2h"}
    assert r["total_host_walltime_s"] == 3.00005 and r["total_gpu_compute_s"] == 1.84486
    assert r["engine_build_s"] == 3.10201 and r["engine_size_mib"] == 12.5703
    assert any("coefficient of variance = 62.0202%" in w for w in r["warnings"])
    assert not r["errors"]


def test_parse_summary_blocks_from_issues():
    r = tx.parse_trtexec_log((DATA / "trtexec_issue4177_summary.txt").read_text())
    assert r["throughput_qps"] == 130.298 and r["metrics"]["latency"]["percentiles"]["99"] == 12.9675
    assert r["status"] == "incomplete" and "trt_version" not in r
    r = tx.parse_trtexec_log((DATA / "trtexec_8.5_orin_dla_issue2426_summary.txt").read_text())
    assert r["metrics"]["gpu_compute"]["median"] == 2239.15 and r["total_gpu_compute_s"] == 22.3916


def test_parse_jetpack6_header():
    r = tx.parse_trtexec_log((DATA / "trtexec_10.3_orin_int8_issue4494_header.txt").read_text())
    assert r["trt_version"] == "10.3.0" and r["precision"] == "FP32+INT8" and r["status"] == "incomplete"
    assert "--int8" in r["command"] and not r["metrics"]


def test_parse_rejects_non_trtexec_text():
    with pytest.raises(UserError, match="does not look like trtexec output"):
        tx.parse_trtexec_log("hello\nworld\n")


def _write_export_times(path: Path, rows, legacy: bool = False) -> None:
    """Exactly how trtexec writes --exportTimes (NVIDIA/TensorRT samples/common/sampleReporting.cpp,
    exportJSONTrace): '[', one '{ "key" : value, ... }' object per line, separated by '\\n, ', ']'."""
    h2d, comp, d2h = ("startInMs", "endInMs", "inMs"), ("startComputeMs", "endComputeMs", "computeMs"), \
        ("startOutMs", "endOutMs", "outMs")
    if not legacy:
        h2d, d2h = ("startH2dMs", "endH2dMs", "h2dMs"), ("startD2hMs", "endD2hMs", "d2hMs")
    lines, sep = ["["], "  "
    for enq0, enq1, a0, a1, c0, c1, b0, b1 in rows:
        fields = [("startEnqMs", enq0), ("endEnqMs", enq1), (h2d[0], a0), (h2d[1], a1), (comp[0], c0), (comp[1], c1),
                  (d2h[0], b0), (d2h[1], b1), (h2d[2], a1 - a0), (comp[2], c1 - c0), (d2h[2], b1 - b0),
                  ("latencyMs", (a1 - a0) + (c1 - c0) + (b1 - b0)), ("endToEndMs", b1 - a0)]
        lines.append(sep + "{ " + ", ".join(f'"{k}" : {v:g}' for k, v in fields) + " }")
        sep = ", "
    lines.append("]")
    path.write_text("\n".join(lines) + "\n")


def test_parse_export_times(tmp_path):
    rng = np.random.default_rng(0)
    rows, t = [], 0.0
    for _ in range(200):
        h2d, comp, d2h = 0.01, float(rng.uniform(1.0, 2.0)), 0.02
        rows.append((t, t + 0.05, t + 0.05, t + 0.05 + h2d, t + 0.06, t + 0.06 + comp, t + 0.07 + comp,
                     t + 0.07 + comp + d2h))
        t += comp + 0.2
    _write_export_times(tmp_path / "times.json", rows)
    r = tx.parse_export_times(tmp_path / "times.json")
    comp = np.array([r[5] - r[4] for r in rows])
    assert r["iterations"] == 200
    np.testing.assert_allclose(r["per_iteration_ms"]["compute"], comp, rtol=1e-5)
    s = np.sort(comp)
    # trtexec computes in float: (1 - 99.f / 100) * 200 = 1.99999 -> excludes 1 sample -> index 198
    assert r["stats_ms"]["compute"]["percentiles"]["99"] == pytest.approx(s[198], rel=1e-5)
    assert r["stats_ms"]["compute"]["median"] == pytest.approx(np.median(comp), rel=1e-5)
    assert r["stats_ms"]["enqueue"]["mean"] == pytest.approx(0.05, rel=1e-4)
    assert r["throughput_qps"] == pytest.approx(200 / ((rows[-1][7] - rows[0][2]) / 1000), rel=1e-5)
    late = tx.parse_export_times(tmp_path / "times.json", warmup_ms=(rows[99][4] + rows[100][4]) / 2)
    assert late["iterations"] == 100
    _write_export_times(tmp_path / "old.json", rows[:10], legacy=True)  # pre-TensorRT-10 key names
    assert tx.parse_export_times(tmp_path / "old.json")["stats_ms"]["h2d"]["mean"] == pytest.approx(0.01, rel=1e-4)


def test_parse_export_times_errors(tmp_path):
    (tmp_path / "cut.json").write_text('[\n  { "startEnqMs" : 1, "endEnqMs" : 2')
    with pytest.raises(UserError, match="not valid JSON"):
        tx.parse_export_times(tmp_path / "cut.json")
    with pytest.raises(UserError, match="does not exist"):
        tx.parse_export_times(tmp_path / "none.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="non-empty"):
        tx.parse_export_times(tmp_path / "empty.json")


def test_trtexec_percentile_rule():
    s = np.arange(1, 11, dtype=float)  # 10 sorted samples
    assert tx.trtexec_percentile(s, 90) == 9.0 and tx.trtexec_percentile(s, 99) == 10.0
    assert tx.trtexec_percentile(s, 50) == 5.0 and tx.trtexec_percentile(s, 0) == 1.0


# --------------------------------------------------------------------------------- operator check
def _graph(ops, opset=18, domain=""):
    nodes, prev = [], "x"
    for i, op in enumerate(ops):
        nodes.append(helper.make_node(op, [prev], [f"t{i}"], name=f"n{i}", domain=domain if op == ops[-1] else ""))
        prev = f"t{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=imports)


def test_op_check_supported_graph():
    r = trt_ops.check_graph(_graph(["Relu", "Sigmoid", "Softmax"]), trt_version="10.3")
    assert r.ok and r.problems() == [] and r.op_counts == {"Relu": 1, "Sigmoid": 1, "Softmax": 1}
    assert r.to_dict()["source"].startswith("onnx/onnx-tensorrt docs/operators.md")


def test_op_check_finds_problems():
    r = trt_ops.check_graph(_graph(["Relu", "Unique"]), trt_version="10.3")
    assert not r.ok and r.unsupported == {"Unique": ["n1"]}
    assert "Unique is not supported by the TensorRT ONNX parser" in r.problems()[0]
    r = trt_ops.check_graph(_graph(["RMSNormalization"], opset=23), trt_version="10.3")
    assert r.too_new == {"RMSNormalization": "10.15"} and not r.opset_supported  # opset 23 > 20
    assert trt_ops.check_graph(_graph(["RMSNormalization"], opset=23), trt_version="10.15").ok
    r = trt_ops.check_graph(_graph(["Relu", "MyPlugin"], domain="com.example"), trt_version="10.3")
    assert r.custom_domain == ["com.example::MyPlugin"]
    r = trt_ops.check_graph(_graph(["MaxPool"]), trt_version="10.3")
    assert "Indices output unsupported" in r.restrictions["MaxPool"]
    assert trt_ops.opset_range("10.3") == (9, 20) and trt_ops.opset_range("11.0") == (9, 24)


def test_op_table_is_consistent():
    assert not set(trt_ops.SUPPORTED) & trt_ops.UNSUPPORTED
    assert set(trt_ops.ADDED_IN) <= set(trt_ops.SUPPORTED)
    assert len(trt_ops.SUPPORTED) > 150  # the 10.15 matrix lists ~160 supported operators


# --------------------------------------------------------------------------- needs the library
def test_missing_tensorrt_names_what_to_install():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError) as e:
        te.import_tensorrt()
    assert "JetPack 6" in str(e.value) and "pip install tensorrt" in str(e.value) and "--trtexec-only" in str(e.value)


@pytest.mark.tensorrt
def test_build_engine_and_calibrator_on_gpu(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT Python package not installed")
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["y"], pads=[1, 1, 1, 1])], "c",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])], [w])
    from exporters import onnx_utils as ou

    ou.save_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "c.onnx")
    major = tp.version_major(trt.__version__)
    precision = "int8" if major == 10 else "fp32"
    opts = tp.TrtOptions(precision=precision, timing_cache=str(tmp_path / "tc"), calib_cache=str(tmp_path / "cc"),
                         calib_batch_size=4)
    plan = tp.plan_build(opts, major)
    shapes = tp.profile_shapes(ou.io_info(ou.load_onnx(tmp_path / "c.onnx"))["inputs"], opts)
    calib = CalibData(rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    info = te.build_engine(tmp_path / "c.onnx", tmp_path / "c.engine", plan, opts, shapes, calib=calib)
    assert info["engine_bytes"] > 0 and (tmp_path / "tc").stat().st_size > 0
    out = tc.runner(tmp_path / "c.engine")(calib.x[:2])
    assert out.shape == (2, 8, 16, 16)


def test_pinned_host_buffer_wrapper_views_the_allocation():
    """The TensorRT runner's pinned buffers are numpy views of a cudaMallocHost pointer; the view
    logic is checked here on ordinary memory (no CUDA on this machine)."""
    import ctypes

    from benchmarks.board.runner_tensorrt import wrap_host

    raw = (ctypes.c_byte * 96)()
    arr = wrap_host(ctypes.addressof(raw), 96, [2, 3, 4], np.dtype("float32"))
    assert arr.shape == (2, 3, 4) and arr.dtype == np.float32
    arr[:] = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    back = np.frombuffer(bytes(raw), dtype=np.float32)
    np.testing.assert_array_equal(back, np.arange(24, dtype=np.float32))  # same memory, no copy
