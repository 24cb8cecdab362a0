"""Load / validate / annotate / simplify ONNX files (no torch: runs on the board too).

* :func:`load_onnx` turns every way a file can be broken (missing, empty, truncated, corrupt,
  side data missing, checker failure) into one-line :class:`UserError` naming the fix.
* sglp-edge records what it did in the model's ``metadata_props`` under the key ``sglp_edge``
  (one JSON object: exporter, opset, simplification, parity against PyTorch, ...);
  :func:`read_metadata` / :func:`update_metadata` read and merge it.
* :func:`simplify_model` runs onnxslim or onnxsim and skips cleanly (saying why) when the tool is
  missing, raises, or returns a graph that does not pass the checker.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from benchmarks.board.atomic import atomic_path
from benchmarks.board.errors import UserError

META_KEY = "sglp_edge"
TWO_GB = 2 * 1024**3
SIMPLIFIERS = ("onnxslim", "onnxsim", "none")


def _onnx():
    try:
        import onnx  # heavy: onnx
    except ImportError:  # pragma: no cover - onnx is a hard dependency of the export extra
        raise UserError("the 'onnx' package is not installed; pip install onnx") from None
    return onnx


def load_onnx(path: str | Path, *, load_external_data: bool = True, check: bool = True) -> Any:
    """Load an ONNX file, with a clear error for every kind of broken file."""
    onnx = _onnx()
    path = Path(path)
    fix = "re-export it with `sglp-edge export`"
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"ONNX file {path} is empty (0 bytes); {fix}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, RuntimeError, ...
        raise UserError(f"ONNX file {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    external = _external_locations(model)
    if external:
        missing = sorted(loc for loc in external if not (path.parent / loc).is_file())
        if missing:
            raise UserError(f"ONNX file {path} refers to external weight data that is missing ({', '.join(missing)}); "
                            f"keep the side file next to it or {fix} as one file")
        if load_external_data:
            try:
                from onnx.external_data_helper import load_external_data_for_model  # heavy: onnx

                load_external_data_for_model(model, str(path.parent))
            except Exception as e:  # noqa: BLE001
                raise UserError(f"external weight data of {path} is unreadable ({type(e).__name__}: "
                                f"{str(e)[:120]}); {fix}") from None
    if model.ir_version <= 0 or len(model.graph.node) == 0 or len(model.graph.output) == 0:
        raise UserError(f"ONNX file {path} holds no usable graph (truncated or not an ONNX model); {fix}")
    if check:
        check_model(model, path)
    return model


def _external_locations(model: Any) -> set[str]:
    onnx = _onnx()
    locs = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    locs.add(e.value)
    return locs


def check_model(model: Any, path: str | Path | None = None) -> None:
    onnx = _onnx()
    where = f"ONNX file {path}" if path else "ONNX model"
    try:
        if model.ByteSize() < TWO_GB:
            onnx.checker.check_model(model)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx.checker.ValidationError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where} fails the ONNX checker ({first[:160]}); the file is damaged or was written by an "
                        "incompatible tool; re-export it with `sglp-edge export`") from None


def save_onnx(model: Any, path: str | Path) -> Path:
    """Write ``model`` atomically as ONE file (weights inside); refuse models of 2 GB or more."""
    size = model.ByteSize()
    if size >= TWO_GB:
        raise UserError(f"the ONNX model is {size / 1024**3:.2f} GB; one-file ONNX must stay below 2 GB. "
                        "Prune further or export in fp16")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return path


def opset_of(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _walk_nodes(graph: Any) -> Iterable[Any]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _walk_nodes(attr.g)
            for g in attr.graphs:
                yield from _walk_nodes(g)


def op_counts(model: Any) -> collections.Counter:
    """``(domain, op_type) -> count`` over the graph, its subgraphs and local functions."""
    counts: collections.Counter = collections.Counter()
    for node in _walk_nodes(model.graph):
        counts[(node.domain or "", node.op_type)] += 1
    for fn in model.functions:
        for node in fn.node:
            counts[(node.domain or "", node.op_type)] += 1
    return counts


def nodes_by_op(model: Any) -> dict[tuple[str, str], list[str]]:
    """``(domain, op_type) -> node names`` over the graph, subgraphs and local-function bodies."""
    out: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for node in _walk_nodes(model.graph):
        out[(node.domain or "", node.op_type)].append(node.name)
    for fn in model.functions:
        for node in fn.node:
            out[(node.domain or "", node.op_type)].append(f"{fn.name}/{node.name}")
    return out


def _dims(value_info: Any) -> list:
    t = value_info.type.tensor_type
    dims: list = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return dims


def _dtype(value_info: Any) -> str:
    onnx = _onnx()
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)))
    except Exception:  # noqa: BLE001 - bfloat16 / float8 have no numpy type
        return onnx.TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()


def io_info(model: Any) -> dict[str, list[dict[str, Any]]]:
    inits = {i.name for i in model.graph.initializer}
    ins = [{"name": v.name, "dtype": _dtype(v), "shape": _dims(v)} for v in model.graph.input if v.name not in inits]
    outs = [{"name": v.name, "dtype": _dtype(v), "shape": _dims(v)} for v in model.graph.output]
    return {"inputs": ins, "outputs": outs}


def read_metadata(model_or_path: Any) -> dict[str, Any]:
    """The ``sglp_edge`` metadata object ({} when absent). Accepts a path (weights are not loaded)."""
    if isinstance(model_or_path, (str, Path)):
        model_or_path = load_onnx(model_or_path, load_external_data=False, check=False)
    for prop in model_or_path.metadata_props:
        if prop.key == META_KEY:
            try:
                value = json.loads(prop.value)
            except json.JSONDecodeError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def update_metadata(model: Any, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into the model's ``sglp_edge`` metadata object (in place)."""
    meta = read_metadata(model)
    meta.update(updates)
    text = json.dumps(meta, sort_keys=True, default=str)
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            prop.value = text
            break
    else:
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, text
    return meta


