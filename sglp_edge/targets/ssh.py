"""A board over SSH: push a bundle (harness + artifact + eval data), run it, pull the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from sglp_edge.targets.base import BenchJob, Target
from sglp_edge.targets.bundle import make_bundle
from sglp_edge.targets.remote import RemoteJob, run_remote
from sglp_edge.targets.ssh_transport import SSHTarget


class SSHBoardTarget(Target):
    kind = "ssh"

    def __init__(self, ssh_target: Any, timeout_s: float = 1800.0, keep_remote: bool = False, label: str = "") -> None:
        super().__init__(label or ssh_target.label or ssh_target.host)
        self.ssh, self.timeout_s, self.keep_remote = ssh_target, timeout_s, keep_remote

    @classmethod
    def from_profile(cls, profile: Any, host: str, *, label: str = "", port: Optional[int] = None,
                     identity: Optional[str] = None, known_hosts: Optional[str] = None, accept_new: bool = False,
                     ssh_config: Optional[str] = None, remote_python: Optional[str] = None,
                     remote_dir: Optional[str] = None, timeout: Optional[float] = None,
                     keep_remote: bool = False) -> "SSHBoardTarget":
        sd = profile.ssh
        t = SSHTarget(
            host=host, port=port if port is not None else (sd.port if sd else 22),
            identity=str(identity) if identity else (sd.identity if sd else None),
            known_hosts=str(known_hosts) if known_hosts else (sd.known_hosts if sd else None),
            strict_host_key_checking="accept-new" if accept_new else "yes",
            connect_timeout_s=sd.connect_timeout_s if sd else 10,
            ssh_config=str(ssh_config) if ssh_config else None,
            python=remote_python or (sd.python if sd else "python3"),
            remote_dir=remote_dir or (sd.remote_dir if sd else "/tmp"),
            env=dict(sd.env) if sd else {}, label=label or None,
        ).validate()
        return cls(t, timeout_s=timeout or (sd.timeout_s if sd else 1800.0), keep_remote=keep_remote, label=label)

    @property
    def where(self) -> str:
        return self.ssh.where

    def bench(self, job: BenchJob) -> Any:
        bundle_path = job.bundle_path or (Path(job.out_dir).parent / f".bundle-{Path(job.out_dir).name}.tar.gz")
        if job.bundle is not None:
            bundle = job.bundle
        else:
            Path(bundle_path).parent.mkdir(parents=True, exist_ok=True)
            bundle = make_bundle(job.artifact, job.data, bundle_path)
        try:
            args = job.profile.run_bench_args(artifact=bundle.artifact, out="results/result.json", data=bundle.data,
                                              overrides=job.overrides)
            run = run_remote(RemoteJob(target=self.ssh, bundle=bundle, run_args=args, out_dir=Path(job.out_dir),
                                       timeout_s=job.timeout_s or self.timeout_s, keep_remote=self.keep_remote,
                                       label=job.label or self.label), job.on_progress)
        finally:
            if job.bundle_path is None and job.bundle is None:
                bundle.path.unlink(missing_ok=True)
        machine = ((run.result or run.partial or {}).get("env") or {}).get("machine")
        return self._stamp(run, {"python": self.ssh.python, **({"machine": machine} if machine else {})})
