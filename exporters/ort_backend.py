"""ONNX Runtime backend: offline-optimised model, static INT8 (QDQ), ORT format for ARM / embedded.

* ``model.onnx``      - the model to ship (FP32 source, or the QDQ INT8 model);
* ``model.opt.onnx``  - offline-optimised with ``SessionOptions.optimized_model_filepath`` at
  ``ORT_ENABLE_EXTENDED`` (portable; ``ORT_ENABLE_ALL`` adds layout changes tied to the build host);
* ``model.ort`` + ``model.required_operators.config`` - the ORT format (``onnxruntime.tools.
  convert_onnx_models_to_ort``, fixed optimisations for ``--target_platform arm``) for minimal /
  mobile builds; the config feeds ``--include_ops_by_config`` of a minimal ORT build.
* INT8: ``quant_pre_process`` then ``quantize_static`` in QDQ format (U8 activations, S8
  per-channel weights: the CPU EP fast path), MinMax calibration on the calibration samples.
  Language models default to weight-only INT8 (``MatMulNBits``, 8-bit blocks of 128, activations
  stay float): on the pruned SmolLM2 it agreed with FP32 on 95 % of next tokens, where static QDQ
  and ``quantize_dynamic`` (activations quantised per tensor: LLM activation outliers) agreed on
  0-38 %. ``int8_scheme="static"`` / ``"dynamic"`` still ask for those.

Execution providers are chosen from what the installed onnxruntime offers: ACL, XNNPACK, CPU.
Numpy + onnxruntime only (no torch).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.board.calib import CalibData, batches
from benchmarks.board.errors import UserError
from exporters.stack import stack_runner

INT8_SCHEMES = ("auto", "static", "dynamic", "weights")  # auto: weights for token models, static otherwise

PRECISIONS = ("fp32", "int8")
PROVIDER_PREFERENCE = ("ACLExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
                    "acl": "ACLExecutionProvider"}


def _ort():
    try:
        import onnxruntime as ort  # heavy: onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed; pip install onnxruntime") from None
    return ort


def version() -> str:
    return _ort().__version__


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def choose_providers(requested: Sequence[str] | None = None, available: Sequence[str] | None = None) -> list[str]:
    """Execution providers to use, best first, restricted to what is installed; CPU always last.
    ``requested`` (names or aliases cpu/xnnpack/acl) must all be installed."""
    avail = list(available if available is not None else available_providers())
    if requested:
        want = [PROVIDER_ALIASES.get(r.lower(), r) for r in requested]
        missing = [w for w in want if w not in avail]
        if missing:
            raise UserError(f"execution provider(s) {missing} are not in this onnxruntime build (installed: "
                            f"{avail}); install an onnxruntime build with them or drop --providers")
        chosen = want
    else:
        chosen = [p for p in PROVIDER_PREFERENCE if p in avail]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _session(path: str | Path, providers: Sequence[str], **opts: Any) -> Any:
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in opts.items():
        setattr(so, k, v)
    try:
        return ort.InferenceSession(str(path), so, providers=list(providers))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"ONNX Runtime cannot load {Path(path).name} ({str(e).strip().splitlines()[0][:200]})") from None


def make_data_reader(input_name: str, x: np.ndarray, batch_size: int = 16) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over calibration batches of ``x``."""
    from onnxruntime.quantization import CalibrationDataReader  # heavy: onnxruntime

    class NpzDataReader(CalibrationDataReader):
        def __init__(self) -> None:
            # equal-sized batches: the histogram calibrators (entropy, percentile) cannot mix sizes
            self._batches = list(batches(x, batch_size, drop_last=len(x) >= batch_size))
            self._it = iter(self._batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self._it, None)
            return None if b is None else {input_name: b}

        def rewind(self) -> None:
            self._it = iter(self._batches)

        def __len__(self) -> int:
            return len(self._batches)

    return NpzDataReader()


def optimize_offline(src: Path, dst: Path, level: str = "extended") -> None:
    ort = _ort()
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    _session(src, ["CPUExecutionProvider"], graph_optimization_level=levels[level], optimized_model_filepath=str(dst))
    if not dst.is_file():
        raise UserError(f"ONNX Runtime did not write the optimised model {dst.name}")


