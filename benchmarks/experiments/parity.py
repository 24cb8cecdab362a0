"""Parity of every exported / compiled artifact against PyTorch on held-out Fashion-MNIST images.

    python benchmarks/experiments/parity.py [--checkpoint DIR] [--heldout 1000] [--calib 300] [--out DIR]

Builds, for ResNet-56: the ONNX file, OpenVINO FP32 / FP16 / INT8 IR and ONNX Runtime FP32 / INT8
artifacts (through ``sglp_edge.export.onnx_export.export_onnx`` and ``exporters.compile.compile_model``), then
reports parity of each against the PyTorch logits on held-out test images (never used for
calibration). The last line printed is the summary:

    parity resnet56 onnx_max_abs=<float> openvino_fp32_max_abs=<float> ort_int8_top1_agree=<float> openvino_int8_top1_agree=<float>

Model: ``--checkpoint DIR``; else the trained default (``sglp_edge/assets/resnet56_fmnist``) when
it exists; else a randomly initialised ResNet-56 whose BatchNorm statistics are estimated from real
training images (so INT8 calibration sees realistic activations). The choice is printed.

``--lm MODEL`` runs the language-model path instead (a pruned checkpoint folder, ``smollm2``, or
``tiny-llama`` for a randomly initialised 2-layer smoke model) on token windows of ``--text FILE``.

Data: the Debian ``dataset-fashion-mnist`` IDX files, padded 28 -> 32, repeated to 3 channels,
normalised as the project trains (:func:`sglp_edge.data.images.load_fashion_mnist`: mean 0.2190 / std
0.3318 of the padded images). This module imports without torch (torch is loaded in ``main`` only).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.board.atomic import atomic_write_json  # noqa: E402
from benchmarks.board.calib import save_npz  # noqa: E402
from benchmarks.board.errors import UserError  # noqa: E402
from exporters.compile import compile_model  # noqa: E402


def _say(msg: str) -> None:
    print(msg, flush=True)


def _resnet56(args: argparse.Namespace) -> tuple[Any, str]:
    import torch

    if args.checkpoint or not args.random_init:
        try:
            from sglp_edge.models.registry import DEFAULT_MODEL, load_model  # heavy: torch; imports without it
        except ImportError:
            load_model, DEFAULT_MODEL = None, None
        if args.checkpoint:
            if load_model is None:
                raise UserError("--checkpoint needs sglp_edge.models.registry (model loading) to be installed")
            return load_model(args.checkpoint).model.eval(), f"checkpoint {args.checkpoint}"
        if load_model is not None and (Path(DEFAULT_MODEL) / "sglp_model.json").is_file():
            return load_model("default").model.eval(), f"trained default ResNet-56 ({DEFAULT_MODEL})"
    from sglp_edge.data.images import load_fashion_mnist  # heavy: imports torch; this script imports without it
    from sglp_edge.models.cifar_resnet import cifar_resnet

    torch.manual_seed(args.seed)
    model = cifar_resnet(56, num_classes=10)
    bn_n = 2000
    x, _ = load_fashion_mnist("train", bn_n)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, bn_n, 100):
            model(torch.from_numpy(x[i:i + 100]))
    model.eval()
    return model, (f"random-init ResNet-56 (seed {args.seed}), BatchNorm statistics from {bn_n} Fashion-MNIST "
                   "training images; no trained default found")


def _torch_logits(model: Any, x: np.ndarray, batch: int = 200) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(x[i:i + batch])).float().numpy())
    return np.concatenate(outs, 0)


def _compile_all(onnx_path: Path, out: Path, calib_npz: Path, eval_npz: Path, calib_n: int,
                 targets: list[tuple[str, str]]) -> dict[str, Any]:
    res = {}
    for backend, prec in targets:
        t = time.perf_counter()
        m = compile_model(onnx_path, backend, prec, out / f"{backend}_{prec}", calib=calib_npz if prec == "int8" else None,
                          eval_data=eval_npz, calib_samples=calib_n, progress=sys.stderr.isatty())
        res[f"{backend}_{prec}"] = m
        p = m["parity"]
        extra = f" accuracy={p['top1_accuracy']:.4f}" if "top1_accuracy" in p else ""
        rt = m.get("runtime", {}).get("with_hint", {}).get("inference_precision_hint") or \
            ",".join(m.get("runtime", {}).get("providers", []))
        _say(f"  {backend:<11} {prec:<4} max_abs={p['max_abs']:.3g} max_rel={p['max_rel']:.3g} "
             f"top1_agree={p['top1_agree']:.4f}{extra} runtime={rt} ({time.perf_counter() - t:.1f}s)")
    return res


def run_resnet56(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    # heavy: these import torch; this script imports without it
    from sglp_edge.data.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
    from sglp_edge.export.onnx_export import export_onnx  # heavy: torch, as above

    model, desc = _resnet56(args)
    _say(f"model: {desc}")
    xh, yh = load_fashion_mnist("test", args.heldout)
    xc, _ = load_fashion_mnist("train", args.calib, offset=10000)
    mean, std, src = FASHION_MNIST_MEAN, FASHION_MNIST_STD, "sglp_edge.data.images"
    _say(f"data: {len(xh)} held-out Fashion-MNIST test images (parity), {len(xc)} training images (calibration); "
         f"normalised with mean {mean} std {std} ({src})")
    t = time.perf_counter()
    ref = _torch_logits(model, xh)
    _say(f"pytorch: top-1 accuracy {float((ref.argmax(1) == yh).mean()):.4f} on the held-out images "
         f"({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    onnx_path = out / "resnet56.onnx"
    er = export_onnx(model, xh[:2], onnx_path, kind="image", simplify=args.simplify, parity_inputs=xh,
                     parity_labels=yh, parity_reference=ref,
                     parity_source=f"{len(xh)} held-out Fashion-MNIST test images",
                     progress=sys.stderr.isatty())
    p = er.parity
    _say(f"  onnx        fp32 max_abs={p['max_abs']:.3g} max_rel={p['max_rel']:.3g} top1_agree={p['top1_agree']:.4f} "
         f"exporter={er.exporter} opset={er.opset} simplify={er.simplify['method']}"
         f"{'' if er.simplify['applied'] else ' (skipped)'} ({time.perf_counter() - t:.1f}s)")
    save_npz(out / "calib.npz", xc)
    save_npz(out / "eval.npz", xh, yh, ref)
    targets = [("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8"), ("onnxruntime", "fp32"),
               ("onnxruntime", "int8")]
    manifests = _compile_all(onnx_path, out, out / "calib.npz", out / "eval.npz", args.calib, targets)
    return {"model": desc, "export": er.to_dict(), "manifests": manifests,
            "summary": {"onnx_max_abs": p["max_abs"],
                        "openvino_fp32_max_abs": manifests["openvino_fp32"]["parity"]["max_abs"],
                        "ort_int8_top1_agree": manifests["onnxruntime_int8"]["parity"]["top1_agree"],
                        "openvino_int8_top1_agree": manifests["openvino_int8"]["parity"]["top1_agree"]}}


def _lm_model(name: str, seed: int) -> tuple[Any, Any, str]:
    import torch

    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(cfg).eval(), None, "random-init tiny LlamaForCausalLM (2 layers, hidden 64, vocab 256)"
    from sglp_edge.models.registry import load_model  # heavy: imports torch; this script imports without it

    loaded = load_model(name)
    return loaded.model.eval(), loaded.tokenizer, f"{name} ({type(loaded.model).__name__})"


def _lm_name(lm: str) -> str:
    """A readable name for the summary line: the folder, or its parent for a prune output's model/."""
    p = Path(lm)
    return p.parent.name if p.name == "model" and p.parent.name else (p.name or lm)


