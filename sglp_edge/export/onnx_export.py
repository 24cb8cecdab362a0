"""PyTorch -> ONNX export with parity against PyTorch written into the file's metadata.

:func:`export_onnx` exports with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``)
by default and falls back to the legacy TorchScript exporter when dynamo fails
(``exporter="auto"``). The result is ONE file below 2 GB (no external data; a model whose weights
reach 2 GB is refused up front, :func:`check_one_file_size`), with a dynamic batch
axis (and a dynamic sequence axis for token models), optionally simplified with onnxslim (default)
or onnxsim, and checked against PyTorch on real inputs with ONNX Runtime: max abs / relative
error and top-1 agreement. What was done is recorded in the ONNX ``metadata_props`` (key
``sglp_edge``, see :mod:`exporters.onnx_utils`).
"""

from __future__ import annotations

import contextlib
import io
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from exporters import onnx_utils as ou
from benchmarks.board.atomic import sha256_file
from benchmarks.board.errors import UserError
from sglp_edge.train.teacher_targets import is_constant

DEFAULT_OPSET = 18  # lowest opset the dynamo exporter emits natively; TensorRT 10.x parses 9..20+
EXPORTERS = ("auto", "dynamo", "legacy")
KINDS = ("image", "tokens")
#: parity passes when max_abs <= ATOL + RTOL * max|reference|
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


@dataclass
class ExportResult:
    path: Path
    opset: int
    exporter: str  # the exporter actually used: "dynamo" | "legacy"
    kind: str
    simplify: dict[str, Any]
    parity: dict[str, Any] | None
    io: dict[str, Any]
    size_bytes: int
    sha256: str
    fallback_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class _ExportWrapper(nn.Module):
    """One tensor in, one tensor out: unwraps HF outputs (``.logits``), tuples and dicts."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind
        self.hf = hasattr(model, "config") and kind == "tokens"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=x, use_cache=False) if self.hf else self.model(x)
        return _first_tensor(out)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    raise UserError(f"the model returned {type(out).__name__}; export needs a tensor (or logits) output")


def export_progress(enabled: bool):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def _as_tensor(x: Any, kind: str) -> torch.Tensor:
    if isinstance(x, (tuple, list)):
        if len(x) != 1:
            raise UserError("export supports single-input models (one image tensor or one input_ids tensor)")
        x = x[0]
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    t = t.detach().cpu()
    if kind == "tokens":
        if t.is_floating_point():
            raise UserError("token models take integer input_ids; got a float tensor")
        return t.long()
    return t.float()


def _example(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Batch >= 2 (and sequence >= 2) so the exporter does not specialise dynamic dims to 0/1."""
    if x.shape[0] < 2:
        x = torch.cat([x, x], 0)
    if kind == "tokens" and x.shape[1] < 2:
        x = torch.cat([x, x], 1)
    return x[:2].contiguous()


def _export_dynamo(w: nn.Module, ex: torch.Tensor, kind: str, opset: int, in_name: str, out_name: str) -> Any:
    from torch.export import Dim

    dims = {0: Dim("batch", min=1, max=65536)}
    if kind == "tokens":
        dims[1] = Dim("sequence", min=1, max=1 << 20)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(w, (ex,), dynamo=True, external_data=False, verbose=False, opset_version=opset,
                                 input_names=[in_name], output_names=[out_name], dynamic_shapes=(dims,))
    return prog.model_proto