def simplify_model(model: Any, method: str = "onnxslim") -> tuple[Any, dict[str, Any]]:
    """Simplify with onnxslim or onnxsim. Never fails: on any problem returns the input model and
    ``info["applied"] = False`` with the reason, so the caller can say so."""
    if method not in SIMPLIFIERS:
        raise UserError(f"unknown simplifier {method!r}; choose one of {', '.join(SIMPLIFIERS)}")
    info: dict[str, Any] = {"method": method, "applied": False, "reason": "", "nodes_before": len(model.graph.node)}
    if method == "none":
        info["reason"] = "simplification disabled (--simplify none)"
        info["nodes_after"] = info["nodes_before"]
        return model, info
    onnx = _onnx()
    try:
        if method == "onnxslim":
            import onnxslim  # heavy: onnxslim (imports onnx)

            info["version"] = getattr(onnxslim, "__version__", "?")
            out = onnxslim.slim(model)
        else:
            import onnxsim  # heavy: onnxsim (imports onnx)

            info["version"] = getattr(onnxsim, "__version__", "?")
            out, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim's own output check failed")
        if out is None:
            raise RuntimeError(f"{method} returned no model")
        onnx.checker.check_model(out)
        # keep metadata written before simplification
        have = {p.key for p in out.metadata_props}
        for p in model.metadata_props:
            if p.key not in have:
                e = out.metadata_props.add()
                e.key, e.value = p.key, p.value
    except ImportError:
        info["reason"] = f"{method} is not installed (pip install {method}); model left unsimplified"
        info["nodes_after"] = info["nodes_before"]
        return model, info
    except Exception as e:  # noqa: BLE001 - any simplifier failure means: keep the original
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        info["reason"] = f"{method} failed ({type(e).__name__}: {first[:160]}); model left unsimplified"
        info["nodes_after"] = info["nodes_before"]
        return model, info
    info["applied"] = True
    info["nodes_after"] = len(out.graph.node)
    return out, info


def compare_outputs(reference: Any, output: Any, *, labels: Any = None) -> dict[str, Any]:
    """Parity figures of ``output`` against ``reference`` (numpy arrays of equal shape).

    ``max_abs``: largest absolute difference; ``max_rel``: ``max_abs`` divided by the largest
    absolute reference value (element-wise relative errors explode near zero, so the scale of the
    reference is used); ``top1_agree``: fraction of rows (samples, or samples x positions for LMs)
    whose arg-max over the last axis agrees. With ``labels``, also both top-1 accuracies.
    """
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise UserError(f"output shape {list(out.shape)} differs from the reference shape {list(ref.shape)}")
    diff = np.abs(out - ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    res: dict[str, Any] = {
        "samples": int(ref.shape[0]) if ref.ndim else 1,
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float(diff.max() / scale) if diff.size and scale > 0 else 0.0,
        "reference_max_abs_value": scale,
    }
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        a, b = ref.argmax(-1), out.argmax(-1)
        res["top1_agree"] = float((a == b).mean())
        res["top1_rows"] = int(a.size)
        if labels is not None and ref.ndim == 2:
            y = np.asarray(labels).reshape(-1)
            res["reference_top1_accuracy"] = float((a == y).mean())
            res["top1_accuracy"] = float((b == y).mean())
    return res
