"""How a causal LM reaches each runtime in ``sglp-edge run``: one route per backend, in one table.

    route = LM_ROUTES[profile.backend]       # the registry's lm_route of the backend: onnx | openvino | genai | gguf
    result = route(pipe, profile)            # a cached stage: {"original": ..., "pruned": ..., "stage": name}

- ``onnx``: :mod:`exporters.lm_compile` on the text-generation-with-past ONNX of the ``export`` stage
  (ONNX Runtime fp32/int8, TensorRT's build command); INT4 rounds the graph of the ``export-awq``
  stage (the models AWQ-scaled on the run's calibration text first);
- ``openvino``: the same compile from the stateful IR of ``export-openvino`` (fused attention, KV
  cache as state: 1.6x the ONNX route's decode on SmolLM2), or from the ONNX when the model cannot
  take the stateful export; INT4 is NNCF's AWQ + scale estimation on the run's calibration text;
- ``genai``: onnxruntime-genai's model builder on the saved models (:mod:`sglp_edge.export.lm_genai`),
  one folder per model (model.onnx, genai_config.json, tokenizer, lm.json with the parity against
  PyTorch; fp32 must reproduce PyTorch's greedy tokens, int8/int4 record theirs); INT4 is the builder's
  k-quant of the models AWQ-scaled on the run's calibration text, the LM head at INT8;
- ``gguf``: llama.cpp's GGUF of the saved models (:mod:`sglp_edge.export.gguf`; fp16 F16, int8 Q8_0,
  int4 Q4_0 with llama-imatrix's importance matrix of the run's calibration text), benchmarked on the
  board by llama.cpp's own tools (benchmarks/board/lm_llama_cpp.py).

Each route writes ``<stage>/original`` and ``<stage>/pruned``; the board stage benchmarks the
backend's artifact there (a file, or for a folder backend the folder itself). A backend names its
route in the backend registry (``lm_route``, benchmarks/board/backends.py); a new kind of route is one
function plus one entry in :data:`ROUTES`.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.board.atomic import atomic_write_json
from benchmarks.board.backends import BACKENDS
from benchmarks.board.errors import UserError
from benchmarks.board.llama_cpp import tool
from exporters.lm_compile import compile_lm
from sglp_edge.export.gguf import export_gguf, find_llama_cpp


def _parity_ids(pipe: Any) -> Any:
    """The first two greedy prompts (24 tokens) of the held-out eval data: the exports' parity prompts."""
    with np.load(pipe.run_dir / "eval_data" / "eval_original.npz") as z:
        return z["greedy_prompts"][:2, :24]


#: calibration blocks of the run's calibration split for low-bit weights (exporters.lm_quant)
CALIB_BLOCKS = 16


def calib_ids(pipe: Any, precision: str) -> Any:
    """Calibration token blocks for a low-bit compile (None for fp32/fp16/int8: nothing to calibrate)."""
    if precision != "int4":
        return None
    return pipe.data.calibration[:CALIB_BLOCKS].numpy()


#: INT4 group size of every LM route in `sglp-edge run` (the onnxruntime-genai builder's default block)
INT4_GROUP = 32


def stage_export_awq(task: Any, pipe: Any) -> dict[str, Any]:
    """The ONNX graph with past of both models, their weights AWQ-scaled on the run's calibration text
    (sglp_edge.export.awq: the same function in float): what an INT4 ONNX Runtime compile rounds."""
    import copy

    import torch  # heavy: torch

    from sglp_edge.export.awq import awq_scale  # heavy: imports torch
    from sglp_edge.export.lm import export_causal_lm  # heavy: imports torch

    final_hash = pipe.runner.file_hash(pipe.final_stage(), "model/model.safetensors")

    def fn(tmp: Path) -> dict[str, Any]:
        ids = torch.from_numpy(_parity_ids(pipe))
        res = {}
        for which, model in task.models(pipe):
            scaled = copy.deepcopy(model)  # the loaded model serves the other stages unchanged
            rec = awq_scale(scaled, calib_ids(pipe, "int4"), bits=4, group_size=INT4_GROUP, log=pipe.log)
            meta = export_causal_lm(scaled, tmp / which, parity_ids=ids)
            del scaled
            res[which] = {"awq": {k: rec[k] for k in ("method", "group_size", "calibration", "error_vs_plain_rounding",
                                                      "seconds")}, "parity": meta["parity_vs_pytorch"]["passed"]}
        return res

    return pipe.runner.stage("export-awq", pipe.inputs("export-awq", task=task.name, final=final_hash,
                                                       calib=CALIB_BLOCKS, group=INT4_GROUP), fn)


