"""``sglp-edge bench``: benchmark a compiled artifact on a device profile, here or on boards over SSH,
and report constraint by constraint whether the target is met.

    sglp-edge bench model.xml --device local-cpu-openvino --data eval.npz --out runs/bench
    sglp-edge bench model.onnx --device raspberry-pi-5 --host pi@pi5 --host pi@pi5b \\
        --known-hosts ~/.ssh/known_hosts --data eval.npz --out runs/pi

Exit status: 0 when every board ran and every measured constraint passed; 1 when a constraint
failed or the harness failed on a board (its partial results and logs are kept); 2 for a usage
error; 4 when a board stopped answering, timed out or the disk filled (the environment, not the model).
A constraint whose metric was not measured is shown as "not measured" (and fails with --strict).
"""

from __future__ import annotations

import platform
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.board.atomic import atomic_write_json, mark_output
from benchmarks.board.errors import EXIT_ENVIRONMENT, UserError

from sglp_edge.commands._common import check_bench_data, guard_out_dir, hold_out, user_errors
from sglp_edge.profiles.load import list_profiles, load_profile
from sglp_edge.targets.base import BenchJob, held_constraints
from sglp_edge.validate import check_file, check_host, check_threads

_OWN = {"results": ("summary.json",), "command": "bench"}  # what makes an --out folder bench's own
_STAGE_SPAN = {"upload": (0, 5), "load": (5, 10), "latency": (10, 60), "accuracy": (60, 99), "done": (100, 100)}


def _label(profile: str, host: Optional[str]) -> str:
    s = profile if host is None else f"{profile}@{host.split('@')[-1]}"
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", s)


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @user_errors
    def bench(
        artifact: Optional[Path] = typer.Argument(None, help="compiled artifact: OpenVINO .xml, ONNX .onnx, TensorRT .engine, llama.cpp .gguf"),
        device: list[str] = typer.Option([], "--device", "-d", help="device profile name or YAML path (repeatable)"),
        data: Optional[Path] = typer.Option(None, "--data", help="evaluation .npz (inputs, labels, PyTorch reference outputs)"),
        out: Path = typer.Option(Path("runs/bench"), "--out", help="output folder"),
        host: list[str] = typer.Option([], "--host", help="user@board to run on over SSH (repeatable: boards run concurrently)"),
        port: Optional[int] = typer.Option(None, "--port", help="SSH port (default: profile's, else 22)"),
        identity: Optional[Path] = typer.Option(None, "--identity", "-i", help="SSH private key"),
        known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="known_hosts file to verify boards against"),
        accept_new_host_key: bool = typer.Option(False, "--accept-new-host-key",
                                                 help="trust a board's key on first contact (StrictHostKeyChecking=accept-new)"),
        ssh_config: Optional[Path] = typer.Option(None, "--ssh-config", help="ssh -F config file"),
        remote_python: Optional[str] = typer.Option(None, "--remote-python", help="python on the board (default: profile's, else python3)"),
        remote_dir: Optional[str] = typer.Option(None, "--remote-dir", help="parent folder for the run on the board (default /tmp)"),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds per board for the whole run (default: profile's, else 1800)"),
        local: bool = typer.Option(False, "--local", help="run here even if the profile names an ssh host"),
        emulate: bool = typer.Option(False, "--emulate", help="run on the emulated ARM board (aarch64 runtime under "
                                     "qemu-aarch64, set up once in ~/.cache/sglp-edge/arm64): accuracy and parity on "
                                     "the ARM build; its latency is recorded as emulated and never held"),
        keep_remote: bool = typer.Option(False, "--keep-remote", help="leave the run folder on the board"),
        threads: Optional[int] = typer.Option(None, "--threads", help="override the profile's thread count"),
        batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="override, e.g. 1,8 (first = primary)"),
        warmup_s: Optional[float] = typer.Option(None, "--warmup-s", help="override warm-up seconds"),
        min_iters: Optional[int] = typer.Option(None, "--min-iters", help="override minimum iterations"),
        min_duration_s: Optional[float] = typer.Option(None, "--min-duration-s", help="override minimum measuring seconds"),
        max_eval: Optional[int] = typer.Option(None, "--max-eval", help="evaluate on the first N samples only"),
        strict: bool = typer.Option(False, "--strict", help="a constraint that was not measured counts as failed"),
        list_devices: bool = typer.Option(False, "--list-devices", help="list the known device profiles and exit"),
    ) -> None:
        """Benchmark ARTIFACT on one or more device profiles (locally or on boards over SSH) and
        report, constraint by constraint, whether each target is met.

        Exit status: 0 every board ran and met every measured constraint; 1 a constraint failed
        or the harness failed on a board (partial results and logs are kept under --out); 2 usage
        error; 4 a board stopped answering or timed out, or the disk filled.
        """
        console = Console()
        if list_devices:
            _print_profiles(console, [load_profile(n) for n in list_profiles()])
            return
        if artifact is None:
            raise UserError("give the artifact to benchmark: sglp-edge bench MODEL --device PROFILE")
        _check_options(host, threads=threads, batch_sizes=batch_sizes, warmup_s=warmup_s, min_iters=min_iters,
                       min_duration_s=min_duration_s, max_eval=max_eval, timeout=timeout, port=port)
        _check_files(artifact, data, device, out)
        profiles = _load_profiles(artifact, device, host, local=local, emulate=emulate)
        boards, labels = _pair_boards(profiles, host, local=local, emulate=emulate)
        # heavy: numpy (targets.factory -> targets.bundle -> benchmarks.board.runners); `sglp-edge --help` stays fast
        from sglp_edge.targets.factory import make_target

        targets = [make_target(p, emulate="qemu-aarch64" if emulate else None, label=lab) if h is None else None
                   for (p, h), lab in zip(boards, labels)]
        _warn_placement(console, boards, labels, targets, port)
        overrides = {"threads": threads, "warmup_s": warmup_s, "min_iters": min_iters, "min_duration_s": min_duration_s,
                     "max_eval": max_eval,
                     "batch_sizes": [int(x) for x in batch_sizes.split(",")] if batch_sizes else None}
        hold_out(out, reuse=True, inputs=(artifact, data), **_OWN)  # every check passed: nothing was written before
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, command="bench")
        _prepare_emulated(console, targets, boards)
        runs = _run_all(console, artifact, data, out, boards, labels, overrides, targets,
                        dict(port=port, identity=identity, known_hosts=known_hosts, accept_new=accept_new_host_key,
                             ssh_config=ssh_config, remote_python=remote_python, remote_dir=remote_dir,
                             timeout=timeout, keep_remote=keep_remote))
        status = _report(console, out, boards, labels, runs, strict, targets)
        if status:
            raise typer.Exit(status)  # 1: a constraint failed (or the harness did); 4: a board or the disk did