def _export_legacy(w: nn.Module, ex: torch.Tensor, kind: str, opset: int, in_name: str, out_name: str) -> Any:
    import onnx

    axes = {0: "batch", 1: "sequence"} if kind == "tokens" else {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(w, (ex,), buf, dynamo=False, opset_version=opset, input_names=[in_name],
                          output_names=[out_name], dynamic_axes={in_name: axes, out_name: axes},
                          do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def ort_session(model_proto: Any):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _torch_outputs(w: nn.Module, x: torch.Tensor, batch: int) -> np.ndarray:
    outs = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            outs.append(w(x[i:i + batch]).float().cpu().numpy())
    return np.concatenate(outs, 0)


def ort_outputs(session: Any, x: np.ndarray, batch_sizes: Sequence[int] = (64,)) -> np.ndarray:
    """Run ``session`` over ``x`` in chunks; cycling through ``batch_sizes`` exercises the dynamic batch."""
    name = session.get_inputs()[0].name
    outs, i, k = [], 0, 0
    while i < x.shape[0]:
        b = batch_sizes[k % len(batch_sizes)]
        outs.append(session.run(None, {name: x[i:i + b]})[0])
        i, k = i + b, k + 1
    return np.concatenate(outs, 0)


def parity_vs_torch(w: nn.Module, model_proto: Any, x: torch.Tensor, *, labels: Any = None, kind: str = "image",
                    batch: int = 64, reference: Any = None) -> dict[str, Any]:
    """Parity of ONNX Runtime against PyTorch on ``x``; ``reference`` = PyTorch outputs for ``x`` when
    the caller already has them (they are not recomputed)."""
    ref = _torch_outputs(w, x, batch) if reference is None else np.asarray(reference, dtype=np.float32)
    if ref.shape[0] != x.shape[0]:
        raise UserError(f"parity reference has {ref.shape[0]} rows for {x.shape[0]} parity inputs")
    sizes = (batch, 1, 3) if x.shape[0] > batch else (max(1, x.shape[0] // 2), 1, 3)
    out = ort_outputs(ort_session(model_proto), x.numpy(), sizes)
    res = ou.compare_outputs(ref, out, labels=labels if kind == "image" else None)
    res.update({"reference": f"pytorch {torch.__version__}", "runtime": ort_version(),
                "batch_sizes_checked": sorted({min(s, x.shape[0]) for s in sizes}),
                "input_shape": list(x.shape), "atol": PARITY_ATOL, "rtol": PARITY_RTOL})
    res["passed"] = bool(res["max_abs"] <= PARITY_ATOL + PARITY_RTOL * res["reference_max_abs_value"])
    if is_constant(torch.from_numpy(np.ascontiguousarray(ref))):  # the same output for every input: proves nothing
        res.update(passed=None, constant_outputs=True)
    return res


def ort_version() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} CPUExecutionProvider"


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    out_path: str | Path,
    *,
    kind: str = "image",
    opset: int | None = None,
    simplify: str = "onnxslim",
    parity_inputs: Any = None,
    parity_labels: Any = None,
    parity_source: str | None = None,
    parity_reference: Any = None,
    exporter: str = "auto",
    input_name: str | None = None,
    output_name: str = "logits",
    extra_metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> ExportResult:
    """Export ``model`` to ONE ONNX file at ``out_path`` (written atomically).

    ``kind`` ``"image"``: input ``input`` ``(batch, C, H, W)`` with a dynamic batch axis;
    ``"tokens"``: input ``input_ids`` ``(batch, sequence)``, both axes dynamic, output the LM logits.
    ``parity_inputs`` (tensor/array ``(N, ...)``, real data) are run through PyTorch and ONNX
    Runtime; the figures go into the result and the file's metadata. ``parity_reference``: the
    PyTorch outputs for ``parity_inputs`` if already computed (saves a second PyTorch pass).
    """
    t0 = time.perf_counter()
    opset = _check_export_args(kind, exporter, simplify, opset)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise UserError(f"output file {out_path} must end in .onnx")
    in_name = input_name or ("input_ids" if kind == "tokens" else "input")
    check_one_file_size(model)
    x = _as_tensor(example_inputs, kind)
    ex = _example(x, kind)
    was_training = model.training
    model.eval()
    w = _ExportWrapper(model, kind).eval()
    notes: list[str] = []
    try:
        with export_progress(progress) as prog:
            task = prog.add_task("export to ONNX", total=4)
            proto, used, fallback_reason = _export_graph(w, ex, kind, opset, in_name, output_name, exporter,
                                                         lambda d: prog.update(task, description=d), notes)
            prog.advance(task)
            prog.update(task, description=f"simplify ({simplify})")
            proto, sinfo = _simplify_checked(proto, simplify, ex, notes)
            prog.advance(task)
            parity = None
            if parity_inputs is not None:
                prog.update(task, description="parity check (PyTorch vs ONNX Runtime)")
                parity = _parity(w, proto, parity_inputs, parity_labels, parity_source, parity_reference, kind, notes)
            else:
                notes.append("no parity inputs given: parity against PyTorch was not checked")
            prog.advance(task)
            prog.update(task, description=f"write {out_path.name}")
            export_meta = {"exporter": used, "fallback_reason": fallback_reason, "opset": ou.opset_of(proto),
                           "requested_opset": opset, "kind": kind, "model_class": type(model).__name__,
                           "simplify": sinfo}
            io_desc = _write(proto, out_path, export_meta, parity, extra_metadata)
            prog.advance(task)
    finally:
        model.train(was_training)
    return ExportResult(path=out_path, opset=ou.opset_of(proto), exporter=used, kind=kind, simplify=sinfo,
                        parity=parity, io=io_desc, size_bytes=out_path.stat().st_size, sha256=sha256_file(out_path),
                        fallback_reason=fallback_reason, warnings=notes, seconds=time.perf_counter() - t0)


def check_one_file_size(model: nn.Module) -> None:
    """Refuse up front, before any export work, a model whose weights alone reach the 2 GB protobuf
    limit of a one-file ONNX (this route writes no external data)."""
    seen, n_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            n_bytes += t.numel() * t.element_size()
    if n_bytes >= ou.TWO_GB:
        raise UserError(f"the model's weights are {n_bytes / 1024**3:.2f} GiB; this export writes ONE .onnx file, "
                        "which must stay below 2 GiB: prune further, or for a decoder LM export with its KV cache "
                        "(sglp-edge export without --no-past: model.onnx + model.onnx.data, any size)")


def _check_export_args(kind: str, exporter: str, simplify: str, opset: int | None) -> int:
    """Refuse an unknown kind / exporter / simplifier or an opset out of range; returns the opset."""
    if kind not in KINDS:
        raise UserError(f"unknown input kind {kind!r}; choose one of {', '.join(KINDS)}")
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if simplify not in ou.SIMPLIFIERS:
        raise UserError(f"unknown simplifier {simplify!r}; choose one of {', '.join(ou.SIMPLIFIERS)}")
    opset = int(opset or DEFAULT_OPSET)
    if not 7 <= opset <= 25:
        raise UserError(f"opset {opset} is out of range; use 17..23 (default {DEFAULT_OPSET})")
    return opset


def _export_graph(w: nn.Module, ex: torch.Tensor, kind: str, opset: int, in_name: str, out_name: str,
                  exporter: str, say: Any, notes: list[str]) -> tuple[Any, str, str | None]:
    """Step 1: the graph from the first exporter that works (dynamo, then legacy under ``auto``),
    checked; returns (model proto, exporter used, why dynamo was not used or None)."""
    used, fallback_reason, proto = None, None, None
    order = {"auto": ["dynamo", "legacy"], "dynamo": ["dynamo"], "legacy": ["legacy"]}[exporter]
    errors = []
    for name in order:
        say(f"export ({name} exporter, opset {opset})")
        try:
            fn = _export_dynamo if name == "dynamo" else _export_legacy
            proto = fn(w, ex, kind, opset, in_name, out_name)
            used = name
            break
        except Exception as e:  # noqa: BLE001 - any exporter failure: try the next one
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
            first = text.splitlines()[0] if text else type(e).__name__
            errors.append(f"{name}: {type(e).__name__}: {first[:200]}")
    if proto is None:
        raise UserError("ONNX export failed (" + "; ".join(errors) + "); try another --opset or --exporter")
    if errors:
        fallback_reason = errors[0]
        notes.append(f"dynamo exporter failed, used the legacy exporter ({errors[0]})")
    if proto.ByteSize() >= ou.TWO_GB:
        raise UserError(f"the exported model is {proto.ByteSize() / 1024**3:.2f} GB; a one-file ONNX must "
                        "stay below 2 GB (prune further)")
    ou.check_model(proto)
    return proto, used, fallback_reason


def _simplify_checked(proto: Any, simplify: str, ex: torch.Tensor, notes: list[str]) -> tuple[Any, dict[str, Any]]:
    """Step 2: the simplified graph when it still runs and keeps its dynamic axes, else the graph as
    exported; returns (model proto, the simplifier's record)."""
    simplified, sinfo = ou.simplify_model(proto, simplify)
    if sinfo["applied"]:
        try:  # the simplified graph must still run and keep the dynamic axes
            sess = ort_session(simplified)
            if [d for d in sess.get_inputs()[0].shape if isinstance(d, int)] == list(ex.shape):
                raise RuntimeError("dynamic axes were fixed by the simplifier")
            proto = simplified
        except Exception as e:  # noqa: BLE001
            sinfo.update(applied=False, reason=f"simplified model rejected ({str(e).splitlines()[0][:160]}); "
                         "kept the unsimplified model", nodes_after=sinfo["nodes_before"])
    if not sinfo["applied"]:
        notes.append(f"simplification skipped: {sinfo['reason']}")
    return proto, sinfo


def _parity(w: nn.Module, proto: Any, inputs: Any, labels: Any, source: str | None, reference: Any, kind: str,
            notes: list[str]) -> dict[str, Any]:
    """Step 3: parity of the graph against PyTorch on ``inputs``, with a note when it is not met."""
    px = _as_tensor(inputs, kind)
    parity = parity_vs_torch(w, proto, px, labels=labels, kind=kind, reference=reference)
    parity["inputs"] = source or "user-supplied"
    if parity.get("constant_outputs"):
        notes.append("parity not checked: the model's outputs do not depend on its input (the same for "
                     "every parity input): are its weights loaded?")
    elif not parity["passed"]:
        notes.append(f"parity above tolerance: max_abs={parity['max_abs']:.3g}")
    return parity


def _write(proto: Any, out_path: Path, export_meta: dict[str, Any], parity: dict[str, Any] | None,
           extra_metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Step 4: metadata into the graph, then the atomic write; returns the graph's inputs/outputs."""
    io_desc = ou.io_info(proto)
    e = export_meta
    meta = {
        "export": {"exporter": e["exporter"], "fallback_reason": e["fallback_reason"], "opset": e["opset"],
                   "requested_opset": e["requested_opset"], "kind": e["kind"], "dynamic_axes": dynamic_axes_of(io_desc),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "model_class": e["model_class"], "simplify": e["simplify"],
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "parity_vs_pytorch": parity,
    }
    if extra_metadata:
        meta.update(extra_metadata)
    ou.update_metadata(proto, meta)
    ou.save_onnx(proto, out_path)
    return io_desc


def dynamic_axes_of(io_desc: dict[str, Any]) -> dict[str, dict[int, str]]:
    out = {}
    for v in io_desc["inputs"] + io_desc["outputs"]:
        axes = {i: d for i, d in enumerate(v["shape"]) if isinstance(d, str)}
        if axes:
            out[v["name"]] = axes
    return out
