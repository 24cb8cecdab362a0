"""`sglp-edge run` for a causal LM, end to end on a tiny random Llama with a character tokenizer
and the real English corpus: prune -> KD -> export with KV cache -> compile (ORT, OpenVINO) ->
LM benchmark in child processes -> report with LM figures. Plus the config's one-line errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

transformers = pytest.importorskip("transformers")

from benchmarks.board.errors import UserError  # noqa: E402
from sglp_edge.data.text import TEXT_DOC_ROOT  # noqa: E402
from sglp_edge.pipeline.config import load_config  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(TEXT_DOC_ROOT).is_dir(), reason="the English text corpus is not installed")


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    t = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]")


def tiny_lm_folder(d: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglp_edge.models.hf_llm import save_hf

    torch.manual_seed(0)
    # head size 16: onnxruntime-genai's CPU attention takes multiples of 16 only (the genai profile's test)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=128, eos_token_id=1)).eval()
    return save_hf(m, d / "tiny-llama", tokenizer=char_tokenizer())


def lm_cfg(model: Path) -> dict:
    return {"name": "lm", "model": str(model), "data": "text",
            "text": {"block_size": 32, "max_tokens": 12000},
            "prune": {"keep": 3, "calib_batches": 2, "batch_size": 2, "seq_len": 32},
            "finetune": {"steps": 2, "batch_size": 2, "val_samples": 2, "test_samples": 3},
            "eval": {"samples": 2, "prompt_tokens": 16, "gen_tokens": 8, "greedy_prompts": 2, "greedy_tokens": 4},
            "devices": ["local-cpu-ort-lm", "local-cpu-openvino-lm"]}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    import torch

    from sglp_edge.pipeline.run import Pipeline

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("lmrun")
    (d / "run.yaml").write_text(yaml.safe_dump(lm_cfg(tiny_lm_folder(d))))
    try:
        rep = Pipeline(load_config(d / "run.yaml"), d / "run", log=lambda m: None).run()
    finally:
        torch.set_num_threads(n)
    return d, rep


def test_lm_run_all_stages_and_report(lm_run):
    d, rep = lm_run
    run = d / "run"
    assert rep["task"] == "causal-lm" and rep["prune"]["n_units_after"] == 3
    for s in ("prune", "finetune", "eval_data", "export", "compile-onnxruntime-fp32", "compile-openvino-fp32"):
        assert (run / s).is_dir(), s
    # the export is the text-generation-with-past layout with its cache parity against PyTorch
    meta = json.loads((run / "export" / "pruned" / "lm.json").read_text())
    assert meta["num_layers"] == 3 and meta["parity_vs_pytorch"]["passed"]
    assert (run / "compile-openvino-fp32" / "pruned" / "model.xml").is_file()
    # OpenVINO compiles the stateful IR of its PyTorch frontend, checked against PyTorch at export
    ov_meta = json.loads((run / "export-openvino" / "pruned" / "lm.json").read_text())
    assert ov_meta["layout"] == "openvino-stateful" and ov_meta["num_layers"] == 3
    assert ov_meta["parity_vs_pytorch"]["passed"]
    import openvino as ov

    assert len(ov.Core().read_model(str(run / "compile-openvino-fp32" / "pruned" / "model.xml")).get_sinks()) == 6
    assert len(rep["targets"]) == 2
    for t in rep["targets"]:
        for which in ("original", "pruned"):
            m = t["lm"][which]
            assert m["decode_tokens_per_s"] > 0 and m["ttft_ms"] > 0 and m["perplexity"] > 1
            # FP32 on both runtimes: the same greedy tokens and perplexity as PyTorch
            assert m["greedy_agreement_pct"] == 100.0, (t["device"], which)
            assert abs(m["perplexity"] / m["torch_perplexity"] - 1) < 1e-3
            assert set(m["llama_bench"]) == {"pp16", "tg8"}
        cons = {c["metric"]: c for c in t["constraints"]}
        inc = 100 * (t["lm"]["pruned"]["perplexity"] / t["lm"]["original"]["perplexity"] - 1)
        assert cons["perplexity_increase_pct"]["measured"] == pytest.approx(inc)
        assert cons["decode_tokens_per_s"]["measured"] == t["lm"]["pruned"]["decode_tokens_per_s"]
    assert rep["finetune"]["test"]["tokens"] == 3 * 31  # finetune.test_samples: 3 held-out blocks, 31 targets each
    assert set(rep["peak_rss_mb"]["host_stages"]) >= {"prune", "finetune", "eval_data", "export"}
    assert all(isinstance(v, float) and v > 50 for v in rep["peak_rss_mb"]["host_stages"].values())
    html = (run / "report.html").read_text()
    assert "id='lm-results'" in html and "id='plot-tokens-ppl'" in html and (run / "tokens_vs_perplexity.png").is_file()
    assert json.loads((run / "report.json").read_text())["torch_eval"]["pruned"]["perplexity"] > 1


def test_lm_config_errors_are_one_line_before_heavy_work(tmp_path):
    folder = tiny_lm_folder(tmp_path)
    base = lm_cfg(folder)

    def load(**over):
        cfg = json.loads(json.dumps(base))
        for k, v in over.items():
            sec, _, key = k.partition("__")
            if key:
                cfg[sec][key] = v
            else:
                cfg[sec] = v
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        return load_config(tmp_path / "c.yaml")

    with pytest.raises(UserError, match="unknown task 'speech'"):
        load(task="speech")
    with pytest.raises(UserError, match="encoders are not in `sglp-edge run` yet"):
        load(task="feature-extraction")
    # a calibration batch that cannot fit in this machine's memory, said before anything loads
    with pytest.raises(UserError, match=r"prune\.batch_size=100000 sequences .* use prune\.batch_size: 2") as e:
        load(prune__batch_size=100000)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"finetune\.batch_size=100000"):
        load(finetune__batch_size=100000)
    cfg = load()
    assert cfg.task == "causal-lm" and cfg.finetune.optimizer == "adamw" and cfg.finetune.lr == 3e-4


def test_image_config_keeps_its_defaults_and_smollm2_config_validates():
    root = Path(__file__).resolve().parents[1]
    img = load_config(root / "configs" / "default.yaml")
    assert img.task == "image-classification" and img.prune.calib_batches == 4 and img.finetune.optimizer == "sgd"
    lm = load_config(root / "configs" / "smollm2.yaml")
    assert lm.task == "causal-lm" and lm.prune.batch_size == 2 and lm.finetune.val_samples == 16
    assert lm.finetune.test_samples == 64 and img.finetune.test_samples is None  # LM: held-out blocks capped


def test_finetune_cli_uses_the_causal_lm_task_defaults(tmp_path):
    """`sglp-edge finetune` on a decoder LM without --lr / --batch-size / --weight-decay / --optimizer
    takes the causal-LM task's defaults, the ones `sglp-edge run` uses (one place to change them), and
    records them in the saved summary."""
    from typer.testing import CliRunner

    from sglp_edge.cli import app
    from sglp_edge.tasks.causal_lm import CausalLM

    folder = tiny_lm_folder(tmp_path)
    out = tmp_path / "ft"
    r = CliRunner().invoke(app, ["finetune", str(folder), "--teacher", str(folder), "--data", "text", "--steps", "1",
                                 "--block-size", "32", "--max-tokens", "6000", "--val-samples", "2",
                                 "--test-samples", "2", "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    saved = "\n".join(p.read_text() for p in out.glob("*.json"))
    d = CausalLM.defaults["finetune"]
    assert f'"lr": {d["lr"]}' in saved and "--lr " + str(d["lr"]) in saved
    for flag in ("batch-size", "weight-decay", "optimizer"):
        assert f"--{flag} {d[flag.replace('-', '_')]} " in saved, flag


def _genai_rerun(lm_run, name: str, devices: list, emulate: bool = False):
    """A copy of the tiny run folder, run again for ``devices`` (the shared stages are reused)."""
    import shutil

    import torch

    from sglp_edge.pipeline.run import Pipeline

    d, _ = lm_run
    shutil.copytree(d / "run", d / name)
    cfg = yaml.safe_load((d / "run.yaml").read_text())
    cfg["devices"] = [{"device": x, "emulate": "qemu-aarch64"} if emulate else x for x in devices]
    (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = Pipeline(load_config(d / f"{name}.yaml"), d / name, log=lambda m: None)
        rep = pipe.run()
    finally:
        torch.set_num_threads(n)
    return d / name, pipe, rep


def test_lm_run_genai_profile_reuses_the_run_and_measures_genai(lm_run):
    """The same run with `devices: [local-cpu-genai-lm]` (a copy of the run folder): prune, fine-tune,
    eval data and export are reused; compile builds both onnxruntime-genai folders (fp32 parity against
    PyTorch) and the board stage runs lm_bench --backend onnxruntime-genai on them in a child process."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'sglp-edge[llm]')")
    pytest.importorskip("onnx_ir", reason="onnxruntime-genai's builder needs onnx-ir")
    run, pipe, rep = _genai_rerun(lm_run, "run-genai", ["local-cpu-genai-lm"])
    stage = "compile-onnxruntime-genai-fp32"
    assert pipe.runner.ran == [stage, "bench-local-cpu-genai-lm"], pipe.runner.ran
    for which in ("original", "pruned"):
        folder = run / stage / which
        assert {"model.onnx", "genai_config.json", "lm.json"} <= {f.name for f in folder.iterdir()}
        meta = json.loads((folder / "lm.json").read_text())
        assert meta["layout"] == "onnxruntime-genai" and meta["parity_vs_pytorch"]["passed"] is True
        assert meta["num_layers"] == (3 if which == "pruned" else 4)
    [t] = rep["targets"]
    assert (t["device"], t["backend"], t["precision"]) == ("local-cpu-genai-lm", "onnxruntime-genai", "fp32")
    res = json.loads((run / "bench-local-cpu-genai-lm" / "pruned" / "result.json").read_text())
    assert res["backend"] == "onnxruntime-genai" and res["settings"]["onnxruntime_genai"]
    assert res["settings"]["export_precision"] == "fp32" and res["target"]["kind"] == "local"
    for which in ("original", "pruned"):
        m = t["lm"][which]
        assert m["decode_tokens_per_s"] > 0 and m["ttft_ms"] > 0 and m["model_size_mb"] > 0
        # fp32 through onnxruntime-genai: PyTorch's greedy tokens and perplexity
        assert m["greedy_agreement_pct"] == 100.0, which
        assert abs(m["perplexity"] / m["torch_perplexity"] - 1) < 1e-3
    cons = {c["metric"]: c for c in t["constraints"]}
    assert set(cons) == {"decode_tokens_per_s", "ttft_ms", "perplexity_increase_pct", "greedy_agreement_pct",
                         "model_size_mb", "peak_memory_mb"}
    assert all(c["measured"] is not None for c in cons.values())
    assert cons["greedy_agreement_pct"]["measured"] == 100.0 and cons["greedy_agreement_pct"]["passed"] is True
    inc = 100 * (t["lm"]["pruned"]["perplexity"] / t["lm"]["original"]["perplexity"] - 1)
    assert cons["perplexity_increase_pct"]["measured"] == pytest.approx(inc)
    assert "onnxruntime-genai" in (run / "report.html").read_text()