def stage_export_openvino(task: Any, pipe: Any) -> dict[str, Any]:
    """The stateful OpenVINO IR of both models (sglp_edge.export.lm_openvino), once per run."""
    import torch  # heavy: torch

    from sglp_edge.export.lm_openvino import export_causal_lm_openvino  # heavy: imports torch

    final_hash = pipe.runner.file_hash(pipe.final_stage(), "model/model.safetensors")

    def fn(tmp: Path) -> dict[str, Any]:
        ids = torch.from_numpy(_parity_ids(pipe))
        res = {}
        for which, model in task.models(pipe):
            meta = export_causal_lm_openvino(model, tmp / which, parity_ids=ids)
            res[which] = {k: meta[k] for k in ("layout", "num_layers", "size_bytes", "sha256", "converter",
                                               "seconds")}
            res[which]["parity"] = meta["parity_vs_pytorch"]
            if not meta["parity_vs_pytorch"]["passed"]:
                raise UserError(f"the OpenVINO export of the {which} model does not reproduce PyTorch "
                                f"({meta['parity_vs_pytorch']}); use an onnxruntime profile")
        return res

    return pipe.runner.stage("export-openvino", pipe.inputs("export-openvino", task=task.name, final=final_hash), fn)


def _compile_from(pipe: Any, prof: Any, src_stage: str, src_file: str) -> dict[str, Any]:
    """exporters.lm_compile on ``<src_stage>/<which>/<src_file>`` for both models, as one cached stage."""
    name = f"compile-{prof.backend}-{prof.precision}"
    hashes = {w: pipe.runner.file_hash(src_stage, f"{w}/{src_file}") for w in ("original", "pruned")}
    e = pipe.cfg.eval

    def fn(tmp: Path) -> dict[str, Any]:
        out = {}
        for which in ("original", "pruned"):
            man = compile_lm(pipe.run_dir / src_stage / which / src_file, prof.backend, prof.precision,
                             tmp / which, max_prompt=e.prompt_tokens, max_context=e.prompt_tokens + e.gen_tokens + 1,
                             calib_ids=calib_ids(pipe, prof.precision), group_size=INT4_GROUP)
            out[which] = {k: man.get(k) for k in ("backend", "precision", "parity", "quantization", "size_bytes",
                                                  "trtexec", "seconds")}
        return out

    return pipe.runner.stage(name, pipe.inputs(name, backend=prof.backend, precision=prof.precision, onnx=hashes,
                                               calib=CALIB_BLOCKS if prof.precision == "int4" else 0), fn) | {"stage": name}


def onnx_route(task: Any, pipe: Any, prof: Any) -> dict[str, Any]:
    if prof.precision == "int4":  # rounded from the AWQ-scaled graph
        stage_export_awq(task, pipe)
        return _compile_from(pipe, prof, "export-awq", "model.onnx")
    return _compile_from(pipe, prof, "export", "model.onnx")


def openvino_route(task: Any, pipe: Any, prof: Any) -> dict[str, Any]:
    from sglp_edge.export.lm_openvino import stateful_unsupported  # heavy: imports torch

    why = stateful_unsupported(pipe.loaded.model)
    if why:
        pipe.log(f"OpenVINO compiles the ONNX graph: {why}")
        return _compile_from(pipe, prof, "export", "model.onnx")
    stage_export_openvino(task, pipe)
    return _compile_from(pipe, prof, "export-openvino", "openvino_model.xml")


