"""benchmarks/board/calib.py: the .npz contract between the torch side and the exporters (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.board.calib import CalibData, batches, check_matches_input, load_npz, num_batches, save_npz
from benchmarks.board.errors import UserError


def test_round_trip_keeps_arrays_and_hashes(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    y = np.arange(10) % 3
    logits = np.random.default_rng(1).standard_normal((10, 3)).astype(np.float32)
    p = save_npz(tmp_path / "d.npz", x, y, logits)
    d = load_npz(p)
    np.testing.assert_array_equal(d.x, x)
    np.testing.assert_array_equal(d.y, y)
    np.testing.assert_array_equal(d.logits, logits)
    assert d.kind == "image" and len(d) == 10 and len(d.sha256) == 64
    assert d.describe()["has_reference_logits"] is True
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_tokens_are_int64_and_head_cuts_every_array(tmp_path):
    ids = np.random.default_rng(0).integers(0, 100, (6, 5)).astype(np.int32)
    d = load_npz(save_npz(tmp_path / "t.npz", ids))
    assert d.kind == "tokens" and d.x.dtype == np.int64
    h = CalibData(d.x, np.arange(6), np.zeros((6, 5, 100), np.float32)).head(4)
    assert len(h) == 4 and h.y.shape == (4,) and h.logits.shape[0] == 4


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a zip file at all", "not a readable .npz"),
])
def test_missing_or_corrupt_file(tmp_path, content, message):
    p = tmp_path / "calib.npz"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_npz(p)


def test_truncated_npz(tmp_path):
    p = save_npz(tmp_path / "c.npz", np.ones((50, 3, 16, 16), np.float32))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable .npz"):
        load_npz(p)


def test_schema_errors(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.ones((2, 3)))
    with pytest.raises(UserError, match="no array 'x'"):
        load_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.array(["a", "b"]).reshape(2, 1))
    with pytest.raises(UserError, match="dtype"):
        load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.ones((4, 3), np.float32), y=np.arange(3))
    with pytest.raises(UserError, match="one integer label per sample"):
        load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=np.full((2, 3), np.nan, np.float32))
    with pytest.raises(UserError, match="NaN"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", x=np.ones((4, 3), np.float32))
    with pytest.raises(UserError, match="no labels"):
        load_npz(tmp_path / "e.npz", require_labels=True)


def test_batches_cover_everything_once():
    x = np.arange(23)[:, None]
    got = list(batches(x, 5))
    assert [len(b) for b in got] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(got), x)
    assert [len(b) for b in batches(x, 5, drop_last=True)] == [5, 5, 5, 5]
    assert num_batches(23, 5) == 5 and num_batches(23, 5, drop_last=True) == 4
    with pytest.raises(UserError):
        list(batches(x, 0))


def test_check_matches_input():
    d = CalibData(np.zeros((4, 3, 32, 32), np.float32), path="c.npz")
    check_matches_input(d, ["batch", 3, 32, 32], "float32")
    with pytest.raises(UserError, match="dimension 2 differs"):
        check_matches_input(d, ["batch", 3, 28, 28], "float32")
    with pytest.raises(UserError, match="rank"):
        check_matches_input(d, ["batch", 3, 32], "float32")
    with pytest.raises(UserError, match="expects int64"):
        check_matches_input(d, ["batch", "sequence"], "int64")