def _check_files(artifact: Path, data: Optional[Path], device: list[str], out: Path) -> None:
    """The artifact, the eval data and the --out folder, before any profile is read."""
    if artifact.is_dir() and (artifact / "genai_config.json").is_file():
        raise UserError(f"sglp-edge bench does not yet take an onnxruntime-genai folder ({artifact}); run "
                        f"python -m benchmarks.board.lm_bench --artifact {artifact} --data EVAL.npz, or sglp-edge run "
                        "with an onnxruntime-genai profile")
    if not artifact.is_file() and not artifact.is_dir():
        raise UserError(f"artifact not found: {artifact}")
    check_file(artifact, "artifact")
    if data is not None and not data.is_file() and not data.is_dir():
        raise UserError(f"eval data not found: {data}")
    if data is not None:
        check_file(data, "eval data (--data)")
    if not device:
        raise UserError("give a device profile with --device (see sglp-edge bench --list-devices)")
    # bench updates its own folder in place (one sub-folder per board): no --force needed for that; a
    # folder is its own with the marker and summary.json, or a marker naming bench (a bench stopped early)
    guard_out_dir(out, reuse=True, inputs=(artifact, data), **_OWN)
    if data is not None:
        _check_data(artifact, data)


def _check_data(artifact: Path, data: Path) -> None:
    """LM eval data (``task`` causal-lm: lm_bench's keys), or image / token eval data against the artifact."""
    # heavy: numpy (benchmarks.board.lm_bench); `sglp-edge --help` stays fast
    import zipfile

    import numpy as np

    from benchmarks.board.lm_bench import TASK, load_eval_npz

    try:
        with np.load(data, allow_pickle=False) as z:
            lm = "task" in z.files and str(z["task"]) == TASK
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # reported by check_bench_data
        lm = False
    if lm:
        load_eval_npz(str(data))
        return
    check_bench_data(artifact, data)