def run_lm(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from sglp_edge.export.onnx_export import export_onnx  # heavy: imports torch; this script imports without it

    model, tok, desc = _lm_model(args.lm, args.seed)
    _say(f"model: {desc}")
    T, n_cal, n_ev = args.seq_len, args.lm_calib, args.lm_eval
    if args.text:
        if tok is None:
            raise UserError(f"{args.lm} has no tokenizer; --text needs a model folder with one")
        ids = np.asarray(tok(Path(args.text).read_text(errors="replace"))["input_ids"], dtype=np.int64)
        windows = ids[: (len(ids) // T) * T].reshape(-1, T)
        if len(windows) < n_cal + n_ev:
            raise UserError(f"{args.text} gives {len(windows)} windows of {T} tokens; need {n_cal + n_ev}")
        xc, xe = windows[:n_cal], windows[n_cal:n_cal + n_ev]
        _say(f"data: {args.text}: {len(xc)} calibration and {len(xe)} held-out windows of {T} tokens")
    elif args.lm != "tiny-llama":
        if tok is None:
            raise UserError(f"{args.lm} has no tokenizer; pass a model folder with one")
        from sglp_edge.data.text import get_text_dataset  # heavy: imports torch; this script imports without it

        text = get_text_dataset(tok, seed=args.seed, block_size=T, max_tokens=max(200_000, 4 * (n_cal + n_ev) * T))
        xc = text.split("calibration")[:n_cal].numpy().astype(np.int64)
        xe = text.split("test")[:n_ev].numpy().astype(np.int64)
        _say(f"data: the project's English corpus ({text.source}): "
             f"{len(xc)} calibration and {len(xe)} held-out windows of {T} tokens")
    else:
        rng = np.random.default_rng(args.seed)
        vocab = int(model.config.vocab_size)
        xc, xe = rng.integers(0, vocab, (n_cal, T)), rng.integers(0, vocab, (n_ev, T))
        _say("data: random token ids (smoke run of the tiny model; no text given)")
    with torch.inference_mode():
        ref = np.concatenate([model(input_ids=torch.from_numpy(xe[i:i + 8]), use_cache=False).logits.float().numpy()
                              for i in range(0, len(xe), 8)], 0)
    name = _lm_name(args.lm)
    onnx_path = out / f"{name}.onnx"
    er = export_onnx(model, xe[:2], onnx_path, kind="tokens", simplify=args.simplify, parity_inputs=xe,
                     parity_reference=ref, parity_source=f"{len(xe)} held-out token windows",
                     progress=sys.stderr.isatty())
    p = er.parity
    _say(f"  onnx        fp32 max_abs={p['max_abs']:.3g} max_rel={p['max_rel']:.3g} top1_agree={p['top1_agree']:.4f} "
         f"exporter={er.exporter} opset={er.opset} ({er.size_bytes / 1e6:.1f} MB)")
    save_npz(out / "lm_calib.npz", xc)
    save_npz(out / "lm_eval.npz", xe, None, ref)
    targets = [("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8"), ("onnxruntime", "fp32"),
               ("onnxruntime", "int8")]
    manifests = _compile_all(onnx_path, out, out / "lm_calib.npz", out / "lm_eval.npz", n_cal, targets)
    return {"model": desc, "export": er.to_dict(), "manifests": manifests,
            "summary": {"onnx_max_abs": p["max_abs"],
                        "openvino_fp32_max_abs": manifests["openvino_fp32"]["parity"]["max_abs"],
                        "ort_int8_top1_agree": manifests["onnxruntime_int8"]["parity"]["top1_agree"],
                        "openvino_int8_top1_agree": manifests["openvino_int8"]["parity"]["top1_agree"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="sglp-edge checkpoint folder to use instead of the default model")
    ap.add_argument("--random-init", action="store_true", help="ignore the trained default; use random init + BN stats")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out test images for parity (default 1000)")
    ap.add_argument("--calib", type=int, default=300, help="calibration images for INT8 (default 300)")
    ap.add_argument("--simplify", default="onnxslim", choices=["onnxslim", "onnxsim", "none"])
    ap.add_argument("--out", help="keep all artifacts and results.json here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm", help="language-model path instead: checkpoint folder, smollm2, or tiny-llama")
    ap.add_argument("--text", help="--lm: text file for calibration / held-out token windows "
                                   "(default: the project's English corpus, python3.11-doc, calibration / test splits)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lm-calib", type=int, default=64)
    ap.add_argument("--lm-eval", type=int, default=64)
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sglp_parity_"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        res = run_lm(args, out) if args.lm else run_resnet56(args, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    if args.out:
        atomic_write_json(out / "results.json", res)
        _say(f"artifacts, manifests and results.json in {out}")
    s = res["summary"]
    name = _lm_name(args.lm) if args.lm else "resnet56"
    _say(f"total {time.perf_counter() - t0:.0f}s")
    print(f"parity {name} onnx_max_abs={s['onnx_max_abs']:.3g} openvino_fp32_max_abs={s['openvino_fp32_max_abs']:.3g} "
          f"ort_int8_top1_agree={s['ort_int8_top1_agree']:.4f} openvino_int8_top1_agree={s['openvino_int8_top1_agree']:.4f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
