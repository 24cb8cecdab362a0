"""The decode models of a causal LM measured on the budget device, one per precision searched
(:mod:`sglp_edge.budget.decode_model`, :mod:`sglp_edge.budget.decode_search`).

The model is cut to a few depths (all layers, ~2/3, ~1/3: the last layers dropped; only the timing
matters, not the quality), each cut is built into the device's real artifact at the precision by
the same calls as the run's compile stage (:mod:`sglp_edge.tasks.lm_routes`: the ONNX graph through
:func:`exporters.lm_compile.compile_lm`, the stateful OpenVINO IR, or onnxruntime-genai's model
builder, INT4 in the route's groups), and each artifact is timed through the device's
:class:`~sglp_edge.targets.base.Target` by the board's LM benchmark (benchmarks/board/lm_bench.py:
a prompt of ``eval.prompt_tokens`` random ids, then ``eval.gen_tokens`` greedy tokens; the median
of its generations) in alternating rounds (a shuffled order each round, so drift and load spread
over every depth alike). Per depth the median over rounds of the time per token and of the TTFT;
two lines are fitted through them. In the first round the same benchmark session scores the
full-depth artifact's perplexity on a few held-out calibration-side blocks (``ppl_full``: q(p)).

Each precision's result is cached as JSON under ``~/.cache/sglp-edge/latency/`` (``SGLP_EDGE_CACHE``
moves it; :mod:`sglp_edge.budget.cache`), keyed by the model's weights, the profile, backend,
precision, threads, the runtime's version, where it ran, the prompt and generation lengths, the
bench settings and the held-out and calibration blocks.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from benchmarks.board.backends import get_backend
from benchmarks.board.errors import UserError
from benchmarks.board.lm_bench import write_eval_npz
from exporters.lm_compile import compile_lm
from sglp_edge.budget.decode_model import METHOD_VERSION, DecodeModel, fit_points, timing_depths
from sglp_edge.budget.cache import cache_file, load_cached, save_cached
from sglp_edge.budget.decode_quality import LayerPerplexity
from sglp_edge.budget.decode_search import DecodeSearch, check_decode_job, decode_precisions
from sglp_edge.budget.latency_model import runtime_version, weights_hash
from sglp_edge.budget.search import check_budget_settings
from sglp_edge.export.lm import export_causal_lm
from sglp_edge.export.lm_genai import export_model_genai
from sglp_edge.export.lm_openvino import export_causal_lm_openvino, stateful_unsupported
from sglp_edge.profiles.load import load_profile
from sglp_edge.targets.base import BenchJob
from sglp_edge.targets.factory import make_target
from sglp_edge.tasks.lm_routes import CALIB_BLOCKS, INT4_GROUP

#: held-out calibration-side blocks the device perplexity of each precision's full-depth artifact is scored on
HELDOUT_BLOCKS = 4


# ---- keys and cache ---------------------------------------------------------------------------
def blocks_sha(ids: Any) -> Optional[str]:
    return None if ids is None else hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()[:16]


def decode_cache_key(model: torch.nn.Module, profile: Any, where: str, *, prompt_tokens: int, gen_tokens: int,
                     depths: list[int], rounds: int, overrides: dict[str, Any], heldout: Any = None,
                     calib: Any = None) -> dict[str, Any]:
    be = get_backend(profile.backend)
    prof = json.dumps(profile.model_dump(mode="json"), sort_keys=True)
    return {"weights": weights_hash(model), "profile": profile.name,
            "profile_sha": hashlib.sha256(prof.encode()).hexdigest()[:12], "backend": profile.backend,
            "precision": profile.precision, "threads": profile.threads,
            "runtime": f"{be.runtime_dist}=={runtime_version(be.runtime_dist)}", "where": where,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "depths": depths, "rounds": rounds,
            "bench": dict(sorted(overrides.items())), "heldout": blocks_sha(heldout), "calib": blocks_sha(calib),
            "method": METHOD_VERSION}


# ---- building and timing ------------------------------------------------------------------------
def cut_to(model: torch.nn.Module, adapter: Any, layers: int) -> torch.nn.Module:
    """``model`` with its last decoder layers dropped down to ``layers`` (a copy; timing only)."""
    units = adapter.units(model)
    return model if layers >= len(units) else adapter.remove(model, [u.name for u in units[layers:]])


def build_lm_artifact(model: torch.nn.Module, tokenizer: Any, profile: Any, out: Path, *, prompt_tokens: int,
                      gen_tokens: int, opset: Optional[int] = None, calib_ids: Any = None) -> Path:
    """The device's artifact of ``model`` at the profile's precision, by the backend's LM route
    with the route's calls (as the run's compile stage builds it: INT4 in groups of
    :data:`~sglp_edge.tasks.lm_routes.INT4_GROUP`, ``calib_ids`` the calibration text of an INT4
    build); returns what the LM benchmark runs (a file or a folder). The ONNX route's INT4 (rounded
    from an AWQ-scaled export in the run) is not a precision an ONNX Runtime profile names, so it
    is not searched."""
    be = get_backend(profile.backend)  # (a board-built backend is refused by check_decode_job)
    out.mkdir(parents=True, exist_ok=True)
    calib = calib_ids if profile.precision == "int4" else None
    if be.lm_route == "genai":
        export_model_genai(model, tokenizer, out / "genai", precision=profile.precision, n_new=4, calib_ids=calib)
        return out / "genai"
    if not be.lm_route or be.builds_on == "board":
        raise UserError(f"backend {profile.backend} has no host-built decoder-LM route; a decode budget needs one")
    if be.lm_route == "openvino" and not stateful_unsupported(model):
        export_causal_lm_openvino(model, out / "export")
        src = out / "export" / "openvino_model.xml"
    else:
        src = Path(export_causal_lm(model, out / "export", opset=opset or 18)["path"])
    man = compile_lm(src, profile.backend, profile.precision, out / "compiled", max_prompt=prompt_tokens,
                     max_context=prompt_tokens + gen_tokens + 1, calib_ids=calib, group_size=INT4_GROUP)
    return Path(man["artifact"])


def timing_data(path: Path, vocab: int, *, prompt_tokens: int, gen_tokens: int, seed: int = 0,
                prompt: Optional[np.ndarray] = None, ppl_blocks: Optional[np.ndarray] = None) -> Path:
    """LM eval data for timing: ``prompt`` (default: random ids), the smallest greedy part, and
    ``ppl_blocks`` (default: the smallest perplexity part, for timing only)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, prompt_tokens) if prompt is None else prompt
    blocks = rng.integers(0, vocab, (1, 4)) if ppl_blocks is None else np.asarray(ppl_blocks, np.int64)
    write_eval_npz(str(path), bench_prompt=prompt, gen_tokens=gen_tokens,
                   greedy_prompts=rng.integers(0, vocab, (1, 4)), greedy_reference=np.zeros((1, 2), np.int64),
                   ppl_blocks=blocks, meta={"model": "decode timing (random ids)"})
    return path