def _load_profiles(artifact: Path, device: list[str], host: list[str], *, local: bool, emulate: bool) -> list:
    """The --device profiles, each checked against the artifact and against --host/--local/--emulate."""
    profiles = [load_profile(d) for d in device]
    for p in profiles:
        p.check_artifact(artifact)
    if host and len(profiles) not in (1, len(host)):
        raise UserError(f"{len(profiles)} --device for {len(host)} --host: give one device for all hosts, or one per host")
    if local and host:
        raise UserError("--local and --host contradict each other")
    if emulate and host:
        raise UserError("--emulate and --host contradict each other: the emulated board runs here")
    if emulate:
        for p in profiles:
            if p.arch != "aarch64":
                raise UserError(f"--emulate runs aarch64 boards; profile {p.name} is {p.arch}")
    return profiles


def _pair_boards(profiles: list, host: list[str], *, local: bool,
                 emulate: bool) -> tuple[list[tuple[Any, Optional[str]]], list[str]]:
    """(profile, host or None) per board, and a unique output label for each."""
    boards: list[tuple[Any, Optional[str]]] = []
    if host:
        for i, h in enumerate(host):
            boards.append((profiles[0] if len(profiles) == 1 else profiles[i], h))
    else:
        for p in profiles:
            h = p.ssh.host if (p.ssh and p.ssh.host and not local and not emulate) else None
            boards.append((p, h))
    labels: list[str] = []
    for p, h in boards:
        lab = _label(p.name, h)
        k = 2
        while lab in labels:
            lab = f"{_label(p.name, h)}-{k}"
            k += 1
        labels.append(lab)
    return boards, labels


def _warn_placement(console: Any, boards: list, labels: list[str], targets: list, port: Optional[int]) -> None:
    """Warn of a board profile run on another architecture here, and of two labels on one board."""
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    seen_hosts: dict[str, str] = {}
    for (p, h), lab, tg in zip(boards, labels, targets):
        if tg is not None and tg.emulated:
            continue
        if h is None and p.arch != here:
            console.print(f"[yellow]warning[/]: {lab} describes an {p.arch} board but runs here on {here}; "
                          "pass --host to run it on the board, or --emulate to check it on the ARM runtime",
                          soft_wrap=True)
        if h is not None:
            key = f"{h.split('@')[-1]}:{port if port is not None else (p.ssh.port if p.ssh else 22)}"
            if key in seen_hosts:
                console.print(f"[yellow]warning[/]: {seen_hosts[key]} and {lab} are the same board ({key}); "
                              "their runs overlap and disturb each other's timings", soft_wrap=True)
            seen_hosts.setdefault(key, lab)


def _prepare_emulated(console: Any, targets: list, boards: list) -> None:
    """Set up each emulated board's ARM runtime once (cached), before any progress bar starts."""
    for tg, (p, _) in zip(targets, boards):
        if tg is not None and tg.emulated:
            console.print(f"[bold]{tg.label}[/]: emulated ARM board (qemu-aarch64, CPU neoverse-n1); latency "
                          "is recorded as emulated, never held against a constraint", soft_wrap=True)
            tg.progress = lambda m: console.print(m, soft_wrap=True)
            tg.prepare(p.backend)


def _check_options(host: list[str], *, batch_sizes: Optional[str], threads: Optional[int], **numbers: Any) -> None:
    """The numbers and hosts on the command line, before any file is read or any board contacted."""
    for h in host:
        check_host("--host", h)
    check_threads("--threads", threads)
    if batch_sizes is not None and not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", batch_sizes):
        raise UserError(f"--batch-sizes must look like 1,8 (got {batch_sizes!r})")
    if batch_sizes is not None and any(int(b) < 1 for b in batch_sizes.split(",")):
        raise UserError(f"--batch-sizes: every batch size must be >= 1 (got {batch_sizes!r})")
    for name, v, least in (("--min-iters", numbers["min_iters"], 1), ("--max-eval", numbers["max_eval"], 1),
                           ("--warmup-s", numbers["warmup_s"], 0), ("--min-duration-s", numbers["min_duration_s"], 0)):
        if v is not None and v < least:
            hint = " (leave it out to evaluate every sample)" if name == "--max-eval" else ""
            raise UserError(f"{name} must be >= {least} (got {v}){hint}")
    if numbers["port"] is not None and not 1 <= numbers["port"] <= 65535:
        raise UserError(f"bad SSH port {numbers['port']}: --port must be between 1 and 65535")
    if numbers["timeout"] is not None and not numbers["timeout"] > 0:
        raise UserError(f"--timeout is seconds per board and must be > 0 (got {numbers['timeout']})")


