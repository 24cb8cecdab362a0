"""Compile a decoder-LM graph (``text-generation-with-past`` layout, see ``sglp_edge/export/lm.py``)
for a backend and precision. No torch: this can run on the board.

    onnxruntime  fp32  the exported graph (ORT's own graph optimisations at session creation)
                 int8  weight-only: every constant-weight MatMul -> MatMulNBits, 8 bits, blocks of 128
                 int4  weight-only: MatMulNBits, 4 bits, symmetric blocks of ``group_size``, k-quant
                       rounding (or GPTQ), the LM head at 8 bits (exporters.lm_quant)
                       (both with ``accuracy_level`` 4, int8 compute: ORT's fast CPU path)
    openvino     fp32 / fp16  IR (``compress_to_fp16`` for fp16 weights; the CPU still computes in f32).
                 The source may be the ``.onnx`` or, faster, the stateful ``openvino_model.xml`` of
                 ``sglp_edge.export.lm_openvino`` (fused attention, KV cache as state); either way
                 the weight compression below applies
                 int8  ``nncf.compress_weights`` INT8_ASYM (weight-only; activations stay float)
                 int4  ``nncf.compress_weights`` INT4_SYM, ``group_size`` (must divide the hidden size:
                       64 for SmolLM2's 576), ratio 1.0, the LM head kept INT8 (NNCF's default);
                       with calibration text: AWQ + scale estimation (exporters.lm_quant)
    tensorrt     the same ONNX plus ``trtexec.sh``: one optimisation profile spanning prefill
                 (sequence up to the prompt length, past 0) and decode (sequence 1, past up to the
                 context), built on the board (engines are GPU- and version-specific)

Each output folder holds the artifact and ``manifest.json`` (what was done, sizes, hashes, a short
parity check against the FP32 graph on ONNX Runtime: max abs logit difference and next-token
agreement on a few random prompts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from benchmarks.board.atomic import atomic_dir, atomic_write_json, sha256_file
from benchmarks.board.backends import BACKENDS, BackendSpec, get_backend
from benchmarks.board.errors import UserError
from exporters.lm_quant import ort_weight_only, ov_weight_only

#: backend -> the precisions it compiles a decoder LM in (the backend registry's ``lm_precisions``)
BACKEND_PRECISIONS = {n: b.lm_precisions for n, b in BACKENDS.items() if b.lm_precisions}


def _lm_dims(onnx_path: Path) -> Dict[str, Any]:
    import onnx  # heavy: onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    names = [i.name for i in m.graph.input]
    if names[:3] != ["input_ids", "attention_mask", "position_ids"] or len(names) < 5:
        raise UserError(f"{onnx_path} is not a text-generation-with-past graph (inputs {names[:4]}); export it with "
                        "sglp_edge.export.lm.export_causal_lm")
    d = [x.dim_value or x.dim_param for x in m.graph.input[3].type.tensor_type.shape.dim]
    vocab = m.graph.output[0].type.tensor_type.shape.dim[2].dim_value or None  # logits (batch, sequence, vocab)
    hidden = None
    for init in m.graph.initializer:  # the embedding / LM-head table: (vocab, hidden)
        if len(init.dims) == 2 and vocab and int(init.dims[0]) == vocab:
            hidden = int(init.dims[1])
    return {"inputs": names, "n_past": len(names) - 3, "kv_heads": int(d[1]), "head_dim": int(d[3]), "hidden": hidden,
            "vocab": vocab}


def trtexec_command(dims: Dict[str, Any], *, precision: str, max_prompt: int, max_context: int,
                    engine: str = "model.engine", onnx_name: str = "model.onnx") -> str:
    """One profile whose box covers prefill (seq up to max_prompt, past 0) and decode (seq 1, past
    up to max_context - 1). ``opt`` is decode, the step that dominates generation."""
    kvh, hd = dims["kv_heads"], dims["head_dim"]

    def shapes(seq: int, past: int) -> str:
        s = [f"input_ids:1x{seq}", f"attention_mask:1x{past + seq}", f"position_ids:1x{seq}"]
        s += [f"{n}:1x{kvh}x{past}x{hd}" for n in dims["inputs"][3:]]
        return ",".join(s)

    flags = " --fp16" if precision == "fp16" else ""
    return (f"trtexec --onnx={onnx_name} --saveEngine={engine}{flags} "
            f"--minShapes={shapes(1, 0)} --optShapes={shapes(1, max_context // 2)} "
            f"--maxShapes={shapes(max_prompt, max_context - 1)}")


def _ir_dims(xml: Path) -> Dict[str, Any]:
    """Dims of a stateful IR from the ``lm.json`` its export wrote beside it."""
    meta_path = xml.parent / "lm.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("layout") != "openvino-stateful":
        raise UserError(f"{xml} has no lm.json of a stateful OpenVINO export beside it; export it with "
                        "sglp_edge.export.lm_openvino (or pass the .onnx of sglp_edge.export.lm)")
    return {"inputs": meta["inputs"], "n_past": 2 * int(meta["num_layers"]), "kv_heads": int(meta["kv_heads"]),
            "head_dim": int(meta["head_dim"]), "hidden": meta.get("hidden_size"), "vocab": meta.get("vocab_size")}


def _openvino_logits(path: Path, ids: np.ndarray, dims: Dict[str, Any]) -> np.ndarray:
    """Prefill logits on OpenVINO in f32 (stateful IR: fresh state, ``beam_idx``, f32 KV cache)."""
    import openvino as ov  # heavy: openvino

    core = ov.Core()
    model = core.read_model(str(path))
    stateful = len(model.get_sinks()) > 0
    cfg = {"INFERENCE_PRECISION_HINT": "f32", **({"KV_CACHE_PRECISION": "f32"} if stateful else {})}
    req = core.compile_model(model, "CPU", cfg).create_infer_request()
    b, t = ids.shape
    feed: Dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                   "position_ids": np.tile(np.arange(t), (b, 1))}
    if stateful:
        feed["beam_idx"] = np.arange(b, dtype=np.int32)
    else:
        for n in [i.get_any_name() for i in model.inputs][3:]:
            feed[n] = np.zeros((b, dims["kv_heads"], 0, dims["head_dim"]), np.float32)
    return req.infer(feed)["logits"]


def _parity(art: Path, route: str, ref_path: Path, dims: Dict[str, Any], vocab: int) -> Dict[str, Any]:
    """Prefill of 3 random 16-token prompts: max |logits - the FP32 source's| and next-token agreement.
    The source runs on ONNX Runtime (an .onnx) or on OpenVINO in f32 (a stateful .xml)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (3, 16)).astype(np.int64)
    if ref_path.suffix == ".xml":
        ref, label = _openvino_logits(ref_path, ids, dims), "openvino f32 on the exported stateful IR"
    else:
        import onnxruntime as ort  # heavy: onnxruntime

        so = ort.SessionOptions()
        so.log_severity_level = 3
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(16), (3, 1))}
        for n in dims["inputs"][3:]:
            feed[n] = np.zeros((3, dims["kv_heads"], 0, dims["head_dim"]), np.float32)
        ref = ort.InferenceSession(str(ref_path), so, providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
        label = "onnxruntime fp32 on the exported graph"
        if route == "onnx":
            out = ort.InferenceSession(str(art), so, providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    if route == "openvino":
        out = _openvino_logits(art, ids, dims)
    return {"reference": label, "prompts": 3, "tokens": 16, "max_abs": float(np.abs(out - ref).max()),
            "next_token_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean())}


def _check(onnx_path: Path, backend: str, precision: str, group_size: int,
           accuracy_level: Optional[int]) -> tuple[BackendSpec, Dict[str, Any], Optional[int]]:
    """The request checked before any work: the backend's spec, the graph's dims, the MatMulNBits level."""
    if backend not in BACKEND_PRECISIONS:
        raise UserError(f"unknown backend {backend!r} for an LM; choose one of {', '.join(BACKEND_PRECISIONS)}")
    if precision not in BACKEND_PRECISIONS[backend]:
        raise UserError(f"{backend} compiles LMs in {', '.join(BACKEND_PRECISIONS[backend])}, not {precision}")
    spec = get_backend(backend)
    if not onnx_path.is_file():
        raise UserError(f"LM graph {onnx_path} does not exist")
    if onnx_path.suffix == ".xml" and spec.lm_route != "openvino":
        raise UserError(f"{onnx_path} is an OpenVINO IR: it compiles for openvino only; pass the .onnx of "
                        f"sglp_edge.export.lm for {backend}")
    dims = _ir_dims(onnx_path) if onnx_path.suffix == ".xml" else _lm_dims(onnx_path)
    if precision == "int4" and (not dims["hidden"] or dims["hidden"] % group_size):
        raise UserError(f"INT4 group size {group_size} does not divide the hidden size {dims['hidden']} (or the "
                        "hidden size is unknown: no (vocab, hidden) weight); use a divisor such as 64 or 32")
    ort_nbits = spec.lm_route == "onnx" and precision in ("int8", "int4")
    if accuracy_level is not None and (not ort_nbits or accuracy_level not in (0, 1, 2, 3, 4)):
        raise UserError("accuracy_level (0-4) applies to ONNX Runtime INT8/INT4 weight-only only")
    if ort_nbits and accuracy_level is None:
        accuracy_level = 4
    return spec, dims, accuracy_level


def _copy_graph(onnx_path: Path, art: Path) -> None:
    """The exported graph as it is (with its external data file, if any)."""
    shutil.copyfile(onnx_path, art)
    data = Path(str(onnx_path) + ".data")
    if data.is_file():
        shutil.copyfile(data, art.parent / data.name)


def _openvino_ir(onnx_path: Path, art: Path, precision: str, group_size: int,
                 calib_ids: Any = None) -> Optional[Dict[str, Any]]:
    """The OpenVINO IR, its weights compressed by NNCF for int8/int4 (weight-only; exporters.lm_quant)."""
    import openvino as ov  # heavy: the runtime

    quantization = None
    model = ov.Core().read_model(str(onnx_path))
    if precision in ("int8", "int4"):
        model, quantization = ov_weight_only(model, precision, group_size, calib_ids)
    ov.save_model(model, str(art), compress_to_fp16=(precision == "fp16"))
    del model
    return quantization


def _write_artifact(spec: BackendSpec, onnx_path: Path, tmp: Path, precision: str, dims: Dict[str, Any], *,
                    group_size: int, accuracy_level: Optional[int], max_prompt: int, max_context: int,
                    man: Dict[str, Any], calib_ids: Any = None, int4_algo: str = "k_quant") -> Path:
    """The backend's artifact (and, for a board-built backend, its trtexec build command) into ``tmp``."""
    art = tmp / spec.artifact
    if spec.lm_route == "openvino":
        quantization = _openvino_ir(onnx_path, art, precision, group_size, calib_ids)
        if quantization is not None:  # fp32/fp16 IRs record none
            man["quantization"] = quantization
        return art
    if precision in ("fp32", "fp16"):
        _copy_graph(onnx_path, art)
        man["quantization"] = None
    else:
        man["quantization"] = ort_weight_only(onnx_path, art, bits=8 if precision == "int8" else 4,
                                              group_size=group_size, accuracy_level=accuracy_level,
                                              calib_ids=calib_ids, algo=int4_algo)
    if spec.builds_on == "board":
        cmd = trtexec_command(dims, precision=precision, max_prompt=max_prompt, max_context=max_context)
        (tmp / "trtexec.sh").write_text("#!/bin/sh\n# build on the board (engines are GPU/TensorRT specific)\n"
                                        + cmd + "\n")
        man["trtexec"] = cmd
        man["build_on"] = "board"
    return art


def compile_lm(onnx_path: str | Path, backend: str, precision: str, out_dir: str | Path, *, group_size: int = 64,
               max_prompt: int = 128, max_context: int = 512, parity: bool = True,
               accuracy_level: Optional[int] = None, calib_ids: Any = None,
               int4_algo: str = "k_quant") -> Dict[str, Any]:
    """Compile the LM graph into ``out_dir`` (replaced whole on success); returns the manifest.

    ``accuracy_level`` (ONNX Runtime INT8/INT4 only): MatMulNBits' compute type, ORT's scale: 0 unset,
    1 fp32, 2 fp16, 3 bf16, 4 int8 (activations quantised per block at run time: the fast CPU path).
    ``None``: 4. Measured on the pruned SmolLM2 (benchmarks/experiments/llm_quant.py, 2 threads): 8-bit weights
    decode at 0.27x FP32's tokens/s at level 0 and 1.53x at level 4, for +0.8 % perplexity.

    ``calib_ids`` (blocks, tokens) int64: calibration text for INT4: NNCF AWQ + scale estimation on
    OpenVINO; on ONNX Runtime only with ``int4_algo="gptq"`` (slow). ONNX Runtime's default INT4 is
    k-quant rounding of a graph whose model was AWQ-scaled before export (sglp_edge.export.awq; what
    ``sglp-edge run`` does). See exporters.lm_quant."""
    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    spec, dims, accuracy_level = _check(onnx_path, backend, precision, group_size, accuracy_level)
    vocab = dims["vocab"]
    man: Dict[str, Any] = {"format": "sglp-edge/lm-compile/1", "task": "causal-lm", "backend": backend,
                           "precision": precision, "source": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
                           "layout": "openvino-stateful" if onnx_path.suffix == ".xml" else "text-generation-with-past",
                           "kv_heads": dims["kv_heads"],
                           "head_dim": dims["head_dim"], "num_layers": dims["n_past"] // 2}
    with atomic_dir(Path(out_dir)) as tmp:
        art = _write_artifact(spec, onnx_path, tmp, precision, dims, group_size=group_size,
                              accuracy_level=accuracy_level, max_prompt=max_prompt, max_context=max_context, man=man,
                              calib_ids=calib_ids, int4_algo=int4_algo)
        man["artifacts"] = sorted(f.name for f in tmp.iterdir())
        man["size_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.suffix in (".onnx", ".data", ".xml", ".bin"))
        if parity and spec.builds_on != "board" and vocab:
            man["parity"] = _parity(art, spec.lm_route, onnx_path, dims, vocab)
        man["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(tmp / "manifest.json", man)
    man["artifact"] = str(Path(out_dir) / spec.artifact)
    return man


def _load_calib(path: str) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--calib {path} is not a readable .npy of token ids ({type(e).__name__})") from None
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise UserError(f"--calib {path} must hold integer token ids of shape (blocks, tokens), not {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)


def main(argv: Optional[List[str]] = None) -> int:  # python -m exporters.lm_compile MODEL.onnx BACKEND PREC OUT
    p = argparse.ArgumentParser(prog="python -m exporters.lm_compile")
    p.add_argument("onnx", help="model.onnx of sglp_edge.export.lm, or (openvino only) openvino_model.xml of "
                                "sglp_edge.export.lm_openvino")
    p.add_argument("backend")
    p.add_argument("precision")
    p.add_argument("out")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--accuracy-level", type=int, default=None, help="ORT MatMulNBits compute type (default 4: int8; 0: ORT's unset)")
    p.add_argument("--calib", default=None, help="calibration token blocks (.npy of int64 (blocks, tokens)) for INT4: "
                                                 "NNCF AWQ on OpenVINO, GPTQ on ONNX Runtime with --int4-algo gptq")
    p.add_argument("--int4-algo", default="k_quant", choices=["k_quant", "gptq"], help="ONNX Runtime INT4 rounding")
    a = p.parse_args(argv)
    try:
        calib = _load_calib(a.calib) if a.calib else None
        man = compile_lm(a.onnx, a.backend, a.precision, a.out, group_size=a.group_size,
                         accuracy_level=a.accuracy_level, calib_ids=calib, int4_algo=a.int4_algo)
    except UserError as e:
        print(f"error: {e}")
        return 2
    print(json.dumps({k: man[k] for k in ("backend", "precision", "size_bytes", "artifact") if k in man}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
