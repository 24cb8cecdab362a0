"""exporters/compile.py with the real OpenVINO and ONNX Runtime (no mocks): artifacts, manifest,
parity, runtime precision, and one-line errors that leave no partial artifact."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters import onnx_utils as ou
from benchmarks.board.atomic import sha256_file
from benchmarks.board.calib import save_npz
from exporters.compile import MANIFEST_NAME, compile_model
from benchmarks.board.errors import UserError


def cnn_model() -> onnx.ModelProto:
    """Two conv layers + classifier head with a dynamic batch (built without torch)."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
            for n, s in (("w1", (16, 3, 3, 3)), ("b1", (16,)), ("w2", (16, 16, 3, 3)), ("b2", (16,)), ("fc", (16, 10)))]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc"),
    ]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    ou.update_metadata(m, {"export": {"opset": 18}, "parity_vs_pytorch": {"max_abs": 1.0e-7, "note": "test graph"}})
    return m


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile")
    ou.save_onnx(cnn_model(), d / "model.onnx")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 3, 16, 16)).astype(np.float32)
    save_npz(d / "calib.npz", x[:64])
    import onnxruntime as ort

    ref = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x[64:]})[0]
    save_npz(d / "eval.npz", x[64:], ref.argmax(1))  # labels = FP32 predictions
    save_npz(d / "eval_ref.npz", x[64:], ref.argmax(1), ref)
    return d