def genai_check(cfg: Any, prof: Any, d: dict[str, Any] | None) -> None:
    """Before any heavy work: the package and its builder's import, and a head size its CPU attention
    takes (``d``: the model's sizes from :func:`sglp_edge.tasks.causal_lm.lm_dims`, None if unknown)."""
    from sglp_edge.export.lm_genai import GQA_HEAD_MULTIPLE, INSTALL, require_genai  # heavy: imports torch

    require_genai()
    try:
        import onnx_ir  # noqa: F401  # heavy: onnx-ir, imported only to check that the builder can
    except ImportError:
        raise UserError(f"device {prof.name}: onnxruntime-genai's builder needs the onnx-ir package: {INSTALL}") from None
    if d and (d["hidden"] // d["heads"]) % GQA_HEAD_MULTIPLE:
        raise UserError(f"device {prof.name}: onnxruntime-genai's CPU attention needs a head size that is a multiple of "
                        f"{GQA_HEAD_MULTIPLE}; {cfg.model} has {d['hidden'] // d['heads']}; use an onnxruntime or "
                        "openvino LM profile")


def genai_route(task: Any, pipe: Any, prof: Any) -> dict[str, Any]:
    """onnxruntime-genai folders of both models, built from the saved models by its model builder."""
    from sglp_edge.export.lm_genai import export_causal_lm_genai, export_model_genai, require_genai  # heavy: torch

    require_genai()  # one line naming the install, before anything is written
    name = f"compile-{prof.backend}-{prof.precision}"
    final_hash = pipe.runner.file_hash(pipe.final_stage(), "model/model.safetensors")
    eval_hash = pipe.runner.file_hash("eval_data", "eval_original.npz")
    n_new = pipe.cfg.eval.greedy_tokens

    def fn(tmp: Path) -> dict[str, Any]:
        ids = _parity_ids(pipe).tolist()
        out = {}
        for which in ("original", "pruned"):
            kw = dict(precision=prof.precision, n_new=n_new, parity_prompts_ids=ids,
                      calib_ids=calib_ids(pipe, prof.precision))
            if which == "pruned":  # the folder the pipeline saved (save_hf, with the tokenizer)
                meta = export_causal_lm_genai(pipe.final_model_dir(), tmp / which, **kw)
            else:  # the model as loaded (a GGUF is dequantised): saved to a temporary folder first
                meta = export_model_genai(pipe.loaded.model, pipe.loaded.tokenizer, tmp / which, **kw)
            parity = meta["parity_vs_pytorch"]
            if prof.precision == "fp32" and not parity["passed"]:
                raise UserError(f"onnxruntime-genai's fp32 build of the {which} model does not reproduce PyTorch "
                                f"(greedy agreement {parity['greedy_agreement']:.3f}, max abs logit difference "
                                f"{parity['max_abs']:.3g}); use an onnxruntime profile (local-cpu-ort-lm)")
            out[which] = {"backend": prof.backend, "precision": prof.precision, "parity": {
                k: parity.get(k) for k in ("runtime", "greedy_agreement", "greedy_equal", "max_abs", "passed")},
                "quantization": meta.get("quantization"),
                "size_bytes": meta["size_bytes"], "layout": meta["layout"], "num_layers": meta["num_layers"],
                "onnxruntime_genai": meta["onnxruntime_genai"], "seconds": meta["seconds"]}
        return out

    return pipe.runner.stage(name, pipe.inputs(name, backend=prof.backend, precision=prof.precision, task=task.name,
                                                final=final_hash, eval=eval_hash, n_new=n_new,
                                                calib=CALIB_BLOCKS if prof.precision == "int4" else 0), fn) | {"stage": name}


#: device-profile precision -> GGUF type of the ``gguf`` route (sglp_edge.export.gguf). int4 is Q4_0, not
#: Q4_K_M: Q4_0 quantizes rows in blocks of 32 (any pruned width that ONNX INT4 takes), llama.cpp repacks
#: it for the CPU's SIMD at load (the pruned SmolLM2's Q4_0 decodes 1.7x the unpruned Q4_1), while
#: Q4_K_M needs rows divisible by 256 and falls back to other types where they are not (SmolLM2: 576)
GGUF_TYPE = {"fp16": "f16", "int8": "q8_0", "int4": "q4_0"}


def gguf_check(cfg: Any, prof: Any, d: dict[str, Any] | None) -> None:
    """Before any heavy work: llama.cpp's tree (convert_hf_to_gguf.py; llama-quantize and llama-imatrix
    for int4) and the gguf package the export reads its file back with."""
    root = find_llama_cpp(None, GGUF_TYPE[prof.precision])
    if prof.precision == "int4":
        tool(root, "llama-imatrix")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"device {prof.name}: the GGUF route needs the gguf package: pip install 'sglp-edge[llm]'")


