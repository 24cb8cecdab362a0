"""The text of the LM eval data, for a runtime that reads text (llama.cpp; host side).

The board has no tokenizer and llama.cpp's tools take text, so the host decodes the eval data's
token ids and keeps a text only where it re-tokenises to exactly those ids (the optional keys
:data:`benchmarks.board.lm_bench.TEXT_KEYS`):

- ``ppl_text``: the held-out perplexity blocks ``ppl_text_blocks`` decoded and joined. A block holding a
  special token (the EOS between packed documents) is left out: ``llama-perplexity`` reads special
  tokens' text as plain text. Written when at least 2 blocks remain (llama-perplexity needs 2 x its
  context) and their joined text tokenises back to their ids;
- ``greedy_prompt_text`` / ``greedy_reference_text`` / ``greedy_text_index``: each greedy prompt that
  tokenises back to its ids (``llama-simple`` parses special tokens, as the tokenizer does here), and
  PyTorch's greedy continuation up to its first end-of-generation token (where llama-simple stops).

- ``ppl_text_torch_nll`` (given the model): PyTorch's NLL of each of those blocks scored the way
  llama-perplexity scores (the second half of each block), the board's comparable reference.

``python -m sglp_edge.tasks.lm_eval_text EVAL.npz --model MODEL_FOLDER --out OUT.npz`` adds them to
eval data written without them (by an older sglp-edge).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

import numpy as np

from benchmarks.board.errors import UserError
from benchmarks.board.lm_bench import TEXT_KEYS, load_eval_npz, write_eval_npz
from sglp_edge.export.gguf import EOG_TEXTS


def special_ids(tok: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (those it would parse from their text)."""
    ids = {int(i) for i in getattr(tok, "all_special_ids", []) or []}
    for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def eog_ids(tok: Any) -> set[int]:
    """End-of-generation ids llama.cpp stops at: the tokenizer's eos and the usual end-of-turn tokens."""
    vocab = tok.get_vocab()
    ids = {int(vocab[t]) for t in EOG_TEXTS if t in vocab}
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def decode(tok: Any, ids: Sequence[int]) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def round_trips(tok: Any, text: str, ids: Sequence[int]) -> bool:
    return list(tok(text, add_special_tokens=False)["input_ids"]) == [int(i) for i in ids]