def time_lm_artifacts(target: Any, profile: Any, artifacts: dict[Any, Path], data: Path, work: Path, *, rounds: int,
                      overrides: dict[str, Any], seed: int = 0, log: Optional[Callable[[str], None]] = None,
                      score: Optional[dict[Any, int]] = None) -> dict[Any, dict[str, Any]]:
    """Every artifact benchmarked by the LM benchmark ``rounds`` times in shuffled alternating rounds
    (one perplexity block: timing only); per artifact every round's ms per decoded token and TTFT.
    ``score``: artifacts whose first round scores the perplexity of that many blocks of ``data``
    (after the timing, in the same session): their ``perplexity``."""
    rng = random.Random(seed)
    out: dict[Any, dict[str, Any]] = {n: {"ms_per_token": [], "ttft_ms": []} for n in artifacts}
    order = list(artifacts)
    for r in range(rounds):
        rng.shuffle(order)
        for i, n in enumerate(order):
            ov = {**overrides, "max_eval": (score or {}).get(n, 1) if r == 0 else 1}
            run = target.bench(BenchJob(artifact=artifacts[n], data=data, profile=profile, out_dir=work / f"r{r}-{n}",
                                        overrides=ov, label=f"decode:{n}"))
            if not run.ok:
                raise UserError(f"timing {n} on {target.label or profile.name} failed: {run.error} (logs in {work})")
            m = (run.result or {}).get("metrics", {})
            out[n]["ms_per_token"].append(1000.0 / float(m["decode_tokens_per_s"]))
            out[n]["ttft_ms"].append(float(m["ttft_ms"]))
            if r == 0 and n in (score or {}):
                out[n]["perplexity"] = float(m["perplexity"])
            if log:
                log(f"decode round {r + 1}/{rounds}, {i + 1}/{len(order)}: {n} {m['decode_tokens_per_s']:.1f} tok/s, "
                    f"TTFT {m['ttft_ms']:.1f} ms")
    return out


