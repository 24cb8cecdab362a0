"""Weight-only low-bit for decoder LMs, calibrated on the run's own text (no torch).

One place for the low-bit step of every LM route, so the choice is made once and recorded in the
artifact (``quantization`` of ``manifest.json`` / ``lm.json``):

- **ONNX graphs** (``exporters.lm_compile`` for ONNX Runtime): ONNX Runtime's
  ``MatMulNBitsQuantizer``. INT4: k-quant rounding in groups of ``group_size`` (the calibration
  happens before the graph is made: the model's weights are AWQ-scaled on the run's text,
  :mod:`sglp_edge.export.awq`, which rounding then benefits from); ``algo="gptq"``: ORT's GPTQ
  (``GPTQWeightOnlyQuantConfig``, the Hessian of each MatMul's input over the calibration blocks; it
  runs the whole graph once per MatMul input and block, about an hour for a 135M model on 2 cores).
  INT8: round-to-nearest in blocks of 128 (8 bits lose next to nothing, so data buys nothing). The LM
  head (the last MatMul: the largest weight, and the one whose error lands directly on the logits)
  stays at ``head_bits`` = 8 where the rest is 4 bits, and so do llama.cpp's mixed layers
  (:func:`mixed_layer_matmuls`, as onnxruntime-genai's builder option ``mixed_layers:int8``).
- **OpenVINO IRs**: NNCF ``compress_weights``. INT4: ``INT4_ASYM`` with ``ratio`` 0.8 (NNCF's mixed
  precision: the most sensitive fifth of the weights and the head at INT8), with calibration blocks
  AWQ + scale estimation on a ``nncf.Dataset`` of the model's own inputs. INT8: ``INT8_ASYM``.

Calibration blocks are token ids ``(N, T)`` int64: the run's calibration split (never held-out text).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from benchmarks.board.errors import UserError

#: OpenVINO INT4: the share of the weights NNCF puts at 4 bits; the rest, the most sensitive by its
#: metric (on the calibration blocks where given), stays at INT8. On the pruned SmolLM2 (groups of 32,
#: AWQ + scale estimation): INT4_SYM all at 4 bits +18.0 % perplexity over FP32, INT4_ASYM +16.1 %,
#: INT4_SYM at 0.8 +10.7 %, INT4_ASYM at 0.8 +8.4 % (benchmarks/results/lm-deploy.md)
OV_INT4_RATIO = 0.8
#: calibration blocks used at most (GPTQ runs the graph once per MatMul input per block)
MAX_CALIB_BLOCKS = 16
HEAD_BITS = 8


def _calib(calib_ids: Any) -> Optional[np.ndarray]:
    if calib_ids is None:
        return None
    ids = np.asarray(calib_ids, np.int64)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise UserError(f"calibration token blocks must be (blocks, tokens) with at least 2 tokens (got {ids.shape})")
    return ids[:MAX_CALIB_BLOCKS]


def graph_feeds(onnx_path: Path, calib_ids: np.ndarray, head_dim: Optional[int] = None) -> List[Dict[str, np.ndarray]]:
    """One feed per calibration block for an LM graph with past inputs (ours: input_ids, attention_mask,
    position_ids, past_key_values.*; onnxruntime-genai's: input_ids, attention_mask, past_key_values.*),
    each a full-block prefill from an empty cache. ``head_dim``: where the graph leaves it symbolic
    (onnxruntime-genai's ``kv_cache_dim``; its genai_config.json has it)."""
    import onnx  # heavy: the graph library

    m = onnx.load(str(onnx_path), load_external_data=False)
    feeds = []
    for blk in calib_ids:
        t = len(blk)
        f: Dict[str, np.ndarray] = {}
        for i in m.graph.input:
            tt = i.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if i.name == "input_ids":
                f[i.name] = blk[None, :].astype(dtype)
            elif i.name == "attention_mask":
                f[i.name] = np.ones((1, t), dtype)
            elif i.name == "position_ids":
                f[i.name] = np.arange(t, dtype=dtype)[None, :]
            elif i.name.startswith("past_key_values"):
                d = [x.dim_value for x in tt.shape.dim]
                if len(d) == 4 and not d[3] and head_dim:
                    d[3] = int(head_dim)
                if len(d) != 4 or not d[1] or not d[3]:
                    raise UserError(f"{onnx_path}: past input {i.name} has no static (heads, head_dim) shape")
                f[i.name] = np.zeros((1, d[1], 0, d[3]), dtype)
            else:
                raise UserError(f"{onnx_path}: cannot calibrate an LM graph with input {i.name!r}")
        feeds.append(f)
    return feeds


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds (deep-copied by GPTQ)."""

    def __init__(self, feeds: Sequence[Dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._it: Optional[Iterator[Dict[str, np.ndarray]]] = None

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._it is None:
            self._it = iter(self.feeds)
        return next(self._it, None)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return iter(self.feeds)


def _last_matmul(model: Any) -> Optional[str]:
    names = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    return names[-1] if names else None


#: constant-weight MatMuls per decoder layer of a Llama-style graph, in graph order: q, k, v, o, gate, up, down
LLAMA_MATMULS = 7


def mixed_layer_matmuls(model: Any) -> List[str]:
    """llama.cpp's mixed strategy (Q4_K_M's ``use_more_bits``), the MatMuls to keep at 8 bits: the v and
    down projections of the first and last eighth of the layers and of every third layer between. Found
    by position in a Llama-style graph (seven constant-weight MatMuls a layer, the down projection the
    one whose input is widest); any other layout: none (the record says so)."""
    consts = {i.name: i for i in model.graph.initializer}
    mms = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    head = _last_matmul(model)
    mms = [n for n in mms if n.name != head]
    if not mms or len(mms) % LLAMA_MATMULS:
        return []
    n = len(mms) // LLAMA_MATMULS
    out = []
    for i in range(n):
        layer = mms[i * LLAMA_MATMULS:(i + 1) * LLAMA_MATMULS]
        dims = [tuple(consts[m.input[1]].dims) for m in layer]
        if any(len(d) != 2 for d in dims) or dims[6][0] <= dims[6][1] or dims[2] != dims[1]:
            return []  # not q, k, v, o, gate, up, down (down: [intermediate, hidden]; v like k)
        if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2:
            out += [layer[2].name, layer[6].name]
    return out


INT4_ALGOS = ("k_quant", "gptq")


def ort_weight_only(src: Path, dst: Path, *, bits: int, group_size: int, accuracy_level: Optional[int],
                    calib_ids: Any = None, head_bits: int = HEAD_BITS, head_dim: Optional[int] = None,
                    algo: str = "k_quant", mixed: bool = True) -> Dict[str, Any]:
    """MatMulNBits weights for the LM graph ``src`` into ``dst`` (one file): see the module docstring.
    Returns the record stored with the artifact."""
    import onnx  # heavy: the graph library
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb  # heavy: the runtime

    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if algo not in INT4_ALGOS:
        raise UserError(f"INT4 algorithm {algo!r} is not one of {', '.join(INT4_ALGOS)}")
    ids = _calib(calib_ids) if algo == "gptq" else None
    if algo == "gptq" and ids is None:
        raise UserError("GPTQ needs calibration token blocks (calib_ids); use k_quant without them")
    model = onnx.load(str(src))
    head = _last_matmul(model) if bits == 4 and head_bits != 4 else None
    more = mixed_layer_matmuls(model) if bits == 4 and mixed else []
    rec: Dict[str, Any] = {"bits": bits, "symmetric": True, "accuracy_level": accuracy_level,
                           "head": {"node": head, "bits": head_bits} if head else None}
    if bits == 4:
        rec["mixed_layers"] = {"matmuls_at_8_bits": len(more), "rule": "llama.cpp Q4_K_M: v / down projections of "
                               "the first and last eighth of the layers and every third layer"} if more else None
    eight = ([head] if head else []) + more
    block = 128 if bits == 8 else group_size
    if bits == 4 and ids is not None:
        cfg: Any = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(graph_feeds(src, ids, head_dim)),
                                                 block_size=128, op_types_to_quantize=("MatMul",))
        rec.update(method="onnxruntime MatMulNBitsQuantizer GPTQ (weight-only, calibrated)",
                   calibration={"blocks": int(ids.shape[0]), "tokens_per_block": int(ids.shape[1])})
    elif bits == 4:
        cfg = mnb.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
        rec.update(method="onnxruntime MatMulNBitsQuantizer k-quant (weight-only, no calibration data)")
    else:
        cfg = mnb.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits,
                                               accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
        rec.update(method=f"onnxruntime MatMulNBitsQuantizer round-to-nearest ({bits} bits, weight-only)")
    rec["block_size"] = block
    qz = mnb.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                  accuracy_level=accuracy_level, algo_config=cfg, op_types_to_quantize=("MatMul",),
                                  nodes_to_exclude=eight or None)
    if eight and ids is not None:  # ORT's GPTQ path ignores nodes_to_exclude: mark them "fp32" (= skip) itself
        node_config = qz._generate_q4_node_config
        qz._generate_q4_node_config = lambda: {**node_config(), **{k: "fp32" for k in eight}}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        qz.process()
    model = qz.model.model
    if eight:  # the head and the mixed layers' MatMuls alone, at head_bits, round-to-nearest
        hcfg = mnb.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, bits=head_bits,
                                                accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in eight]
        hq = mnb.MatMulNBitsQuantizer(model, bits=head_bits, block_size=128, is_symmetric=True,
                                      accuracy_level=accuracy_level, algo_config=hcfg,
                                      op_types_to_quantize=("MatMul",), nodes_to_exclude=others)
        with contextlib.redirect_stdout(io.StringIO()):
            hq.process()
        model = hq.model.model
    consts = {i.name for i in model.graph.initializer}
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    onnx.save_model(model, str(dst), save_as_external_data=False)
    rec["quantized_matmuls"] = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    rec["unquantized_matmuls"] = len(left)  # constant-weight MatMuls left in float (attention's are not weights)
    return rec


def ov_dataset(model: Any, calib_ids: np.ndarray) -> Any:
    """A ``nncf.Dataset`` of the IR's own inputs, one full-block prefill per calibration block (a
    stateful IR gets ``beam_idx``; an IR with explicit past inputs gets empty caches)."""
    import nncf  # heavy: NNCF

    names = [i.get_any_name() for i in model.inputs]
    items = []
    for blk in calib_ids:
        t = len(blk)
        f: Dict[str, np.ndarray] = {"input_ids": blk[None, :], "attention_mask": np.ones((1, t), np.int64),
                                    "position_ids": np.arange(t, dtype=np.int64)[None, :]}
        if "beam_idx" in names:
            f["beam_idx"] = np.zeros((1,), np.int32)
        for port in model.inputs:
            n = port.get_any_name()
            if n.startswith("past_key_values"):
                ps = port.get_partial_shape()
                f[n] = np.zeros((1, ps[1].get_length(), 0, ps[3].get_length()), np.float32)
        items.append({k: v for k, v in f.items() if k in names})
    return nncf.Dataset(items)


def ov_weight_only(model: Any, precision: str, group_size: int, calib_ids: Any = None) -> tuple:
    """(compressed model, record): NNCF weight compression of an OpenVINO LM (see the module docstring)."""
    import nncf  # heavy: NNCF

    ids = _calib(calib_ids)
    if precision == "int8":
        return (nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM),
                {"method": "nncf.compress_weights INT8_ASYM (weight-only)", "bits": 8})
    rec: Dict[str, Any] = {"bits": 4, "group_size": group_size, "ratio": OV_INT4_RATIO, "backup": "INT8_ASYM",
                           "head": {"bits": 8}}
    kw: Dict[str, Any] = dict(mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size, ratio=OV_INT4_RATIO)
    if ids is not None:
        kw.update(dataset=ov_dataset(model, ids), awq=True, scale_estimation=True)
        rec.update(method="nncf.compress_weights INT4_ASYM + AWQ + scale estimation, the most sensitive "
                          f"{1 - OV_INT4_RATIO:.0%} of the weights at INT8 (weight-only, calibrated)",
                   calibration={"blocks": int(ids.shape[0]), "tokens_per_block": int(ids.shape[1])})
    else:
        rec["method"] = (f"nncf.compress_weights INT4_ASYM, {1 - OV_INT4_RATIO:.0%} of the weights at INT8 "
                         "(weight-only, no calibration data)")
    with contextlib.redirect_stdout(io.StringIO()):
        model = nncf.compress_weights(model, **kw)
    return model, rec
