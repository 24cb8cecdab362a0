"""``sglp-edge export MODEL --out model.onnx``: PyTorch -> one ONNX file, with parity against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from benchmarks.board.errors import UserError
from sglp_edge.commands._common import (guard_out_dir, guard_out_file, hold_out, trust_builder_option, trust_remote_code_option,
                      user_errors)
from sglp_edge.export.gguf import check_gguf_type, check_source, export_gguf, find_llama_cpp


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x") if d)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise UserError(f"--input-shape {text!r} is not like 3x32x32 (channels x height x width, no batch)")
    return dims


def _export_gguf(model: str, out: Path, *, gguf: bool, gguf_type: Optional[str], llama_cpp: Optional[Path],
                 force: bool, imatrix: Optional[Path], others: dict) -> None:
    """--gguf: OUT.gguf and OUT.gguf.json from a Hugging Face folder; every check before any work."""
    gguf_type = check_gguf_type(gguf_type or "f16")
    if not gguf:
        raise UserError("--gguf-type and --gguf-imatrix apply with --gguf (sglp-edge export FOLDER --gguf --gguf-type q4_0 "
                        "--out X.gguf)")
    clash = next((k for k, v in others.items() if v), None)
    if clash:
        raise UserError(f"{clash} does not apply with --gguf (a saved Hugging Face folder -> one GGUF file)")
    if out.suffix != ".gguf":
        raise UserError(f"with --gguf, --out names the .gguf file to write (got {out}; e.g. --out model-{gguf_type}.gguf)")
    src = check_source(model)
    find_llama_cpp(llama_cpp, gguf_type, imatrix)
    sidecar = out.with_name(out.name + ".json")
    for path in (out, sidecar):
        guard_out_file(path, force=force, inputs=(src["folder"],))
    hold_out(out, file=True, force=force, inputs=(src["folder"],))
    meta = export_gguf(model, out, gguf_type=gguf_type, llama_cpp=llama_cpp, imatrix=imatrix, log=lambda s: typer.echo(s, err=True))
    p, s = meta.get("parity_vs_pytorch", {}), meta.get("llama_simple_vs_pytorch", {})
    typer.echo(f"wrote {out} ({meta['size_bytes'] / 1e6:.2f} MB; GGUF {gguf_type}: {meta['structure']['block_count']} "
               f"blocks blk.0..blk.{meta['structure']['block_count'] - 1}) + {sidecar.name}")
    typer.echo(f"greedy vs PyTorch (transformers loads the GGUF), {p['prompts']} prompts x {p['new_tokens']} tokens: "
               f"identical={p['identical']}{_diffs(p, 'first_difference', 'token')} top1_agreement="
               f"{p['top1_agreement']:.4f} max_abs_logits={p['max_abs_logits']:.3g}")
    typer.echo("llama-simple vs PyTorch (greedy text): " + (s["skipped"] if "skipped" in s else
               f"identical={s['identical']}{_diffs(s, 'first_difference_char', 'character')}"))


def _diffs(check: dict, key: str, unit: str) -> str:
    """' (first difference at token 5, 0)' for the prompts of a greedy check that differ; '' when none does."""
    at = [str(r[key]) for r in check["per_prompt"] if r[key] is not None]
    return f" (first difference at {unit} {', '.join(at)})" if at else ""


def _export_genai(model: str, weights: Optional[Path], net, tokenizer, out: Path, precision: str, console) -> None:
    """FOLDER/genai: from the Hugging Face folder itself when MODEL is one (or a prune output holding
    model/), else from the loaded model saved with its tokenizer."""
    from sglp_edge.export.lm_genai import export_causal_lm_genai, export_model_genai  # heavy: imports torch

    src = Path(model)
    hf = next((d for d in (src, src / "model") if (d / "config.json").is_file()), None) if weights is None else None
    meta = (export_causal_lm_genai(hf, out, precision=precision) if hf is not None
            else export_model_genai(net, tokenizer, out, precision=precision))
    p = meta["parity_vs_pytorch"]
    typer.echo(f"wrote {meta['path']} ({meta['size_bytes'] / 1e6:.2f} MB; onnxruntime-genai {precision}); greedy vs "
               f"transformers over {p['prompts']} prompts x {p['new_tokens']} tokens: agreement="
               f"{p['greedy_agreement']:.4f} prefill max_abs={p['max_abs']:.3g} passed={p['passed']}")
    if p["passed"] is False:
        console.print("[yellow]note:[/] the fp32 onnxruntime-genai export does not reproduce transformers; "
                      f"see {out}/lm.json (parity_vs_pytorch.per_prompt)")


def register(app: typer.Typer) -> None:
    @app.command("export")
    @user_errors
    def export(
        model: str = typer.Argument(..., help="checkpoint folder, 'default'/'resnet56', cifar_resnet20..110, "
                                               "torchvision:<arch>, your own file.py:fn or model.pt2, "
                                               "a Hugging Face folder or .gguf"),
        out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write; image and --no-past models: one "
                                 "file below 2 GB (larger ones are refused up front); decoder LMs (--past): a folder "
                                 "with model.onnx, its weights in model.onnx.data from 2 GB (no size limit)"),
        opset: Optional[int] = typer.Option(None, help="ONNX opset (default 18: TensorRT 10.x, OpenVINO, ORT)"),
        simplify: str = typer.Option("onnxslim", help="onnxslim | onnxsim | none (skipped with a note on failure)"),
        exporter: str = typer.Option("auto", help="auto (dynamo, legacy on failure) | dynamo | legacy"),
        parity_data: Optional[Path] = typer.Option(None, help=".npz with 'x' (and 'y') of real inputs for the parity check"),
        parity_samples: int = typer.Option(256, help="how many samples the parity check uses"),
        input_shape: Optional[str] = typer.Option(None, help="image input CxHxW (default: 3x32x32 for CIFAR ResNets, "
                                                             "else 3x224x224)"),
        seq_len: int = typer.Option(32, help="example sequence length for token models"),
        weights: Optional[Path] = typer.Option(None, help="state dict (.pt/.safetensors) for an architecture name"),
        num_classes: Optional[int] = typer.Option(None, help="classes of an architecture given by name"),
        units: Optional[str] = typer.Option(None, "--units", help="layer units by module path globs, as given to prune "
                                            "(not needed to export: accepted so the prune command line carries over)"),
        past: bool = typer.Option(True, "--past/--no-past", help="decoder LMs: one graph for prefill and decode with "
                                  "a KV cache (text-generation-with-past; --out names a folder). --no-past: logits only"),
        openvino: bool = typer.Option(False, "--openvino", help="decoder LMs: also write FOLDER/openvino, a stateful "
                                      "OpenVINO IR with fused attention (OpenVINO's PyTorch frontend; what "
                                      "exporters.lm_compile compiles fastest for openvino)"),
        genai: bool = typer.Option(False, "--genai", help="decoder LMs: also write FOLDER/genai, an onnxruntime-genai "
                                   "folder (its model builder; genai_config.json + tokenizer), greedy-checked "
                                   "against transformers"),
        genai_precision: str = typer.Option("fp32", help="--genai weights: fp32 | int8 | int4 (MatMulNBits)"),
        gguf: bool = typer.Option(False, "--gguf", help="decoder LMs: write --out as one llama.cpp GGUF file instead of "
                                  "ONNX, from a saved Hugging Face folder (a prune's model/, a run's finetune/model); "
                                  "checked (layers, greedy vs PyTorch, llama-simple) into OUT.json"),
        gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="--gguf weights: f16 (default) | q8_0 | "
                                                "q4_0 | q4_1 | q4_k_m (4-bit: llama-quantize)"),
        gguf_imatrix: Optional[Path] = typer.Option(None, "--gguf-imatrix", help="4-bit --gguf: a calibration text "
                                                    "file; llama-imatrix's importance matrix on it guides "
                                                    "llama-quantize (data-aware 4-bit)"),
        llama_cpp: Optional[Path] = typer.Option(None, "--llama-cpp", help="llama.cpp tree for --gguf (default "
                                                 "$SGLP_EDGE_LLAMA_CPP, else ~/.cache/sglp-edge/llama.cpp; "
                                                 "`make llama-cpp` builds it)"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out file"),
        trust_builder: bool = trust_builder_option(),
        trust_remote_code: bool = trust_remote_code_option(),
    ) -> None:
        """Export a model to ONNX (dynamo exporter, legacy fallback), simplify it, and check parity
        against PyTorch with ONNX Runtime; the figures go into the file's metadata."""
        if gguf or gguf_type is not None or gguf_imatrix is not None:
            _export_gguf(model, out, gguf=gguf, gguf_type=gguf_type, llama_cpp=llama_cpp, force=force,
                         imatrix=gguf_imatrix, others={"--weights": weights is not None, "--openvino": openvino, "--genai": genai})
            return
        import torch
        from rich.console import Console

        console = Console(stderr=True)
        _check_options(parity_samples, seq_len, input_shape, parity_data, genai_precision, genai)
        guard_out_file(out, force=force, inputs=(model, weights, parity_data))
        hold_out(out, file=True, force=force, inputs=(model, weights, parity_data))
        from sglp_edge.models.registry import load_model  # heavy: imports torch; the CLI starts without it

        loaded = load_model(model, weights=weights, num_classes=num_classes, units=units, need_adapter=False,
                            trust_builder=trust_builder, trust_remote_code=trust_remote_code)
        net = loaded.model.eval()
        if getattr(loaded.adapter, "modality", "image") == "sentences":  # encoders: input_ids + attention_mask
            _export_encoder(loaded, out, parity_samples, opset=opset, simplify=simplify, exporter=exporter)
            return
        kind = "tokens" if getattr(loaded.adapter, "modality", "image") == "tokens" else "image"
        gen = torch.Generator().manual_seed(0)
        if kind == "tokens" and past:
            _export_lm(model, weights, loaded, out, opset=opset, force=force, openvino=openvino, genai=genai,
                       genai_precision=genai_precision, console=console)
            return
        if openvino or genai:
            raise UserError(f"--{'openvino' if openvino else 'genai'} applies to decoder LMs exported with their KV "
                            "cache (--past) only")
        vocab = _vocab_size(net, model) if kind == "tokens" else 0
        example = _example_input(net, kind, vocab, input_shape, seq_len, gen)
        px, py, source = _parity_inputs(example, kind, vocab, seq_len, parity_data, parity_samples, gen, console)
        _export_graph(loaded, model, example, out, kind, px, py, source, opset=opset, simplify=simplify,
                      exporter=exporter, console=console)