def ppl_text(tok: Any, blocks: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ppl_text`` and ``ppl_text_blocks`` (or nothing), and what was checked."""
    blocks = np.asarray(blocks)
    specials = special_ids(tok)
    keep = [i for i, b in enumerate(blocks) if not specials.intersection(int(t) for t in b)]
    meta: dict[str, Any] = {"blocks": int(len(blocks)), "without_special_tokens": len(keep)}
    for attempt in ("joined", "blocks that round-trip alone"):
        if attempt != "joined":  # a block whose own text does not round-trip spoils the join
            keep = [i for i in keep if round_trips(tok, decode(tok, blocks[i]), blocks[i])]
        flat = [int(t) for i in keep for t in blocks[i]]
        text = decode(tok, flat)
        if len(keep) >= 2 and round_trips(tok, text, flat):
            meta.update(written=True, kept=len(keep), check=attempt)
            return {"ppl_text": np.array(text), "ppl_text_blocks": np.array(keep, np.int64)}, meta
    meta.update(written=False, kept=len(keep),
                why="fewer than 2 blocks whose joined text re-tokenises to the same ids")
    return {}, meta


def greedy_text(tok: Any, prompts: np.ndarray, refs: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """The greedy prompts that round-trip, their index, and PyTorch's continuation text (cut at EOG)."""
    eog = eog_ids(tok)
    idx, ptxt, rtxt, cut = [], [], [], 0
    for i, (p, r) in enumerate(zip(np.asarray(prompts), np.asarray(refs))):
        t = decode(tok, p)
        if not round_trips(tok, t, p):
            continue
        r = [int(x) for x in r]
        stop = next((k for k, x in enumerate(r) if x in eog), len(r))
        cut += stop < len(r)
        idx.append(i)
        ptxt.append(t)
        rtxt.append(decode(tok, r[:stop]))
    meta = {"prompts": int(len(prompts)), "written": len(idx), "references_cut_at_eog": cut}
    if not idx:
        return {}, dict(meta, why="no greedy prompt re-tokenises to the same ids")
    return {"greedy_prompt_text": np.array(ptxt), "greedy_reference_text": np.array(rtxt),
            "greedy_text_index": np.array(idx, np.int64)}, meta


def torch_nll_second_half(model: Any, blocks: np.ndarray) -> np.ndarray:
    """PyTorch's mean next-token NLL of each block scored as ``llama-perplexity -c <block>`` scores it: the
    tokens after position ``block // 2``, from the whole block's context (float64 log-softmax)."""
    import torch  # heavy: torch

    out = []
    with torch.no_grad():
        for b in np.asarray(blocks):
            first = len(b) // 2
            ids = torch.as_tensor(np.asarray(b, np.int64))
            lp = torch.log_softmax(model(ids[None]).logits[0, first:-1].double(), -1)
            out.append(-lp.gather(-1, ids[first + 1:, None]).mean().item())
    return np.array(out, np.float64)


def eval_text(tok: Any, ppl_blocks: np.ndarray, prompts: np.ndarray, refs: np.ndarray,
              model: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """All text keys of one eval data set (only those that round-trip) and a record of the checks; with
    ``model``, ``ppl_text_torch_nll`` too: PyTorch's NLL of each ``ppl_text_blocks`` block, scored as
    llama-perplexity scores it (the board's reference for llama.cpp's perplexity)."""
    a, ma = ppl_text(tok, ppl_blocks)
    b, mb = greedy_text(tok, prompts, refs)
    if model is not None and "ppl_text_blocks" in a:
        a["ppl_text_torch_nll"] = torch_nll_second_half(model, np.asarray(ppl_blocks)[a["ppl_text_blocks"]])
    return {**a, **b}, {"ppl_text": ma, "greedy_text": mb}


def add_eval_text(npz: Any, folder: Any, out: Any, *, torch_reference: bool = True) -> dict[str, Any]:
    """Eval data ``npz`` with its text keys (re)computed with the tokenizer of the model ``folder`` (and,
    with ``torch_reference``, its PyTorch NLL scored as llama-perplexity scores), written to ``out``;
    the record of the checks. ``folder`` must be the model the eval data was written for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).float().eval() \
        if torch_reference else None
    d = load_eval_npz(str(npz))
    text, rec = eval_text(tokenizer, d["ppl_blocks"], d["greedy_prompts"], d["greedy_reference"], model=model)
    rec["keys"] = [k for k in TEXT_KEYS if k in text]
    meta = json.loads(str(d["meta"])) if "meta" in d else {}
    meta["text"] = rec
    write_eval_npz(str(out), bench_prompt=d["bench_prompt"], gen_tokens=d["gen_tokens"],
                   greedy_prompts=d["greedy_prompts"], greedy_reference=d["greedy_reference"],
                   ppl_blocks=d["ppl_blocks"], torch_perplexity=float(d["torch_perplexity"]) if "torch_perplexity" in d
                   else None, meta=meta, text=text)
    return rec


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglp_edge.tasks.lm_eval_text", description=__doc__.split("\n\n")[0])
    p.add_argument("npz", help="LM eval data (sglp-edge run: eval_data/eval_pruned.npz)")
    p.add_argument("--model", required=True, help="the folder of the model the eval data is for (its tokenizer and "
                   "weights), e.g. runs/X/finetune/model")
    p.add_argument("--out", required=True, help="where to write the eval data with text")
    p.add_argument("--text-only", action="store_true", help="no PyTorch reference NLL (the model is not loaded)")
    a = p.parse_args(argv)
    try:
        rec = add_eval_text(a.npz, a.model, a.out, torch_reference=not a.text_only)
    except (UserError, OSError) as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2
    sys.stderr.write(f"wrote {a.out}: {json.dumps(rec)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
