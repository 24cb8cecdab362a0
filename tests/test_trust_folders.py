"""Trust (issue 24, items 3, 5, 6): an --out folder is ours only with our marker AND our result;
nothing in a folder that is not ours is cleaned, stamped or replaced; every writing command holds
the folder's lock (beside it) for the whole write, so a second writer gets one line and exit 2."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.board.atomic import MARKER, FolderLock, clean_stale_temps, mark_output
from benchmarks.board.errors import UserError
from sglp_edge.cli import app
from tests.onnx_models import make_cnn

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FMNIST.is_file(), reason="Debian dataset-fashion-mnist is not installed")
PRUNE = ["prune", "cifar_resnet20", "--keep", "6", "--calib-batches", "1", "--batch-size", "16"]
IN_USE = "in use by another sglp-edge process"


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stderr


def one_line_error(code, err, needle, status=2):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == status, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]


def snapshot(d: Path) -> dict:
    """Every entry under ``d``: a file's bytes, or None for a folder."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes()) for p in sorted(d.rglob("*"))}


def no_lock_files(d: Path) -> None:
    parent = d.parent
    assert not (d / ".lock").exists() and not (parent / f".{d.name}.lock").exists(), sorted(
        p.name for p in parent.iterdir())


def ext_folder(tmp_path: Path) -> Path:
    """The issue's folder: a user's, that happens to hold a manifest.json and dot-files that look like temps."""
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "manifest.json").write_text('{"name": "my site", "pages": 12}\n')
    (ext / ".draft.tmp").write_text("my draft\n")
    (ext / ".cache.tmp").mkdir()
    (ext / ".cache.tmp" / "blob").write_bytes(b"\x00cache")
    (ext / ".notes.old.1").write_text("old notes\n")
    return ext


# ---- item 3: a user's folder with a manifest is not a run folder ----------------------------------
def test_run_refuses_a_user_folder_with_a_manifest_and_touches_nothing(tmp_path):
    ext = ext_folder(tmp_path)
    before = snapshot(ext)
    code, err = cli("run", "--config", "default", "--out", ext)
    one_line_error(code, err, "sglp-edge did not write")
    assert "[clean]" not in err
    assert snapshot(ext) == before and not (ext / MARKER).exists()
    no_lock_files(ext)
    code, err = cli(*PRUNE, "--out", ext, "--force")  # and --force never replaces it
    one_line_error(code, err, "sglp-edge did not write")
    assert snapshot(ext) == before
    no_lock_files(ext)


def test_stage_runner_checks_before_it_locks_marks_or_cleans(tmp_path):
    from sglp_edge.pipeline.stages import StageRunner

    ext = ext_folder(tmp_path)
    before = snapshot(ext)
    said = []
    with pytest.raises(UserError, match="did not write"):
        StageRunner(ext, log=said.append)
    assert said == [] and snapshot(ext) == before
    no_lock_files(ext)


def test_a_marker_beside_user_files_without_a_manifest_is_not_a_run_folder(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / MARKER).write_text('{"written_by": "sglp-edge"}\n')
    (d / "thesis.tex").write_text("x")
    before = snapshot(d)
    code, err = cli("run", "--config", "default", "--out", d)
    one_line_error(code, err, "sglp-edge did not write")
    code, err = cli(*PRUNE, "--out", d, "--force")
    one_line_error(code, err, "sglp-edge did not write")
    assert snapshot(d) == before


def test_clean_stale_temps_removes_only_our_writers_names_and_only_in_our_folder(tmp_path):
    ext = ext_folder(tmp_path)
    ours = [ext / ".model.onnx.k3x_9q0a.tmp", ext / ".prune.4711.tmp.onnx"]
    for p in ours:
        p.write_text("half-written")
    (ext / ".export.old.4711").mkdir()  # atomic_dir's replaced folder
    assert clean_stale_temps(ext) == []  # not ours: nothing goes, not even our own names
    mark_output(ext)
    gone = sorted(p.name for p in clean_stale_temps(ext))
    assert gone == sorted([".export.old.4711", *(p.name for p in ours)])
    assert sorted(p.name for p in ext.iterdir()) == [".cache.tmp", ".draft.tmp", ".notes.old.1", MARKER,
                                                    "manifest.json"]


