"""Causal LM that generates with a KV cache (Optimum: ``text-generation-with-past``).

- calibration: ``prune.calib_batches`` batches of ``prune.batch_size`` SEQUENCES of
  ``prune.seq_len`` tokens (default 8 x 2 x 128) from the calibration documents;
- loss: next-token cross-entropy (GradNorm), KD on the next-token distribution (fine-tune), AdamW,
  a budget in steps or minutes, validation capped at ``finetune.val_samples`` blocks;
- export: one graph for prefill and decode with past key/values (:mod:`sglp_edge.export.lm`);
- compile: one route per backend (:mod:`sglp_edge.tasks.lm_routes`): :mod:`exporters.lm_compile` (ORT
  fp32/int8/int4, OpenVINO fp32/fp16/int8/int4 from its stateful IR, TensorRT's build command), or
  onnxruntime-genai's model builder (:mod:`sglp_edge.export.lm_genai`, fp32/int8/int4);
- board data: token ids (:func:`benchmarks.board.lm_bench.write_eval_npz`): the TTFT prompt,
  held-out perplexity blocks, greedy prompts and PyTorch's greedy continuations, and their text where
  it re-tokenises to the same ids (for llama.cpp: :mod:`sglp_edge.tasks.lm_eval_text`);
- metrics: TTFT, decode tokens/s (p50/p90 per token), perplexity (and its increase over the
  unpruned model on the same runtime), greedy agreement with PyTorch, size, peak memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.board.errors import UserError
from benchmarks.board.lm_bench import write_eval_npz
from sglp_edge.models.lm_memory import GB, meminfo_total, activation_bytes, check_prune_memory, lm_dims, params_of
from sglp_edge.profiles.load import load_profile
from sglp_edge.tasks.base import Task
from sglp_edge.tasks.causal_lm_report import build_lm_report
from sglp_edge.tasks.context import TaskContext
from sglp_edge.tasks.lm_eval_text import eval_text
from sglp_edge.tasks.lm_routes import LM_ROUTE_CHECKS, LM_ROUTES, stage_export_openvino


class CausalLM(Task):
    name = "causal-lm"
    optimum_name = "text-generation-with-past"
    modality = "tokens"
    defaults = {
        "prune": {"calib_batches": 8, "batch_size": 2, "seq_len": 128},
        "finetune": {"batch_size": 4, "lr": 3e-4, "optimizer": "adamw", "weight_decay": 0.0, "val_samples": 16,
                     "test_samples": 64},
        "eval": {"samples": 16},
    }

    def check_config(self, cfg: Any) -> None:
        if cfg.eval.prompt_tokens < 1 or cfg.eval.gen_tokens < 1 or cfg.eval.greedy_prompts < 1 or cfg.eval.greedy_tokens < 1:
            raise UserError("eval.prompt_tokens, gen_tokens, greedy_prompts and greedy_tokens must be at least 1")
        if cfg.prune.batch_size < 1 or cfg.prune.seq_len < 2 or cfg.finetune.batch_size < 1:
            raise UserError("prune.batch_size, prune.seq_len (>= 2) and finetune.batch_size must be positive")
        d = lm_dims(cfg.model)
        self._check_routes(cfg, d)
        total = meminfo_total()
        if d is None or total is None:
            return
        check_prune_memory(cfg.model, cfg.prune.batch_size, cfg.prune.seq_len, d=d)
        p = params_of(d)
        budget = 0.75 * total
        # teacher + student + gradients + AdamW's two moments, plus the student's activations and
        # the teacher's logits / KD softmaxes
        need_ft = 20.0 * p + activation_bytes(d, cfg.finetune.batch_size, cfg.text.block_size) \
            + 4.0 * cfg.finetune.batch_size * cfg.text.block_size * d["vocab"] * 4
        batch, tokens = cfg.finetune.batch_size, cfg.text.block_size
        if cfg.finetune.enabled and need_ft > budget:
            raise UserError(
                f"finetune.batch_size={batch} sequences x {tokens} tokens needs about {need_ft / GB:.0f} GB for "
                f"{cfg.model} ({p / 1e6:.0f} M params) but this machine has {total / GB:.0f} GB; use "
                f"finetune.batch_size: {self.defaults['finetune']['batch_size']} (the causal-lm default) or shorter "
                "sequences")

    def _check_routes(self, cfg: Any, d: dict[str, Any] | None) -> None:
        """Each device's LM route checked before any heavy work (e.g. onnxruntime-genai installed)."""
        for board in cfg.boards():
            try:
                prof = load_profile(board.device)
            except UserError:  # reported by the pipeline's validation, with the run's other checks
                continue
            check = LM_ROUTE_CHECKS.get(prof.backend)
            if check and prof.task == self.name:
                check(cfg, prof, d)

    # ---- data and models -----------------------------------------------------------------------
    def load_data(self, ctx: TaskContext) -> Any:
        from sglp_edge.data.text import get_text_dataset  # heavy: torch

        tok = ctx.loaded.tokenizer
        if tok is None:
            raise UserError(f"{ctx.cfg.model} has no tokenizer; a causal LM run needs one to read the text data")
        return get_text_dataset(tok, ctx.cfg.data_root, seed=ctx.cfg.seed, block_size=ctx.cfg.text.block_size,
                                max_tokens=ctx.cfg.text.max_tokens)

    def save_model(self, ctx: TaskContext, loaded: Any, model: Any, folder: Path, extra: dict[str, Any]) -> None:
        from sglp_edge.models.hf_llm import save_hf  # heavy: torch, transformers

        save_hf(model, folder, tokenizer=ctx.loaded.tokenizer, extra=extra)

    def models(self, ctx: TaskContext):
        """``("original", model), ("pruned", model)``: the model as loaded and the run's final model."""
        from sglp_edge.models.registry import load_model  # heavy: torch

        return (("original", ctx.loaded.model), ("pruned", load_model(str(ctx.final_model_dir())).model))

    # ---- stages ----------------------------------------------------------------------------------
    def stage_eval_data(self, ctx: TaskContext) -> dict[str, Any]:
        import torch  # heavy

        e = ctx.cfg.eval
        final_hash = ctx.final_hash()

        def fn(tmp: Path) -> dict[str, Any]:
            d = ctx.data
            n_ppl = min(e.samples, max(1, len(d.test) - 1))
            ppl_blocks = d.test[:n_ppl]
            rest = torch.cat([d.test[n_ppl:].reshape(-1), d.val.reshape(-1)])
            plen = min(64, d.block_size)
            need = e.prompt_tokens + e.greedy_prompts * plen
            if len(rest) < need:
                raise UserError(f"held-out text has {len(rest)} tokens after the perplexity blocks; need {need} "
                                "(lower eval.samples, eval.prompt_tokens or eval.greedy_prompts)")
            bench_prompt = rest[: e.prompt_tokens]
            prompts = rest[e.prompt_tokens: need].reshape(e.greedy_prompts, plen)
            out: dict[str, Any] = {"ppl_blocks": int(n_ppl), "block_size": int(d.block_size),
                                   "greedy": f"{e.greedy_prompts} prompts x {e.greedy_tokens} tokens",
                                   "prompt_tokens": e.prompt_tokens, "gen_tokens": e.gen_tokens, "torch_ppl": {}}
            for which, model in self.models(ctx):
                model.eval()
                ref, ppl = torch_greedy_and_ppl(model, prompts, e.greedy_tokens, ppl_blocks)
                out["torch_ppl"][which] = ppl
                # the text llama.cpp reads (it has no token-id input), where it re-tokenises to the same ids
                text, out.setdefault("text", {})[which] = eval_text(ctx.loaded.tokenizer, ppl_blocks.numpy(),
                                                                    prompts.numpy(), ref.numpy(), model=model)
                write_eval_npz(str(tmp / f"eval_{which}.npz"), bench_prompt=bench_prompt.numpy(),
                               gen_tokens=e.gen_tokens, greedy_prompts=prompts.numpy(), greedy_reference=ref.numpy(),
                               ppl_blocks=ppl_blocks.numpy(), torch_perplexity=ppl, text=text,
                               meta={"model": which, "split": "test (held-out documents)", "text": out["text"][which]})
            return out

        return ctx.runner.stage("eval_data", ctx.inputs("eval", eval=e.model_dump(), text=ctx.cfg.text.model_dump(),
                                                        final=final_hash), fn)

    def stage_export(self, ctx: TaskContext) -> dict[str, Any]:
        import torch  # heavy

        from sglp_edge.export.lm import export_causal_lm  # heavy: torch

        final_hash = ctx.final_hash()

        def fn(tmp: Path) -> dict[str, Any]:
            with np.load(ctx.run_dir / "eval_data" / "eval_original.npz") as z:
                ids = torch.from_numpy(z["greedy_prompts"][:2, :24])
            res = {}
            for which, model in self.models(ctx):
                meta = export_causal_lm(model, tmp / which, opset=ctx.cfg.export.opset or 18, parity_ids=ids)
                res[which] = {k: meta[k] for k in ("layout", "num_layers", "size_bytes", "sha256", "parity_vs_pytorch",
                                                   "external_data", "seconds")}
                res[which]["exporter"] = "dynamo"
                res[which]["parity"] = meta["parity_vs_pytorch"]
            return res

        return ctx.runner.stage("export", ctx.inputs("export", export=ctx.cfg.export.model_dump(), task=self.name,
                                                     final=final_hash), fn)

    def stage_export_openvino(self, ctx: TaskContext) -> dict[str, Any]:
        """The stateful OpenVINO IR of both models (sglp_edge.export.lm_openvino), once per run."""
        return stage_export_openvino(self, ctx)

    def stage_compile(self, ctx: TaskContext, board: Any) -> dict[str, Any]:
        """The profile's backend route (sglp_edge/tasks/lm_routes.py: ONNX, stateful OpenVINO, onnxruntime-genai)."""
        prof = load_profile(board.device)
        if prof.task != self.name:
            raise UserError(f"device profile {prof.name} is for {prof.task}, not a causal LM; use an LM profile "
                            "such as local-cpu-ort-lm, local-cpu-openvino-lm, local-cpu-genai-lm, raspberry-pi-5-lm "
                            "or jetson-orin-nano-lm")
        route = LM_ROUTES.get(prof.backend)
        if route is None:
            raise UserError(f"backend {prof.backend} has no decoder-LM route in sglp-edge run yet; use one of "
                            f"{', '.join(LM_ROUTES)}")
        return route(self, ctx, prof)

    def derived_metrics(self, results: dict[str, Any]) -> dict[str, Any]:
        o = (results.get("original") or {}).get("metrics") or {}
        p = (results.get("pruned") or {}).get("metrics") or {}
        out = {}
        if o.get("perplexity") and p.get("perplexity"):
            out["perplexity_increase_pct"] = 100.0 * (p["perplexity"] / o["perplexity"] - 1.0)
        if p.get("perplexity") and p.get("torch_perplexity"):  # what the runtime and its precision cost
            out["perplexity_vs_pytorch_pct"] = 100.0 * (p["perplexity"] / p["torch_perplexity"] - 1.0)
        return out

    def build_report(self, ctx: TaskContext, prune: Any, ft: Any, ev: Any, ex: Any, targets: list) -> dict[str, Any]:
        return build_lm_report(ctx, prune, ft, ev, ex, targets)


def torch_greedy_and_ppl(model: Any, prompts: Any, n_new: int, blocks: Any) -> tuple[Any, float]:
    """PyTorch's reference: greedy continuations (``n_new`` tokens after each of ``prompts``, KV cache on)
    and the perplexity over ``blocks`` (each scored on its own, log-softmax in float64)."""
    import math

    import torch  # heavy

    refs = []
    with torch.no_grad():
        for p in prompts:
            ids = p[None]
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                               use_cache=True, pad_token_id=0, eos_token_id=None)
            refs.append(g[0, ids.shape[1]:])
        nll, n = 0.0, 0
        for b in blocks:
            lp = torch.log_softmax(model(b[None]).logits[0, :-1].double(), -1)
            nll += -lp.gather(-1, b[1:, None]).sum().item()
            n += len(b) - 1
    return torch.stack(refs), math.exp(nll / n)
