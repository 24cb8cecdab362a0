"""The emulated ARM board: an aarch64 Python 3.11 with the ARM builds of numpy and the runtimes,
run under ``qemu-aarch64-static`` (user-mode emulation), set up once and cached outside any run
folder (``~/.cache/sglp-edge/arm64``, or ``$SGLP_EDGE_ARM64_CACHE``).

What the set-up does (``docs/arm-emulation.md`` has the facts it rests on):

1. ``qemu-user-static`` from apt when ``qemu-aarch64-static`` is not on PATH;
2. an arm64 sysroot from Debian's ``:arm64`` packages, fetched with ``apt-get download`` against a
   private package list (its own ``Dir::State::Lists``, ``APT::Architectures=arm64``), so the
   machine's dpkg architectures are never changed, then unpacked with ``dpkg -x``;
3. a fake ``proc/cpuinfo`` (and ``midr_el1``) inside the sysroot describing Neoverse-N1 cores:
   QEMU passes the host's x86 ``/proc/cpuinfo`` through otherwise and ``import onnxruntime``
   segfaults on it;
4. the aarch64 wheels of numpy and each runtime asked for (``pip download --platform ...``, the
   same versions as on this host), each installed into its own folder;
5. ``bin/python3``: a wrapper that runs the sysroot's ``python3.11`` under the emulator with
   ``QEMU_CPU=neoverse-n1`` (the default ``max`` CPU turns on SVE, where OpenVINO's answers are
   wrong under QEMU 7.2). It takes the place of a board's ``python3`` everywhere: locally, or as the
   remote interpreter behind an SSH server.

Every piece is built in a temporary folder and renamed into place, under a file lock, so an
interrupted set-up leaves nothing half-made and two processes never build the same piece.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional, Sequence

from benchmarks.board.backends import BACKENDS
from benchmarks.board.errors import UserError

QEMU_CPU = "neoverse-n1"
PY = "python3.11"
#: Debian 12 arm64 packages that make a working Python 3.11 (24 packages, ~13 MB)
SYSROOT_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11", "libc6", "libexpat1",
    "zlib1g", "libffi8", "libssl3", "libstdc++6", "libgcc-s1", "libbz2-1.0", "liblzma5", "libsqlite3-0",
    "libuuid1", "libncursesw6", "libtinfo6", "libreadline8", "libgomp1", "libcrypt1", "libdb5.3", "libnsl2",
    "libtirpc3", "media-types",
)
PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_35_aarch64")
#: pip distribution name of each runtime's aarch64 build (the board harness needs numpy + one of these):
#: the emulatable backends' runtimes and what they import, from the backend registry
RUNTIME_DISTS = {d: d for b in BACKENDS.values() if b.emulatable for d in (*b.runtime_deps, b.runtime_dist)}
RUNTIME_DISTS["numpy"] = "numpy"
# pure-Python packages the runtimes import at start-up
_EXTRA = {"openvino": ("packaging", "openvino-telemetry")}

CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n"
    for i in range(4)
)
MIDR = "0x00000000413fd0c1\n"


def cache_root() -> Path:
    env = os.environ.get("SGLP_EDGE_ARM64_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sglp-edge" / "arm64"


def host_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(argv: Sequence[str], what: str, fix: str, timeout: float = 900, cwd: Optional[Path] = None) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except FileNotFoundError:
        raise UserError(f"ARM emulation set-up: {what} failed: {argv[0]} is not installed; {fix}") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"ARM emulation set-up: {what} timed out after {timeout:g} s; {fix}") from None
    if p.returncode != 0:
        lines = [l.strip() for l in (p.stderr or p.stdout).splitlines() if l.strip()]
        why = next((l for l in reversed(lines) if l.startswith(("E:", "ERROR", "error"))), lines[-1] if lines else "")
        raise UserError(f"ARM emulation set-up: {what} failed ({why or f'exit {p.returncode}'}); {fix}")
    return p.stdout


@contextmanager
def _building(dest: Path) -> Iterator[Path]:
    """Build ``dest`` in a sibling temporary folder and rename it into place on success."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_qemu(install: bool = True) -> str:
    q = shutil.which("qemu-aarch64-static")
    if q:
        return q
    if not install:
        raise UserError("qemu-aarch64-static is not installed: apt-get install -y qemu-user-static")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    fix = "install it yourself: sudo apt-get install -y --no-install-recommends qemu-user-static"
    _run(sudo + ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "--no-install-recommends",
                 "qemu-user-static"], "apt-get install qemu-user-static", fix)
    q = shutil.which("qemu-aarch64-static")
    if not q:
        raise UserError(f"ARM emulation set-up: qemu-user-static installed but qemu-aarch64-static is not on PATH; {fix}")
    return q