def test_lm_run_genai_on_the_emulated_arm_board(lm_run, tmp_path, monkeypatch):
    """An aarch64 onnxruntime-genai profile under emulation: the aarch64 onnxruntime-genai wheel (with
    the aarch64 onnxruntime it loads) runs the same folders; fp32 gives PyTorch's greedy tokens, and
    speed and memory are recorded as emulated, never held."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'sglp-edge[llm]')")
    pytest.importorskip("onnx_ir", reason="onnxruntime-genai's builder needs onnx-ir")
    from sglp_edge.profiles.load import ENV_VAR
    from sglp_edge.targets import arm64_env

    if not arm64_env.ready(("onnxruntime", "onnxruntime-genai")):
        pytest.skip("emulated ARM board with onnxruntime-genai not set up here: run `sglp-edge run --emulate` once "
                    "with an aarch64 onnxruntime-genai profile (needs PyPI for the aarch64 wheels)")
    (tmp_path / "arm-genai-lm.yaml").write_text(
        "name: arm-genai-lm\narch: aarch64\ntask: causal-lm\nbackend: onnxruntime-genai\nprecision: fp32\nthreads: 2\n"
        "bench: {power: 'off'}\nconstraints: ['decode_tokens_per_s >= 1', 'greedy_agreement_pct >= 99', "
        "'peak_memory_mb <= 100000']\n")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    run, pipe, rep = _genai_rerun(lm_run, "run-genai-arm", ["arm-genai-lm"], emulate=True)
    assert pipe.runner.ran == ["compile-onnxruntime-genai-fp32", "bench-arm-genai-lm_at_emulated"], pipe.runner.ran
    [t] = rep["targets"]
    res = json.loads((run / "bench-arm-genai-lm_at_emulated" / "pruned" / "result.json").read_text())
    assert res["backend"] == "onnxruntime-genai" and res["env"]["machine"] == "aarch64"
    assert res["target"]["emulated"] and res["target"]["aarch64_versions"]["onnxruntime-genai"]
    for which in ("original", "pruned"):
        assert t["lm"][which]["greedy_agreement_pct"] == 100.0, which
    cons = {c["metric"]: c for c in t["constraints"]}
    assert cons["greedy_agreement_pct"]["passed"] is True
    assert cons["peak_memory_mb"]["passed"] is None and "emulated" in cons["peak_memory_mb"]["note"]


def test_genai_profile_checks_come_at_config_load(tmp_path, monkeypatch):
    """A genai device is checked when the config loads, before prune: the package, and a head size
    onnxruntime-genai's CPU attention takes (the tiny model with 4 heads of 8 is refused)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglp_edge.export.lm_genai import INSTALL
    from sglp_edge.models.hf_llm import save_hf

    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128, eos_token_id=1)).eval()
    folder = save_hf(m, tmp_path / "heads8", tokenizer=char_tokenizer())
    cfg = {**lm_cfg(folder), "devices": ["local-cpu-genai-lm"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    if importlib.util.find_spec("onnxruntime_genai") and importlib.util.find_spec("onnx_ir"):
        with pytest.raises(UserError, match="device local-cpu-genai-lm: onnxruntime-genai's CPU attention needs a head "
                                            "size that is a multiple of 16; .* has 8"):
            load_config(tmp_path / "c.yaml")
    # without the package: one line naming the install, still before any stage
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(UserError, match="onnxruntime-genai package") as e:
        load_config(tmp_path / "c.yaml")
    assert INSTALL in str(e.value) and "\n" not in str(e.value)
    # other LM profiles are not affected
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**cfg, "devices": ["local-cpu-ort-lm"]}))
    assert load_config(tmp_path / "c.yaml").devices == ["local-cpu-ort-lm"]
