"""onnxruntime-genai behind the LM harness's session interface (numpy + onnxruntime-genai; Python 3.8+).

:class:`GenaiSession` runs a folder written by :mod:`sglp_edge.export.lm_genai` (``model.onnx`` +
``genai_config.json``) with onnxruntime-genai's ``Generator`` and offers ``step(ids, past, start)``
like :class:`benchmarks.board.lm_bench.LMSession`, so the harness's ``generate`` / ``speed`` /
``greedy_agreement`` / ``perplexity`` run on it unchanged: ``step`` appends the tokens to the
generator (``append_tokens``: one forward pass over them, the KV cache kept inside the generator in
one preallocated buffer of ``max_length`` tokens) and returns ``get_output("logits")``, the logits of
every appended position. ``start == 0`` starts a new generator (a new sequence); ``past`` is unused
(always ``[]``). Batch 1 only. The harness's argmax decode is used rather than genai's own
``generate_next_token``, so the timings compare like for like with the ONNX Runtime and OpenVINO
sessions (both copy the last logits to numpy each step).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from benchmarks.board.errors import UserError

BACKEND = "onnxruntime-genai"
GENAI_CONFIG = "genai_config.json"
INSTALL = "pip install 'onnxruntime-genai>=0.18'"


def is_genai_folder(path: Any) -> bool:
    p = Path(path)
    return p.is_dir() and (p / GENAI_CONFIG).is_file()


def open_model(og: Any, folder: Any, threads: Optional[int] = None) -> Any:
    """``og.Model`` of a genai folder; ``threads`` sets the decoder session's intra-op threads (a
    genai_config overlay, the file itself untouched)."""
    cfg = og.Config(str(folder))
    if threads:
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
    return og.Model(cfg)


def genai_files(folder: Path) -> List[Path]:
    """The model's files on disk (graph + external weights), not tokenizer or config."""
    return [f for f in sorted(folder.iterdir()) if f.is_file() and f.name.startswith("model.onnx")]


class GenaiSession:
    """An onnxruntime-genai model with the harness's ``step`` interface (batch 1)."""

    stateful = True

    def __init__(self, artifact: str, *, threads: Optional[int] = None, max_length: Optional[int] = None):
        try:
            import onnxruntime_genai as og  # heavy: onnxruntime-genai
        except ImportError as e:
            raise UserError(f"backend {BACKEND} needs the onnxruntime-genai package ({e}): {INSTALL}") from None
        folder = Path(artifact)
        if folder.name == GENAI_CONFIG:
            folder = folder.parent
        if not is_genai_folder(folder):
            raise UserError(f"{artifact} is not an onnxruntime-genai folder (no {GENAI_CONFIG}); export it with "
                            "sglp_edge.export.lm_genai (sglp-edge export ... --genai)")
        self._og = og
        self.backend = BACKEND
        self.artifact = folder
        gcfg = json.loads((folder / GENAI_CONFIG).read_text())
        mcfg = gcfg.get("model", {})
        self.context_length = int(mcfg.get("context_length") or 2048)
        self.max_length = min(int(max_length or 2048), self.context_length)
        self.vocab_size = mcfg.get("vocab_size")
        self._model = open_model(og, folder, threads)
        self._gen = None  # type: Any
        self._pos = 0
        self.input_names = ["input_ids"]
        self.output_names = ["logits"]
        self.n_past, self.kv_heads, self.head_dim = 0, None, None
        self.settings = {"threads": threads, "provider": "cpu", "max_length": self.max_length,
                         "onnxruntime_genai": getattr(og, "__version__", None),
                         "decode_loop": "harness (append_tokens + get_output('logits') + numpy argmax)"}
        manifest = folder / "lm.json"  # sglp_edge.export.lm_genai's record: the weights' precision
        if manifest.is_file():
            try:
                self.settings["export_precision"] = json.loads(manifest.read_text()).get("precision")
            except ValueError:
                pass

    def empty_past(self, batch: int = 1) -> List[np.ndarray]:
        if batch != 1:
            raise UserError(f"backend {BACKEND} runs batch 1 only in this harness (asked for {batch})")
        return []

    def _new_generator(self) -> None:
        self._gen = None  # free the previous KV buffer first
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(do_sample=False, max_length=self.max_length, batch_size=1)
        self._gen = self._og.Generator(self._model, params)
        self._pos = 0

    def step(self, ids: np.ndarray, past: List[np.ndarray], start: int) -> Tuple[np.ndarray, List[np.ndarray]]:
        ids = np.asarray(ids)
        b, t = ids.shape
        if b != 1:
            raise UserError(f"backend {BACKEND} runs batch 1 only in this harness (got {b})")
        if start == 0 or self._gen is None:
            self._new_generator()
        if start != self._pos:
            raise UserError(f"{BACKEND}: step at position {start}, but the sequence holds {self._pos} tokens")
        if start + t > self.max_length:
            raise UserError(f"{BACKEND}: {start + t} tokens exceed max_length {self.max_length}")
        self._gen.append_tokens(ids.astype(np.int32, copy=False))
        self._pos += t
        logits = np.asarray(self._gen.get_output("logits"))
        return logits.reshape(1, -1, logits.shape[-1])[:, -t:], []


def native_generate(sess: GenaiSession, prompt: np.ndarray, n_new: int) -> Dict[str, Any]:
    """onnxruntime-genai's own greedy loop (``generate_next_token``, no logits copied out): tokens and
    timings in :func:`benchmarks.board.lm_bench.generate`'s form (margins not available). It stops at an
    end-of-sequence id, so it may return fewer than ``n_new + 1`` tokens."""
    og = sess._og
    sess._gen = None
    params = og.GeneratorParams(sess._model)
    params.set_search_options(do_sample=False, max_length=min(len(prompt) + n_new + 1, sess.max_length), batch_size=1)
    t0 = time.perf_counter()
    gen = og.Generator(sess._model, params)
    gen.append_tokens(np.asarray(prompt, np.int32)[None, :])
    gen.generate_next_token()
    toks = [int(gen.get_next_tokens()[0])]
    ttft = time.perf_counter() - t0
    steps = []
    while not gen.is_done():
        t1 = time.perf_counter()
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
        steps.append(time.perf_counter() - t1)
    return {"tokens": toks, "ttft_s": ttft, "step_s": steps, "margins": []}
