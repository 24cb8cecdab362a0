"""Two ``sglp-edge deploy`` into the same board folder at once, against the REAL local sshd "board"
(tests/test_remote_ssh.py's fixture): the scripts that change the folder hold
``DIR/.sglp-edge-deploy.lock`` while they run, so a second deploy meanwhile is refused in one line
(an environment fault: exit status 4) and changes nothing; the lock goes when the first one ends."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.board.errors import EXIT_ENVIRONMENT, EnvironmentFault, exit_code
from sglp_edge.targets.deploy import deploy, pick_release, rollback
from sglp_edge.targets.deploy_board import LOCK
from test_deploy import DEVICE, board, make_run
from test_remote_ssh import sshd  # noqa: F401  (the real sshd fixture)


def _state(to: Path) -> tuple:
    releases = sorted(p.name for p in (to / "releases").iterdir())
    return (to / "current").resolve(), (to / "current" / "model.onnx").read_bytes(), releases


def _refused(e: pytest.ExceptionInfo, to: Path) -> None:
    msg = str(e.value)
    assert msg.startswith("another deploy into ") and f":{to} is running; nothing was changed" in msg
    assert "\n" not in msg
    assert exit_code(e.value) == EXIT_ENVIRONMENT == 4


def test_a_held_lock_refuses_deploy_and_rollback_and_changes_nothing(sshd, tmp_path):  # noqa: F811
    to = tmp_path / "board" / "model"
    deploy(pick_release(make_run(tmp_path / "run1"), DEVICE), board(sshd), str(to), check=False)
    assert not (to / LOCK).exists()  # released when the scripts ended
    before = _state(to)
    (to / LOCK).mkdir()  # another deploy is in its stage or switch script
    with pytest.raises(EnvironmentFault) as e:
        deploy(pick_release(make_run(tmp_path / "run2", seed=1), DEVICE), board(sshd), str(to), check=False)
    _refused(e, to)
    assert _state(to) == before and not list(to.glob(".incoming.*"))
    assert (to / LOCK).is_dir()  # the refused deploy leaves the other one's lock alone
    (to / LOCK).rmdir()
    r2 = deploy(pick_release(make_run(tmp_path / "run2", seed=1), DEVICE), board(sshd), str(to), check=False)
    assert (to / "current").resolve().name == r2["release"] and not (to / LOCK).exists()
    (to / LOCK).mkdir()
    with pytest.raises(EnvironmentFault) as e:
        rollback(board(sshd), str(to), check=False)  # the switch back is refused too
    _refused(e, to)
    assert (to / "current").resolve().name == r2["release"]
    (to / LOCK).rmdir()
    rollback(board(sshd), str(to), check=False)
    assert (to / "current").resolve() == before[0] and not (to / LOCK).exists()


def test_concurrent_deploys_into_one_folder(sshd, tmp_path):  # noqa: F811
    to = tmp_path / "board" / "model"
    slow = tmp_path / "slow-python"  # the first deploy's runner takes a while, holding the lock
    slow.write_text(f"#!/bin/sh\nsleep 6\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    first: dict = {}

    def deploy_first() -> None:
        try:
            first["result"] = deploy(pick_release(make_run(tmp_path / "run1"), DEVICE), board(sshd, python=str(slow)),
                                     str(to), check=True)
        except Exception as e:  # reported by the assertion below
            first["error"] = e

    t = threading.Thread(target=deploy_first)
    t.start()
    deadline = time.monotonic() + 120
    while not (to / LOCK).is_dir() and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (to / LOCK).is_dir(), first
    with pytest.raises(EnvironmentFault) as e:
        deploy(pick_release(make_run(tmp_path / "run2", seed=1), DEVICE), board(sshd), str(to), check=False)
    _refused(e, to)
    t.join(300)
    assert "error" not in first, first.get("error")
    assert (to / "current").resolve().name == first["result"]["release"]
    assert [p.name for p in (to / "releases").iterdir()] == [first["result"]["release"]]
    assert not (to / LOCK).exists() and not list(to.glob(".incoming.*"))