def time_depths(target: Any, profile: Any, artifacts: dict[int, Path], data: Path, work: Path, *, rounds: int,
                overrides: dict[str, Any], seed: int = 0, log: Optional[Callable[[str], None]] = None,
                score_blocks: int = 0) -> list[dict[str, Any]]:
    """Every depth's artifact timed (:func:`time_lm_artifacts`); per depth the medians over rounds
    of ms per decoded token and TTFT, and every round's figures; with ``score_blocks``, the deepest
    one's device perplexity on that many blocks of ``data``."""
    top = max(artifacts)
    t = time_lm_artifacts(target, profile, {f"L{n}": a for n, a in artifacts.items()}, data, work, rounds=rounds,
                          overrides=overrides, seed=seed, log=log, score={f"L{top}": score_blocks} if score_blocks else None)
    pts = []
    for n in sorted(artifacts, reverse=True):
        ms, ttft = t[f"L{n}"]["ms_per_token"], t[f"L{n}"]["ttft_ms"]
        pts.append({"layers": n, "ms_per_token": float(np.median(ms)), "ttft_ms": float(np.median(ttft)),
                    "tokens_per_s": 1000.0 / float(np.median(ms)), "rounds_ms_per_token": ms, "rounds_ttft_ms": ttft,
                    **({"perplexity": t[f"L{n}"]["perplexity"]} if "perplexity" in t[f"L{n}"] else {})})
    return pts


def verify_decode(run_dir: Path, search: dict[str, Any], bench: dict[str, Any], *, rounds: int,
                  log: Optional[Callable[[str], None]] = None) -> Optional[dict[str, Any]]:
    """The run's compiled ``original`` and ``pruned`` LM artifacts of the budget device timed in
    ``rounds`` alternating passes: per-pass tokens/s and ratios, the median ratio and the anchored
    tokens/s (ratio x the decode model's full-depth prediction). None when they are not there."""
    prof = load_profile(search["device"])  # at the precision the decode budget chose (the run compiled that one)
    prof = prof.model_copy(update={"precision": search.get("precision") or prof.precision})
    be = get_backend(prof.backend)
    d = Path(run_dir) / f"compile-{prof.backend}-{prof.precision}"
    arts = {w: d / w if be.folder_artifact else d / w / be.artifact for w in ("original", "pruned")}
    data = Path(run_dir) / "eval_data" / "eval_pruned.npz"
    if not all(a.exists() for a in arts.values()) or not data.is_file():
        return None
    ov = {k: v for k, v in bench.items() if k not in ("max_eval", "eval_batch")}
    with np.load(data) as z, tempfile.TemporaryDirectory(prefix="sglp-verify-") as tmp:
        # the run's prompt and generation length; the smallest perplexity and greedy parts (timing only)
        timing = timing_data(Path(tmp) / "timing.npz", int(z["ppl_blocks"].max()) + 1, prompt_tokens=0,
                             gen_tokens=int(z["gen_tokens"]), prompt=z["bench_prompt"])
        t = time_lm_artifacts(make_target(prof), prof, arts, timing, Path(tmp), rounds=rounds, overrides=ov, log=log)
    tps = {w: [1000.0 / v for v in t[w]["ms_per_token"]] for w in arts}
    ratios = [p / o for p, o in zip(tps["pruned"], tps["original"])]
    full = search.get("predicted_full_tokens_per_s")
    ratio = float(np.median(ratios))
    return {"rounds": rounds, "ratios": ratios, "ratio": ratio, "pruned_tokens_per_s": tps["pruned"],
            "original_tokens_per_s": tps["original"], "anchored_decode_tokens_per_s": ratio * full if full else None}


