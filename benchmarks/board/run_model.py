"""Minimal runner left beside a deployed artifact (``sglp-edge deploy``): numpy and the runtime only,
Python 3.8+. Loads the model named in RELEASE.json and answers one input.

    python3 run_model.py                  # a fixed pseudo-random input of the model's shape (batch 1)
    python3 run_model.py --input x.npy    # your own input (with the batch axis)

Prints one JSON line: artifact, runtime and version, machine, output shape, top-1 index.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _shape(dims, batch: int = 1) -> list:
    return [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 1) for i, d in enumerate(dims)]


def run_onnxruntime(path: Path, x):
    import onnxruntime as ort  # heavy: onnxruntime

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if x is None:
        x = np.random.default_rng(0).standard_normal(_shape(inp.shape)).astype(np.float32)
    return sess.run(None, {inp.name: x})[0], "onnxruntime", ort.__version__


def run_openvino(path: Path, x):
    import openvino as ov  # heavy: openvino

    core = ov.Core()
    model = core.read_model(str(path))
    if x is None:
        ps = model.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in ps]
        x = np.random.default_rng(0).standard_normal(_shape(dims)).astype(np.float32)
    model.reshape({model.inputs[0]: list(x.shape)})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(x)[compiled.outputs[0]]), "openvino", ov.__version__


def run_tensorrt(path: Path, x):
    import tensorrt as trt  # heavy: tensorrt
    try:
        from cuda.bindings import runtime as rt  # heavy: cuda-python
    except ImportError:
        from cuda import cudart as rt  # older cuda-python  # heavy: cuda-python

    def ok(res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise SystemExit(f"error: CUDA call failed ({err})")
        return rest[0] if rest else None

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise SystemExit("error: TensorRT could not load the engine (built for another GPU or TensorRT version?)")
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if x is None:
        x = np.random.default_rng(0).standard_normal(_shape(list(engine.get_tensor_shape(ins[0])))).astype(np.float32)
    if not ctx.set_input_shape(ins[0], tuple(x.shape)):
        raise SystemExit(f"error: shape {list(x.shape)} is outside the engine's profile")
    y = np.empty(tuple(ctx.get_tensor_shape(outs[0])), dtype=trt.nptype(engine.get_tensor_dtype(outs[0])))
    dx, dy = ok(rt.cudaMalloc(x.nbytes)), ok(rt.cudaMalloc(y.nbytes))
    try:
        ok(rt.cudaMemcpy(dx, x.ctypes.data, x.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
        ctx.set_tensor_address(ins[0], dx)
        ctx.set_tensor_address(outs[0], dy)
        if not ctx.execute_async_v3(0):
            raise SystemExit("error: TensorRT inference failed")
        ok(rt.cudaDeviceSynchronize())
        ok(rt.cudaMemcpy(y.ctypes.data, dy, y.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
    finally:
        rt.cudaFree(dx)
        rt.cudaFree(dy)
    return y, "tensorrt", trt.__version__


RUNTIMES = {".onnx": run_onnxruntime, ".ort": run_onnxruntime, ".xml": run_openvino, ".engine": run_tensorrt,
            ".plan": run_tensorrt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="answer one input with the deployed model")
    ap.add_argument("--input", help=".npy input with the batch axis (default: a fixed pseudo-random one)")
    a = ap.parse_args(argv)
    try:
        path = HERE / json.loads((HERE / "RELEASE.json").read_text())["artifact"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: RELEASE.json beside run_model.py is missing or damaged ({e}); deploy the release again",
              file=sys.stderr)
        return 2
    run = RUNTIMES.get(path.suffix.lower())
    if run is None:
        print(f"error: no runner for {path.name}", file=sys.stderr)
        return 2
    x = np.load(a.input).astype(np.float32) if a.input else None
    try:
        y, runtime, version = run(path, x)
    except ImportError as e:
        print(f"error: the runtime for {path.name} is not installed here ({e})", file=sys.stderr)
        return 4
    except Exception as e:  # noqa: BLE001 - a model the runtime cannot load or run: one line, not a traceback
        msg = " ".join(str(e).split())[:300]
        print(f"error: could not load or run {path.name} ({type(e).__name__}: {msg})", file=sys.stderr)
        return 3
    y = np.asarray(y, dtype=np.float32)
    print(json.dumps({"artifact": path.name, "runtime": runtime, "version": version, "machine": platform.machine(),
                      "python": platform.python_version(), "output_shape": list(y.shape),
                      "top1": int(y.reshape(y.shape[0], -1).argmax(1)[0]), "finite": bool(np.isfinite(y).all())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
