"""ONNX export of a sentence encoder with its attention mask (Optimum's ``feature-extraction``).

Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has token types),
all ``(batch, sequence)`` int64 with both axes dynamic; outputs ``last_hidden_state``
``(batch, sequence, hidden)`` and ``sentence_embedding`` ``(batch, hidden)`` (masked mean pooling
+ L2, inside the graph, so a runtime needs no pooling code). Parity against PyTorch runs on ONNX
Runtime over real batches with padding (different masks per batch): both outputs, the padded
positions of ``last_hidden_state`` excluded, plus the cosine between the two runtimes' sentence
embeddings. It reuses :mod:`sglp_edge.export.onnx_export`'s session, simplifier and metadata plumbing.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from exporters import onnx_utils as ou
from benchmarks.board.atomic import sha256_file
from benchmarks.board.errors import UserError

from sglp_edge.export.onnx_export import DEFAULT_OPSET, PARITY_ATOL, PARITY_RTOL, ExportResult, dynamic_axes_of, ort_session, ort_version, export_progress
from sglp_edge.models.hf_encoder import pool_normalize
from sglp_edge.tasks.feature_extraction import get_sentence_dataset

OUTPUTS = ("last_hidden_state", "sentence_embedding")


class EncoderExportWrapper(nn.Module):
    """``(input_ids, attention_mask[, token_type_ids]) -> (last_hidden_state, sentence_embedding)``."""

    def __init__(self, model: nn.Module, token_types: bool):
        super().__init__()
        self.model, self.token_types = model, token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"token_type_ids": token_type_ids} if self.token_types else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return hidden, pool_normalize(hidden, attention_mask)


def _uses_token_types(model: nn.Module) -> bool:
    return int(getattr(model.config, "type_vocab_size", 0) or 0) > 1


def _feeds(batch: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    out = []
    for n in names:
        v = batch.get(n)
        if v is None and n == "token_type_ids":
            v = torch.zeros_like(batch["input_ids"])
        if not isinstance(v, torch.Tensor):
            raise UserError(f"an export batch has no {n!r}; give dicts with input_ids and attention_mask")
        out.append(v.detach().cpu().long())
    return tuple(out)


def _example(batch: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Batch >= 2 and sequence >= 2 so the exporter keeps both axes dynamic; padding kept."""
    feeds = _feeds(batch, names)
    if feeds[0].shape[0] < 2:
        feeds = tuple(torch.cat([f, f], 0) for f in feeds)
    if feeds[0].shape[1] < 3:
        raise UserError("the example batch must hold sentences of at least 3 tokens")
    return tuple(f[:2].contiguous() for f in feeds)


def _export(w: nn.Module, ex: tuple[torch.Tensor, ...], names: Sequence[str], opset: int, how: str) -> Any:
    import onnx

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if how == "dynamo":
            from torch.export import Dim

            b, s = Dim("batch", min=1, max=65536), Dim("sequence", min=1, max=4096)
            prog = torch.onnx.export(w, ex, dynamo=True, external_data=False, verbose=False, opset_version=opset,
                                     input_names=list(names), output_names=list(OUTPUTS),
                                     dynamic_shapes=tuple({0: b, 1: s} for _ in names))
            return prog.model_proto
        buf = io.BytesIO()
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes.update({OUTPUTS[0]: {0: "batch", 1: "sequence"}, OUTPUTS[1]: {0: "batch"}})
        torch.onnx.export(w, ex, buf, dynamo=False, opset_version=opset, input_names=list(names),
                          output_names=list(OUTPUTS), dynamic_axes=axes, do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue())


