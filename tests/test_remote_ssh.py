"""Remote boards over SSH, against a REAL OpenSSH sshd started here on 127.0.0.1.

The "board" is this machine: the bundle is pushed over ssh, unpacked in a fresh folder and run with
this venv's python (``sys.executable``), exactly as on a Jetson or a Pi. Only loopback is used.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from onnx_models import make_cnn
from sglp_edge.profiles.schema import DeviceProfile
from sglp_edge.targets.bundle import make_bundle
from sglp_edge.targets.remote import RemoteJob, run_remote, run_remote_many
from sglp_edge.targets.ssh_transport import SSHTarget

SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(not Path(SSHD).exists() or shutil.which("ssh") is None,
                                reason="needs Debian openssh-server (/usr/sbin/sshd) and ssh: apt-get install openssh-server")

FAST = {"warmup_s": 0.05, "min_iters": 5, "min_duration_s": 0.2, "batch_sizes": [1]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    host_key = keygen(d / "host_key")
    client_key = keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\nUseDNS no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nX11Forwarding no\nAllowTcpForwarding no\nPrintMotd no\n"
        "MaxStartups 100\nMaxSessions 100\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation dir sshd insists on
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.05)
    pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    yield {"dir": d, "port": port, "key": client_key, "known_hosts": d / "known_hosts",
           "host": f"{getpass.getuser()}@127.0.0.1"}
    proc.terminate()  # the sshd this fixture started, by its handle
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def make_eval(model: Path, path: Path) -> Path:
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((24, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    np.savez(path, x=x, y=ref.argmax(1), ref_logits=ref, baseline_top1=np.array(100.0))
    return path


PROFILE = DeviceProfile.model_validate({
    "name": "loopback", "arch": "x86_64", "backend": "onnxruntime", "threads": 1,
    "inputs": [{"shape": [1, 3, 32, 32]}], "bench": {**FAST, "eval_batch": 8},
    "constraints": ["latency_p90_ms <= 1000", "accuracy_drop_pct <= 1.5", "energy_mj <= 1"],
})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    model = make_cnn(d / "tiny.onnx")
    data = make_eval(model, d / "eval.npz")
    bundle = make_bundle(model, data, d / "bundle.tar.gz")
    return {"model": model, "data": data, "bundle": bundle, "dir": d}


def target(sshd, **kw) -> SSHTarget:
    base = dict(host=sshd["host"], port=sshd["port"], identity=str(sshd["key"]),
                known_hosts=str(sshd["known_hosts"]), ssh_config="/dev/null", python=sys.executable,
                connect_timeout_s=5)
    base.update(kw)
    return SSHTarget(**base)


def job(sshd, artifacts, out: Path, bundle=None, timeout_s: float = 120, keep_remote: bool = False,
        **kw) -> RemoteJob:
    b = bundle or artifacts["bundle"]
    args = PROFILE.run_bench_args(artifact=b.artifact, out="results/result.json", data=b.data)
    return RemoteJob(target=target(sshd, **kw), bundle=b, run_args=args, out_dir=out, timeout_s=timeout_s,
                     keep_remote=keep_remote)


# ---------------------------------------------------------------------------------------------


def test_success_round_trip(sshd, artifacts, tmp_path):
    board_dir = tmp_path / "board"
    events: list[dict] = []
    run = run_remote(job(sshd, artifacts, tmp_path / "out", remote_dir=str(board_dir)),
                     on_progress=lambda label, ev: events.append(ev))
    assert run.ok, (run.error, (tmp_path / "out" / "stderr.log").read_text())
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["status"] == "complete" and doc["backend"] == "onnxruntime"
    assert doc["artifact"]["name"] == "tiny.onnx"
    assert doc["artifact"]["sha256"] == __import__("benchmarks.board.atomic", fromlist=["x"]).sha256_file(artifacts["model"])
    m = doc["metrics"]
    assert m["latency_p90_ms"] > 0 and m["top1_pct"] == 100.0 and m["accuracy_drop_pct"] == 0.0
    assert doc["runtime"]["threads_used"] == 1
    assert not (tmp_path / "out" / "result.partial.json").exists()
    assert "@@sglp-progress" in (tmp_path / "out" / "stdout.log").read_text()
    meta = json.loads((tmp_path / "out" / "remote.json").read_text())
    assert meta["ok"] and meta["where"] == f"{sshd['host']}:{sshd['port']}"
    assert [s["step"] for s in meta["steps"]] == ["upload", "run", "pull", "cleanup"]
    assert list(board_dir.iterdir()) == []  # remote folder removed
    stages = {e["stage"] for e in events}
    assert {"upload", "load", "latency", "accuracy", "done"} <= stages


def test_unreachable_board_is_a_clear_error_within_the_timeout(sshd, artifacts, tmp_path):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    run = run_remote(job(sshd, artifacts, tmp_path / "out", port=port))
    assert time.monotonic() - t0 < 15
    assert not run.ok and "unreachable" in run.error and "Connection refused" in run.error
    assert f"127.0.0.1:{port}" in run.error
    meta = json.loads((tmp_path / "out" / "remote.json").read_text())
    assert meta["error"] == run.error and not (tmp_path / "out" / "result.json").exists()


def test_wrong_host_key_is_refused(sshd, artifacts, tmp_path):
    other = keygen(tmp_path / "impostor")
    pub = (tmp_path / "impostor.pub").read_text().split()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd['port']} {pub[0]} {pub[1]}\n")
    board_dir = tmp_path / "board"
    run = run_remote(job(sshd, artifacts, tmp_path / "out", known_hosts=str(kh), remote_dir=str(board_dir)))
    assert not run.ok and "host key verification failed" in run.error and "CHANGED" in run.error
    assert not board_dir.exists()  # nothing ran on the board
    # an empty known_hosts: checking is on by default, so an unknown key is refused too
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    run = run_remote(job(sshd, artifacts, tmp_path / "out2", known_hosts=str(empty), remote_dir=str(board_dir)))
    assert not run.ok and "host key verification failed" in run.error and "ssh-keyscan" in run.error
    assert empty.read_text() == ""  # and nothing was added behind the user's back
    assert not board_dir.exists()
    assert other.exists()


def test_file_names_with_spaces_and_shell_metacharacters(sshd, artifacts, tmp_path):
    weird = tmp_path / "dir with spaces"
    name = "my model; touch PWNED1 && $(touch PWNED2) `touch PWNED3` 'q' \"d\" | & < > *.onnx"
    model = make_cnn(weird / name)
    data = make_eval(model, weird / "eval data $HOME & ; (x).npz")
    bundle = make_bundle(model, data, tmp_path / "b $(touch PWNED4).tar.gz")
    board_dir = tmp_path / "board dir $(touch PWNED5); x"
    run = run_remote(job(sshd, artifacts, tmp_path / "out", bundle=bundle, remote_dir=str(board_dir),
                         keep_remote=True))
    assert run.ok, (run.error, (tmp_path / "out" / "stderr.log").read_text())
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["artifact"]["name"] == name and doc["accuracy"]["data"] == data.name
    assert doc["metrics"]["top1_pct"] == 100.0
    # the names arrived intact on the board, and no shell ever interpreted them
    kept = list(board_dir.glob("sglp-edge.*/bundle"))
    assert len(kept) == 1 and (kept[0] / "artifact" / name).is_file()
    everywhere = [p.name for p in tmp_path.rglob("PWNED*")] + [p.name for p in Path.cwd().glob("PWNED*")]
    assert everywhere == []


def _wait_for_partial(board_dir: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in board_dir.glob("sglp-edge.*/bundle/results/result.partial.json"):
            try:
                doc = json.loads(p.read_text())
            except ValueError:
                continue
            if doc.get("stage", "").startswith("latency"):
                return doc
        time.sleep(0.1)
    raise AssertionError("the board never reported its latency stage")


def test_board_dies_mid_run_partial_results_and_logs_are_kept(sshd, artifacts, tmp_path):
    board_dir = tmp_path / "board"
    j = job(sshd, artifacts, tmp_path / "out", remote_dir=str(board_dir),
            env={"SGLP_EDGE_BENCH_TEST_HANG_S": "60"})
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("run", run_remote(j)))
    th.start()
    partial = _wait_for_partial(board_dir)
    log = tmp_path / "out" / "stderr.log"
    deadline = time.monotonic() + 30
    # the board's stderr reaches the local log while the run is still going
    while not (log.exists() and "test hook" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(partial["pid"], signal.SIGKILL)  # the benchmark process this test started on the "board"
    th.join(timeout=60)
    run = box["run"]
    assert not run.ok and "killed" in run.error and run.exit_code in (137, -9)
    out = tmp_path / "out"
    assert not (out / "result.json").exists()
    kept = json.loads((out / "result.partial.json").read_text())
    assert kept["status"] == "running" and kept["metrics"]["latency_p50_ms"] > 0  # finished stage survived
    assert kept["accuracy"] is None
    assert "test hook" in (out / "stderr.log").read_text()
    assert '"stage": "latency"' in (out / "stdout.log").read_text()
    assert list(board_dir.iterdir()) == []  # cleaned up after pulling


def test_overall_timeout_stops_the_run_and_keeps_partials(sshd, artifacts, tmp_path):
    j = job(sshd, artifacts, tmp_path / "out", timeout_s=5, env={"SGLP_EDGE_BENCH_TEST_HANG_S": "120"})
    t0 = time.monotonic()
    run = run_remote(j)
    assert time.monotonic() - t0 < 40
    assert not run.ok and "timeout" in run.error
    kept = json.loads((tmp_path / "out" / "result.partial.json").read_text())
    assert kept["metrics"]["latency_p50_ms"] > 0 and kept["status"] in ("running", "interrupted")


def test_several_boards_run_concurrently(sshd, artifacts, tmp_path):
    spans: dict[str, list[float]] = {}
    lock = threading.Lock()

    def on_progress(label: str, ev: dict) -> None:
        with lock:
            spans.setdefault(label, []).append(time.monotonic())

    jobs = []
    for lab in ("board-a", "board-b"):
        j = job(sshd, artifacts, tmp_path / lab)
        j.label = lab
        jobs.append(j)
    runs = run_remote_many(jobs, on_progress=on_progress)
    assert [r.ok for r in runs] == [True, True], [r.error for r in runs]
    assert [r.label for r in runs] == ["board-a", "board-b"]
    a, b = spans["board-a"], spans["board-b"]
    assert min(b) < max(a) and min(a) < max(b)  # their activity overlapped in time
    for lab in ("board-a", "board-b"):
        assert json.loads((tmp_path / lab / "result.json").read_text())["status"] == "complete"


def test_cli_bench_on_two_remote_boards(sshd, artifacts, tmp_path):
    from typer.testing import CliRunner

    from sglp_edge.cli import app

    prof = tmp_path / "loopback.yaml"
    prof.write_text(
        "# One profile = one backend\narch: x86_64\nbackend: onnxruntime\nthreads: 1\n"
        "inputs: [{shape: [1, 3, 32, 32]}]\n"
        "bench: {warmup_s: 0.05, min_iters: 5, min_duration_s: 0.2, batch_sizes: [1], eval_batch: 8}\n"
        "constraints: ['latency_p90_ms <= 1000', 'accuracy_drop_pct <= 1.5', 'energy_mj <= 1']\n")
    common = ["bench", str(artifacts["model"]), "--device", str(prof), "--data", str(artifacts["data"]),
              "--port", str(sshd["port"]), "--identity", str(sshd["key"]), "--ssh-config", "/dev/null",
              "--remote-python", sys.executable]
    res = CliRunner().invoke(app, common + ["--host", sshd["host"], "--host", sshd["host"],
                                            "--known-hosts", str(sshd["known_hosts"]), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [b["label"] for b in summary["boards"]] == ["loopback@127.0.0.1", "loopback@127.0.0.1-2"]
    for b in summary["boards"]:
        assert b["ok"] and b["all_passed"]
        assert b["target"]["kind"] == "ssh" and b["target"]["where"] == f"{sshd['host']}:{sshd['port']}"
        verdicts = {c["metric"]: c["passed"] for c in b["constraints"]}
        assert verdicts == {"latency_p90_ms": True, "accuracy_drop_pct": True, "energy_mj": None}
    assert "not measured: energy_mj" in res.output
    assert "are the same board" in " ".join(res.output.split())  # both --host name one machine

    # a board with the wrong host key: exit 1, the error printed, summary says so
    bad = tmp_path / "kh"
    keygen(tmp_path / "k2")
    pub = (tmp_path / "k2.pub").read_text().split()
    bad.write_text(f"[127.0.0.1]:{sshd['port']} {pub[0]} {pub[1]}\n")
    res = CliRunner().invoke(app, common + ["--host", sshd["host"], "--known-hosts", str(bad),
                                            "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1
    assert "host key verification failed" in " ".join(res.output.split())
    s2 = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert s2["boards"][0]["ok"] is False


# ---------------------------------------------------------------------------------------------
# The emulated ARM board behind the real sshd: the board's "python" is the wrapper that runs the
# aarch64 Python (ARM ONNX Runtime) under qemu-aarch64, so the SSH path runs an ARM runtime end to end.
def test_emulated_arm_board_behind_sshd(sshd, artifacts, tmp_path):
    from sglp_edge.targets import arm64_env
    from sglp_edge.targets.base import BenchJob
    from sglp_edge.targets.factory import make_target

    if not arm64_env.ready(("onnxruntime",)):
        pytest.skip("emulated ARM board not set up here: run `python benchmarks/experiments/arm_emulated.py` once")
    arm = PROFILE.model_copy(update={"name": "pi-emulated", "arch": "aarch64"})
    board_python = str(arm64_env.cache_root() / "bin" / "python3")
    tg = make_target(arm, host=sshd["host"], label="pi-emulated",
                     ssh={"port": sshd["port"], "identity": str(sshd["key"]), "known_hosts": str(sshd["known_hosts"]),
                          "ssh_config": "/dev/null", "remote_python": board_python,
                          "remote_dir": str(tmp_path / "board"), "timeout": 600})
    assert tg.kind == "ssh"
    run = tg.bench(BenchJob(artifact=artifacts["model"], data=artifacts["data"], profile=arm, out_dir=tmp_path / "out"))
    assert run.ok, (run.error, (tmp_path / "out" / "stderr.log").read_text()[-2000:])
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["env"]["machine"] == "aarch64"  # the board that answered over SSH is the ARM build
    assert doc["target"]["kind"] == "ssh" and doc["target"]["machine"] == "aarch64"
    assert doc["target"]["where"] == f"{sshd['host']}:{sshd['port']}"
    assert doc["metrics"]["top1_pct"] == 100.0 and doc["accuracy"]["agreement"]["max_abs_diff"] < 1e-4


def test_genai_folder_artifact_goes_up_whole_and_runs(sshd, tmp_path):
    """A folder artifact (onnxruntime-genai: model.onnx + genai_config.json + tokenizer) travels whole
    in the bundle, under its own (hostile) name, and the board harness runs it with the genai profile."""
    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'sglp-edge[llm]')")
    pytest.importorskip("onnx_ir", reason="onnxruntime-genai's builder needs onnx-ir")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import benchmarks.board.lm_bench as lm_bench
    from sglp_edge.export.lm_genai import export_causal_lm_genai
    from sglp_edge.profiles.load import load_profile
    from test_lm_genai import TINY, VOCAB, _save, _torch_greedy

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    folder = tmp_path / "gen ai; $(touch PWNED6)"
    export_causal_lm_genai(_save(model, tmp_path / "hf"), folder, precision="fp32", n_new=4)
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, VOCAB, (2, 6))
    data = lm_bench.write_eval_npz(str(tmp_path / "lm_eval.npz"), bench_prompt=rng.integers(0, VOCAB, 8),
                                   gen_tokens=4, greedy_prompts=prompts,
                                   greedy_reference=np.stack([_torch_greedy(model, p, 4) for p in prompts]),
                                   ppl_blocks=rng.integers(0, VOCAB, (1, 12)), torch_perplexity=1.0)
    bundle = make_bundle(folder, data, tmp_path / "b.tar.gz")
    assert bundle.artifact == f"artifact/{folder.name}"
    with tarfile.open(bundle.path) as tar:
        names = set(tar.getnames())
    assert {f"artifact/{folder.name}/{f}" for f in ("model.onnx", "genai_config.json", "lm.json")} <= names
    prof = load_profile("local-cpu-genai-lm").model_copy(update={"threads": 1})
    args = prof.run_bench_args(artifact=bundle.artifact, out="results/result.json", data=bundle.data)
    run = run_remote(RemoteJob(target=target(sshd), bundle=bundle, run_args=args, out_dir=tmp_path / "out",
                               timeout_s=120))
    assert run.ok, (run.error, (tmp_path / "out" / "stderr.log").read_text()[-2000:])
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    assert doc["backend"] == "onnxruntime-genai" and doc["artifact"]["name"] == folder.name
    assert doc["metrics"]["greedy_agreement_pct"] == 100.0 and doc["metrics"]["model_size_mb"] > 0
    assert [p.name for p in tmp_path.rglob("PWNED*")] == []
