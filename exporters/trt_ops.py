"""Static check of an ONNX graph against the TensorRT ONNX parser's operator support.

Source: onnx/onnx-tensorrt ``docs/operators.md``, the support matrix headed "TensorRT 10.15 supports
operators in the inclusive range of opset 9 to opset 24" (TensorRT 10.15 GA, 2026-02-02), and the
same repository's ``docs/Changelog.md`` for when operators were added after TensorRT 10.3 (the
JetPack 6 release). The 10.0 matrix of the same file documents opset 9..20. Supported types are as
listed there (INT8/FP8/INT4 are "quantized types": only through Q/DQ).

Only the operator *name* (and opset) is checked statically; restrictions are reported for the
operators the graph uses so users can review them before reaching the board. Numpy-free, torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.board.errors import UserError
from exporters import onnx_utils as ou

SOURCE = ("onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15 support matrix) and docs/Changelog.md; "
          "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md")
TABLE_TRT_VERSION = "10.15"
#: documented opset range per TensorRT release (inclusive)
OPSET_RANGE = {"10.0": (9, 20), "10.15": (9, 24)}

# op -> (supported types, restriction or "")
SUPPORTED: dict[str, tuple[str, str]] = {
    "Abs": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Acos": ("FP32, FP16, BF16", ""),
    "Acosh": ("FP32, FP16, BF16", ""),
    "Add": ("FP32, FP16, BF16, INT32, INT64", ""),
    "And": ("BOOL", ""),
    "ArgMax": ("FP32, FP16, BF16, INT32, INT64", ""),
    "ArgMin": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Asin": ("FP32, FP16, BF16", ""),
    "Asinh": ("FP32, FP16, BF16", ""),
    "Atan": ("FP32, FP16, BF16", ""),
    "Atanh": ("FP32, FP16, BF16", ""),
    "Attention": ("FP32, FP16, BF16, INT8, FP8", "Q, K, V and attn_mask must be 4D; past_key/past_value/"
                  "nonpad_kv_seqlen inputs and present_key/present_value/qk_matmul_output outputs unsupported"),
    "AveragePool": ("FP32, FP16, BF16", "2D or 3D pooling only; dilations must be empty or all ones"),
    "BatchNormalization": ("FP32, FP16, BF16", ""),
    "BlackmanWindow": ("FP32, FP16", ""),
    "Cast": ("FP32, FP16, BF16, INT32, INT64, UINT8, BOOL", ""),
    "CastLike": ("FP32, FP16, BF16, INT32, INT64, UINT8, BOOL", ""),
    "Ceil": ("FP32, FP16, BF16", ""),
    "Celu": ("FP32, FP16, BF16", ""),
    "Clip": ("FP32, FP16, BF16", ""),
    "Concat": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Constant": ("FP32, FP16, BF16, FP8, FP4, INT4, INT32, INT64, BOOL",
                 "sparse_value, value_string and value_strings attributes unsupported"),
    "ConstantOfShape": ("FP32, FP16, BF16, FP8, FP4, INT4, INT32, INT64, BOOL", ""),
    "Conv": ("FP32, FP16, BF16", ""),
    "ConvTranspose": ("FP32, FP16, BF16", ""),
    "Cos": ("FP32, FP16, BF16", ""),
    "Cosh": ("FP32, FP16, BF16", ""),
    "CumSum": ("FP32, FP16, BF16", "axis must be a build-time constant"),
    "DeformConv": ("FP32, FP16", "input must have 1D or 2D spatial dimensions; begin/end pads must match"),
    "DepthToSpace": ("FP32, FP16, BF16, INT32, INT64", ""),
    "DequantizeLinear": ("INT8, FP8, FP4, INT4", "x_zero_point must be zero"),
    "Div": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Dropout": ("FP32, FP16, BF16", "is_training must be an initializer and evaluate to False"),
    "Einsum": ("FP32, FP16, BF16", ""),
    "Elu": ("FP32, FP16, BF16", ""),
    "Equal": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Erf": ("FP32, FP16, BF16", ""),
    "Exp": ("FP32, FP16, BF16", ""),
    "Expand": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "EyeLike": ("FP32, FP16, BF16, INT32, INT64, BOOL", "input must have static dimensions"),
    "Flatten": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Floor": ("FP32, FP16, BF16", ""),
    "Gather": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "GatherElements": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "GatherND": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Gelu": ("FP32, FP16, BF16, INT8, INT32, INT64", ""),
    "Gemm": ("FP32, FP16, BF16", ""),
    "GlobalAveragePool": ("FP32, FP16, BF16", ""),
    "GlobalLpPool": ("FP32, FP16, BF16", ""),
    "GlobalMaxPool": ("FP32, FP16, BF16", ""),
    "Greater": ("FP32, FP16, BF16, INT32, INT64", ""),
    "GreaterOrEqual": ("FP32, FP16, BF16, INT32, INT64", ""),
    "GridSample": ("FP32, FP16", "input must be 4D"),
    "GroupNormalization": ("FP32, FP16, BF16", ""),
    "GRU": ("FP32, FP16, BF16", "bidirectional GRUs need the same activations for both directions"),
    "HammingWindow": ("FP32, FP16", ""),
    "HannWindow": ("FP32, FP16", ""),
    "HardSigmoid": ("FP32, FP16, BF16", ""),
    "HardSwish": ("FP32, FP16, BF16", ""),
    "Hardmax": ("FP32, FP16, BF16", "axis dimension of input must be a build-time constant"),
    "Identity": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "If": ("FP32, FP16, BF16, INT32, INT64, BOOL",
           "both branches' outputs must have the same rank and different names"),
    "ImageScaler": ("FP32, FP16, BF16", ""),
    "InstanceNormalization": ("FP32, FP16, BF16", ""),
    "IsInf": ("FP32, FP16, BF16", ""),
    "IsNaN": ("FP32, FP16, BF16, INT32, INT64", ""),
    "LayerNormalization": ("FP32, FP16, BF16", "only the first output Y is supported"),
    "LeakyRelu": ("FP32, FP16, BF16", ""),
    "Less": ("FP32, FP16, BF16, INT32, INT64", ""),
    "LessOrEqual": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Log": ("FP32, FP16, BF16", ""),
    "LogSoftmax": ("FP32, FP16, BF16", ""),
    "Loop": ("FP32, FP16, BF16, INT32, INT64, BOOL",
             "scan output length cannot be dynamic; loop-carried shapes must not change across iterations"),
    "LRN": ("FP32, FP16, BF16", ""),
    "LSTM": ("FP32, FP16, BF16", "same activations in both directions; input_forget=0; layout=0"),
    "LpNormalization": ("FP32, FP16, BF16", ""),
    "LpPool": ("FP32, FP16, BF16", "dilations must be empty or all ones"),
    "MatMul": ("FP32, FP16, BF16", ""),
    "Max": ("FP32, FP16, BF16, INT32, INT64", ""),
    "MaxPool": ("FP32, FP16, BF16", "2D or 3D pooling only; Indices output unsupported; dilations all ones"),
    "Mean": ("FP32, FP16, BF16, FP8, INT32, INT64", ""),
    "MeanVarianceNormalization": ("FP32, FP16, BF16", ""),
    "Min": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Mish": ("FP32, FP16", ""),
    "Mod": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Mul": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Neg": ("FP32, FP16, BF16, INT32, INT64", ""),
    "NonMaxSuppression": ("FP32, FP16", ""),
    "NonZero": ("FP32, FP16", ""),
    "Not": ("BOOL", ""),
    "OneHot": ("FP32, FP16, BF16, INT32, INT64, BOOL", "depth must be a build-time constant"),
    "Or": ("BOOL", ""),
    "Pad": ("FP32, FP16, BF16, INT32, INT64", ""),
    "ParametricSoftplus": ("FP32, FP16, BF16", ""),
    "Pow": ("FP32, FP16, BF16, INT32, INT64", ""),
    "PRelu": ("FP32, FP16, BF16", ""),
    "QuantizeLinear": ("FP32, FP16, BF16", "y_zero_point must be 0"),
    "RandomNormal": ("FP32, FP16, BF16", "seed is ignored"),
    "RandomNormalLike": ("FP32, FP16, BF16", "seed is ignored"),
    "RandomUniform": ("FP32, FP16, BF16", "seed is ignored"),
    "RandomUniformLike": ("FP32, FP16, BF16", "seed is ignored"),
    "Range": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Reciprocal": ("FP32, FP16, BF16", ""),
    **{f"Reduce{r}": ("FP32, FP16, BF16, INT32, INT64", "axes must be an initializer")
       for r in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")},
    "Relu": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Reshape": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Resize": ("FP32, FP16, BF16", "modes nearest/linear; coordinate modes half_pixel, pytorch_half_pixel, "
               "tf_half_pixel_for_nn, asymmetric, align_corners; aspect ratio policy stretch; no antialiasing"),
    "ReverseSequence": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "RMSNormalization": ("FP32, FP16, BF16", ""),
    "RNN": ("FP32, FP16, BF16", "bidirectional RNNs need the same activations for both directions"),
    "RoiAlign": ("FP32, FP16", ""),
    "RotaryEmbedding": ("FP32, FP16, BF16", "position_ids must be INT64"),
    "Round": ("FP32, FP16, BF16", ""),
    "STFT": ("FP32", "frame_step and window must be initializers; input must be real-valued"),
    "ScaledTanh": ("FP32, FP16, BF16", ""),
    "Scan": ("FP32, FP16, BF16", ""),
    "Scatter": ("FP32, FP16, BF16, INT32, INT64", ""),
    "ScatterElements": ("FP32, FP16, BF16, INT32, INT64", ""),
    "ScatterND": ("FP32, FP16, BF16, INT32, INT64", "reduction other than none is not supported"),
    "Selu": ("FP32, FP16, BF16", ""),
    "Shape": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Shrink": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Sigmoid": ("FP32, FP16, BF16", ""),
    "Sign": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Sin": ("FP32, FP16, BF16", ""),
    "Sinh": ("FP32, FP16, BF16", ""),
    "Size": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Slice": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Softmax": ("FP32, FP16, BF16", ""),
    "Softplus": ("FP32, FP16, BF16", ""),
    "Softsign": ("FP32, FP16, BF16", ""),
    "SpaceToDepth": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Split": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Sqrt": ("FP32, FP16, BF16", ""),
    "Squeeze": ("FP32, FP16, BF16, INT32, INT64, BOOL", "axes must be resolvable to a constant"),
    "Sub": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Sum": ("FP32, FP16, BF16, INT32, INT64", ""),
    "Tan": ("FP32, FP16, BF16", ""),
    "Tanh": ("FP32, FP16, BF16", ""),
    "TensorScatter": ("FP32, FP16, BF16, INT32", "past_cache and update must be 4D; axis must be -2"),
    "ThresholdedRelu": ("FP32, FP16, BF16", ""),
    "Tile": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "TopK": ("FP32, FP16, BF16, INT32, INT64", "sorted must be 1; K must be less than 3840"),
    "Transpose": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Trilu": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Unsqueeze": ("FP32, FP16, BF16, INT32, INT64, BOOL", "axes must be resolvable to a constant"),
    "Upsample": ("FP32, FP16, BF16", ""),
    "Where": ("FP32, FP16, BF16, INT32, INT64, BOOL", ""),
    "Xor": ("BOOL", ""),
}

#: listed as "N" in the TensorRT 10.15 matrix
UNSUPPORTED: frozenset[str] = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

#: operators the parser gained after TensorRT 10.3 (JetPack 6), from onnx-tensorrt's Changelog.md
ADDED_IN: dict[str, str] = {
    "BlackmanWindow": "10.4", "HammingWindow": "10.4", "HannWindow": "10.4", "STFT": "10.5",
    "Attention": "10.14", "RotaryEmbedding": "10.15", "RMSNormalization": "10.15", "TensorScatter": "10.15",
}


def _vkey(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(v).split(".")[:2])
    except ValueError:
        raise UserError(f"TensorRT version {v!r} is not of the form MAJOR.MINOR (e.g. 10.3)") from None


def opset_range(trt_version: str) -> tuple[int, int]:
    """Documented opset range for ``trt_version``: the nearest documented release at or below it."""
    docs = sorted(OPSET_RANGE, key=_vkey)
    best = docs[0]
    for d in docs:
        if _vkey(d) <= _vkey(trt_version):
            best = d
    return OPSET_RANGE[best]


@dataclass
class TrtOpReport:
    trt_version: str
    table_version: str
    opset: int
    opset_supported: bool
    opset_range: tuple[int, int]
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # op -> node names (first few)
    too_new: dict[str, str] = field(default_factory=dict)  # op -> TensorRT version that added it
    unknown: list[str] = field(default_factory=list)  # not in the matrix at all
    custom_domain: list[str] = field(default_factory=list)  # ops outside the default ONNX domain (plugins)
    restrictions: dict[str, str] = field(default_factory=dict)  # for ops the graph uses
    op_counts: dict[str, int] = field(default_factory=dict)
    source: str = SOURCE

    @property
    def ok(self) -> bool:
        return self.opset_supported and not (self.unsupported or self.too_new or self.unknown or self.custom_domain)

    def problems(self) -> list[str]:
        out = []
        if not self.opset_supported:
            lo, hi = self.opset_range
            out.append(f"opset {self.opset} is outside TensorRT {self.trt_version}'s documented range {lo}..{hi} "
                       f"(re-export with --opset {min(max(self.opset, lo), hi)})")
        for op, nodes in self.unsupported.items():
            out.append(f"{op} is not supported by the TensorRT ONNX parser (nodes: {', '.join(nodes[:3])})")
        for op, ver in self.too_new.items():
            out.append(f"{op} needs TensorRT >= {ver} (target {self.trt_version})")
        for op in self.unknown:
            out.append(f"{op} is not in the TensorRT {self.table_version} support matrix")
        for op in self.custom_domain:
            out.append(f"{op} is a custom-domain op: needs a TensorRT plugin")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["problems"] = self.problems()
        return d


def check_graph(model_or_path: Any, *, trt_version: str = "10.3") -> TrtOpReport:
    """Check an ONNX model (``ModelProto`` or path) against the parser's operator support for
    ``trt_version`` (default 10.3, JetPack 6)."""
    model = model_or_path
    if not hasattr(model_or_path, "graph"):
        model = ou.load_onnx(model_or_path, load_external_data=False, check=False)
    opset = ou.opset_of(model)
    lo, hi = opset_range(trt_version)
    rep = TrtOpReport(trt_version=str(trt_version), table_version=TABLE_TRT_VERSION, opset=opset,
                      opset_supported=lo <= opset <= hi, opset_range=(lo, hi))
    by_op = ou.nodes_by_op(model)
    local_functions = {(f.domain, f.name) for f in model.functions}
    for (domain, op), nodes in sorted(by_op.items()):
        if (domain, op) in local_functions:
            continue  # the parser inlines ONNX local functions; their bodies are checked below
        rep.op_counts[op if not domain else f"{domain}::{op}"] = len(nodes)
        if domain not in ("", "ai.onnx"):
            rep.custom_domain.append(f"{domain}::{op}")
        elif op in UNSUPPORTED:
            rep.unsupported[op] = [n or "<unnamed>" for n in nodes[:5]]
        elif op not in SUPPORTED:
            rep.unknown.append(op)
        else:
            if op in ADDED_IN and _vkey(ADDED_IN[op]) > _vkey(trt_version):
                rep.too_new[op] = ADDED_IN[op]
            if SUPPORTED[op][1]:
                rep.restrictions[op] = SUPPORTED[op][1]
    return rep
