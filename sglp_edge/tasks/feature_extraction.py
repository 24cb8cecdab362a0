"""Sentence encoders (Optimum: ``feature-extraction``): data, embedding-KD fine-tune and quality.

- data: real English sentences from the Python documentation (Debian ``python3.11-doc``, the same
  corpus as the LM ``text`` data set): documents are split (seeded) into calibration / fine-tune /
  held-out parts, prose paragraphs are cut into sentences, and a sentence seen in one split is
  dropped from the others, so no sentence is shared;
- loss: embedding distillation ``1 - cos(student, teacher)`` of the sentence embeddings (masked mean
  pooling + L2, :mod:`sglp_edge.models.hf_encoder`), for GradNorm (through the adapter) and KD;
- quality on held-out sentences, pruned against original: **cosine agreement** (mean cosine of the
  two embeddings of each sentence) and **nearest-neighbour agreement** (fraction of sentences whose
  nearest other held-out sentence is the same under both models);
- export: :mod:`sglp_edge.export.encoder` (input_ids + attention_mask [+ token_type_ids]).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from benchmarks.board.errors import UserError
from sglp_edge.data.text import TEXT_DOC_ROOT, TEXT_PACKAGE, text_documents
from sglp_edge.models.hf_encoder import embedding_distillation_loss, pool_normalize
from sglp_edge.train.kd import KDObjective

SPLITS = ("calibration", "train", "val", "test")
_ROLE = re.compile(r":[\w:.+-]+:`!?~?([^`<]*?)\s*(?:<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^>]*>)?`_{1,2}")
_EMPH = re.compile(r"\*{1,2}([^*]+)\*{1,2}")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# ---------------------------------------------------------------------------------------------
# sentences
# ---------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _good(s: str, min_words: int, max_words: int) -> bool:
    words = s.split()
    if not min_words <= len(words) <= max_words or s[-1] not in ".!?" or not s[0].isupper():
        return False
    letters = sum(c.isalpha() for c in s)
    return letters >= 0.7 * len(s.replace(" ", "")) and not any(t in s for t in ("::", "`", "|", ">>>", "http"))


def prose_sentences(text: str, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Sentences of the prose paragraphs of one reStructuredText page: unindented paragraphs that
    are not directives, titles, tables or code; inline markup reduced to its text."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(not ln.strip() or ln[0].isspace() for ln in lines):
            continue  # indented: code, directive bodies, block quotes
        first = lines[0].lstrip()
        if first.startswith(("..", ">>>", "+", "=", "-", "*", "#", "|")) or len(lines) >= 2 and \
                re.fullmatch(r"[=\-~^\"'*#+`]{3,}", lines[-1].strip()):
            continue
        for s in _SPLIT.split(_clean(" ".join(ln.strip() for ln in lines))):
            s = s.strip()
            if s and _good(s, min_words, max_words):
                out.append(s)
    return out


def split_sentences(root: str | Path | None = None, *, seed: int = 0,
                    fractions: tuple[float, float, float] = (0.1, 0.8, 0.1), val_fraction: float = 0.05,
                    max_sentences: dict[str, int] | None = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({split: sentences}, {split: document paths}): documents split as the LM ``text`` data set
    splits them (seeded), then cut into sentences; duplicates are kept once, in the first split of
    held-out, calibration, val, train that holds them, so the splits share no sentence."""
    docs = text_documents(root)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_cal, n_test = max(1, round(fractions[0] * n)), max(1, round(fractions[2] * n))
    parts = {"calibration": order[:n_cal], "test": order[n_cal:n_cal + n_test]}
    ft = order[n_cal + n_test:]
    n_val = max(1, round(val_fraction * len(ft)))
    parts["val"], parts["train"] = ft[:n_val], ft[n_val:]
    seen: set[str] = set()
    sents: dict[str, list[str]] = {}
    for name in ("test", "calibration", "val", "train"):
        got: list[str] = []
        cap = (max_sentences or {}).get(name)
        for i in parts[name]:
            for s in prose_sentences(docs[i][1]):
                if s not in seen:
                    seen.add(s)
                    got.append(s)
        if cap is not None and len(got) > cap:  # a seeded sample, spread over all the split's documents
            got = sorted(random.Random(seed + len(name)).sample(got, cap), key=got.index)
        if not got:
            raise UserError(f"the {name} split has no English sentences; is the corpus (python3.11-doc) complete?")
        sents[name] = got
    return {k: sents[k] for k in SPLITS}, {k: [docs[i][0] for i in parts[k]] for k in SPLITS}