def gguf_route(task: Any, pipe: Any, prof: Any) -> dict[str, Any]:
    """A GGUF of both models (sglp_edge.export.gguf: llama.cpp's converter, llama-quantize) in the
    profile's precision; int4 quantized with llama-imatrix's importance matrix of the run's calibration
    text. ``<which>/model.gguf`` with export_gguf's record (``model.gguf.json``) and ``manifest.json``
    (``gguf_type``, size, sha256, tensor types, F16's greedy parity with PyTorch)."""
    from sglp_edge.models.hf_llm import save_hf  # heavy: torch, transformers

    gtype = GGUF_TYPE[prof.precision]
    name = f"compile-{prof.backend}-{prof.precision}"
    final_hash = pipe.runner.file_hash(pipe.final_stage(), "model/model.safetensors")
    calib = calib_ids(pipe, prof.precision)

    def fn(tmp: Path) -> dict[str, Any]:
        imatrix = None
        if calib is not None:  # data-aware 4-bit: llama-imatrix on the calibration text
            imatrix = tmp / "calib.txt"
            imatrix.write_text(pipe.loaded.tokenizer.decode(np.asarray(calib).reshape(-1).tolist(),
                                                            skip_special_tokens=False), encoding="utf-8")
        out = {}
        for which in ("original", "pruned"):
            if which == "pruned":  # the folder the pipeline saved (save_hf, with the tokenizer)
                src = pipe.final_model_dir()
            else:  # the model as loaded (a GGUF is dequantised): saved to a temporary folder first
                src = save_hf(pipe.loaded.model, tmp / "hf-original", tokenizer=pipe.loaded.tokenizer)
            # F16 is checked against PyTorch (greedy, in transformers and llama-simple); the quantized types'
            # greedy agreement and perplexity are what the board stage measures
            meta = export_gguf(src, tmp / which / "model.gguf", gguf_type=gtype, imatrix=imatrix, log=pipe.log,
                               check=gtype == "f16")
            shutil.rmtree(tmp / "hf-original", ignore_errors=True)
            man = {"backend": prof.backend, "precision": prof.precision, "artifact": "model.gguf",
                   "gguf_type": (meta["llama_cpp"]["quantize"] or meta["llama_cpp"]["convert_outtype"]).upper(),
                   "size_bytes": meta["size_bytes"], "sha256": meta["sha256"], "tensor_types": meta["gguf"]["tensor_types"],
                   "imatrix": bool(imatrix), "parity": {k: (meta.get(k) or {}).get("identical") for k in
                                                        ("parity_vs_pytorch", "llama_simple_vs_pytorch")},
                   "seconds": meta["seconds"]}
            atomic_write_json(tmp / which / "manifest.json", man)
            out[which] = man
        return out

    return pipe.runner.stage(name, pipe.inputs(name, backend=prof.backend, precision=prof.precision, gguf_type=gtype,
                                               task=task.name, final=final_hash,
                                               calib=CALIB_BLOCKS if calib is not None else 0), fn) | {"stage": name}


#: route name (the backend registry's ``lm_route``) -> route function (see the module docstring)
ROUTES: dict[str, Callable[[Any, Any, Any], dict[str, Any]]] = {
    "onnx": onnx_route,
    "openvino": openvino_route,
    "genai": genai_route,
    "gguf": gguf_route,
}
#: route name -> cheap check of a run config before any stage (config load): one line naming the fix
ROUTE_CHECKS: dict[str, Callable[[Any, Any, Any], None]] = {
    "genai": genai_check,
    "gguf": gguf_check,
}
#: backend -> route; a backend the registry gives no ``lm_route`` has no LM route in `sglp-edge run`
LM_ROUTES: dict[str, Callable[[Any, Any, Any], dict[str, Any]]] = {
    n: ROUTES[b.lm_route] for n, b in BACKENDS.items() if b.lm_route}
#: backend -> its route's check, where the route has one
LM_ROUTE_CHECKS: dict[str, Callable[[Any, Any, Any], None]] = {
    n: ROUTE_CHECKS[b.lm_route] for n, b in BACKENDS.items() if b.lm_route in ROUTE_CHECKS}
