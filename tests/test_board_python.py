"""The board-side harness (what a bundle runs on a Jetson or a Pi) must import and run on Python
3.8 (JetPack 5) and 3.10 (JetPack 6). No such interpreter is on these machines, so ``vermin``
checks the minimum version of every module the harness imports, found from ``run_bench.py`` by
following its imports. (The emulated ARM tests run the same modules on an aarch64 Python 3.11.)"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERMIN = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
pytestmark = pytest.mark.skipif(not Path(VERMIN).exists(), reason="needs vermin (pip install -e .[dev])")
BOARD_MIN = "3.8"


def board_modules(entry: str = "benchmarks/board/run_bench.py") -> list[Path]:
    """``entry`` and every benchmarks.* / exporters.* module it imports, transitively (a dotted
    ``benchmarks.board.*`` name in a string counts: the backend registry's lazily imported modules)."""
    todo, seen = [ROOT / entry], set()
    while todo:
        f = todo.pop()
        if f in seen or not f.is_file():
            continue
        seen.add(f)
        pkg = f.parent.name
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:  # relative: from .x import y / from . import x
                    mod = ".".join(filter(None, [pkg, mod]))
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.startswith("benchmarks.board."):  # a module the backend registry names
                names = [node.value, node.value.rpartition(".")[0]]
            for n in names:
                parts = n.split(".")
                if parts[0] in ("benchmarks", "exporters"):
                    for cand in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT / parts[0] / "__init__.py"):
                        todo.append(cand)
    return sorted(seen)


def vermin(files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([VERMIN, f"-t={BOARD_MIN}-", "--no-tips", "--violations", "--backport", "dataclasses",
                           "--backport", "typing", *map(str, files)], capture_output=True, text=True, timeout=120)


def test_board_harness_runs_on_python_38():
    files = sorted(set(board_modules()) | set(board_modules("benchmarks/board/run_model.py")))  # + deploy's runner
    rel = {str(f.relative_to(ROOT)) for f in files}
    # the harness, its runners and the TensorRT build path it ships are all in the closure
    assert {"benchmarks/board/run_bench.py", "benchmarks/board/runners.py", "benchmarks/board/runner_base.py",
            "benchmarks/board/runner_openvino.py",
            "benchmarks/board/runner_onnxruntime.py", "benchmarks/board/runner_tensorrt.py", "benchmarks/board/harness.py",
            "benchmarks/board/run_model.py", "benchmarks/board/trt_build.py", "benchmarks/board/tensorrt_engine.py",
            "benchmarks/board/tensorrt_plan.py", "benchmarks/board/errors.py"} <= rel
    assert not any(r.startswith("sglp_edge/") for r in rel)  # the host package never goes to a board
    r = vermin(files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_check_catches_newer_syntax(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: str) -> str:\n    match x:\n        case 'a':\n            return x.removeprefix('a')\n"
                   "    return x\n")
    r = vermin([bad])
    assert r.returncode != 0 and "3.10" in r.stdout