def to_ort_format(src: Path, out_dir: Path, *, target_platform: str = "arm") -> list[Path]:
    """``python -m onnxruntime.tools.convert_onnx_models_to_ort`` on one file; returns written files."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (  # heavy: onnxruntime
        OptimizationStyle, convert_onnx_models_to_ort)

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp = Path(tmp)
        shutil.copy2(src, tmp / "model.onnx")
        try:
            quiet = logging.getLogger("ort_format_model.utils")
            level, quiet.level = quiet.level, logging.WARNING
            with contextlib.redirect_stdout(io.StringIO()):
                convert_onnx_models_to_ort(tmp / "model.onnx", output_dir=tmp / "out",
                                           optimization_styles=[OptimizationStyle.Fixed], target_platform=target_platform)
            quiet.setLevel(level)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"ORT format conversion failed ({str(e).strip().splitlines()[0][:200]})") from None
        written = []
        for f in sorted((tmp / "out").iterdir()):
            dst = out_dir / f.name
            shutil.move(str(f), dst)
            written.append(dst)
    if not any(p.suffix == ".ort" for p in written):
        raise UserError("ORT format conversion wrote no .ort file")
    return written


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def first_last_compute_nodes(model_path: Path) -> list[str]:
    """Names of the first and last Conv/Gemm/MatMul nodes (kept in float: the usual INT8 recipe)."""
    import onnx  # heavy: onnx

    names = [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node
             if n.op_type in COMPUTE_OPS and n.name]
    return sorted(set(names[:1] + names[-1:]), key=names.index) if names else []


def quantize_int8(src: Path, dst: Path, calib: CalibData, *, samples: int = 300, symmetric: bool = False,
                  per_channel: bool = True, method: str = "minmax", batch_size: int = 16,
                  keep_first_last_float: bool = True) -> dict[str, Any]:
    """Static QDQ INT8 with ORT's quantizer. ``symmetric=True`` gives S8 activations with zero
    points 0, the form TensorRT's explicit quantization requires. ``keep_first_last_float`` leaves
    the first and last compute layers unquantised (cheap, and the most precision-sensitive)."""
    from onnxruntime.quantization import (  # heavy: onnxruntime
        CalibrationMethod, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # heavy: onnxruntime

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UserError(f"unknown calibration method {method!r}; choose one of {', '.join(methods)}")
    n = min(samples, len(calib))
    info: dict[str, Any] = {"tool": f"onnxruntime.quantization {version()}", "format": "QDQ",
                            "calibration_samples": n, "calibrate_method": method, "per_channel": per_channel,
                            "activation_type": "int8 symmetric" if symmetric else "uint8",
                            "weight_type": "int8 symmetric"}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=calib.kind == "image")
            info["pre_process"] = "quant_pre_process (shape inference + optimisation)"
        except Exception as e:  # noqa: BLE001 - pre-processing is an optimisation, not a must
            shutil.copy2(src, pre)
            info["pre_process"] = f"skipped ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        exclude = first_last_compute_nodes(pre) if keep_first_last_float else []
        info["kept_float"] = exclude
        sess = _session(pre, ["CPUExecutionProvider"])
        reader = make_data_reader(sess.get_inputs()[0].name, calib.x[:n], batch_size)
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {"WeightSymmetric": True}
        try:
            quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[method], extra_options=extra,
                            nodes_to_exclude=exclude or None)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"ONNX Runtime INT8 quantization failed ({str(e).strip().splitlines()[0][:200]})") from None
    return info


def quantize_int8_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic INT8: int8 weights (per channel), activation ranges computed per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # heavy: onnxruntime

    try:
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    except Exception as e:  # noqa: BLE001
        raise UserError(f"ONNX Runtime dynamic INT8 quantization failed ({str(e).strip().splitlines()[0][:200]})") from None
    return {"tool": f"onnxruntime.quantization {version()}", "format": "dynamic (QOperator)", "scheme": "dynamic",
            "calibration_samples": 0, "per_channel": True, "weight_type": "int8",
            "activation_type": "uint8, range per batch at run time", "op_types": ["MatMul", "Gemm"]}


def quantize_int8_weights(src: Path, dst: Path, block_size: int = 128) -> dict[str, Any]:
    """Weight-only INT8: every MatMul with a constant weight becomes ``MatMulNBits`` (8 bits,
    symmetric blocks of ``block_size``); activations stay float."""
    import onnx  # heavy: onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb  # heavy: onnxruntime

    try:
        cfg = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8,
                                               op_types_to_quantize=("MatMul",))
        qz = mnb.MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=block_size, is_symmetric=True,
                                      algo_config=cfg, op_types_to_quantize=("MatMul",))
        with contextlib.redirect_stdout(io.StringIO()):
            qz.process()
        qz.model.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"ONNX Runtime weight-only INT8 quantization failed ({str(e).strip().splitlines()[0][:200]})") from None
    n = sum(1 for node in onnx.load(str(dst), load_external_data=False).graph.node if node.op_type == "MatMulNBits")
    return {"tool": f"onnxruntime.quantization {version()}", "format": "MatMulNBits (weight-only)", "scheme": "weights",
            "calibration_samples": 0, "bits": 8, "block_size": block_size, "symmetric": True,
            "quantized_matmuls": n, "activation_type": "float (not quantised)"}


def build(
    onnx_path: str | Path,
    out_dir: str | Path,
    precision: str,
    *,
    calib: CalibData | None = None,
    calib_samples: int = 300,
    providers: Sequence[str] | None = None,
    calibrate_method: str = "minmax",
    keep_first_last_float: bool = True,
    ort_format: bool = True,
    target_platform: str = "arm",
    int8_scheme: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    if int8_scheme not in INT8_SCHEMES:
        raise UserError(f"int8_scheme must be one of {', '.join(INT8_SCHEMES)}; got {int8_scheme!r}")
    if precision not in PRECISIONS:
        raise UserError(f"onnxruntime backend supports precisions {', '.join(PRECISIONS)}; got {precision!r} "
                        "(for fp16 use --backend openvino or tensorrt)")
    out_dir = Path(out_dir)
    chosen = choose_providers(providers)
    section: dict[str, Any] = {"backend": {"name": "onnxruntime", "version": version()},
                               "runtime": {"providers": chosen, "available_providers": available_providers()}}
    model = out_dir / "model.onnx"
    if precision == "int8":
        if calib is None:
            raise UserError("INT8 needs calibration data: pass --calib DATA.npz")
        scheme = ("weights" if calib.kind == "tokens" else "static") if int8_scheme == "auto" else int8_scheme
        if scheme == "weights":
            say("quantize INT8 (weight-only MatMulNBits, 8 bits)")
            section["quantization"] = quantize_int8_weights(Path(onnx_path), model)
        elif scheme == "dynamic":
            say("quantize INT8 (dynamic: int8 weights, activations per batch)")
            section["quantization"] = quantize_int8_dynamic(Path(onnx_path), model)
        else:
            say(f"quantize INT8 (QDQ, {min(calib_samples, len(calib))} calibration samples)")
            section["quantization"] = dict(quantize_int8(Path(onnx_path), model, calib, samples=calib_samples,
                                                         method=calibrate_method,
                                                         keep_first_last_float=keep_first_last_float),
                                           scheme="static")
    else:
        shutil.copy2(onnx_path, model)
    artifacts = [{"path": "model.onnx", "role": f"onnx-{precision}"}]
    say("offline graph optimisation")
    optimize_offline(model, out_dir / "model.opt.onnx", "extended")
    artifacts.append({"path": "model.opt.onnx", "role": "onnx-offline-optimized (ORT_ENABLE_EXTENDED)"})
    if ort_format:
        say(f"convert to ORT format ({target_platform})")
        for p in to_ort_format(model, out_dir, target_platform=target_platform):
            artifacts.append({"path": p.name, "role": "ort-format" if p.suffix == ".ort" else "ort-required-operators"})
        section["ort_format"] = {"optimization_style": "Fixed", "target_platform": target_platform}
    section["artifacts"] = artifacts
    return section


def compile_step(req: Any) -> tuple:
    """The registry's compile step (see exporters/stack.py): the ONNX Runtime artifact + the harness's runner."""
    section = build(req.onnx_path, req.out, req.precision, calib=req.calib, calib_samples=req.calib_samples,
                    providers=req.providers, keep_first_last_float=req.keep_first_last_float,
                    int8_scheme=req.int8_scheme, progress=req.say)
    run = (stack_runner("onnxruntime", req.out / "model.onnx", req.precision, providers=choose_providers(req.providers))
           if req.want_runner else None)
    return section, run, None