def _check_options(parity_samples: int, seq_len: int, input_shape: Optional[str], parity_data: Optional[Path],
                   genai_precision: str, genai: bool) -> None:
    """Refuse bad options in one line, before anything is loaded or written."""
    if parity_samples < 1:
        raise UserError(f"--parity-samples must be >= 1 (got {parity_samples})")
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1 (got {seq_len})")
    if input_shape:
        _parse_shape(input_shape)
    if parity_data is not None and not parity_data.is_file():
        raise UserError(f"parity data {parity_data} does not exist")
    if genai_precision not in ("fp32", "int8", "int4"):
        raise UserError(f"--genai-precision must be fp32, int8 or int4 (got {genai_precision!r})")
    if genai:
        from sglp_edge.export.lm_genai import require_genai  # heavy: imports torch; the CLI starts without it

        require_genai()  # before the long ONNX export, not after it


def _export_encoder(loaded, out: Path, parity_samples: int, **kw) -> None:
    """A sentence encoder: input_ids + attention_mask, parity on held-out sentences."""
    from sglp_edge.export.encoder import export_loaded_encoder  # heavy: imports torch; the CLI starts without it

    res = export_loaded_encoder(loaded, out, parity_samples=parity_samples, **kw)
    p = res.parity or {}
    typer.echo(f"wrote {res.path} ({res.size_bytes / 1e6:.2f} MB) exporter={res.exporter} opset={res.opset} "
               f"inputs={[i['name'] for i in res.io['inputs']]}; parity vs PyTorch on {p.get('samples')} "
               f"sentences: max_abs={p.get('max_abs', float('nan')):.3g} "
               f"embedding_cos_min={p.get('embedding_cos_min', float('nan')):.6f} passed={p.get('passed')}")