def encoder_parity(w: nn.Module, proto: Any, batches: Sequence[dict[str, torch.Tensor]],
                   names: Sequence[str]) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on ``batches`` (each run at its own padded shape)."""
    sess = ort_session(proto)
    worst_h = worst_e = scale_h = scale_e = 0.0
    cos_min, n, shapes = 1.0, 0, set()
    for b in batches:
        feeds = _feeds(b, names)
        with torch.inference_mode():
            ref_h, ref_e = (t.float().numpy() for t in w(*feeds))
        got_h, got_e = sess.run(list(OUTPUTS), {k: v.numpy() for k, v in zip(names, feeds)})
        real = feeds[1].numpy().astype(bool)  # padded positions carry no meaning: left out
        worst_h = max(worst_h, float(np.abs(got_h - ref_h)[real].max()))
        worst_e = max(worst_e, float(np.abs(got_e - ref_e).max()))
        scale_h = max(scale_h, float(np.abs(ref_h[real]).max()))
        scale_e = max(scale_e, float(np.abs(ref_e).max()))
        cos = (got_e * ref_e).sum(1) / (np.linalg.norm(got_e, axis=1) * np.linalg.norm(ref_e, axis=1))
        cos_min = min(cos_min, float(cos.min()))
        n += int(feeds[0].shape[0])
        shapes.add(tuple(feeds[0].shape))
    passed = worst_h <= PARITY_ATOL + PARITY_RTOL * scale_h and worst_e <= PARITY_ATOL + PARITY_RTOL * scale_e
    return {"samples": n, "shapes_checked": sorted(list(s) for s in shapes), "max_abs": max(worst_h, worst_e),
            "max_abs_last_hidden_state": worst_h, "max_abs_sentence_embedding": worst_e,
            "reference_max_abs_value": scale_h, "embedding_cos_min": cos_min, "atol": PARITY_ATOL,
            "rtol": PARITY_RTOL, "reference": f"pytorch {torch.__version__}", "runtime": ort_version(),
            "passed": bool(passed)}


def export_encoder_onnx(model: nn.Module, example_batch: dict[str, torch.Tensor], out_path: str | Path, *,
                        parity_batches: Sequence[dict[str, torch.Tensor]] | None = None, opset: int | None = None,
                        simplify: str = "onnxslim", exporter: str = "auto", parity_source: str | None = None,
                        extra_metadata: dict[str, Any] | None = None, progress: bool = True) -> ExportResult:
    """Export an encoder to ONE ONNX file at ``out_path`` (atomically), with the attention mask as
    an input; ``parity_batches`` (real, padded sentence batches) are checked on ONNX Runtime."""
    t0 = time.perf_counter()
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise UserError(f"output file {out_path} must end in .onnx")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise UserError(f"unknown exporter {exporter!r}; choose one of auto, dynamo, legacy")
    if simplify not in ou.SIMPLIFIERS:
        raise UserError(f"unknown simplifier {simplify!r}; choose one of {', '.join(ou.SIMPLIFIERS)}")
    opset = int(opset or DEFAULT_OPSET)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if _uses_token_types(model) else [])
    ex = _example(example_batch, names)
    was = model.training
    model.eval()
    w = EncoderExportWrapper(model, "token_type_ids" in names).eval()
    notes: list[str] = []
    try:
        with export_progress(progress) as prog:
            task = prog.add_task("export encoder to ONNX", total=3)
            proto, used, errors = None, None, []
            for how in {"auto": ["dynamo", "legacy"], "dynamo": ["dynamo"], "legacy": ["legacy"]}[exporter]:
                try:
                    proto, used = _export(w, ex, names, opset, how), how
                    break
                except Exception as e:  # noqa: BLE001 - any exporter failure: try the next one
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    errors.append(f"{how}: {type(e).__name__}: {first[:200]}")
            if proto is None:
                raise UserError("ONNX export failed (" + "; ".join(errors) + "); try another --opset or --exporter")
            if errors:
                notes.append(f"dynamo exporter failed, used the legacy exporter ({errors[0]})")
            ou.check_model(proto)
            prog.advance(task)
            simplified, sinfo = ou.simplify_model(proto, simplify)
            if sinfo["applied"]:
                try:
                    encoder_parity(w, simplified, [example_batch], names)  # must still run with the mask
                    proto = simplified
                except Exception as e:  # noqa: BLE001
                    sinfo.update(applied=False, reason=f"simplified model rejected ({str(e).splitlines()[0][:160]})")
            prog.advance(task)
            parity = None
            if parity_batches:
                parity = encoder_parity(w, proto, parity_batches, names)
                parity["inputs"] = parity_source or "user-supplied"
                if not parity["passed"]:
                    notes.append(f"parity above tolerance: max_abs={parity['max_abs']:.3g}")
            else:
                notes.append("no parity batches given: parity against PyTorch was not checked")
            io_desc = ou.io_info(proto)
            meta = {"export": {"exporter": used, "opset": ou.opset_of(proto), "kind": "feature-extraction",
                               "dynamic_axes": dynamic_axes_of(io_desc), "torch": torch.__version__,
                               "model_class": type(model).__name__, "simplify": sinfo,
                               "pooling": "mean over attention_mask, L2-normalised"},
                    "parity_vs_pytorch": parity, **(extra_metadata or {})}
            ou.update_metadata(proto, meta)
            ou.save_onnx(proto, out_path)
            prog.advance(task)
    finally:
        model.train(was)
    return ExportResult(path=out_path, opset=ou.opset_of(proto), exporter=used, kind="feature-extraction",
                        simplify=sinfo, parity=parity, io=io_desc, size_bytes=out_path.stat().st_size,
                        sha256=sha256_file(out_path), fallback_reason=errors[0] if errors else None, warnings=notes,
                        seconds=time.perf_counter() - t0)


def export_loaded_encoder(loaded: Any, out_path: str | Path, *, parity_samples: int = 64, batch_size: int = 16,
                          data_root: str | Path | None = None, **kw: Any) -> ExportResult:
    """``sglp-edge export`` for an encoder (a ``LoadedModel``): parity on real held-out sentences of
    the English corpus, in padded batches of ``batch_size``."""
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source}: exporting an encoder needs its tokenizer (tokenizer files next to config.json)")
    n = max(2, int(parity_samples))
    data = get_sentence_dataset(loaded.tokenizer, data_root, max_length=128,
                                max_sentences={"calibration": 1, "train": 1, "val": 1, "test": n})
    test = data.test
    batches = [test.batch(range(i, min(i + batch_size, len(test)))) for i in range(0, len(test), batch_size)]
    return export_encoder_onnx(loaded.model.eval(), batches[0], out_path, parity_batches=batches,
                               parity_source=f"{len(test)} held-out English sentences ({data.source})",
                               extra_metadata={"model": {"source": str(loaded.source), "kind": loaded.kind,
                                                         "removed_units": list(loaded.removed_units)}}, **kw)
