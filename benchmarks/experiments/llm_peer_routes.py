"""The pruned LM's artifacts for ``llm_peer.py``, one per route and precision, made by the project's
own export and compile code with its defaults (low-bit calibrated on ``calib`` token blocks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import benchmarks.board.lm_bench as lm_bench

#: route:precision, every LM route the project deploys (llama.cpp: the GGUF of ``sglp-edge export --gguf``);
#: onnxruntime-genai ``int4plain``: every decoder MatMul at 4 bits (the default INT4 keeps llama.cpp's mixed
#: layers at 8), ``int4gN``: the default INT4 in groups of N
ROUTES = ("onnxruntime:fp32", "onnxruntime:int8", "onnxruntime:int4", "openvino:fp32", "openvino:int8",
          "openvino:int4", "onnxruntime-genai:fp32", "onnxruntime-genai:int8", "onnxruntime-genai:int4",
          "onnxruntime-genai:int4plain",
          "llama.cpp:q8_0", "llama.cpp:q4_0", "llama.cpp:q4_1", "llama.cpp:q4_k_m")


def _size(path: Path) -> int:
    path = Path(path)
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path, *path.parent.glob(path.stem + ".bin")]
    return sum(f.stat().st_size for f in files if f.suffix in (".onnx", ".data", ".xml", ".bin", ".gguf")
               or f.name.startswith("model.onnx"))


def _graph(kind: str, model: Any, work: Path, calib: Any, reuse: bool) -> Path:
    """The exported graph the compile starts from: the ONNX with past (``onnx-awq``: of the model
    AWQ-scaled on ``calib``, what `sglp-edge run` rounds to INT4), or the stateful OpenVINO IR."""
    import copy

    import torch  # heavy

    ids = torch.as_tensor(calib[:2, :24])
    if kind in ("onnx", "onnx-awq"):
        from sglp_edge.export.awq import awq_scale  # heavy: imports torch
        from sglp_edge.export.lm import export_causal_lm  # heavy: imports torch
        from sglp_edge.tasks.lm_routes import INT4_GROUP  # heavy: imports torch-using modules

        out = work / f"export-{kind}"
        if not (reuse and (out / "model.onnx").is_file()):
            if kind == "onnx-awq":
                model = copy.deepcopy(model)
                awq_scale(model, calib, bits=4, group_size=INT4_GROUP)
            export_causal_lm(model, out, parity_ids=ids)
        return out / "model.onnx"
    from sglp_edge.export.lm_openvino import export_causal_lm_openvino  # heavy: imports torch, openvino

    out = work / "export-openvino"
    if not (reuse and (out / "openvino_model.xml").is_file()):
        export_causal_lm_openvino(model, out, parity_ids=ids)
    return out / "openvino_model.xml"


def build_route(route: str, prec: str, model: Any, src: Path, tok: Any, work: Path, *, calib: Any,
                reuse: bool = False, name: str = "") -> dict[str, Any]:
    """{"path", "size_bytes", "quantization"} of the pruned model's artifact on ``route`` in ``prec``
    (``name``: its folder in ``work``, default ``<route>-<prec>``)."""
    out = work / (name or f"{route}-{prec}")
    if route in ("onnxruntime", "openvino"):
        from exporters.lm_compile import compile_lm  # heavy: onnx / openvino inside

        from sglp_edge.tasks.lm_routes import INT4_GROUP  # heavy: imports torch-using modules

        kind = "openvino" if route == "openvino" else ("onnx-awq" if prec == "int4" else "onnx")
        g = _graph(kind, model, work, calib, reuse)
        art = out / ("model.onnx" if route == "onnxruntime" else "model.xml")
        if not (reuse and art.is_file()):
            man = compile_lm(g, route, prec, out, calib_ids=calib if prec == "int4" else None, group_size=INT4_GROUP)
            art = Path(man["artifact"])
        q = _manifest(out).get("quantization")
        return {"path": art, "size_bytes": _size(art), "quantization": q}
    if route == "onnxruntime-genai":
        from sglp_edge.export.lm_genai import BUILDER_LOWBIT_PLAIN, export_causal_lm_genai  # heavy: imports torch

        if not (reuse and (out / "lm.json").is_file()):  # int4gN: INT4 in groups of N (default 32)
            p, g = (prec[:4], int(prec[5:])) if prec.startswith("int4g") else (prec[:4] if prec == "int4plain"
                                                                               else prec, 32)
            export_causal_lm_genai(src, out, precision=p, calib_ids=calib if p == "int4" else None, group_size=g,
                                   extra_options=BUILDER_LOWBIT_PLAIN if prec == "int4plain" else ())
        return {"path": out, "size_bytes": _size(out), "quantization": _manifest(out, "lm.json").get("quantization")}
    if route == "llama.cpp":
        from sglp_edge.export.gguf import export_gguf  # heavy: imports torch

        path = out / f"model-{prec}.gguf"
        if not (reuse and path.is_file()):
            imatrix = None
            if prec.startswith("q4"):  # data-aware 4-bit: llama-imatrix on the calibration text
                imatrix = work / "calib.txt"
                imatrix.write_text(tok.decode(np.asarray(calib).reshape(-1).tolist(), skip_special_tokens=False))
            meta = export_gguf(src, path, gguf_type=prec, imatrix=imatrix, check=False)  # the yardstick measures it
            path = Path(meta.get("path", path))
        return {"path": path, "size_bytes": path.stat().st_size,
                "quantization": f"llama.cpp {prec.upper()}" + (" (importance matrix of the calibration text)"
                                                             if prec.startswith("q4") else "")}
    raise ValueError(f"unknown route {route!r}")


def _manifest(folder: Path, name: str = "manifest.json") -> dict[str, Any]:
    import json

    p = Path(folder) / name
    return json.loads(p.read_text()) if p.is_file() else {}


def open_route(route: str, path: Path, *, threads: int) -> Any:
    """The harness session of an artifact (the board's own decode loop)."""
    return lm_bench.open_session(str(path), route, threads=threads)
