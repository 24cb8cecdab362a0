"""Accuracy of the compiled artifact itself on held-out data (numpy only: runs on the board).

The evaluation data is one ``.npz`` (its keys: :mod:`benchmarks.board.calib`, ``load_eval_npz``).

Perplexity of a causal LM: the first output is taken as logits (B, T, V); token t+1 is predicted
from position t; positions whose ``attention_mask`` is 0 are ignored;
``ppl = exp(sum NLL / number of predicted tokens)``. Everything is streamed batch by batch, so
LM logits are never all held in memory.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.board.calib import EvalData
from benchmarks.board.errors import UserError

#: (rtol, atol) for allclose against the PyTorch reference, by the precision the artifact runs in.
#: A single fp32 tolerance flags healthy fp16/int8 artifacts (TensorRT #2709), hence per precision.
PARITY_TOLERANCE = {
    "fp32": (1e-3, 1e-3),
    "fp16": (1e-2, 1e-2),
    "bf16": (2e-2, 2e-2),
    "int8": (1e-1, 1e-1),
}

def map_inputs(input_names: list[str], data: EvalData) -> dict[str, str]:
    """Model input name -> npz key."""
    if all(n in data.arrays for n in input_names):
        return {n: n for n in input_names}
    if len(input_names) == 1 and "x" in data.arrays:
        return {input_names[0]: "x"}
    raise UserError(
        f"{data.path.name} has arrays {data.input_keys} but the model's inputs are {input_names}: "
        "store a single-input model's data as 'x', otherwise one array per input name"
    )


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def lm_nll(logits: np.ndarray, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    if logits.ndim != 3:
        raise UserError(f"language-model logits must be (batch, seq, vocab), got shape {logits.shape}")
    lp = log_softmax(logits[:, :-1, :])
    tgt = input_ids[:, 1:].astype(np.int64)
    picked = np.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
    if attention_mask is not None:
        valid = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    else:
        valid = np.ones_like(tgt, dtype=bool)
    return float(-(picked * valid).sum()), int(valid.sum())


def top1(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits.reshape(logits.shape[0], -1) if logits.ndim == 2 else logits, axis=-1)


class _Agreement:
    def __init__(self, precision: str) -> None:
        self.rtol, self.atol = PARITY_TOLERANCE.get(precision, PARITY_TOLERANCE["fp32"])
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.within = 0
        self.top1_same = 0
        self.top1_n = 0
        self.ref_min = math.inf
        self.ref_max = -math.inf
        self.cos_min = math.inf

    def add(self, out: np.ndarray, ref: np.ndarray) -> None:
        out = np.asarray(out, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if out.shape != ref.shape:
            raise UserError(f"'ref_logits' rows have shape {ref.shape[1:]} but the artifact outputs {out.shape[1:]}")
        d = np.abs(out - ref)
        self.max_abs = max(self.max_abs, float(d.max()) if d.size else 0.0)
        self.sum_abs += float(d.sum())
        self.count += d.size
        self.within += int((d <= self.atol + self.rtol * np.abs(ref)).sum())
        self.ref_min = min(self.ref_min, float(ref.min()))
        self.ref_max = max(self.ref_max, float(ref.max()))
        a = np.argmax(out, axis=-1)
        b = np.argmax(ref, axis=-1)
        self.top1_same += int((a == b).sum())
        self.top1_n += int(a.size)
        o2 = out.reshape(out.shape[0], -1)
        r2 = ref.reshape(ref.shape[0], -1)
        denom = np.linalg.norm(o2, axis=1) * np.linalg.norm(r2, axis=1)
        cos = np.where(denom > 0, (o2 * r2).sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
        self.cos_min = min(self.cos_min, float(cos.min()))

    def result(self) -> dict[str, Any]:
        within_pct = 100.0 * self.within / self.count if self.count else None
        return {
            "top1_agreement_pct": 100.0 * self.top1_same / self.top1_n if self.top1_n else None,
            "max_abs_diff": self.max_abs,
            "mean_abs_diff": self.sum_abs / self.count if self.count else None,
            "ref_range": [self.ref_min, self.ref_max],
            "min_cosine_similarity": self.cos_min if self.count else None,
            "tolerance": {"rtol": self.rtol, "atol": self.atol},
            "within_tolerance_pct": within_pct,
            "allclose": (self.within == self.count) if self.count else None,
        }


def _check_inputs(runner: Any, data: EvalData, mapping: dict[str, str]) -> None:
    """Each mapped array's sample shape is the model input's."""
    specs = {s.name: s for s in runner.inputs}
    for name, key in mapping.items():
        want = specs[name].shape[1:]
        got = list(data.arrays[key].shape[1:])
        if want and got != list(want):
            raise UserError(
                f"{data.path.name}: '{key}' samples have shape {got} but the model input {name!r} expects {list(want)}"
            )


def _batch_feeds(data: EvalData, mapping: dict[str, str], start: int, stop: int, batch_size: int) -> dict[str, np.ndarray]:
    """Samples ``start:stop``, the last batch padded to ``batch_size`` by repeating its final sample."""
    real = stop - start
    feeds = {}
    for name, key in mapping.items():
        chunk = data.arrays[key][start:stop]
        if real < batch_size:
            pad = np.repeat(chunk[-1:], batch_size - real, axis=0)
            chunk = np.concatenate([chunk, pad], axis=0)
        feeds[name] = chunk
    return feeds


class _TaskMetric:
    """Top-1 (classification) or perplexity (language model), accumulated batch by batch."""

    def __init__(self, data: EvalData, mapping: dict[str, str], names: list[str]) -> None:
        self.data = data
        self.correct = self.ref_correct = 0
        self.nll_sum, self.ntok = 0.0, 0
        self.ids_key = mapping.get("input_ids") or ("input_ids" if "input_ids" in data.arrays else mapping[names[0]])
        # the mask may be a model input or stored for the metric only
        self.mask_key = mapping.get("attention_mask") or ("attention_mask" if "attention_mask" in data.arrays else None)

    def add(self, out: np.ndarray, start: int, stop: int) -> None:
        data = self.data
        if data.task == "classification":
            labels = data.labels[start:stop].reshape(-1)
            self.correct += int((top1(out) == labels).sum())
            if data.ref is not None:
                self.ref_correct += int((top1(data.ref[start:stop]) == labels).sum())
            return
        ids = data.arrays[self.ids_key][start:stop]
        mask = data.arrays[self.mask_key][start:stop] if self.mask_key else None
        s, c = lm_nll(out, ids, mask)
        self.nll_sum += s
        self.ntok += c

    def result(self, res: dict[str, Any]) -> None:
        data, n = self.data, self.data.n
        if data.task == "classification":
            res["top1_pct"] = 100.0 * self.correct / n
            if data.ref is not None:
                res["reference_top1_pct"] = 100.0 * self.ref_correct / n
                res["top1_drop_vs_reference_pct"] = res["reference_top1_pct"] - res["top1_pct"]
            if data.baseline_top1 is not None:
                res["baseline_top1_pct"] = data.baseline_top1
                res["accuracy_drop_pct"] = data.baseline_top1 - res["top1_pct"]
            return
        if self.ntok == 0:
            raise UserError(f"{data.path.name}: no predicted tokens (sequences shorter than 2, or fully masked)")
        res["nll"] = self.nll_sum / self.ntok
        res["tokens"] = self.ntok
        res["perplexity"] = math.exp(self.nll_sum / self.ntok)
        if data.baseline_ppl is not None:
            res["baseline_perplexity"] = data.baseline_ppl
            res["ppl_increase_pct"] = 100.0 * (res["perplexity"] / data.baseline_ppl - 1.0)


def evaluate(
    runner: Any,
    data: EvalData,
    *,
    batch_size: int,
    precision: str = "fp32",
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, Any]:
    """Run the compiled artifact over all samples (at ``batch_size``; the last batch is padded by
    repeating its final sample and the padding is discarded) and compute the task metric plus
    agreement with the stored PyTorch outputs."""
    names = [s.name for s in runner.inputs]
    mapping = map_inputs(names, data)
    if runner.batch != batch_size:
        runner.set_batch(batch_size)
    _check_inputs(runner, data, mapping)
    n = data.n
    metric = _TaskMetric(data, mapping, names)
    agree = _Agreement(precision) if data.ref is not None else None
    out_idx = runner.output_names.index("logits") if "logits" in runner.output_names else 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        out = np.asarray(runner.infer(_batch_feeds(data, mapping, start, stop, batch_size))[out_idx])[:stop - start]
        metric.add(out, start, stop)
        if agree is not None:
            agree.add(out, data.ref[start:stop])
        if progress:
            progress(stop, n)
    res: dict[str, Any] = {"task": data.task, "samples": n, "batch_size": batch_size, "data": data.path.name}
    metric.result(res)
    if agree is not None:
        res["agreement"] = agree.result()
    return res
