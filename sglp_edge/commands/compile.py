"""``sglp-edge compile model.onnx --backend ... --precision ... --out DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from benchmarks.board.tensorrt_plan import TrtOptions

from sglp_edge.commands._common import guard_out_dir, hold_out, positive, user_errors
from sglp_edge.validate import check_file


def register(app: typer.Typer) -> None:
    @app.command("compile")
    @user_errors
    def compile_cmd(
        onnx: Path = typer.Argument(..., help="ONNX file written by `sglp-edge export`"),
        backend: str = typer.Option(..., "--backend", "-b", help="openvino | onnxruntime | tensorrt"),
        precision: str = typer.Option("fp32", "--precision", "-p", help="fp32 | fp16 | int8 (ORT: fp32 | int8)"),
        out: Path = typer.Option(..., "--out", "-o", help="output folder (replaced whole, atomically)"),
        calib: Optional[Path] = typer.Option(None, help="calibration .npz ('x': real inputs); required for int8"),
        eval_data: Optional[Path] = typer.Option(None, "--eval", help="held-out .npz ('x', optional 'y', 'logits') "
                                                                      "for the parity figures"),
        max_accuracy_drop: Optional[float] = typer.Option(None, help="OpenVINO int8: NNCF accuracy control, absolute "
                                                                     "drop (e.g. 0.01); needs --eval with labels"),
        calib_samples: int = typer.Option(300, help="calibration samples used"),
        eval_samples: Optional[int] = typer.Option(None, help="limit the evaluation samples"),
        device: str = typer.Option("CPU", help="OpenVINO device"),
        providers: Optional[str] = typer.Option(None, help="ONNX Runtime EPs, comma-separated (cpu,xnnpack,acl); "
                                                           "default: the best installed"),
        trt_version: Optional[str] = typer.Option(None, help="TensorRT version targeted (default: the installed one, "
                                                             "or 10.3 with --trtexec-only)"),
        trtexec_only: bool = typer.Option(False, help="TensorRT: prepare ONNX + trtexec command without building"),
        workspace_mb: int = typer.Option(1024, help="TensorRT workspace limit (MiB)"),
        timing_cache: Optional[Path] = typer.Option(None, help="TensorRT timing cache to reuse/update"),
        dla_core: Optional[int] = typer.Option(None, help="TensorRT: build for this Jetson DLA core"),
        gpu_fallback: bool = typer.Option(True, help="TensorRT DLA: let unsupported layers run on the GPU"),
        opt_batch: int = typer.Option(1, help="TensorRT profile: optimal batch"),
        max_batch: int = typer.Option(32, help="TensorRT profile: maximum batch"),
        quantize_all: bool = typer.Option(False, help="int8: quantize the first and last compute layers too "
                                                      "(default keeps them in float)"),
        int8_scheme: str = typer.Option("auto", help="int8: auto (static for images, weight-only for LMs), "
                                                     "static, weights, dynamic (onnxruntime)"),
        force: bool = typer.Option(False, "--force", help="replace an --out folder an earlier sglp-edge command wrote"),
    ) -> None:
        """Compile an ONNX model for OpenVINO, ONNX Runtime or TensorRT; writes the artifacts and a
        manifest.json (source hash, backend + version, precision, parity figures) atomically."""
        from exporters.compile import compile_model  # heavy: numpy at its top; `sglp-edge --help` stays fast

        for name, v in (("--calib-samples", calib_samples), ("--eval-samples", eval_samples),
                        ("--workspace-mb", workspace_mb), ("--opt-batch", opt_batch), ("--max-batch", max_batch)):
            positive(name, v)
        for path, what in ((onnx, "ONNX file"), (calib, "--calib"), (eval_data, "--eval")):
            if path is not None and (path.is_dir() or path.is_file()):
                check_file(path, what)  # a folder where a file goes (a missing one is named by the compiler)
        guard_out_dir(out, force=force, inputs=(onnx, calib, eval_data, timing_cache))
        hold_out(out, force=force, inputs=(onnx, calib, eval_data, timing_cache))
        opts = TrtOptions(precision=precision, workspace_mb=workspace_mb,
                          timing_cache=str(timing_cache) if timing_cache else None, dla_core=dla_core,
                          gpu_fallback=gpu_fallback, opt_batch=opt_batch, max_batch=max_batch)
        m = compile_model(onnx, backend, precision, out, calib=calib, eval_data=eval_data,
                          max_accuracy_drop=max_accuracy_drop, calib_samples=calib_samples, eval_samples=eval_samples,
                          device=device, providers=[p for p in providers.split(",") if p] if providers else None,
                          trt_version=trt_version, trtexec_only=trtexec_only, trt_options=opts,
                          keep_first_last_float=not quantize_all, int8_scheme=int8_scheme)
        b = m["backend"]
        typer.echo(f"wrote {out}/ ({', '.join(a['path'] for a in m['artifacts'])}, manifest.json) "
                   f"backend={b['name']} {b.get('version') or b.get('target_version')} precision={precision}")
        rt = m.get("runtime", {})
        if "with_hint" in rt:
            typer.echo(f"runtime precision: {rt['with_hint']['inference_precision_hint']} with "
                       f"{rt['compile_config']}, {rt['default_without_hint']['inference_precision_hint']} by default; "
                       f"layers {rt['with_hint']['compute_layer_precisions']}")
        elif "providers" in rt:
            typer.echo(f"execution providers: {', '.join(rt['providers'])}")
        p = m.get("parity")
        if p:
            extra = f" top1_agree={p['top1_agree']:.4f}" if "top1_agree" in p else ""
            acc = (f" accuracy={p['top1_accuracy']:.4f} (reference {p['reference_top1_accuracy']:.4f})"
                   if "top1_accuracy" in p else "")
            typer.echo(f"parity on {p['samples']} {p['inputs']} vs {p['reference']}: max_abs={p['max_abs']:.3g} "
                       f"max_rel={p['max_rel']:.3g}{extra}{acc}")
        if "tensorrt" in m:
            typer.echo(f"trtexec: {m['tensorrt']['trtexec_command']}")
        for note in m.get("notes", []):
            typer.echo(f"note: {note}", err=True)
