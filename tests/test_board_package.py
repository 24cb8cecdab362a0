"""The board package (``benchmarks/board/``) is exactly what a board gets, and it stands alone.

(a) a bundle holds the import closure of the two board entry points (run_bench.py, run_model.py) plus
    the two package ``__init__.py`` files, the artifact, the data and MANIFEST.json, nothing else;
(b) unpacked, it imports and answers ``--help`` with torch, transformers, sglp_edge and exporters
    made unimportable and the unpacked folder as the only place ``benchmarks`` can come from;
(c) no board module imports anything outside ``benchmarks.board`` but the standard library, numpy and
    the runtimes.
The closure follows every import (module level or in a function) and every dotted
``benchmarks.board.*`` name in a string: the backend registry names the runner modules and the
board-side build that way, imported only when used.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sglp_edge.targets.bundle import make_bundle

ROOT = Path(__file__).resolve().parents[1]
BOARD = ROOT / "benchmarks" / "board"
ENTRIES = ("benchmarks.board.run_bench", "benchmarks.board.run_model")
#: what a board module may import besides benchmarks.board: numpy and the runtimes (with the
#: bindings they need: cuda-python / cupy for TensorRT's buffers, onnx for the board-side engine build)
THIRD_PARTY = {"numpy", "onnxruntime", "onnxruntime_genai", "openvino", "tensorrt", "cuda", "cupy", "onnx"}
BLOCKED = ("torch", "transformers", "sglp_edge", "exporters")
IMPORTED = ("benchmarks.board.run_bench", "benchmarks.board.runners", "benchmarks.board.harness",
            "benchmarks.board.accuracy", "benchmarks.board.lm_bench", "benchmarks.board.tegrastats")


def module_file(name: str) -> Path:
    return ROOT.joinpath(*name.split(".")).with_suffix(".py")


def references(path: Path) -> set[str]:
    """Dotted names ``path`` imports (and, for ``from m import n``, ``m.n`` too: ``n`` may be a module),
    plus dotted ``benchmarks.board.*`` names in strings (and their parent, for ``module.function``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            out |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith("benchmarks.board."):
            out |= {node.value, node.value.rpartition(".")[0]}
    return out


def board_closure() -> set[str]:
    """Repository-relative paths of every benchmarks.board module the entry points reach."""
    todo, seen = list(ENTRIES), set()
    while todo:
        name = todo.pop()
        f = module_file(name)
        if name in seen or not f.is_file():
            continue
        seen.add(name)
        todo += [r for r in references(f) if r.startswith("benchmarks.board.")]
    return {str(module_file(n).relative_to(ROOT)) for n in seen}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bundle")
    art = d / "model.onnx"
    art.write_bytes(b"tiny artifact: the bundle only carries it")
    data = d / "eval.npz"
    np.savez(data, x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    return make_bundle(art, data, d / "bundle.tar.gz").path


def test_every_board_module_is_in_the_closure_of_the_entry_points():
    closure = board_closure()
    package = {str(p.relative_to(ROOT)) for p in BOARD.glob("*.py") if p.name != "__init__.py"}
    assert package - closure == set(), "board modules no entry point reaches: move them out of benchmarks/board/"
    assert {"benchmarks/board/runner_onnxruntime.py", "benchmarks/board/runner_openvino.py",
            "benchmarks/board/runner_tensorrt.py", "benchmarks/board/trt_build.py"} <= closure


def test_bundle_holds_exactly_the_board_closure(bundle):
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
    code = {n for n in names if not n.startswith(("artifact/", "data/")) and n != "MANIFEST.json"}
    assert code == board_closure() | {"benchmarks/__init__.py", "benchmarks/board/__init__.py"}
    assert names - code == {"artifact/model.onnx", "data/eval.npz", "MANIFEST.json"}


def test_unpacked_bundle_imports_without_the_host_packages(bundle, tmp_path):
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import sys\n"
            + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)
            + "".join(f"import {m}\n" for m in IMPORTED)
            + "import benchmarks\n"
            + f"assert all(sys.modules[m].__file__.startswith({str(tmp_path)!r}) for m in {IMPORTED!r} + ('benchmarks',))\n"
            + "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = subprocess.run([sys.executable, "-m", "benchmarks.board.run_bench", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--artifact" in r.stdout, r.stderr


def test_board_modules_import_nothing_outside_the_board_package():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for f in sorted(BOARD.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                ok = (n == "benchmarks.board" or n.startswith("benchmarks.board.") or top in stdlib
                      or top in THIRD_PARTY or n == "__future__")
                if not ok:
                    bad.append(f"{f.name}: {n}")
    assert not bad, bad