def _run_all(console: Any, artifact: Path, data: Optional[Path], out: Path, boards: list, labels: list[str],
             overrides: dict[str, Any], targets: list, ssh_opts: dict[str, Any]) -> list:
    # heavy: numpy (targets.bundle -> benchmarks.board.runners); `sglp-edge --help` stays fast
    from sglp_edge.targets.bundle import make_bundle
    from sglp_edge.targets.ssh import SSHBoardTarget

    # every SSH board is a target too; all are validated before anything starts
    remote = [i for i, (_, h) in enumerate(boards) if h is not None]
    for i in remote:
        prof, h = boards[i]
        targets[i] = SSHBoardTarget.from_profile(
            prof, h, label=labels[i], port=ssh_opts["port"], identity=ssh_opts["identity"],
            known_hosts=ssh_opts["known_hosts"], accept_new=ssh_opts["accept_new"], ssh_config=ssh_opts["ssh_config"],
            remote_python=ssh_opts["remote_python"], remote_dir=ssh_opts["remote_dir"], timeout=ssh_opts["timeout"],
            keep_remote=ssh_opts["keep_remote"])
    bundle = make_bundle(artifact, data, out / ".bundle.tar.gz") if remote else None  # one upload bundle for all

    results: list = [None] * len(boards)
    lock = threading.Lock()
    with Progress(TextColumn("[bold]{task.fields[board]}"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        tasks = {lab: progress.add_task("waiting", total=100, board=lab) for lab in labels}

        def on_progress(label: str, ev: dict[str, Any]) -> None:
            stage = ev.get("stage", "")
            lo, hi = _STAGE_SPAN.get(stage, (0, 0))
            done, total = ev.get("done", 0), ev.get("total", 0) or 1
            pct = lo + (hi - lo) * min(1.0, done / total)
            desc = stage if stage != "latency" or "batch_size" not in ev else f"latency (batch {ev['batch_size']})"
            if stage == "accuracy":
                desc = f"accuracy {done}/{ev.get('total', 0)}"
            with lock:
                progress.update(tasks[label], completed=pct, description=desc)

        def local_lane() -> None:
            # local runs one after another: they would disturb each other's timings
            for i, ((prof, h), lab) in enumerate(zip(boards, labels)):
                if h is not None:
                    continue
                results[i] = targets[i].bench(BenchJob(artifact=artifact, data=data, profile=prof, out_dir=out / lab,
                                                       overrides=overrides, timeout_s=ssh_opts["timeout"], label=lab,
                                                       on_progress=on_progress))
                progress.update(tasks[lab], completed=100, description="done" if results[i].ok else "failed")

        def remote_one(i: int) -> None:
            results[i] = targets[i].bench(BenchJob(artifact=artifact, data=data, profile=boards[i][0], out_dir=out / labels[i],
                                                   overrides=overrides, label=labels[i], bundle=bundle,
                                                   on_progress=on_progress))
            lab = labels[i]
            progress.update(tasks[lab], completed=100, description="done" if results[i].ok else "failed")

        with ThreadPoolExecutor(max_workers=len(remote) + 1, thread_name_prefix="bench") as pool:
            futs = [pool.submit(remote_one, i) for i in remote]
            futs.append(pool.submit(local_lane))
            for f in futs:
                f.result()
    if bundle is not None:
        try:
            bundle.path.unlink()
        except FileNotFoundError:
            pass
    return results


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _report(console: Any, out: Path, boards: list, labels: list[str], runs: list, strict: bool,
            targets: Optional[list] = None) -> bool:
    rows = [("backend", None, 0), ("batch", "batch_size", 0), ("p50 ms", "latency_p50_ms", 3),
            ("p90 ms", "latency_p90_ms", 3), ("p99 ms", "latency_p99_ms", 3), ("mean ms", "latency_mean_ms", 3),
            ("std ms", "std_ms", 3), ("throughput /s", "throughput_items_per_s", 1),
            ("peak memory MB", "peak_memory_mb", 1), ("model size MB", "model_size_mb", 2),
            ("top-1 %", "top1_pct", 2), ("accuracy drop pts", "accuracy_drop_pct", 2),
            ("perplexity", "perplexity", 3), ("energy mJ", "energy_mj", 2), ("status", "status", 0)]
    lat = Table(title="Latency (primary batch) and resources", show_lines=False)
    lat.add_column("metric")
    for k, lab in enumerate(labels):
        emu = bool(targets and targets[k] is not None and targets[k].emulated)
        lat.add_column(lab + (" (emulated: not a board's figures)" if emu else ""), justify="right", overflow="fold")
    columns: list[dict[str, Any]] = []
    cons = Table(title="Constraints", show_lines=False)
    for col in ("board", "constraint", "measured", "verdict"):
        cons.add_column(col)
    summary: dict[str, Any] = {"boards": []}
    any_failed = env_failed = False
    for k, ((prof, h), lab, run) in enumerate(zip(boards, labels, runs)):
        tg = targets[k] if targets else None
        emulated = bool(tg is not None and tg.emulated)
        doc = run.result or run.partial or {}
        m = dict(doc.get("metrics", {}))
        lat_entry = (doc.get("latency") or [{}])[0]
        columns.append({**m, "std_ms": lat_entry.get("std_ms"), "backend": prof.backend,
                        "status": doc.get("status") or ("failed" if not run.ok else None)})
        results = held_constraints(prof, m, emulated)
        for r in results:
            verdict = {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]"}.get(
                r.verdict, "[yellow]not measured: emulated[/]" if r.note.startswith("not measured: emulated")
                else "[yellow]not measured[/]")
            cons.add_row(lab, f"{r.metric} {r.op} {r.limit:g}", _fmt(r.measured), verdict)
            if r.passed is False or (strict and r.passed is None):
                any_failed = True
        if not run.ok:
            any_failed = any_failed or not run.environment
            env_failed = env_failed or run.environment
        summary["boards"].append({
            "label": lab, "profile": prof.name, "where": run.where, "ok": run.ok, "error": run.error,
            "target": doc.get("target") or {"kind": "ssh" if h else "local", "where": run.where, "emulated": False},
            "status": doc.get("status"), "out_dir": str(run.out_dir), "metrics": m,
            "constraints": [r.model_dump() for r in results],
            "all_passed": run.ok and all(r.passed for r in results if r.passed is not None)
                          and (not strict or all(r.passed is not None for r in results)),
        })
    for title, key, nd in rows:
        vals = [_fmt(c.get(key or "backend"), nd) if nd else _fmt(c.get(key or "backend")) for c in columns]
        if key is None or any(v != "-" for v in vals):
            lat.add_row(title, *vals)
    console.print(lat)
    console.print(cons)
    atomic_write_json(out / "summary.json", summary)
    for b in summary["boards"]:
        if b["error"]:
            kept = " (partial results and logs kept in " + b["out_dir"] + ")"
            console.print(f"[red]error[/]: [{b['label']}] {b['error']}{kept}", soft_wrap=True)
    for b in summary["boards"]:
        nm = [c["metric"] for c in b["constraints"] if c["passed"] is None]
        verdict = "meets every measured constraint" if b["all_passed"] else "does NOT meet its target"
        extra = f"; not measured: {', '.join(nm)}" if nm else ""
        console.print(f"{b['label']}: {verdict}{extra}", soft_wrap=True)
    return 1 if any_failed else EXIT_ENVIRONMENT if env_failed else 0


def _print_profiles(console: Any, profiles: list) -> None:
    t = Table(title="Device profiles (one profile = one backend)")
    t.add_column("name", no_wrap=True)
    for col in ("arch", "backend", "precision", "threads"):
        t.add_column(col)
    t.add_column("description", overflow="fold")
    for p in profiles:
        t.add_row(p.name, p.arch, p.backend, p.precision, str(p.threads or "-"), p.description)
    console.print(t)