def _apt_opts(root: Path) -> list[str]:
    lists = root / "apt" / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (root / "apt" / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={root / 'apt' / 'cache'}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
            "-o", "Debug::NoLocking=1", "-q"] + (["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else [])


def build_sysroot(root: Path) -> Path:
    sysroot = root / "sysroot"
    if (sysroot / "usr" / "bin" / PY).is_file() and (sysroot / "proc" / "cpuinfo").is_file():
        return sysroot
    fix = "check that Debian's package servers are reachable (apt-get update) and retry"
    opts = _apt_opts(root)
    _run(["apt-get", *opts, "update"], "apt-get update for arm64 (private package list)", fix)
    debs = root / "debs"
    debs.mkdir(exist_ok=True)
    _run(["apt-get", *opts, "download", *[f"{p}:arm64" for p in SYSROOT_PACKAGES]],
         "apt-get download of the arm64 Python packages", fix, cwd=debs)
    files = sorted(debs.glob("*_arm64.deb")) + sorted(debs.glob("*_all.deb"))
    with _building(sysroot) as tmp:
        for deb in files:
            _run(["dpkg", "-x", str(deb), str(tmp)], f"dpkg -x {deb.name}", "remove the cache folder and retry")
        if not (tmp / "usr" / "bin" / PY).is_file():
            raise UserError(f"ARM emulation set-up: the arm64 packages gave no usr/bin/{PY}; remove {root} and retry")
        (tmp / "proc").mkdir(exist_ok=True)
        (tmp / "proc" / "cpuinfo").write_text(CPUINFO)
        for i in range(4):
            d = tmp / "sys" / "devices" / "system" / "cpu" / f"cpu{i}" / "regs" / "identification"
            d.mkdir(parents=True, exist_ok=True)
            (d / "midr_el1").write_text(MIDR)
    shutil.rmtree(debs, ignore_errors=True)
    return sysroot


def site_dir(root: Path, dist: str) -> Path:
    return root / "site" / dist


def install_wheels(root: Path, dist: str, version: Optional[str]) -> Path:
    dest = site_dir(root, dist)
    stamp = dest / ".sglp-installed.json"
    if stamp.is_file():
        return dest
    spec = [f"{dist}=={version}" if version else dist, *_EXTRA.get(dist, ())]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    common = ["--only-binary=:all:", *plat, "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
              "--no-deps", "--disable-pip-version-check", "-q"]
    fix = f"check that PyPI is reachable and that {spec[0]} has an aarch64 wheel for CPython 3.11"
    wheels = root / "wheels" / dist
    wheels.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", *common, "-d", str(wheels), *spec],
         f"pip download of the aarch64 {spec[0]} wheel", fix)
    with _building(dest) as tmp:
        _run([sys.executable, "-m", "pip", "install", *common, "--no-index", "--find-links", str(wheels),
              "--target", str(tmp), *spec], f"pip install --target of the aarch64 {dist} wheel", fix)
        (tmp / ".sglp-installed.json").write_text(json.dumps({"dist": dist, "version": version,
                                                              "wheels": sorted(p.name for p in wheels.iterdir())}))
    shutil.rmtree(wheels, ignore_errors=True)
    return dest


def write_wrapper(root: Path, qemu: str, dists: Sequence[str]) -> Path:
    """``bin/python3``: the sysroot's Python under the emulator, with every installed runtime on its path."""
    sysroot = root / "sysroot"
    paths = ":".join(str(site_dir(root, d)) for d in dists)
    body = (
        "#!/bin/sh\n"
        "# sglp-edge: an aarch64 Python 3.11 under user-mode emulation (written by sglp_edge/targets/arm64_env.py)\n"
        f'export QEMU_CPU="${{SGLP_EDGE_QEMU_CPU:-{QEMU_CPU}}}"\n'
        "unset PYTHONHOME\n"
        "export PYTHONNOUSERSITE=1\n"
        f'export PYTHONPATH="{paths}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'exec "{qemu}" -L "{sysroot}" "{sysroot}/usr/bin/{PY}" "$@"\n'
    )
    w = root / "bin" / "python3"
    w.parent.mkdir(parents=True, exist_ok=True)
    tmp = w.with_name(f".python3.tmp{os.getpid()}")
    tmp.write_text(body)
    tmp.chmod(0o755)
    tmp.replace(w)
    return w


def ensure(runtimes: Sequence[str] = ("onnxruntime",), *, root: Optional[Path] = None,
           progress: Optional[callable] = None) -> dict:
    """Set up (or reuse) the emulated ARM Python with numpy and ``runtimes``; returns
    ``{"python": wrapper, "root": ..., "setup_s": seconds spent now, "versions": {...}, "qemu_cpu": ...}``.
    Raises :class:`UserError` with one line naming the fix when a step fails."""
    root = Path(root) if root else cache_root()
    for r in runtimes:
        if r not in RUNTIME_DISTS:
            raise UserError(f"no aarch64 build is known for runtime {r!r}; the emulated ARM target runs "
                            f"{', '.join(k for k in RUNTIME_DISTS if k != 'numpy')}")
    dists = ["numpy", *dict.fromkeys(r for r in runtimes if r != "numpy")]
    t0 = time.perf_counter()
    say = progress or (lambda m: None)
    with _lock(root):
        qemu = find_qemu()
        if not (root / "sysroot" / "usr" / "bin" / PY).is_file():
            say("ARM emulation: building the arm64 Python sysroot (once)")
        build_sysroot(root)
        versions = {}
        for d in dists:
            v = host_version(RUNTIME_DISTS[d])
            if not (site_dir(root, d) / ".sglp-installed.json").is_file():
                say(f"ARM emulation: installing the aarch64 {d} {v or ''} wheel (once)")
            install_wheels(root, RUNTIME_DISTS[d], v)
            versions[d] = json.loads((site_dir(root, d) / ".sglp-installed.json").read_text()).get("version")
        installed = sorted(p.name for p in (root / "site").iterdir() if (p / ".sglp-installed.json").is_file())
        wrapper = write_wrapper(root, qemu, ["numpy", *[d for d in installed if d != "numpy"]])
    return {"python": str(wrapper), "root": str(root), "setup_s": time.perf_counter() - t0, "versions": versions,
            "qemu": qemu, "qemu_cpu": QEMU_CPU, "emulated": True}


def ready(runtimes: Sequence[str] = ("onnxruntime",), root: Optional[Path] = None) -> bool:
    """True when the cache already holds everything ``ensure(runtimes)`` needs (no set-up would run)."""
    root = Path(root) if root else cache_root()
    return (shutil.which("qemu-aarch64-static") is not None and (root / "bin" / "python3").is_file()
            and (root / "sysroot" / "usr" / "bin" / PY).is_file()
            and all((site_dir(root, d) / ".sglp-installed.json").is_file() for d in ("numpy", *runtimes)))
