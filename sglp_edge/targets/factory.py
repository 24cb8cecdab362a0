"""Which target benchmarks one board: :func:`make_target` picks local, SSH or the emulated ARM board
from a profile and the command line (the kinds themselves are in :mod:`sglp_edge.targets.local`,
:mod:`~sglp_edge.targets.ssh` and :mod:`~sglp_edge.targets.emulated`; their interface is
:mod:`sglp_edge.targets.base`)."""

from __future__ import annotations

from typing import Any, Optional

from benchmarks.board.errors import UserError

from sglp_edge.targets.base import EMULATORS, Target
from sglp_edge.targets.emulated import EmulatedArmTarget
from sglp_edge.targets.local import LocalTarget
from sglp_edge.targets.ssh import SSHBoardTarget


def make_target(profile: Any, *, host: Optional[str] = None, emulate: Optional[str] = None, label: str = "",
                ssh: Optional[dict[str, Any]] = None) -> Target:
    """The target for one board: ``emulate`` (``qemu-aarch64``, or True) -> the emulated ARM board
    (also when the profile says ``emulate: qemu-aarch64`` and no host is given); a host -> that
    board over SSH (its remote python may itself be the emulator); otherwise this machine."""
    if emulate is True:
        emulate = "qemu-aarch64"
    if emulate is None and not host:
        emulate = getattr(profile, "emulate", None)
    if emulate and host:
        raise UserError("--emulate and --host contradict each other: the emulated board runs here "
                        "(to put it behind SSH, make the board's python the emulator wrapper)")
    if emulate:
        if emulate not in EMULATORS:
            raise UserError(f"unknown emulator {emulate!r}: use {', '.join(EMULATORS)}")
        return EmulatedArmTarget(label=label or profile.name, profile=profile)
    if host:
        return SSHBoardTarget.from_profile(profile, host, label=label, **(ssh or {}))
    return LocalTarget(label=label or profile.name)
