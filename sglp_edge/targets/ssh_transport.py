"""The SSH transport shared by remote benchmarking (:mod:`sglp_edge.targets.remote`) and deployment
(:mod:`sglp_edge.targets.deploy`): one board's connection settings (:class:`SSHTarget`) and the OpenSSH
argument list they make, the ``sh -c`` wrapper for remote scripts, and the one-line diagnosis of a
failed ``ssh`` (exit 255).

Only OpenSSH's own ``ssh`` is used, as an argument list (never ``shell=True``), with the
destination after ``--``; ``BatchMode=yes``, ``StrictHostKeyChecking=yes`` unless ``accept-new``
is asked for, ``ConnectTimeout`` and ``ServerAliveInterval``/``CountMax`` always set. See
:mod:`sglp_edge.targets.remote` for why.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from benchmarks.board.errors import UserError

from sglp_edge.profiles.load import python_argv


@dataclass
class SSHTarget:
    host: str  # [user@]host
    port: int = 22
    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    strict_host_key_checking: str = "yes"  # "yes" or "accept-new"
    connect_timeout_s: int = 10
    server_alive_interval_s: int = 5
    server_alive_count_max: int = 3
    ssh_config: Optional[str] = None  # -F FILE (e.g. /dev/null to ignore ~/.ssh/config)
    python: str = "python3"  # remote interpreter; a command line is allowed
    remote_dir: str = "/tmp"
    env: dict[str, str] = field(default_factory=dict)
    label: Optional[str] = None
    ssh_binary: str = "ssh"

    def validate(self) -> "SSHTarget":
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise UserError(f"bad host {self.host!r}: use user@board (no spaces, not starting with '-')")
        if not (1 <= int(self.port) <= 65535):
            raise UserError(f"bad SSH port {self.port}: use 1-65535")
        if shutil.which(self.ssh_binary) is None:
            raise UserError(f"the OpenSSH client ({self.ssh_binary}) is not installed here: apt install openssh-client")
        if self.strict_host_key_checking not in ("yes", "accept-new"):
            raise UserError("host key checking must be 'yes' (default) or 'accept-new'")
        if self.identity and not Path(self.identity).expanduser().is_file():
            raise UserError(f"SSH identity file not found: {self.identity}")
        if self.known_hosts and not Path(self.known_hosts).expanduser().parent.is_dir():
            raise UserError(f"known_hosts folder does not exist: {Path(self.known_hosts).parent}")
        for k in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise UserError(f"bad environment variable name {k!r}")
        python_argv(self.python)
        return self

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def ssh_argv(self, remote_command: str) -> list[str]:
        def opt_path(p: str) -> str:
            p = str(Path(p).expanduser())
            return f'"{p}"' if any(c.isspace() for c in p) else p

        argv = [self.ssh_binary]
        if self.ssh_config:
            argv += ["-F", str(Path(self.ssh_config).expanduser())]
        argv += [
            "-T",
            "-p", str(int(self.port)),
            "-o", "BatchMode=yes",
            "-o", f"StrictHostKeyChecking={self.strict_host_key_checking}",
            "-o", f"ConnectTimeout={int(self.connect_timeout_s)}",
            "-o", f"ServerAliveInterval={int(self.server_alive_interval_s)}",
            "-o", f"ServerAliveCountMax={int(self.server_alive_count_max)}",
            "-o", "RequestTTY=no",
        ]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={opt_path(self.known_hosts)}"]
        if self.identity:
            argv += ["-i", str(Path(self.identity).expanduser()), "-o", "IdentitiesOnly=yes"]
        argv += ["--", self.host, remote_command]
        return argv


def sh_c(script: str) -> str:
    """Wrap a POSIX sh script so that any login shell runs it unchanged."""
    return "sh -c " + shlex.quote(script)


def classify_ssh_error(target: SSHTarget, stderr: str, during_run: bool = False) -> str:
    s = stderr or ""
    kh = target.known_hosts or "~/.ssh/known_hosts"
    if during_run:  # stderr also holds the benchmark's own output: only trust ssh's client messages
        ssh_lines = [l.strip() for l in s.splitlines()
                     if l.startswith(("ssh:", "Connection to", "client_loop", "Timeout, server", "Broken pipe"))]
        why = f" ({ssh_lines[-1]})" if ssh_lines else ""
        return (f"lost the SSH connection to {target.where} during the run{why}; the board rebooted, lost its "
                f"network or sshd stopped")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in s:
        return (f"host key verification failed for {target.where}: the board's host key has CHANGED since it was "
                f"recorded in {kh}; if the board was reflashed, check its fingerprint and remove the old line with "
                f"ssh-keygen -R '[{target.host.split('@')[-1]}]:{target.port}' -f {kh}")
    if "Host key verification failed" in s or "No ED25519 host key is known" in s or "host key is not known" in s.lower():
        return (f"host key verification failed for {target.where}: its key is not in {kh} (checking is on). "
                f"Check the board's fingerprint, then add it: ssh-keyscan -p {target.port} "
                f"{target.host.split('@')[-1]} >> {kh} (or pass --accept-new-host-key once)")
    for needle in ("Connection refused", "Connection timed out", "timed out", "No route to host",
                   "Could not resolve hostname", "Network is unreachable", "Name or service not known",
                   "Connection reset", "Connection closed by"):
        if needle.lower() in s.lower():
            last = [l for l in s.strip().splitlines() if l.strip()]
            why = last[-1].strip() if last else needle
            return (f"board {target.where} is unreachable ({why}); check that it is powered and on the network, "
                    f"that sshd runs on port {target.port}, and the host name")
    if "Permission denied" in s:
        return (f"SSH login to {target.where} was refused (Permission denied); check the user name and "
                f"--identity (BatchMode is on: no password prompts)")
    last = [l for l in s.strip().splitlines() if l.strip()]
    return f"ssh to {target.where} failed: {last[-1].strip() if last else 'exit 255 with no message'}"