def _check_manifest(out, src):
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["format"] == "sglp-edge/compile-manifest/1"
    assert m["source"]["sha256"] == sha256_file(src)
    assert m["source"]["parity_vs_pytorch"]["max_abs"] == 1.0e-7  # carried over from the export metadata
    for a in m["artifacts"]:
        assert sha256_file(out / a["path"]) == a["sha256"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dirs left
    return m


def test_openvino_fp32_parity_and_runtime_precision(workdir):
    out = workdir / "ov_fp32"
    m = compile_model(workdir / "model.onnx", "openvino", "fp32", out, eval_data=workdir / "eval.npz", progress=False)
    _check_manifest(out, workdir / "model.onnx")
    assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
    import openvino as ov

    assert m["backend"] == {"name": "openvino", "version": ov.get_version()}
    assert m["runtime"]["compile_config"] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert m["runtime"]["with_hint"]["inference_precision_hint"] == "f32"
    assert m["runtime"]["default_without_hint"]["inference_precision_hint"] in ("f32", "bf16", "f16")
    assert m["runtime"]["with_hint"]["compute_layer_precisions"]["Convolution"] == {"f32": 2}
    p = m["parity"]
    assert p["reference"].startswith("onnxruntime fp32") and p["samples"] == 32
    assert p["max_abs"] < 1e-4 and p["top1_agree"] == 1.0 and p["top1_accuracy"] == 1.0


def test_openvino_fp16_weights_are_halved(workdir):
    m32 = json.loads((workdir / "ov_fp32" / MANIFEST_NAME).read_text()) if (workdir / "ov_fp32").exists() else None
    out = workdir / "ov_fp16"
    m = compile_model(workdir / "model.onnx", "openvino", "fp16", out, eval_data=workdir / "eval.npz", progress=False)
    _check_manifest(out, workdir / "model.onnx")
    if m32:
        bin32 = next(a["bytes"] for a in m32["artifacts"] if a["path"] == "model.bin")
        bin16 = next(a["bytes"] for a in m["artifacts"] if a["path"] == "model.bin")
        assert bin16 < 0.6 * bin32
    assert m["parity"]["max_abs"] < 0.05 and m["parity"]["top1_agree"] >= 0.9


def test_openvino_int8_nncf(workdir):
    out = workdir / "ov_int8"
    m = compile_model(workdir / "model.onnx", "openvino", "int8", out, calib=workdir / "calib.npz",
                      eval_data=workdir / "eval_ref.npz", calib_samples=32, progress=False)
    _check_manifest(out, workdir / "model.onnx")
    assert m["quantization"]["calibration_samples"] == 32 and m["quantization"]["method"].startswith("nncf.quantize")
    assert m["calibration"]["sha256"] == sha256_file(workdir / "calib.npz")
    layers = m["runtime"]["with_hint"]["compute_layer_precisions"]["Convolution"]
    assert len(m["quantization"]["kept_float"]) == 2  # first conv and the classifier stay in float
    assert m["quantization"]["bias_correction"] == "full"  # image models: full bias correction by default
    assert layers.get("u8", 0) + layers.get("i8", 0) == 1 and layers.get("f32") == 1, layers  # conv2 runs in 8 bit
    assert m["parity"]["reference"].startswith("pytorch")  # eval_ref.npz carries reference logits
    assert m["parity"]["top1_agree"] >= 0.8


def test_onnxruntime_fp32_and_ort_format(workdir):
    out = workdir / "ort_fp32"
    m = compile_model(workdir / "model.onnx", "onnxruntime", "fp32", out, eval_data=workdir / "eval.npz", progress=False)
    _check_manifest(out, workdir / "model.onnx")
    names = {a["path"] for a in m["artifacts"]}
    assert {"model.onnx", "model.opt.onnx", "model.ort", "model.required_operators.config"} <= names
    assert m["runtime"]["providers"][-1] == "CPUExecutionProvider"
    assert m["parity"]["max_abs"] == 0.0
    import onnxruntime as ort

    x = np.ones((2, 3, 16, 16), np.float32)
    a = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(str(out / "model.opt.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert "Conv" in (out / "model.required_operators.config").read_text()


def test_onnxruntime_int8_qdq(workdir):
    out = workdir / "ort_int8"
    m = compile_model(workdir / "model.onnx", "onnxruntime", "int8", out, calib=workdir / "calib.npz",
                      eval_data=workdir / "eval.npz", calib_samples=64, keep_first_last_float=False, progress=False)
    assert m["quantization"]["kept_float"] == []
    _check_manifest(out, workdir / "model.onnx")
    q = onnx.load(out / "model.onnx")
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert m["quantization"]["format"] == "QDQ" and m["quantization"]["calibration_samples"] == 64
    assert m["parity"]["top1_agree"] >= 0.8 and m["parity"]["max_abs"] > 0


def test_tensorrt_kit_without_tensorrt(workdir):
    out = workdir / "trt_int8"
    m = compile_model(workdir / "model.onnx", "tensorrt", "int8", out, calib=workdir / "calib.npz",
                      trtexec_only=True, trt_version="10.3", calib_samples=32, progress=False)
    _check_manifest(out, workdir / "model.onnx")
    assert m["tensorrt"]["engine_built"] is False
    assert m["parity"]["measured_on"].startswith("onnxruntime CPU on the ONNX prepared for TensorRT")
    assert m["parity"]["inputs"].startswith("calibration samples") and m["parity"]["top1_agree"] >= 0.8
    assert m["tensorrt"]["plan"]["onnx_variant"] == "qdq"
    q = onnx.load(out / "model.onnx")
    zps = [numpy_helper.to_array(t) for t in q.graph.initializer if "zero_point" in t.name]
    assert zps and not any(z.any() for z in zps)  # symmetric: every zero point is 0, as TensorRT requires
    assert any(z.dtype == np.int8 for z in zps)  # signed 8-bit activations / weights
    script = (out / "trtexec_build.sh").read_text()
    # TensorRT 10 INT8 from Q/DQ: weakly typed with FP16 fallback, no calibrator
    assert "--stronglyTyped" not in script and "--int8" in script and "--fp16" in script and "--calib" not in script
    assert "--onnx=model.onnx" in script and "--exportTimes=times.json" in script
    # the timing cache is outside the (fresh) output folder, keyed by the board and TensorRT version
    assert '"--timingCacheFile=$TIMING_CACHE"' in script and "timing-${DEVICE:-unknown-gpu}-trt" in script
    assert not any(a["path"].endswith(".cache") for a in m["artifacts"])
    assert json.loads((out / "trt_op_check.json").read_text())["ok"] is True


def test_trtexec_script_keys_the_timing_cache_like_the_python_side(tmp_path):
    """Run the board script's cache-path lines with bash (its interpreter: pipefail): the same file name
    as timing_cache_path()."""
    import subprocess

    import benchmarks.board.tensorrt_plan as tp
    from exporters.tensorrt_compile import trtexec_script

    script = trtexec_script(["trtexec", "--onnx=model.onnx", "--timingCacheFile=@TIMING_CACHE@"], "10.3")
    head = script.split("trtexec --onnx")[0]
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    head = head.replace("/proc/device-tree/model", str(tmp_path / "model"))
    out = subprocess.run(["bash", "-c", head + 'echo "$TIMING_CACHE"'], capture_output=True, text=True,
                         env={"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode == 0, out.stderr
    want = tp.timing_cache_path("NVIDIA Jetson Orin Nano Developer Kit", "10.3", root=tmp_path / "home" / ".cache"
                                / "sglp-edge" / "tensorrt")
    assert out.stdout.strip() == str(want)
    assert want.parent.is_dir()  # the script creates the cache folder outside the build folder


def test_tensorrt_11_kit_has_an_fp16_graph(workdir):
    out = workdir / "trt11_fp16"
    m = compile_model(workdir / "model.onnx", "tensorrt", "fp16", out, eval_data=workdir / "eval.npz",
                      trtexec_only=True, trt_version="11.0", progress=False)
    assert m["tensorrt"]["plan"]["onnx_variant"] == "fp16" and m["backend"]["target_version"] == "11.0"
    g = onnx.load(out / "model.onnx")
    assert {t.data_type for t in g.graph.initializer} == {TensorProto.FLOAT16}
    assert g.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    cmd = m["tensorrt"]["trtexec_command"]
    assert "--fp16" not in cmd and "--stronglyTyped" not in cmd
    assert m["parity"]["max_abs"] < 0.05 and m["parity"]["top1_agree"] >= 0.9


def test_tensorrt_without_library_names_the_install(workdir):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    out = workdir / "trt_fp16"
    with pytest.raises(UserError, match="pip install tensorrt|JetPack"):
        compile_model(workdir / "model.onnx", "tensorrt", "fp16", out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("backend, precision, kwargs, message", [
    ("onnxruntime", "fp16", {}, "precision fp16 is not supported by the onnxruntime backend"),
    ("openvino", "int4", {}, "not supported by the openvino backend"),
    ("tflite", "fp32", {}, "unknown backend"),
    ("openvino", "int8", {}, "INT8 needs calibration data"),
    ("onnxruntime", "int8", {"calib": "missing.npz"}, "does not exist"),
    ("openvino", "fp32", {"max_accuracy_drop": 0.01}, "applies to --backend openvino --precision int8"),
])
def test_bad_requests_leave_nothing(workdir, backend, precision, kwargs, message):
    out = workdir / f"bad_{backend}_{precision}"
    kwargs = {k: (workdir / v if k == "calib" else v) for k, v in kwargs.items()}
    with pytest.raises(UserError, match=message) as e:
        compile_model(workdir / "model.onnx", backend, precision, out, progress=False, **kwargs)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_corrupt_onnx_keeps_previous_output(workdir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous build")
    data = (workdir / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="truncated or corrupt|no usable graph|fails the ONNX checker"):
        compile_model(tmp_path / "cut.onnx", "openvino", "fp32", out, progress=False)
    assert (out / "keep.txt").read_text() == "previous build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.onnx", "out"]


def test_calibration_shape_mismatch(workdir, tmp_path):
    save_npz(tmp_path / "c.npz", np.zeros((8, 3, 32, 32), np.float32))
    with pytest.raises(UserError, match="dimension 2 differs"):
        compile_model(workdir / "model.onnx", "onnxruntime", "int8", tmp_path / "o", calib=tmp_path / "c.npz",
                      progress=False)
    assert not (tmp_path / "o").exists()


def test_openvino_int8_with_accuracy_control(workdir):
    out = workdir / "ov_int8_ac"
    m = compile_model(workdir / "model.onnx", "openvino", "int8", out, calib=workdir / "calib.npz",
                      eval_data=workdir / "eval.npz", max_accuracy_drop=0.02, calib_samples=32, progress=False)
    q = m["quantization"]
    assert q["method"] == "quantize_with_accuracy_control" and q["max_drop"] == 0.02
    assert q["metric"] == "top-1 accuracy" and q["validation_samples"] == 32
    # labels are the FP32 predictions, so the FP32 accuracy is 1.0 and the drop bound applies to it
    assert m["parity"]["top1_accuracy"] >= 1.0 - 0.02 - 1e-9
    with pytest.raises(UserError, match="labelled evaluation data"):
        compile_model(workdir / "model.onnx", "openvino", "int8", workdir / "ov_x", calib=workdir / "calib.npz",
                      max_accuracy_drop=0.02, progress=False)


def test_execution_provider_choice():
    from exporters.ort_backend import choose_providers

    arm = ["ACLExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(available=arm) == arm
    assert choose_providers(available=["XnnpackExecutionProvider", "CPUExecutionProvider", "AzureExecutionProvider"]) \
        == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["xnnpack"], available=arm) == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(UserError, match="not in this onnxruntime build"):
        choose_providers(["acl"], available=["CPUExecutionProvider"])
    import onnxruntime as ort

    assert choose_providers() == [p for p in arm if p in ort.get_available_providers()]


def _token_lm(d):
    """A tiny token LM with its calibration and reference-labelled evaluation sets in ``d``."""
    import onnxruntime as ort
    from onnx_models import make_token_lm

    model = make_token_lm(d / "lm.onnx")
    ids = np.random.default_rng(0).integers(0, 64, (16, 8)).astype(np.int64)
    ref = ort.InferenceSession(str(model)).run(None, {"input_ids": ids})[0]
    save_npz(d / "calib.npz", ids[:8])
    save_npz(d / "eval.npz", ids[8:], None, ref[8:])
    return model


def test_openvino_int8_for_token_models_is_weight_only(tmp_path):
    """LMs: weight-only INT8 (nncf.compress_weights) by default; static INT8 still on request."""
    import openvino as ov

    from benchmarks.board.calib import load_npz
    from exporters.openvino_backend import build

    model = _token_lm(tmp_path)
    m = compile_model(model, "openvino", "int8", tmp_path / "ov", calib=tmp_path / "calib.npz",
                      eval_data=tmp_path / "eval.npz", progress=False)
    q = m["quantization"]
    assert q["scheme"] == "weights" and q["method"].startswith("nncf.compress_weights")
    consts = [op for op in ov.Core().read_model(str(tmp_path / "ov" / "model.xml")).get_ops()
              if op.get_type_name() == "Constant"]
    assert any(c.get_element_type().get_type_name() in ("u8", "i8") for c in consts)  # 8-bit weights stored
    assert m["parity"]["top1_agree"] >= 0.95
    with pytest.raises(UserError, match="int8_scheme"):
        build(model, tmp_path / "bad", "int8", calib=load_npz(tmp_path / "calib.npz"), int8_scheme="magic")


def test_onnxruntime_int8_for_token_models_is_weight_only(tmp_path):
    model = _token_lm(tmp_path)
    m = compile_model(model, "onnxruntime", "int8", tmp_path / "ort", calib=tmp_path / "calib.npz",
                      eval_data=tmp_path / "eval.npz", progress=False)
    assert m["quantization"]["scheme"] == "weights" and m["quantization"]["quantized_matmuls"] == 1
    ops = {n.op_type for n in onnx.load(str(tmp_path / "ort" / "model.onnx")).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops, ops
    assert m["parity"]["top1_agree"] >= 0.95
    d = compile_model(model, "onnxruntime", "int8", tmp_path / "ort_dyn", calib=tmp_path / "calib.npz",
                      eval_data=tmp_path / "eval.npz", int8_scheme="dynamic", progress=False)
    assert d["quantization"]["scheme"] == "dynamic"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "ort_dyn" / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}, ops


def test_int8_scheme_must_suit_the_backend(workdir):
    with pytest.raises(UserError, match="int8-scheme dynamic is not available for openvino"):
        compile_model(workdir / "model.onnx", "openvino", "int8", workdir / "never", calib=workdir / "calib.npz",
                      int8_scheme="dynamic", progress=False)
    assert not (workdir / "never").exists()
