"""Decoder-LM export for generation: one ONNX graph that serves prefill AND decode with a KV cache.

Layout (Optimum's ``text-generation-with-past``, what TensorRT-LLM-less runtimes, users' own
decode loops and :mod:`benchmarks.board.lm_bench` expect):

    inputs   input_ids (batch, sequence) int64, attention_mask (batch, past_sequence + sequence) int64,
             position_ids (batch, sequence) int64,
             past_key_values.{i}.key / .value (batch, kv_heads, past_sequence, head_dim) float32
    outputs  logits (batch, sequence, vocab), present.{i}.key / .value (batch, kv_heads,
             past_sequence + sequence, head_dim)

Prefill passes an empty past (``past_sequence`` = 0); each decode step passes the previous
``present.*`` back as ``past_key_values.*``. Batch, sequence and past length are dynamic.

Route: ``torch.onnx.export(dynamo=True)`` of a thin wrapper that rebuilds transformers'
``DynamicCache`` from flat tensors. The graph uses standard ONNX operators only, so it runs on ONNX
Runtime, OpenVINO (reads ``.onnx`` directly) and TensorRT. Weights go to one external-data file
``model.onnx.data`` when the model is 2 GB or more, otherwise inside ``model.onnx``.

Proof of the export (written into ``lm.json`` and the ONNX metadata): on ONNX Runtime, prefill of
a prompt followed by token-by-token decode with the cache reproduces PyTorch's full-sequence logits
(max abs difference), and the greedy continuation is identical.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from exporters import onnx_utils as ou
from benchmarks.board.atomic import atomic_dir, sha256_file
from benchmarks.board.errors import UserError
from sglp_edge.models.hf_llm import unsupported_reason

LAYOUT = "text-generation-with-past"
TASK = "causal-lm"
MODEL_FILE = "model.onnx"
META_FILE = "lm.json"
PARITY_ATOL = 1e-3  # fp32 logits of magnitude ~10-30 over 20+ layers: ~1e-5 typical


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def kv_shape(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a transformers decoder config."""
    heads = int(config.num_attention_heads)
    kvh = int(getattr(config, "num_key_value_heads", None) or heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kvh, hd


class _WithPast(nn.Module):
    """Flat tensors in and out; rebuilds the ``DynamicCache`` transformers 5.x wants."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = int(model.config.num_hidden_layers)

    def forward(self, input_ids, attention_mask, position_ids, past):  # past: tuple of 2 * n_layers tensors
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        res = [out.logits]
        for layer in out.past_key_values.layers[: self.n_layers]:
            res += [layer.keys, layer.values]
        return tuple(res)


def _feed(ids: np.ndarray, past: list[np.ndarray], start: int, names: list[str]) -> dict[str, np.ndarray]:
    b, t = ids.shape
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, start + t), np.int64),
            "position_ids": np.tile(np.arange(start, start + t, dtype=np.int64), (b, 1))}
    feed.update(zip(names[3:], past))
    return feed


def torch_reference(model: nn.Module, ids: torch.Tensor, n_new: int = 4) -> dict[str, np.ndarray]:
    """PyTorch's full-sequence logits of ``ids`` and its ``n_new`` greedy tokens (``model.generate``):
    computed BEFORE a runtime loads its own copy of the weights, so the two never run side by side."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().numpy()
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                             use_cache=True, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].numpy()
    return {"logits": logits, "greedy": gen}