def _export_lm(model: str, weights: Optional[Path], loaded, out: Path, *, opset: Optional[int], force: bool,
               openvino: bool, genai: bool, genai_precision: str, console) -> None:
    """A decoder LM with its KV cache: FOLDER/model.onnx, and FOLDER/openvino, FOLDER/genai when asked."""
    from sglp_edge.export.lm import export_causal_lm  # heavy: imports torch; the CLI starts without it

    net = loaded.model
    folder = out.with_suffix("") if out.suffix == ".onnx" else out
    if folder != out:  # X.onnx names the folder X: replaced whole, so checked and held as a folder
        guard_out_dir(folder, force=force, inputs=(model, weights))
        hold_out(folder, force=force, inputs=(model, weights))
    meta = export_causal_lm(net, folder, opset=opset or 18)
    p = meta["parity_vs_pytorch"]
    data = " + model.onnx.data" if meta.get("external_data") else ""
    typer.echo(f"wrote {folder}/model.onnx{data} + lm.json ({meta['size_bytes'] / 1e6:.2f} MB; {meta['layout']}: "
               f"{meta['num_layers']} layers, dynamic batch / sequence / past)")
    typer.echo(f"cache parity vs PyTorch (prefill {p['prefill_tokens']} + decode {p['decode_tokens']} tokens, "
               f"random ids): max_abs={p['max_abs']:.3g} greedy_equal={p['greedy_equal']} passed={p['passed']}")
    if openvino:
        from sglp_edge.export.lm_openvino import export_causal_lm_openvino  # heavy: imports torch and openvino

        meta = export_causal_lm_openvino(net, folder / "openvino")
        p = meta["parity_vs_pytorch"]
        typer.echo(f"wrote {meta['path']} ({meta['size_bytes'] / 1e6:.2f} MB; stateful, beam_idx input); "
                   f"parity vs PyTorch on OpenVINO f32: max_abs={p['max_abs']:.3g} "
                   f"greedy_equal={p['greedy_equal']} passed={p['passed']}")
    if genai:
        _export_genai(model, weights, net, loaded.tokenizer, folder / "genai", genai_precision, console)