# ---- item 5: bench never stamps a user's summary.json folder ---------------------------------------
def test_bench_refuses_a_user_folder_with_a_summary(tmp_path):
    model = make_cnn(tmp_path / "m.onnx")
    d = tmp_path / "results"
    d.mkdir()
    (d / "summary.json").write_text('{"boards": ["mine"]}\n')
    (d / "pi5").mkdir()
    (d / "pi5" / "notes.txt").write_text("x")
    before = snapshot(d)
    code, err = cli("bench", model, "--device", "local-cpu-ort", "--out", d)
    one_line_error(code, err, "sglp-edge did not write")
    assert snapshot(d) == before and not (d / MARKER).exists()
    no_lock_files(d)


# ---- item 6: one writer per --out ----------------------------------------------------------------
@needs_data
def test_two_prunes_into_one_out_exactly_one_writes(tmp_path):
    out = tmp_path / "out"
    with FolderLock(out):  # the first prune, still running
        code, err = cli(*PRUNE, "--out", out)
        one_line_error(code, err, IN_USE)
        code, err = cli(*PRUNE, "--out", out, "--force")
        one_line_error(code, err, IN_USE)
        assert not out.exists()
    code, err = cli(*PRUNE, "--out", out)  # the first one's result
    assert code == 0, err
    assert (out / "plan.json").is_file() and (out / MARKER).is_file()
    no_lock_files(out)
    plan = (out / "plan.json").read_bytes()
    with FolderLock(out):  # a folder of ours is guarded too, even with --force
        code, err = cli(*PRUNE, "--out", out, "--force")
        one_line_error(code, err, IN_USE)
    assert (out / "plan.json").read_bytes() == plan


def test_compile_into_a_held_out_refuses_then_replaces_its_own_folder(tmp_path):
    model = make_cnn(tmp_path / "m.onnx")
    out = tmp_path / "ort"
    with FolderLock(out):
        code, err = cli("compile", model, "--backend", "onnxruntime", "--out", out)
        one_line_error(code, err, IN_USE)
    assert not out.exists()
    code, err = cli("compile", model, "--backend", "onnxruntime", "--out", out)
    assert code == 0, err
    no_lock_files(out)
    with FolderLock(out):  # the lock is beside the folder: it still guards it after a replacement by rename
        code, err = cli("compile", model, "--backend", "onnxruntime", "--out", out, "--force")
        one_line_error(code, err, IN_USE)
    code, err = cli("compile", model, "--backend", "onnxruntime", "--out", out, "--force")
    assert code == 0, err
    assert (out / "manifest.json").is_file()
    no_lock_files(out)


def test_export_into_a_held_file_refuses(tmp_path):
    f = tmp_path / "r20.onnx"
    with FolderLock(f):
        code, err = cli("export", "cifar_resnet20", "--out", f)
        one_line_error(code, err, IN_USE)
        assert (tmp_path / ".r20.onnx.lock").is_file()  # the lock file is named after the output
    assert not f.exists()
    no_lock_files(f)


def test_bench_into_a_held_out_refuses(tmp_path):
    model = make_cnn(tmp_path / "m.onnx")
    out = tmp_path / "b"
    with FolderLock(out):
        code, err = cli("bench", model, "--device", "local-cpu-ort", "--out", out)
        one_line_error(code, err, IN_USE)
    assert not out.exists()


def test_folder_lock_is_exclusive_and_leaves_no_file(tmp_path):
    out = tmp_path / "o"
    a = FolderLock(out).acquire()
    with pytest.raises(UserError, match=IN_USE):
        FolderLock(out).acquire()
    a.release()
    assert not (tmp_path / ".o.lock").exists()
    with FolderLock(out):  # a released lock is taken again at once
        with pytest.raises(UserError, match=IN_USE):
            FolderLock(out).acquire()
    assert list(tmp_path.iterdir()) == []


def test_a_users_file_named_like_the_lock_is_never_changed_or_removed(tmp_path):
    mine = tmp_path / ".o.lock"
    mine.write_text("my lock notes\n")
    with FolderLock(tmp_path / "o"):
        with pytest.raises(UserError, match=IN_USE):
            FolderLock(tmp_path / "o").acquire()
    assert mine.read_text() == "my lock notes\n"
