"""exporters/onnx_utils.py: clear errors on broken files, metadata, simplification, parity maths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters import onnx_utils as ou
from benchmarks.board.errors import UserError


def small_model(opset: int = 18) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, dynamic batch (no torch)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w, fc])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture()
def model_file(tmp_path):
    return ou.save_onnx(small_model(), tmp_path / "m.onnx")


def test_load_good_file_and_io(model_file):
    m = ou.load_onnx(model_file)
    assert ou.opset_of(m) == 18
    io = ou.io_info(m)
    assert io["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 8, 8]}]
    assert io["outputs"][0]["shape"] == ["batch", 4]
    assert ou.op_counts(m)[("", "Conv")] == 1


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.02])
def test_truncated_file_is_a_clear_error(model_file, cut):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(UserError) as e:
        ou.load_onnx(model_file)
    msg = str(e.value)
    assert "\n" not in msg and "sglp-edge export" in msg


def test_empty_missing_and_garbage(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        ou.load_onnx(tmp_path / "empty.onnx")
    with pytest.raises(UserError, match="does not exist"):
        ou.load_onnx(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe this is not protobuf \x00\x01" * 40)
    with pytest.raises(UserError, match="truncated or corrupt|no usable graph"):
        ou.load_onnx(tmp_path / "junk.onnx")


def test_checker_failure_is_reported(tmp_path):
    m = small_model()
    m.graph.node[1].input[0] = "does_not_exist"  # dangling edge
    (tmp_path / "bad.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(UserError, match="fails the ONNX checker"):
        ou.load_onnx(tmp_path / "bad.onnx")


def test_missing_external_data(tmp_path):
    m = small_model()
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(UserError, match="external weight data that is missing"):
        ou.load_onnx(tmp_path / "ext.onnx")


def test_metadata_round_trip_and_merge(tmp_path):
    m = small_model()
    ou.update_metadata(m, {"export": {"opset": 18}, "parity_vs_pytorch": {"max_abs": 1e-7}})
    ou.update_metadata(m, {"note": "second write merges"})
    p = ou.save_onnx(m, tmp_path / "meta.onnx")
    meta = ou.read_metadata(p)
    assert meta == {"export": {"opset": 18}, "parity_vs_pytorch": {"max_abs": 1e-7}, "note": "second write merges"}
    assert [x.key for x in onnx.load(p).metadata_props].count("sglp_edge") == 1


@pytest.mark.parametrize("method", ["onnxslim", "onnxsim"])
def test_simplifiers_keep_function_and_metadata(method):
    m = small_model()
    ou.update_metadata(m, {"k": 1})
    out, info = ou.simplify_model(m, method)
    assert info["applied"], info
    assert ou.read_metadata(out) == {"k": 1}
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    a = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["onnxslim", "onnxsim"])
def test_simplifier_failure_is_skipped_with_reason(method):
    # an operator the ONNX default domain does not know (what a TensorRT plugin node looks like)
    m = small_model()
    m.graph.node[1].op_type = "NoSuchOp"
    out, info = ou.simplify_model(m, method)
    assert out is m and info["applied"] is False
    assert f"{method} failed" in info["reason"] and "left unsimplified" in info["reason"]
    assert "NoSuchOp" in info["reason"]


def test_simplify_none_and_unknown_method():
    m = small_model()
    out, info = ou.simplify_model(m, "none")
    assert out is m and "disabled" in info["reason"]
    with pytest.raises(UserError, match="unknown simplifier"):
        ou.simplify_model(m, "polygraphy")


def test_save_refuses_nothing_small_and_is_atomic(tmp_path):
    p = ou.save_onnx(small_model(), tmp_path / "a.onnx")
    assert p.is_file() and not list(tmp_path.glob(".*tmp*"))


def test_compare_outputs():
    ref = np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5]])
    out = ref + np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 4.0]])
    r = ou.compare_outputs(ref, out, labels=[1, 1])
    assert r["max_abs"] == 4.0 and r["max_rel"] == pytest.approx(4.0 / 3.0)
    assert r["top1_agree"] == 0.5  # row 2 flips from class 0 to class 2
    assert r["reference_top1_accuracy"] == 0.5 and r["top1_accuracy"] == 0.5
    with pytest.raises(UserError, match="differs"):
        ou.compare_outputs(ref, ref[:1])
    lm = ou.compare_outputs(np.zeros((2, 5, 7)), np.zeros((2, 5, 7)))
    assert lm["top1_rows"] == 10 and lm["top1_agree"] == 1.0