def measure_decode_model(model: torch.nn.Module, adapter: Any, tokenizer: Any, profile: Any, target: Any, work: Path,
                         *, prompt_tokens: int, gen_tokens: int, opset: Optional[int] = None, rounds: int = 3,
                         overrides: Optional[dict[str, Any]] = None, seed: int = 0, use_cache: bool = True,
                         log: Optional[Callable[[str], None]] = None, heldout: Any = None,
                         calib: Any = None) -> DecodeModel:
    """The cached decode model of ``model`` on ``target`` at the profile's precision, or a fresh
    measurement (then cached). ``heldout`` (blocks, tokens): the full-depth artifact's device
    perplexity is scored on them (``ppl_full``); ``calib`` (blocks, tokens): the calibration text of
    an INT4 build, given to the full-depth one only (AWQ does not change the graph: the cuts, timed
    only, are built data-free)."""
    ov = {k: v for k, v in (overrides or {}).items() if k not in ("max_eval", "eval_batch")}
    n = len(adapter.units(model))
    depths = timing_depths(n)
    calib = calib if profile.precision == "int4" else None
    key = decode_cache_key(model, profile, getattr(target, "where", "local"), prompt_tokens=prompt_tokens,
                           gen_tokens=gen_tokens, depths=depths, rounds=rounds, overrides=ov, heldout=heldout,
                           calib=calib)
    if use_cache:
        hit = load_cached(DecodeModel, key, "decode-")
        if hit is not None:
            if log:
                log(f"decode model: cached ({cache_file(key, 'decode-')})")
            return hit
    t0 = time.perf_counter()
    arts = {}
    for d in depths:
        if log:
            log(f"decode model: building the {d}-layer cut for {profile.name} ({profile.backend} {profile.precision})")
        net = cut_to(model, adapter, d)
        arts[d] = build_lm_artifact(net, tokenizer, profile, Path(work) / f"L{d}", prompt_tokens=prompt_tokens,
                                    gen_tokens=gen_tokens, opset=opset, calib_ids=calib if d == n else None)
        del net
    data = timing_data(Path(work) / "timing.npz", int(model.config.vocab_size), prompt_tokens=prompt_tokens,
                       gen_tokens=gen_tokens, seed=seed, ppl_blocks=heldout)
    points = time_depths(target, profile, arts, data, Path(work) / "bench", rounds=rounds, overrides=ov, seed=seed,
                         log=log, score_blocks=0 if heldout is None else len(heldout))
    dm = fit_points(n, profile.precision, points, key, measure_s=time.perf_counter() - t0)
    dm.ppl_full = points[0].get("perplexity")
    if use_cache:
        save_cached(dm, "decode-")
    if log:
        log(f"decode model ({profile.precision}): {dm.decode['a_ms']:.3f} + {dm.decode['b_ms']:.4f} x layers ms/token "
            f"(R^2 {dm.decode['r2']:.3f}), TTFT {dm.ttft['a_ms']:.2f} + {dm.ttft['b_ms']:.3f} x layers ms; device "
            f"perplexity at full depth {dm.ppl_full if dm.ppl_full is None else round(dm.ppl_full, 3)} ({dm.measure_s:.0f} s)")
    return dm


