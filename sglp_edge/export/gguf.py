"""``sglp-edge export FOLDER --gguf --out X.gguf``: a saved Hugging Face decoder LM (a prune's ``model/``,
a run's ``finetune/model``) -> one llama.cpp GGUF file, F16, Q8_0, Q4_0 or Q4_K_M.

llama.cpp does the work (it is never vendored; see :mod:`benchmarks.board.llama_cpp`):
``convert_hf_to_gguf.py`` writes F16 or Q8_0, ``build/bin/llama-quantize`` turns the F16 file into a
4-bit one. A pruned folder already holds its kept layers renumbered 0..N-1 with ``num_hidden_layers``
= N (checked here, in the weights), so the GGUF has ``blk.0`` .. ``blk.N-1`` and ``block_count`` N
(checked again in the file written). The result is checked and recorded in ``X.gguf.json``: the
structure read back with gguf-py, greedy decoding of the GGUF loaded by transformers against the
source model in PyTorch, and, where ``llama-simple`` is built, llama.cpp's own greedy text against
PyTorch's. Everything is written in a temporary sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.board.atomic import atomic_write_json, sha256_file
from benchmarks.board.diskspace import disk_full_as_fault
from benchmarks.board.errors import UserError
from benchmarks.board.llama_cpp import llama_cpp_root, run_tool, tool

#: --gguf-type -> (convert_hf_to_gguf.py --outtype, llama-quantize type or None)
GGUF_TYPES: dict[str, tuple[str, Optional[str]]] = {
    "f16": ("f16", None), "q8_0": ("q8_0", None), "q4_0": ("f16", "Q4_0"), "q4_1": ("f16", "Q4_1"),
    "q4_k_m": ("f16", "Q4_K_M")}
#: config.model_type of the decoders convert_hf_to_gguf.py converts that sglp-edge prunes (llama: tested)
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")
#: prompts of the greedy checks (PyTorch vs the GGUF in transformers, and vs llama-simple)
PROMPTS = ("The capital of France is", "Once upon a time, there was a little")
NEW_TOKENS = 32
#: end-of-generation tokens llama.cpp stops at besides the vocabulary's eos (llama-vocab.cpp)
EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>", "<|eom_id|>")
#: llama-imatrix on calibration text (--gguf-imatrix): context and most chunks (SmolLM2: about a minute)
IMATRIX_CTX, IMATRIX_CHUNKS = 128, 64
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_BLK = re.compile(r"^blk\.(\d+)\.")


def check_gguf_type(name: str) -> str:
    key = str(name).strip().lower()
    if key not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)} (got {name!r})")
    return key


def source_folder(model: Any) -> Path:
    """The Hugging Face folder of MODEL: the folder itself, or its ``model/`` (a prune output)."""
    src = Path(str(model))
    if not src.is_dir():
        raise UserError(f"--gguf converts a saved Hugging Face folder (a prune's model/ or a run's finetune/model); "
                        f"{src} is not a folder")
    hf = next((d for d in (src, src / "model") if (d / "config.json").is_file()), None)
    if hf is None:
        raise UserError(f"{src} has no config.json (nor model/config.json); give a Hugging Face decoder LM folder "
                        "(save_pretrained, e.g. a prune's model/)")
    return hf


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names from a .safetensors header (8-byte length + JSON), without loading the weights."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-save the model") from None
    return [k for k in header if k != "__metadata__"]


def check_source(model: Any) -> dict[str, Any]:
    """Cheap checks of the source folder, before any work: a decoder LM llama.cpp converts, its weights
    in safetensors, a tokenizer, no code of its own, and layers 0..N-1 with ``num_hidden_layers`` = N."""
    folder = source_folder(model)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'} is unreadable ({e}); re-save the model") from None
    mtype = cfg.get("model_type")
    if mtype not in MODEL_TYPES or not any(str(a).endswith("ForCausalLM") for a in cfg.get("architectures") or []):
        raise UserError(f"{folder}: model_type {mtype!r} ({cfg.get('architectures')}) is not a decoder LM that --gguf "
                        f"converts; supported model_type: {', '.join(MODEL_TYPES)}")
    tok_cfg = folder / "tokenizer_config.json"
    if "auto_map" in cfg or (tok_cfg.is_file() and '"auto_map"' in tok_cfg.read_text()):
        raise UserError(f"{folder} carries its own Python code (auto_map); --gguf does not run it")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{folder} has no tokenizer (tokenizer.json); a GGUF holds its tokenizer: save the model "
                        "with its tokenizer")
    if (folder / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is None:
        raise UserError(f"{folder} has a sentencepiece tokenizer.model; converting it needs: pip install sentencepiece")
    missing = [m for m in ("torch", "transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--gguf needs {', '.join(missing)} (the converter and the checks): pip install 'sglp-edge[llm]'")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{folder} has no .safetensors weights; re-save the model with save_pretrained")
    found = sorted({int(m.group(1)) for w in weights for k in _safetensors_names(w) if (m := _LAYER.match(k))})
    n = int(cfg.get("num_hidden_layers") or 0)
    if found != list(range(n)):
        raise UserError(f"{folder}: num_hidden_layers is {n} but the weights hold layers {found[:6]}"
                        f"{'...' if len(found) > 6 else ''}; a pruned folder must have its layers renumbered "
                        "0..N-1 (save it with sglp_edge.save)")
    prune = {}
    if (folder / "sglp_prune.json").is_file():
        try:
            prune = json.loads((folder / "sglp_prune.json").read_text())
        except ValueError:
            prune = {}
    return {"folder": folder, "config": cfg, "num_hidden_layers": n, "weights": weights,
            "original_num_hidden_layers": prune.get("original_num_hidden_layers", n),
            "kept_layers": prune.get("kept_layers", list(range(n)))}


def find_llama_cpp(explicit: Any, gguf_type: str, imatrix: Any = None) -> Path:
    """llama.cpp's tree (``--llama-cpp``, ``$SGLP_EDGE_LLAMA_CPP``, ``~/.cache/sglp-edge/llama.cpp``), with
    ``llama-quantize`` built for the 4-bit types (and ``llama-imatrix`` for ``imatrix``, a calibration
    text); a one-line UserError naming how to get it."""
    root = llama_cpp_root(explicit, need="source")
    quantized = GGUF_TYPES[check_gguf_type(gguf_type)][1] is not None
    if imatrix is not None and not quantized:
        raise UserError(f"--gguf-imatrix applies to the 4-bit types ({', '.join(k for k, v in GGUF_TYPES.items() if v[1])}"
                        f"), not {gguf_type}")
    if imatrix is not None and not Path(imatrix).is_file():
        raise UserError(f"calibration text {imatrix} does not exist")
    if quantized:
        tool(root, "llama-quantize")
    if imatrix is not None:
        tool(root, "llama-imatrix")
    return root


def _convert(root: Path, folder: Path, dest: Path, outtype: str, name: str, work: Path, timeout: float) -> None:
    """``convert_hf_to_gguf.py`` in a subprocess of this Python, offline."""
    paths = [str(root.resolve() / "gguf-py")]
    if importlib.util.find_spec("sentencepiece") is None:
        # the converter imports sentencepiece before it looks for a tokenizer.model (absent here: checked):
        # a stand-in module lets it fall through to tokenizer.json
        shim = work / "shim" / "sentencepiece"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("class SentencePieceProcessor:\n    def __init__(self, *a, **k):\n"
                                          "        raise ImportError('sentencepiece is not installed')\n")
        paths.append(str(work / "shim"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, str(root.resolve() / "convert_hf_to_gguf.py"), str(folder.resolve()), "--outfile", str(dest),
           "--outtype", outtype, "--model-name", name]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=work)
    except subprocess.TimeoutExpired:
        raise UserError(f"convert_hf_to_gguf.py did not finish in {timeout:.0f} s on {folder}") from None
    if r.returncode != 0 or not dest.is_file():
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-2:])[-400:]
        raise UserError(f"llama.cpp's convert_hf_to_gguf.py failed on {folder} (exit {r.returncode}): {tail}")


def read_gguf(path: Path) -> dict[str, Any]:
    """What the file says: architecture, block_count, blk indices, tensor types, tokenizer flags."""
    from gguf import GGUFReader  # optional: the gguf package comes with sglp-edge[llm]

    r = GGUFReader(str(path))

    def field(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"architecture": arch, "block_count": field(f"{arch}.block_count"), "file_type": field("general.file_type"),
            "blocks": sorted({int(m.group(1)) for t in r.tensors if (m := _BLK.match(t.name))}),
            "tensors": len(r.tensors), "tensor_types": types, "has_output_weight": any(
                t.name == "output.weight" for t in r.tensors),
            "tokenizer_pre": field("tokenizer.ggml.pre"), "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
            "bos_token_id": field("tokenizer.ggml.bos_token_id"), "eos_token_id": field("tokenizer.ggml.eos_token_id"),
            "eot_token_id": field("tokenizer.ggml.eot_token_id")}


def check_structure(info: dict[str, Any], layers: int) -> dict[str, Any]:
    """block_count == the source's num_hidden_layers and blk.0..blk.N-1 all present, or a UserError."""
    ok = info["block_count"] == layers and info["blocks"] == list(range(layers))
    if not ok:
        raise UserError(f"the GGUF written has block_count {info['block_count']} and blocks {info['blocks'][:6]}, "
                        f"not 0..{layers - 1}; nothing was kept")
    return {"block_count": layers, "blocks_contiguous": True, "passed": True}


