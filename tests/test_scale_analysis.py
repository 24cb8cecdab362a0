"""Analysis at scale (issue 27): the segment-prefix replay gives the same scores and choices for less
work, the accelerator choice, the calibration batch that shrinks with model size, the up-front
estimate, and plain progress lines when output is not a terminal."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.board.errors import UserError
from sglp_edge.models.base import get_module
from sglp_edge.models.lm_memory import LM_DEFAULT_BATCH, lm_default_batch, prune_memory_need
from sglp_edge.pipeline.progress import PlainProgress, analysis_progress
from sglp_edge.sglp.accelerator import Placement, analysis_model, check_accelerator, choose_accelerator
from sglp_edge.sglp.importance import CandidateScorer, select_in_segment
from sglp_edge.sglp.prefix_cache import PrefixReplay

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _tiny_llama(layers: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sglp_edge.models.hf_llm import HFDecoderAdapter

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return m, HFDecoderAdapter(), batches


def _tiny_resnet():
    from sglp_edge.models.registry import load_model

    torch.manual_seed(0)
    loaded = load_model("cifar_resnet20")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    return loaded.model.eval(), loaded.adapter, batches


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_resnet], ids=["llama", "resnet20"])
def test_prefix_replay_gives_the_same_scores_and_choice(make):
    model, adapter, batches = make()
    units = adapter.units(model)
    seg = [u.name for u in units[2:] if u.removable][:4]
    plain = CandidateScorer(model, adapter, batches, protocol="loss")
    replay = PrefixReplay(model, adapter, units, batches)
    cached = CandidateScorer(model, adapter, batches, protocol="loss", replay=replay)
    a = select_in_segment(plain, 0, seg, 2)
    b = select_in_segment(cached, 0, seg, 2)
    assert replay.usable and a.keep == b.keep and a.scores.keys() == b.scores.keys() and len(a.scores) == 6
    assert replay.first_of(seg) >= 2  # a prefix was replayed
    for k in a.scores:
        assert b.scores[k] == pytest.approx(a.scores[k], rel=1e-6, abs=1e-9)


def test_prefix_replay_skips_the_units_before_the_segment():
    model, adapter, batches = _tiny_llama()
    units = adapter.units(model)
    replay = PrefixReplay(model, adapter, units, batches)
    calls = {"first": 0, "last": 0}
    get_module(model, "model.layers.0.mlp").register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1))
    get_module(model, "model.layers.5.mlp").register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    scorer = CandidateScorer(model, adapter, batches, protocol="loss", replay=replay)
    scorer.score(["model.layers.3", "model.layers.4"], ["model.layers.3"])  # captures once, then replays 0..2
    assert calls == {"first": len(batches), "last": 2 * len(batches)}
    # the replaced forwards are gone afterwards: a plain forward runs every layer again
    adapter.loss(model, batches[0])
    assert calls == {"first": len(batches) + 1, "last": 2 * len(batches) + 1}
    assert "forward" not in get_module(model, "model.layers.0").__dict__


def test_gradnorm_protocols_do_not_replay():
    model, adapter, batches = _tiny_llama(4)
    replay = PrefixReplay(model, adapter, adapter.units(model), batches)
    assert CandidateScorer(model, adapter, batches, protocol="natural", replay=replay).replay is None


def test_accelerator_choice_and_refusal():
    with pytest.raises(UserError, match="choose one of auto, cpu, cuda"):
        check_accelerator("tpu")
    assert choose_accelerator("cpu", "tokens").device.type == "cpu"
    if torch.cuda.is_available():
        p = choose_accelerator("auto", "tokens")
        assert p.device.type == "cuda"
    else:
        with pytest.raises(UserError, match="--accelerator cpu"):
            check_accelerator("cuda")
        p = choose_accelerator("auto", "tokens")
        assert p.on_host and "no CUDA" in p.why and p.to_dict()["device"] == "cpu"


def test_analysis_model_converts_a_copy_and_leaves_the_original():
    model, _, _ = _tiny_llama(2)
    bf = analysis_model(model, Placement("cpu", torch.device("cpu"), torch.bfloat16, "test"))
    assert bf is not model
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert bf.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their dtype
    same = analysis_model(model, Placement("cpu", torch.device("cpu"), torch.float32, "test"))
    assert same is model


def test_lm_default_batch_shrinks_with_model_size():
    assert lm_default_batch(1.35e8)[0] == LM_DEFAULT_BATCH
    b1, why = lm_default_batch(1.07e9)
    assert b1 == 4 and "1.07 B" in why
    assert lm_default_batch(8e9)[0] == 2
    d = {"hidden": 2048, "layers": 16, "inter": 8192, "vocab": 49152, "heads": 32, "kv_heads": 8, "tied": True}
    fwd, full = prune_memory_need(d, 4, 128, forward_only=True), prune_memory_need(d, 4, 128)
    assert 4.0 * 1.07e9 < fwd < 2 * 4.0 * 1.07e9 < full


def test_plain_progress_prints_milestones_with_an_eta():
    out, now = io.StringIO(), [0.0]
    p = PlainProgress(out, clock=lambda: now[0])
    with p:
        t = p.add_task("candidate loss", total=20)
        for _ in range(20):
            now[0] += 3.0
            p.advance(t)
    lines = out.getvalue().splitlines()
    assert "candidate loss: start (20 steps)" in lines[0]
    assert any("2/20, 6s elapsed, ETA 54s" in ln for ln in lines)
    assert "done 20/20 in 1m00s" in lines[-1]
    assert len(lines) == 1 + 9 + 1  # start, every 2 steps up to 18, done
    assert isinstance(analysis_progress(io.StringIO()), PlainProgress)  # not a terminal: lines


def test_plain_progress_speaks_after_a_quiet_minute():
    out, now = io.StringIO(), [0.0]
    p = PlainProgress(out, clock=lambda: now[0], max_quiet_s=60)
    t = p.add_task("slow", total=1000)
    now[0] = 61.0
    p.advance(t)
    assert "1/1000, 1m01s elapsed" in out.getvalue().splitlines()[-1]


def test_prune_cli_logs_plain_lines_and_records_the_analysis(tmp_path):
    from sglp_edge.data.text import TEXT_DOC_ROOT
    from tests.test_decode_budget import tiny_llama_folder

    if not Path(TEXT_DOC_ROOT).is_dir():
        pytest.skip("the English text corpus is not installed")
    folder = tiny_llama_folder(tmp_path)
    out = tmp_path / "pruned"
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "prune", str(folder), "--data", "text", "--keep", "2",
                        "--out", str(out), "--accelerator", "cpu", "--threads", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    err = p.stderr
    assert "analysis estimate on cpu" in err
    assert "CKA over calibration batches: start (4 steps)" in err and "CKA over calibration batches: done 4/4" in err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["accelerator"]["device"] == "cpu" and plan["accelerator"]["dtype"] == "float32"
    assert plan["prefix_cache"] == {"used": True}
    assert plan["estimate"]["seconds"] > 0 and plan["estimate"]["max_evaluations"] == 80
    assert plan["calibration"]["batch_size"] == LM_DEFAULT_BATCH
    assert len(plan["kept"]) == 2