class SentenceSet(Dataset):
    """Tokenised sentences padded to one length; items are dicts of 1-D LongTensors."""

    def __init__(self, sentences: Sequence[str], tokenizer: Any, max_length: int):
        self.sentences = list(sentences)
        enc = tokenizer(self.sentences, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        self.tensors = {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        return trim({k: v[list(idx)] for k, v in self.tensors.items()})


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no sentence of the batch uses."""
    mask = batch["attention_mask"]
    n = max(int(mask.sum(1).max()), 1)
    return {k: (v[:, :n] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == mask.shape else v)
            for k, v in batch.items()}


@dataclass
class SentenceDataBundle:
    """Sentences of the English corpus for an encoder. ``calibration`` feeds SGLP (CKA, GradNorm),
    ``train`` the KD fine-tune, ``val`` best-checkpoint selection, ``test`` (held-out documents)
    the reported agreement."""

    name: str
    calibration: SentenceSet
    train: SentenceSet
    val: SentenceSet
    test: SentenceSet
    max_length: int
    seed: int
    source: str
    documents: dict[str, list[str]]
    modality: str = "sentences"
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "source": self.source, "seed": self.seed, "max_length": self.max_length,
                "sentences": {k: len(getattr(self, k)) for k in SPLITS},
                "documents": {k: len(v) for k, v in self.documents.items()}, **self.meta}

    def calibration_batches(self, n_batches: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """A FIXED list of ``n_batches`` batches of ``batch_size`` calibration sentences, padding
        trimmed to the longest sentence of each batch."""
        need = n_batches * batch_size
        if need > len(self.calibration):
            raise UserError(f"{n_batches} calibration batches of {batch_size} sentences need {need} but the "
                            f"calibration split has {len(self.calibration)}; use fewer or smaller batches")
        order = random.Random(seed + 7919).sample(range(len(self.calibration)), need)
        return [self.calibration.batch(order[b * batch_size:(b + 1) * batch_size]) for b in range(n_batches)]


def get_sentence_dataset(tokenizer: Any, root: str | Path | None = None, *, seed: int = 0, max_length: int = 128,
                         max_sentences: dict[str, int] | None = None) -> SentenceDataBundle:
    """Tokenised sentence splits for an encoder (see :func:`split_sentences`)."""
    if max_length < 4:
        raise UserError(f"the sentence length limit must be at least 4 tokens, got {max_length}")
    sents, docs = split_sentences(root, seed=seed, max_sentences=max_sentences)
    sets = {k: SentenceSet(v, tokenizer, max_length) for k, v in sents.items()}
    return SentenceDataBundle(name="text", **sets, max_length=max_length, seed=seed,
                              source=f"{Path(root) if root else TEXT_DOC_ROOT} (Debian {TEXT_PACKAGE})", documents=docs,
                              meta={"split": "by document, seeded; duplicate sentences kept in one split only",
                                    "unit": "prose sentences of 6-40 words"})


# ---------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sentence_embeddings(model: torch.nn.Module, adapter: Any, data: SentenceSet | Iterable[dict[str, torch.Tensor]],
                        batch_size: int = 64) -> torch.Tensor:
    """(N, hidden) L2-normalised sentence embeddings of a sentence set (or of given batches)."""
    was = model.training
    model.eval()
    try:
        if isinstance(data, SentenceSet):
            batches: Iterable[Any] = (data.batch(range(i, min(i + batch_size, len(data))))
                                      for i in range(0, len(data), batch_size))
        else:
            batches = data
        out = [adapter.embed(model, b).float().cpu() for b in batches]
    finally:
        model.train(was)
    return torch.cat(out, 0)


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Cosine agreement (mean, min over sentences) and nearest-neighbour agreement of two
    embeddings of the same N sentences (N >= 2); rows need not be normalised."""
    if student.shape != teacher.shape or student.dim() != 2 or student.shape[0] < 2:
        raise UserError(f"agreement needs two (N >= 2, hidden) embeddings of the same sentences; got "
                        f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    s = torch.nn.functional.normalize(student.double(), dim=1)
    t = torch.nn.functional.normalize(teacher.double(), dim=1)
    cos = (s * t).sum(1)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return {"cos": float(cos.mean()), "cos_min": float(cos.min()),
            "nn_agree": float((nearest(s) == nearest(t)).double().mean()), "sentences": int(s.shape[0])}


def evaluate_agreement(student: torch.nn.Module, teacher: torch.nn.Module, adapter: Any, data: SentenceSet,
                       teacher_emb: torch.Tensor | None = None, batch_size: int = 64) -> dict[str, float]:
    """:func:`agreement` of ``student`` against ``teacher`` on ``data`` (held-out sentences)."""
    t = sentence_embeddings(teacher, adapter, data, batch_size) if teacher_emb is None else teacher_emb
    return agreement(sentence_embeddings(student, adapter, data, batch_size), t)


# ---------------------------------------------------------------------------------------------
# the KD fine-tune objective (sglp_edge.train.finetune picks it for adapters of modality "sentences")
# ---------------------------------------------------------------------------------------------
class EncoderKDObjective(KDObjective):
    """Embedding distillation: ``1 - cos`` between student and teacher sentence embeddings (plus
    the optional feature-KD MSE on kept layers). Validation score: the mean cosine agreement."""

    def _pair(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = trim(batch)
        with torch.no_grad():
            t = self.adapter.embed(self.teacher, batch)
        return self.adapter.embed(model, batch), t

    def train_loss(self, model, batch):
        s, t = self._pair(model, batch)
        loss = embedding_distillation_loss(s, t)
        shown = {"1-cos": float(loss.detach())}
        loss = self.with_feature_loss(loss, shown)
        return loss, shown

    def eval_sums(self, model, batch):
        s, t = self._pair(model, batch)
        cos = torch.nn.functional.cosine_similarity(s.float(), t.float(), dim=-1)
        return {"n": float(cos.numel()), "cos_sum": float(cos.sum())}

    def finalize(self, sums):
        cos = sums.get("cos_sum", 0.0) / max(sums.get("n", 0.0), 1.0)
        return {"cos": cos, "n": sums.get("n", 0.0), "score": cos}


__all__ = ["EncoderKDObjective", "SentenceDataBundle", "SentenceSet", "agreement", "evaluate_agreement",
           "get_sentence_dataset", "pool_normalize", "prose_sentences", "sentence_embeddings", "split_sentences"]