def greedy_tokens(model: Any, ids: list[int], n: int) -> list[int]:
    import torch  # heavy: torch

    x = torch.tensor([ids])
    with torch.no_grad():  # n tokens, never stopping early: eos is compared by the caller
        g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, use_cache=True,
                           pad_token_id=0, eos_token_id=None)
    return g[0, len(ids):].tolist()


def _first_diff(a: list, b: Any) -> Optional[int]:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def greedy_parity(src_model: Any, tokenizer: Any, gguf: Path, n: int = NEW_TOKENS) -> dict[str, Any]:
    """The GGUF loaded by transformers (dequantized to fp32) against the source model: free-running greedy
    tokens per prompt (identical? first difference) and, on the source's greedy continuation, the
    top-1 agreement and largest logit difference (teacher-forced)."""
    import torch  # heavy: torch
    from transformers import AutoModelForCausalLM  # heavy: transformers

    gg = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                              local_files_only=True).eval()
    rows, agree, total, max_abs = [], 0, 0, 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ref, got = greedy_tokens(src_model, ids, n), greedy_tokens(gg, ids, n)
        with torch.no_grad():
            full = torch.tensor([ids + ref])
            a, b = src_model(full).logits[0, len(ids) - 1:-1], gg(full).logits[0, len(ids) - 1:-1]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ref)
        max_abs = max(max_abs, float((a - b).abs().max()))
        rows.append({"prompt": prompt, "identical": ref == got, "first_difference": _first_diff(ref, got),
                     "pytorch": tokenizer.decode(ref), "gguf": tokenizer.decode(got)})
    return {"prompts": len(PROMPTS), "new_tokens": n, "identical": all(r["identical"] for r in rows),
            "top1_agreement": agree / max(total, 1), "max_abs_logits": max_abs, "per_prompt": rows}