def _vocab_size(net, model: str) -> int:
    vocab = int(getattr(getattr(net, "config", None), "vocab_size", 0) or 0)
    if vocab <= 0:
        raise UserError(f"cannot tell the vocabulary size of {model}; it needs a config.vocab_size")
    return vocab


def _example_input(net, kind: str, vocab: int, input_shape: Optional[str], seq_len: int, gen):
    """The example batch of two the graph is traced with: token ids, or images of the model's input shape."""
    import torch

    if kind == "tokens":
        return torch.randint(0, vocab, (2, seq_len), generator=gen)
    if input_shape:
        shape = _parse_shape(input_shape)
    elif hasattr(net, "in_channels") and type(net).__name__ in ("CifarResNet", "SmallMobileNetV2"):
        shape = (int(net.in_channels), 32, 32)
    elif isinstance(getattr(net, "image_size", None), int):  # a model that names its input size
        shape = (int(getattr(net, "in_channels", 3)), net.image_size, net.image_size)
    else:
        shape = (3, 224, 224)
    return torch.randn(2, *shape, generator=gen)


def _parity_inputs(example, kind: str, vocab: int, seq_len: int, parity_data: Optional[Path], parity_samples: int,
                   gen, console):
    """(inputs, labels or None, where they come from) for the parity check: --parity-data, else
    Fashion-MNIST test images for a 32x32 image model, else random inputs."""
    import torch

    from benchmarks.board.calib import load_npz  # heavy: numpy; the CLI starts without it

    px = py = None
    source = None
    if parity_data is not None:
        d = load_npz(parity_data, what="parity data").head(parity_samples)
        px, py, source = d.x, d.y, f"{parity_data} ({len(d)} samples)"
    elif kind == "image" and tuple(example.shape[1:]) in ((3, 32, 32), (1, 32, 32)):
        from sglp_edge.data.images import FASHION_MNIST_DIR, load_fashion_mnist  # heavy: imports torch

        try:
            px, py = load_fashion_mnist("test", parity_samples)
            px = px[:, : example.shape[1]].copy()  # grey repeated to 3 channels: a grey model takes one
            source = f"Fashion-MNIST test images ({parity_samples}, {FASHION_MNIST_DIR})"
        except UserError as e:
            console.print(f"[yellow]note:[/] {e}; parity on random inputs (pass --parity-data)")
    if px is None:
        if kind == "tokens":
            px = torch.randint(0, vocab, (min(parity_samples, 16), seq_len), generator=gen)
        else:
            px = torch.randn(parity_samples, *example.shape[1:], generator=gen)
        source = "random inputs (no real data given: pass --parity-data)"
    return px, py, source


def _export_graph(loaded, model: str, example, out: Path, kind: str, px, py, source: str, *, opset: Optional[int],
                  simplify: str, exporter: str, console) -> None:
    """export_onnx with the parity inputs, then what it wrote and how parity went."""
    from sglp_edge.export.onnx_export import export_onnx  # heavy: imports torch; the CLI starts without it

    res = export_onnx(loaded.model, example, out, kind=kind, opset=opset, simplify=simplify, exporter=exporter,
                      parity_inputs=px, parity_labels=py, parity_source=source,
                      extra_metadata={"model": {"source": str(model), "kind": loaded.kind,
                                                "removed_units": list(loaded.removed_units)}})
    p = res.parity or {}
    typer.echo(f"wrote {res.path} ({res.size_bytes / 1e6:.2f} MB, sha256 {res.sha256[:12]}) "
               f"exporter={res.exporter} opset={res.opset} simplify={res.simplify['method']}"
               f"{'' if res.simplify['applied'] else ' (skipped)'}")
    if p:
        top1 = f" top1_agree={p['top1_agree']:.4f}" if "top1_agree" in p else ""
        typer.echo(f"parity vs PyTorch on {p['samples']} samples [{source}]: max_abs={p['max_abs']:.3g} "
                   f"max_rel={p['max_rel']:.3g}{top1} passed="
                   f"{'n/a (outputs constant)' if p.get('constant_outputs') else p['passed']}")
    for w in res.warnings:
        console.print(f"[yellow]note:[/] {w}")
