"""Building a TensorRT engine on the board, from the ONNX file a bundle carries (what
``python -m benchmarks.board.run_bench --backend tensorrt --artifact model.onnx`` does before timing it).

Board-side like the rest of the harness: Python 3.8, numpy and the runtime only (no torch);
``benchmarks.board.tensorrt_engine`` and ``onnx`` are imported when an engine is built.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import benchmarks.board.tensorrt_engine as te
import benchmarks.board.tensorrt_plan as tp
from benchmarks.board.errors import UserError


def build_trt_engine(onnx_path: Path, precision: str, batches: list[int],
                     shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Build a TensorRT engine from ONNX on this board with ``benchmarks.board.tensorrt_engine`` (shipped
    in the bundle): engines are tied to the GPU and TensorRT version, so they are built where they
    run. The optimisation profile spans the batch sizes benchmarked."""
    trt = te.import_tensorrt()
    major = tp.version_major(trt.__version__)
    traits = {"has_qdq": False, "is_fp16": False}
    inputs = None
    try:
        import onnx  # heavy: onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        traits = tp.graph_traits(model)
        inits = {i.name for i in model.graph.initializer}
        inputs = []
        for i in model.graph.input:
            if i.name in inits:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
            dt = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
            inputs.append({"name": i.name, "shape": dims, "dtype": dt})
    except ImportError:  # no onnx on the board: the input shapes must be given
        named = {k: v for k, v in shapes.items() if k}
        if not named:
            raise UserError("building a TensorRT engine here needs the onnx package (pip install onnx) or "
                            "--input-shape NAME=1x... naming every input") from None
        inputs = [{"name": k, "shape": [None] + list(v[1:]), "dtype": "float32"} for k, v in named.items()]
    # the timing cache outlives this run's fresh folder: keyed by board and TensorRT version, reused
    opts = tp.TrtOptions(precision=precision, opt_batch=batches[0], max_batch=max(batches),
                         timing_cache=str(tp.timing_cache_path(tp.device_key(), trt.__version__)))
    plan = tp.plan_build(opts, major, graph_has_qdq=traits["has_qdq"], graph_is_fp16=traits["is_fp16"])
    unprepared = ((plan.onnx_variant == "fp16" and not traits["is_fp16"])
                  or (plan.onnx_variant == "qdq" and not traits["has_qdq"]))
    if unprepared or plan.calibrator:
        raise UserError(
            f"TensorRT {trt.__version__} needs a prepared ONNX graph (FP16 or Q/DQ INT8) for {precision}: make it on "
            "the host with `sglp-edge compile --backend tensorrt --trtexec-only` and bench that ONNX"
        )
    engine = onnx_path.with_suffix(".engine")
    t0 = time.monotonic()
    info = te.build_engine(onnx_path, engine, plan, opts, tp.profile_shapes(inputs, opts))
    return {**info, "engine": str(engine), "onnx": onnx_path.name, "plan": plan.to_dict(),
            "build_s": time.monotonic() - t0}