def llama_simple_parity(root: Path, src_model: Any, tokenizer: Any, gguf: Path, info: dict[str, Any],
                        n: int = NEW_TOKENS) -> dict[str, Any]:
    """``llama-simple -m X.gguf -n N PROMPT`` (greedy) against PyTorch's greedy text from the same tokens:
    llama.cpp adds BOS only when the GGUF says so and stops at an end-of-generation token, as done here."""
    try:
        exe = tool(root, "llama-simple")
    except UserError as e:
        return {"skipped": str(e)}
    vocab = tokenizer.get_vocab()
    eog = {i for i in (info["eos_token_id"], info["eot_token_id"], tokenizer.eos_token_id) if i is not None}
    eog |= {vocab[t] for t in EOG_TEXTS if t in vocab}
    rows = []
    for prompt in PROMPTS:
        ids = ([info["bos_token_id"]] if info["add_bos_token"] else []) + tokenizer(
            prompt, add_special_tokens=False)["input_ids"]
        ref = greedy_tokens(src_model, ids, n)
        stop = next((i for i, t in enumerate(ref) if t in eog), len(ref))
        want = tokenizer.decode(ref[:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        try:
            r = subprocess.run([str(exe), "-m", str(gguf), "-n", str(n), prompt], capture_output=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise UserError(f"llama-simple did not finish in 600 s on {gguf}") from None
        if r.returncode != 0:
            tail = " ".join(r.stderr.decode("utf-8", "replace").strip().splitlines()[-2:])[-300:]
            raise UserError(f"llama-simple failed on {gguf} (exit {r.returncode}): {tail}")
        printed = r.stdout.decode("utf-8", "replace")  # the prompt's pieces, then the generated ones, then "\n"
        printed = printed[:-1] if printed.endswith("\n") else printed
        at = printed.find(prompt)
        got = printed[at + len(prompt):] if at >= 0 else printed
        rows.append({"prompt": prompt, "identical": got == want, "first_difference_char": _first_diff(list(want), got),
                     "pytorch": want, "llama_cpp": got})
    return {"prompts": len(PROMPTS), "new_tokens": n, "add_bos_token": info["add_bos_token"],
            "identical": all(r["identical"] for r in rows), "per_prompt": rows}


def run_checks(src: dict[str, Any], gguf: Path, root: Path, info: dict[str, Any],
               log: Callable[[str], None]) -> dict[str, Any]:
    """The greedy checks against the source model in PyTorch fp32 (loaded once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # heavy: torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers

    folder = src["folder"]
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    log(f"checking: {NEW_TOKENS} greedy tokens x {len(PROMPTS)} prompts, the GGUF in transformers vs PyTorch")
    parity = greedy_parity(model, tok, gguf)
    log("checking: llama.cpp's llama-simple (greedy) vs PyTorch")
    return {"parity_vs_pytorch": parity, "llama_simple_vs_pytorch": llama_simple_parity(root, model, tok, gguf, info)}


def export_gguf(model: Any, out: Any, *, gguf_type: str = "f16", llama_cpp: Any = None, check: bool = True,
                imatrix: Any = None, log: Callable[[str], None] = print, timeout: float = 3600) -> dict[str, Any]:
    """Write ``out`` (a .gguf file) and ``out.json`` (what was written and how it was checked) from the
    Hugging Face folder ``model``; both appear only when complete. Returns the JSON's content.
    ``imatrix``: a calibration text for llama-imatrix, whose importance matrix guides the 4-bit types."""
    gguf_type = check_gguf_type(gguf_type)
    src = check_source(model)
    root = find_llama_cpp(llama_cpp, gguf_type, imatrix)
    out = Path(out)
    outtype, qtype = GGUF_TYPES[gguf_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)).resolve()
    seconds: dict[str, float] = {}
    try:
        with disk_full_as_fault(out.parent):
            t = time.time()
            conv = work / f"{out.stem}.{outtype}.gguf"
            log(f"converting {src['folder']} ({src['num_hidden_layers']} layers) to GGUF {outtype.upper()} "
                "with llama.cpp's convert_hf_to_gguf.py")
            _convert(root, src["folder"], conv, outtype, out.stem, work, timeout)
            seconds["convert"] = round(time.time() - t, 1)
            final, mat = conv, None
            if qtype is not None:
                t, final = time.time(), work / out.name
                mat = _quantize(root, conv, final, qtype, imatrix, work, timeout, log)
                conv.unlink()
                seconds["quantize"] = round(time.time() - t, 1)
            info = read_gguf(final)
            meta = _meta(src, out, final, gguf_type, root, info)
            meta["llama_cpp"]["imatrix"] = mat
            if check:
                t = time.time()
                meta.update(run_checks(src, final, root, info, log))
                seconds["check"] = round(time.time() - t, 1)
            meta["seconds"] = seconds
            atomic_write_json(work / "meta.json", meta)
            os.replace(final, out)
            os.replace(work / "meta.json", out.with_name(out.name + ".json"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def _quantize(root: Path, conv: Path, final: Path, qtype: str, imatrix: Any, work: Path, timeout: float,
              log: Callable[[str], None]) -> Optional[dict[str, Any]]:
    """llama-quantize F16 -> ``qtype``, after llama-imatrix on ``imatrix`` when given; what the matrix came from."""
    args: list = []
    mat = None
    if imatrix is not None:
        log(f"computing an importance matrix with llama-imatrix on {imatrix} (at most {IMATRIX_CHUNKS} x "
            f"{IMATRIX_CTX} tokens)")
        run_tool(root, "llama-imatrix", ["-m", conv, "-f", Path(imatrix).resolve(), "-o", work / "imatrix.gguf",
                                         "-c", IMATRIX_CTX, "--chunks", IMATRIX_CHUNKS, "--no-ppl"], timeout=timeout)
        args = ["--imatrix", work / "imatrix.gguf"]
        mat = {"text": str(imatrix), "sha256": sha256_file(imatrix), "ctx": IMATRIX_CTX, "max_chunks": IMATRIX_CHUNKS}
    log(f"quantizing to {qtype} with llama-quantize{' and the importance matrix' if args else ''}")
    run_tool(root, "llama-quantize", args + [conv, final, qtype], timeout=timeout)
    if not final.is_file():
        raise UserError(f"llama-quantize wrote no {qtype} file from {conv.name}")
    return mat


def _meta(src: dict[str, Any], out: Path, final: Path, gguf_type: str, root: Path, info: dict[str, Any]) -> dict:
    return {"path": str(out), "format": "gguf", "gguf_type": gguf_type, "size_bytes": final.stat().st_size,
            "sha256": sha256_file(final),
            "source": {"folder": str(src["folder"]), "model_type": src["config"].get("model_type"),
                       "num_hidden_layers": src["num_hidden_layers"],
                       "original_num_hidden_layers": src["original_num_hidden_layers"],
                       "kept_layers": src["kept_layers"],
                       "weights_sha256": {w.name: sha256_file(w) for w in src["weights"]}},
            "llama_cpp": {"root": str(root), "convert_outtype": GGUF_TYPES[gguf_type][0],
                          "quantize": GGUF_TYPES[gguf_type][1]},
            "gguf": info, "structure": check_structure(info, src["num_hidden_layers"])}
