"""``sglp-edge deploy`` keeps its promises (issue 24: items 4, 7, 8, 9, 10, and the deploy parts of
12 and 16), against the REAL loopback sshd "board" of tests/test_remote_ssh.py: only releases it
made are ever removed, a rollback is checked before it switches, a killed deploy never switches,
``~`` is the board's home, a refusal leaves nothing behind, modes follow the umask, a corrupt
report is one line, and the host-key hint names a flag deploy has."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sglp_edge.targets.deploy import deploy, pick_release, run_in_place
from sglp_edge.targets.deploy_board import INDEX
from test_deploy import DEVICE, board, make_run
from test_remote_ssh import SSHD, sshd  # noqa: F401  (the real sshd fixture)

pytestmark = pytest.mark.skipif(not Path(SSHD).exists() or shutil.which("ssh") is None,
                                reason="needs Debian openssh-server (/usr/sbin/sshd) and ssh: apt-get install openssh-server")


def cli_argv(sshd, run: Path, to: str, *extra: str, known_hosts=None) -> list[str]:  # noqa: F811
    return [sys.executable, "-m", "sglp_edge.cli", "deploy", str(run), "--device", DEVICE, "--host", sshd["host"],
            "--port", str(sshd["port"]), "--identity", str(sshd["key"]), "--ssh-config", "/dev/null",
            "--known-hosts", str(known_hosts or sshd["known_hosts"]), "--remote-python", sys.executable,
            "--to", to, *extra]


def cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def one_error_line(p: subprocess.CompletedProcess, code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    return p.stderr


def link(to: Path, name: str) -> str:
    return os.readlink(to / name)


def two_releases(sshd, tmp_path: Path, to: Path) -> tuple[str, str]:  # noqa: F811
    a = deploy(pick_release(make_run(tmp_path / "runA"), DEVICE), board(sshd), str(to), check=False)["release"]
    b = deploy(pick_release(make_run(tmp_path / "runB", seed=1), DEVICE), board(sshd), str(to), check=False)["release"]
    assert link(to, "current") == f"releases/{b}" and link(to, "previous") == f"releases/{a}"
    return a, b


# 4 -------------------------------------------------------------------------------------------
def test_folders_deploy_did_not_make_are_never_touched(sshd, tmp_path):  # noqa: F811
    # a folder that already holds the user's own things, and no sglp-edge index: refused, untouched
    to = tmp_path / "board" / "model"
    (to / "releases" / "mine").mkdir(parents=True)
    (to / "releases" / "mine" / "keep.txt").write_text("the user's")
    run = make_run(tmp_path / "run1")
    err = one_error_line(cli(cli_argv(sshd, run, str(to), "--no-check")), 2)
    assert "sglp-edge did not put there" in err
    assert sorted(p.name for p in to.rglob("*")) == ["keep.txt", "mine", "releases"]
    # a folder sglp-edge deploys to, where the user later adds a folder of their own in releases/
    to2 = tmp_path / "board" / "model2"
    a, b = two_releases(sshd, tmp_path, to2)
    (to2 / "releases" / "mine").mkdir()
    (to2 / "releases" / "mine" / "keep.txt").write_text("the user's")
    c = deploy(pick_release(make_run(tmp_path / "runC", seed=2), DEVICE), board(sshd), str(to2), check=False)
    assert sorted(p.name for p in (to2 / "releases").iterdir()) == sorted([b, c["release"], "mine"])  # only a went
    assert (to2 / "releases" / "mine" / "keep.txt").read_text() == "the user's"
    assert json.loads((to2 / INDEX).read_text())["releases"] == [b, c["release"]]


def test_a_layout_from_before_the_index_is_adopted(sshd, tmp_path):  # noqa: F811
    to = tmp_path / "board" / "model"
    a, b = two_releases(sshd, tmp_path, to)
    (to / INDEX).unlink()  # as an older sglp-edge left it: current, previous, releases/, no index
    (to / "releases" / "mine").mkdir()
    c = deploy(pick_release(make_run(tmp_path / "runC", seed=2), DEVICE), board(sshd), str(to), check=False)
    assert sorted(p.name for p in (to / "releases").iterdir()) == sorted([b, c["release"], "mine"])
    assert link(to, "current") == f"releases/{c['release']}" and link(to, "previous") == f"releases/{b}"


# 7 -------------------------------------------------------------------------------------------
def test_rollback_checks_the_previous_release_before_switching(sshd, tmp_path):  # noqa: F811
    to = tmp_path / "board" / "model"
    a, b = two_releases(sshd, tmp_path, to)
    model = to / "releases" / a / "model.onnx"
    blob = model.read_bytes()
    model.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # the previous release rotted on the board
    argv = cli_argv(sshd, tmp_path / "runA", str(to), "--rollback")
    err = one_error_line(cli(argv), 4)
    assert "rollback refused" in err and "SHA-256" in err and "model.onnx" in err
    assert link(to, "current") == f"releases/{b}" and link(to, "previous") == f"releases/{a}"
    # sums that match a model the runtime cannot parse: the runner on the board refuses it
    model.write_bytes(b"not an onnx model")
    sums = to / "releases" / a / "SHA256SUMS"
    import hashlib

    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    sums.write_text("".join(f"{digest}  model.onnx\n" if ln.endswith("  model.onnx") else ln + "\n"
                            for ln in sums.read_text().splitlines()))
    err = one_error_line(cli(argv), 4)
    assert "runner of the previous release failed" in err and "model.onnx" in err
    assert link(to, "current") == f"releases/{b}" and link(to, "previous") == f"releases/{a}"


# 8 -------------------------------------------------------------------------------------------
def _sums_under(to: Path) -> int:
    return len(list(to.glob("releases/*/SHA256SUMS")) + list(to.glob(".incoming.*/SHA256SUMS")))


def test_a_killed_deploy_never_switches(sshd, tmp_path):  # noqa: F811
    to = tmp_path / "board" / "model"
    a, b = two_releases(sshd, tmp_path, to)
    before = _sums_under(to)
    proc = subprocess.Popen(cli_argv(sshd, make_run(tmp_path / "runC", seed=2), str(to)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:  # the whole release has reached the board (its last file, SHA256SUMS, is there)
        while _sums_under(to) == before and link(to, "current") == f"releases/{b}" and proc.poll() is None:
            assert time.monotonic() < deadline, "the release never reached the board"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)  # the deploy this test started, by its handle
        proc.wait(timeout=10)
    time.sleep(8)  # an orphaned ssh would have switched by now
    assert link(to, "current") == f"releases/{b}" and link(to, "previous") == f"releases/{a}"
    assert (to / "releases" / a / "model.onnx").is_file() and (to / "releases" / b / "model.onnx").is_file()


# 9 -------------------------------------------------------------------------------------------
def test_tilde_is_the_boards_home(sshd, tmp_path):  # noqa: F811
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # the sshd user is this user
    name = f"sglp-edge-test-{uuid.uuid4().hex[:10]}"
    try:
        p = cli(cli_argv(sshd, make_run(tmp_path / "run"), f"~/{name}", "--no-check"))
        assert p.returncode == 0, p.stderr
        assert f":{home}/{name}/current as release" in p.stdout
        assert (home / name / "current" / "model.onnx").is_file()
        assert not (home / "~" / name).exists()  # no folder literally named ~
        assert run_in_place(board(sshd), f"~/{name}")["output_shape"] == [1, 10]
    finally:  # what this test created in the home folder, by its unique name
        shutil.rmtree(home / name, ignore_errors=True)
        shutil.rmtree(home / "~" / name, ignore_errors=True)
    err = one_error_line(cli(cli_argv(sshd, tmp_path / "run", "~pi/model")), 2)
    assert "only ~ or ~/..." in err


# 10 ------------------------------------------------------------------------------------------
def test_a_refused_deploy_leaves_nothing_behind_and_modes_follow_the_umask(sshd, tmp_path):  # noqa: F811
    to = tmp_path / "board" / "model"
    a = deploy(pick_release(make_run(tmp_path / "runA"), DEVICE), board(sshd), str(to), check=False)["release"]
    umask = os.umask(0)
    os.umask(umask)  # the sshd (and so the board's shell) inherits this process's umask
    rel = to / "releases" / a
    assert rel.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in rel.iterdir()} == {0o644 & ~umask}
    (to / "current").unlink()
    (to / "current").mkdir()  # the user made current a real folder
    (to / "current" / "theirs.txt").write_text("x")
    index = (to / INDEX).read_text()
    err = one_error_line(cli(cli_argv(sshd, make_run(tmp_path / "runB", seed=1), str(to))), 2)
    assert "real folder" in err and "current" in err
    assert sorted(p.name for p in to.iterdir()) == sorted(["releases", "current", INDEX])  # no .current.new
    assert [p.name for p in (to / "releases").iterdir()] == [a]  # no orphan release
    assert (to / INDEX).read_text() == index and (to / "current" / "theirs.txt").read_text() == "x"


# 12 (deploy) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["{not json", "[1, 2]", json.dumps({"targets": [
    {"device": DEVICE, "constraints": [], "measured": True}]})])
def test_a_corrupt_report_is_one_line(tmp_path, text):
    run = make_run(tmp_path / "run")
    (run / "report.json").write_text(text)
    p = cli([sys.executable, "-m", "sglp_edge.cli", "deploy", str(run), "--device", DEVICE, "--host", "pi@192.0.2.1",
             "--to", "/opt/model"])
    err = one_error_line(p, 2)
    assert "report.json" in err and "re-run `sglp-edge run`" in err


# 16 (deploy) ---------------------------------------------------------------------------------
def test_the_host_key_hint_names_a_flag_deploy_has(sshd, tmp_path):  # noqa: F811
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    run = make_run(tmp_path / "run")
    to = str(tmp_path / "board" / "model")
    err = one_error_line(cli(cli_argv(sshd, run, to, "--no-check", known_hosts=kh)), 2)
    assert "host key verification failed" in err and "--accept-new-host-key" in err
    assert not Path(to).exists()
    p = cli(cli_argv(sshd, run, to, "--no-check", "--accept-new-host-key", known_hosts=kh))
    assert p.returncode == 0, p.stderr
    assert "127.0.0.1" in kh.read_text() and (Path(to) / "current" / "model.onnx").is_file()
