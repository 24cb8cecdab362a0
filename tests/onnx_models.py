"""Tiny ONNX models the tests share (built with onnx.helper; no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(g: onnx.GraphProto, path: Path) -> Path:
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path


def make_cnn(path: Path, batch: int | str = "N", classes: int = 10, seed: int = 0) -> Path:
    """x[B,3,32,32] -> conv3x3(8) -> relu -> global avg pool -> matmul -> logits[B,classes]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W")
    f = numpy_helper.from_array(rng.standard_normal((8, classes)).astype(np.float32), "F")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "F"], ["logits"]),
    ]
    g = helper.make_graph(nodes, "tiny_cnn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], [w, f])
    return _save(g, path)


def make_token_lm(path: Path, vocab: int = 64, hidden: int = 32, seed: int = 0) -> Path:
    """input_ids[B,T] (int64) -> Gather(embedding[vocab,hidden]) -> MatMul(W[hidden,vocab]) -> logits[B,T,vocab]."""
    rng = np.random.default_rng(seed)
    e = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "E")
    w = numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "W")
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], axis=0),
             helper.make_node("MatMul", ["h", "W"], ["logits"])]
    g = helper.make_graph(nodes, "token_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", vocab])], [e, w])
    return _save(g, path)
