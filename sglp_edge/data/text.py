"""The English text data set: real prose from the reStructuredText sources of the Python
documentation (Debian package ``python3.11-doc``), split *by document* into calibration /
fine-tune / held-out parts with a seed, tokenised and packed into fixed-length blocks
(:func:`get_text_dataset` returns a :class:`TextDataBundle`)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sglp_edge.data.splits import seeded_perm as _seeded_perm
from benchmarks.board.errors import UserError

TEXT_DOC_ROOT = Path(os.environ.get("SGLP_EDGE_TEXT_CORPUS", "/usr/share/doc/python3.11/html/_sources"))
TEXT_PACKAGE = "python3.11-doc"


def text_documents(root: str | Path | None = None, *, min_chars: int = 200) -> list[tuple[str, str]]:
    """(relative path, text) of every English documentation page, sorted by path."""
    root = Path(root) if root else TEXT_DOC_ROOT
    if not root.is_dir():
        raise UserError(f"English text corpus not found at {root}; install it with `apt-get install {TEXT_PACKAGE}` "
                        "(or pass --data-root DIR holding .rst.txt / .txt files)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".rst.txt", ".txt", ".rst")))
    docs = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) >= min_chars:
            docs.append((str(p.relative_to(root)), text))
    if len(docs) < 3:
        raise UserError(f"{root} holds {len(docs)} usable text files; need at least 3 (install {TEXT_PACKAGE})")
    return docs


def pack_tokens(token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (separated by ``eos_id``) and cut into full ``block_size`` blocks
    (sequence packing; the ragged tail is dropped). Returns a LongTensor (n_blocks, block_size)."""
    flat: list[int] = []
    for toks in token_lists:
        flat.extend(toks)
        if eos_id is not None:
            flat.append(int(eos_id))
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


@dataclass
class TextDataBundle:
    """Packed token blocks of the English corpus, split by document.

    ``calibration`` is for SGLP's CKA/GradNorm, ``train`` (the fine-tune part) for recovery
    training, ``val`` (a slice of the fine-tune documents) for best-checkpoint selection, and
    ``test`` (held-out documents) for the perplexity that is reported."""

    name: str
    calibration: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    block_size: int
    seed: int
    source: str
    documents: dict[str, list[str]]
    modality: str = "tokens"
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> torch.Tensor:
        aliases = {"finetune": "train", "fine-tune": "train", "heldout": "test", "held-out": "test", "calib": "calibration"}
        name = aliases.get(name, name)
        if name not in ("calibration", "train", "val", "test"):
            raise UserError(f"unknown text split {name!r}; use calibration, train (fine-tune), val or test (held-out)")
        return getattr(self, name)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "source": self.source, "seed": self.seed, "block_size": self.block_size,
                "blocks": {k: int(self.split(k).shape[0]) for k in ("calibration", "train", "val", "test")},
                "documents": {k: len(v) for k, v in self.documents.items()}, **self.meta}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        blocks = self.split(split)
        order = _seeded_perm(len(blocks), seed) if shuffle else list(range(len(blocks)))
        for i in range(0, len(order), batch_size):
            yield blocks[order[i:i + batch_size]]

    def calibration_batches(self, n_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
        """A FIXED list of ``n_batches`` input_ids tensors (batch_size, block_size) from the
        calibration documents (never the held-out ones)."""
        blocks = self.calibration
        need = n_batches * batch_size
        if need > len(blocks):
            raise UserError(f"{n_batches} calibration batches of {batch_size} need {need} blocks of {self.block_size} "
                            f"tokens but the calibration split has {len(blocks)}; use fewer or shorter blocks")
        order = _seeded_perm(len(blocks), seed + 7919)[:need]
        return [blocks[order[b * batch_size:(b + 1) * batch_size]].clone() for b in range(n_batches)]


def get_text_dataset(tokenizer: Any, root: str | Path | None = None, *, seed: int = 0, block_size: int = 256,
                     fractions: tuple[float, float, float] = (0.1, 0.8, 0.1), val_fraction: float = 0.05,
                     max_tokens: int | None = None) -> TextDataBundle:
    """Split the corpus's documents (seeded) into calibration / fine-tune / held-out parts,
    tokenise each document, and pack each part into ``block_size`` blocks. ``val`` is carved from
    the fine-tune documents. ``max_tokens`` caps each part (for quick runs)."""
    if block_size < 2:
        raise UserError("block_size must be at least 2 tokens")
    docs = text_documents(root)
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n = len(order)
    n_cal = max(1, int(round(fractions[0] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    cal, test, ft = order[:n_cal], order[n_cal:n_cal + n_test], order[n_cal + n_test:]
    n_val = max(1, int(round(val_fraction * len(ft))))
    val, ft = ft[:n_val], ft[n_val:]
    eos = getattr(tokenizer, "eos_token_id", None)

    def part(idx: list[int]) -> torch.Tensor:
        toks: list[list[int]] = []
        total = 0
        for i in idx:
            t = tokenizer(docs[i][1], add_special_tokens=False)["input_ids"]
            toks.append(list(t))
            total += len(t) + 1
            if max_tokens is not None and total >= max_tokens:
                break
        return pack_tokens(toks, block_size, eos)

    bundle = TextDataBundle(
        name="text", calibration=part(cal), train=part(ft), val=part(val), test=part(test), block_size=block_size,
        seed=seed, source=f"{Path(root) if root else TEXT_DOC_ROOT} (Debian {TEXT_PACKAGE})",
        documents={"calibration": [docs[i][0] for i in cal], "train": [docs[i][0] for i in ft],
                   "val": [docs[i][0] for i in val], "test": [docs[i][0] for i in test]},
        meta={"split": "by document, seeded", "packing": "documents joined with EOS, cut into full blocks"})
    for k in ("calibration", "train", "val", "test"):
        if bundle.split(k).shape[0] == 0:
            raise UserError(f"the text {k} split has no full block of {block_size} tokens; use a smaller block size")
    return bundle