def held_out_blocks(calib: Sequence[torch.Tensor], drawn: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(calibration ids, held-out blocks)``: the prune's calibration batches stacked (the first
    :data:`~sglp_edge.tasks.lm_routes.CALIB_BLOCKS` as an INT4 build's calibration text, as the route
    takes), and the rows of ``drawn`` that are none of them (the first :data:`HELDOUT_BLOCKS`)."""
    cal = torch.cat([b for b in calib], 0)
    seen = {tuple(r.tolist()) for r in cal}
    rows = [r for r in drawn if tuple(r.tolist()) not in seen][:HELDOUT_BLOCKS]
    if not rows:
        raise UserError("no calibration-side text block is left beside the prune's own to score the precisions on; "
                        "use fewer prune.calib_batches or more text")
    return cal[:CALIB_BLOCKS].numpy(), torch.stack(rows).numpy()


def make_decode_search(loaded: Any, *, device: Optional[str], tokens_per_s: Optional[float], ttft_ms: Optional[float],
                       margin: float, rounds: int, work: Path, prompt_tokens: int, gen_tokens: int,
                       opset: Optional[int] = None, bench: Optional[dict[str, Any]] = None, seed: int = 0,
                       log: Optional[Callable[[str], None]] = None, use_cache: bool = True,
                       precisions: Optional[Sequence[str]] = None, calib: Optional[Sequence[torch.Tensor]] = None,
                       drawn: Optional[torch.Tensor] = None) -> DecodeSearch:
    """The decode model of ``loaded`` on ``device`` at each precision searched (cached, else
    measured) and the (layers, precision) they predict for the budget; raises the one-line "cannot be
    met" error here, before the analysis. ``calib`` (the prune's calibration batches) and ``drawn``
    (calibration-side blocks beyond them, :func:`held_out_blocks`) give q(p) and ``ppl_layers``."""
    prof = load_profile(device or "local-cpu-ort-lm")
    budget = check_decode_job(prof, None, tokens_per_s, ttft_ms, precisions)
    check_budget_settings(margin, rounds)
    target = make_target(prof)
    if target.emulated:
        raise UserError(f"{prof.name} runs on the emulated ARM board, whose timings are not a board's: a decode "
                        "budget needs real timing (give a board with --host, or a local profile)")
    cal_ids, held = held_out_blocks(calib, drawn) if (calib and drawn is not None) else (None, None)
    models = []
    for p in decode_precisions(prof, precisions):
        try:
            models.append(measure_decode_model(loaded.model, loaded.adapter, loaded.tokenizer,
                                               prof.model_copy(update={"precision": p}), target, Path(work) / p,
                                               prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, opset=opset,
                                               rounds=rounds, overrides=bench, seed=seed, use_cache=use_cache,
                                               log=log, heldout=held, calib=cal_ids))
        except UserError as e:
            if p == prof.precision or precisions is not None:
                raise
            raise UserError(f"the decode budget's {p} build failed: {e} (leave {p} out: --decode-precisions / "
                            "prune.decode_precisions)") from None
    est = LayerPerplexity(loaded.model, loaded.adapter, torch.from_numpy(held)) if held is not None else None
    s = DecodeSearch(models, budget, prof, margin=margin, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                     ppl_layers=est)
    if log:
        ch = s.chosen
        ppl = "" if ch["predicted_perplexity"] is None else f", perplexity {ch['predicted_perplexity']:.3g} (estimate)"
        log(f"decode budget ({budget.describe()}): keep {ch['layers']} of {s.dm.n_layers} layers at {ch['precision']} "
            f"(searched {', '.join(m.precision for m in s.models)}), predicted {ch['predicted_tokens_per_s']:.1f} "
            f"tok/s, TTFT {ch['predicted_ttft_ms']:.1f} ms{ppl}")
    return s