def prefill_decode_parity(step: Callable[[np.ndarray, Any, int], tuple[np.ndarray, Any]], empty_past: Any,
                          model: nn.Module | None, ids: torch.Tensor, *, split: int, n_new: int = 4,
                          reference: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Prefill ``ids[:, :split]`` then decode ``ids[:, split:]`` one token at a time through a runtime
    with a KV cache (``step(ids, past, start) -> (logits, past)``, starting from ``empty_past``),
    against PyTorch's one full-sequence forward (``max_abs``); the whole block in one runtime pass
    against the same (``full_block_max_abs``); plus ``n_new`` greedy tokens against ``model.generate``.
    ``reference``: :func:`torch_reference` of ``ids``, computed beforehand (``model`` is then unused)."""
    ref = reference if reference is not None else torch_reference(model, ids, n_new)
    b, total = ids.shape
    x = ids.numpy()
    full, _ = step(x, empty_past, 0)
    full_max = float(np.abs(full - ref["logits"]).max())
    del full
    out, past = step(x[:, :split], empty_past, 0)
    max_abs = float(np.abs(out - ref["logits"][:, :split]).max())  # compared per step: no second block of logits
    for t in range(split, total):
        out, past = step(x[:, t:t + 1], past, t)
        max_abs = max(max_abs, float(np.abs(out - ref["logits"][:, t:t + 1]).max()))
    toks, nxt = [], out[:, -1].argmax(-1)
    for t in range(n_new):
        toks.append(nxt)
        out, past = step(nxt[:, None], past, total + t)
        nxt = out[:, -1].argmax(-1)
    same = bool((np.stack(toks, 1) == ref["greedy"]).all())
    return {"max_abs": max_abs, "max_ref": float(np.abs(ref["logits"]).max()), "batch": b, "prefill_tokens": split,
            "decode_tokens": total - split, "greedy_tokens": n_new, "greedy_equal": same,
            "block_tokens": total, "full_block_max_abs": full_max,
            "passed": bool(max(max_abs, full_max) <= PARITY_ATOL and same)}


def cache_parity(session: Any, model: nn.Module | None, ids: torch.Tensor, *, split: int, n_new: int = 4,
                 reference: dict[str, np.ndarray] | None = None, config: Any = None) -> dict[str, Any]:
    """:func:`prefill_decode_parity` on ONNX Runtime (``session``), the cache passed as graph inputs/outputs.
    ``config``: the model's config when ``model`` is None (a precomputed ``reference``)."""
    names = [i.name for i in session.get_inputs()]
    cfg = config if config is not None else model.config
    kvh, hd = kv_shape(cfg)
    n_layers = int(cfg.num_hidden_layers)
    empty = [np.zeros((ids.shape[0], kvh, 0, hd), np.float32) for _ in range(2 * n_layers)]

    def step(tokens: np.ndarray, past: list[np.ndarray], start: int) -> tuple[np.ndarray, list[np.ndarray]]:
        out = session.run(None, _feed(tokens, past, start, names))
        return out[0], out[1:]

    return prefill_decode_parity(step, empty, model, ids, split=split, n_new=n_new, reference=reference)


def shared_initializers(path: Path, module: nn.Module) -> dict[str, np.ndarray]:
    """External-data initializers of the ONNX file ``path`` that are tensors of ``module`` stored unchanged
    (same name, dtype, shape and bytes, checked by reading the file in chunks): name -> a numpy view of
    the torch tensor's own memory. Initializers the exporter rewrote (e.g. the transposed Linear
    weights the dynamo exporter folds) have other names and are not in the result."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, np.ndarray] = {}
    for init in proto.graph.initializer:
        t = tensors.get(init.name)
        if t is None or init.data_location != onnx.TensorProto.EXTERNAL or t.device.type != "cpu" \
                or not t.is_contiguous() or list(t.shape) != list(init.dims):
            continue
        arr = t.detach().numpy()
        info = ExternalDataInfo(init)
        if arr.dtype != onnx.helper.tensor_dtype_to_np_dtype(init.data_type) or info.length not in (None, arr.nbytes):
            continue
        if same_bytes(path.parent / info.location, int(info.offset or 0), arr):
            out[init.name] = arr
    return out


def same_bytes(data_file: Path, offset: int, arr: np.ndarray, chunk: int = 1 << 24) -> bool:
    """Whether ``data_file`` holds ``arr``'s bytes at ``offset`` (read in chunks: no second full copy)."""
    flat = arr.reshape(-1).view(np.uint8)
    with open(data_file, "rb") as f:
        f.seek(offset)
        for i in range(0, flat.size, chunk):
            got = f.read(min(chunk, flat.size - i))
            if len(got) != min(chunk, flat.size - i) or not np.array_equal(np.frombuffer(got, np.uint8), flat[i:i + len(got)]):
                return False
    return True


def parity_session(path: Path, share_from: nn.Module | None = None) -> Any:
    """ONNX Runtime session on the exported file for the parity check, adding as little memory as it
    can beside the torch model: pre-packing off (MLAS would keep a packed copy of every MatMul weight;
    the file's external data stays memory-mapped), and, for an external-data file, every initializer
    that is a tensor of ``share_from`` stored unchanged (:func:`shared_initializers`) handed over as an
    OrtValue over the torch tensor's memory (``SessionOptions.add_initializer``: used in place on CPU,
    not copied). The OrtValues live as long as the session (``session.sglp_shared``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    shared = shared_initializers(path, share_from) if share_from is not None else {}
    values = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in shared.items()}
    for name, value in values.items():
        so.add_initializer(name, value)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.sglp_shared = values
    return sess


def export_causal_lm(model: nn.Module, out_dir: str | Path, *, opset: int = 18, parity_ids: torch.Tensor | None = None,
                     external_data: bool | None = None) -> dict[str, Any]:
    """Export a transformers ``XxxForCausalLM`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``, ``lm.json``),
    atomically.

    ``parity_ids`` (batch, T >= 3) int64: real token ids (e.g. a held-out block) for the parity check;
    random ids when omitted. ``external_data``: ``None`` = only when the weights reach 2 GB (one
    ``model.onnx.data`` beside ``model.onnx``, referenced by a relative path).
    Memory: the export adds little to the torch weights (the exporter's transposed weights are
    written one at a time); the parity check computes PyTorch's reference first, then opens ONNX
    Runtime without pre-packing on the memory-mapped external data, sharing the torch tensors stored
    unchanged (:func:`parity_session`): about one more copy of the weights (the Linear weights are
    stored transposed, so those cannot be shared). The returned manifest (also ``lm.json``) has ``size_bytes`` (model.onnx +
    model.onnx.data), ``files``, ``external_data``, ``memory`` and ``parity_vs_pytorch``."""
    why = unsupported_reason(model)
    if why:
        raise UserError(f"cannot export for generation: {why}")
    t0 = time.perf_counter()
    cfg = model.config
    was_training = model.training
    model.eval()
    w = _WithPast(model).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if external_data is None:
        external_data = n_bytes >= ou.TWO_GB * 0.95
    gen = torch.Generator().manual_seed(0)
    ids = parity_ids if parity_ids is not None else torch.randint(0, int(cfg.vocab_size), (2, 12), generator=gen)
    ids = ids.to(torch.int64)
    if ids.ndim != 2 or ids.shape[1] < 3:
        raise UserError("parity_ids must be (batch, tokens) with at least 3 tokens")
    out_dir = Path(out_dir)
    try:
        with atomic_dir(out_dir) as tmp:
            path = tmp / MODEL_FILE
            in_names, out_names = _export_graph(w, path, opset, external_data, gen)
            parity = _check_parity(path, w, ids, external_data)
            meta = _manifest(cfg, opset, bool(external_data), in_names, out_names, parity)
            proto = ou.load_onnx(path, load_external_data=False, check=False)
            ou.update_metadata(proto, {"export": {"exporter": "dynamo", "kind": TASK, "layout": LAYOUT},
                                       "parity_vs_pytorch": parity})
            ou.save_onnx(proto, path)  # the graph only: external data stays where it is
            del proto
            files = sorted(f for f in tmp.iterdir() if f.is_file() and f.name.startswith(MODEL_FILE))
            meta["files"] = [f.name for f in files] + [META_FILE]
            meta["size_bytes"] = sum(f.stat().st_size for f in files)
            meta["memory"] = {"weights_bytes": n_bytes, "process_peak_rss_bytes": peak_rss_bytes()}
            meta["sha256"] = sha256_file(path)
            meta["seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    finally:
        model.train(was_training)
    meta["path"] = str(out_dir / MODEL_FILE)
    return meta


def _export_graph(w: _WithPast, path: Path, opset: int, external_data: bool,
                  gen: torch.Generator) -> tuple[list[str], list[str]]:
    """Step 1: ``torch.onnx.export(dynamo=True)`` written to ``path`` (weights in ``path.data`` when
    ``external_data``); the ONNXProgram (and the weight copies it holds) is freed before returning."""
    cfg = w.model.config
    n_layers = int(cfg.num_hidden_layers)
    kvh, hd = kv_shape(cfg)
    in_names, out_names = io_names(n_layers)
    b, t, p = 2, 5, 3  # trace shapes that cannot specialise: batch 2, 5 new tokens, 3 past tokens
    ex_ids = torch.randint(0, int(cfg.vocab_size), (b, t), generator=gen)
    ex_past = tuple(torch.zeros(b, kvh, p, hd) for _ in range(2 * n_layers))
    ex = (ex_ids, torch.ones(b, p + t, dtype=torch.int64), torch.arange(p, p + t).expand(b, t).contiguous(), ex_past)
    seq = {0: "batch", 1: "sequence"}
    dyn = (seq, {0: "batch", 1: "total_sequence"}, seq, tuple({0: "batch", 2: "past_sequence"} for _ in ex_past))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(w, ex, dynamo=True, input_names=in_names, output_names=out_names,
                                 dynamic_shapes=dyn, opset_version=opset, external_data=external_data,
                                 verbose=False)
        prog.save(str(path), external_data=external_data)
    del prog
    gc.collect()  # the exporter's folded weight copies go before the parity check's runtime loads its own
    return in_names, out_names


def _check_parity(path: Path, w: _WithPast, ids: torch.Tensor, external_data: bool) -> dict[str, Any]:
    """Step 2: PyTorch's reference on ``ids`` first, then ONNX Runtime on the file (:func:`parity_session`)."""
    n_new = 4
    ref = torch_reference(w.model, ids, n_new)
    sess = parity_session(path, w if external_data else None)
    try:
        got_in = [i.name for i in sess.get_inputs()]
        want = io_names(w.n_layers)[0]
        if got_in != want:
            raise UserError(f"exported graph has inputs {got_in[:4]}..., expected the {LAYOUT} layout")
        parity = cache_parity(sess, None, ids, split=max(1, ids.shape[1] * 2 // 3), n_new=n_new, reference=ref,
                              config=w.model.config)
        parity["shared_initializers"] = len(sess.sglp_shared)
        return parity
    finally:
        del sess


def _manifest(cfg: Any, opset: int, external_data: bool, in_names: list[str], out_names: list[str],
              parity: dict[str, Any]) -> dict[str, Any]:
    kvh, hd = kv_shape(cfg)
    return {"task": TASK, "layout": LAYOUT, "num_layers": int(cfg.num_hidden_layers), "kv_heads": kvh, "head_dim": hd,
            "vocab_size": int(cfg.vocab_size), "hidden_size": int(cfg.hidden_size),
            "eos_token_id": getattr(cfg, "eos_token_id", None), "model_type": cfg.model_type,
            "opset": opset, "external_data": external_data, "inputs": in_names, "outputs": out_names,
            "dynamic_axes": {"batch": "all", "sequence": "input_ids/position_ids", "past_sequence": "past_key_values.*"},
            "parity_vs_pytorch": parity, "torch": torch.__version__,
            "sglp_kept_layers": getattr(cfg, "sglp_kept_layers", None), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this whole process so far (Linux / macOS ``ru_maxrss``), None elsewhere."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def read_lm_meta(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / META_FILE
    if not p.is_file():
        raise UserError(f"{folder} is not an LM export folder (no {META_FILE}); export it with export_causal_lm")
    return json.loads(p.read_text())
