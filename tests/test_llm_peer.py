"""benchmarks/experiments/llm_peer.py: the yardstick's cheap checks (the measurement itself is a
benchmark, run by hand on a quiet machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.board import llama_cpp
from benchmarks.board.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_absent_llama_cpp_is_one_line_and_exit_2(tmp_path):
    """No llama.cpp where it is pointed to: one line naming how to get it, exit 2, nothing written."""
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "experiments" / "llm_peer.py"), "--pruned",
                        str(tmp_path), "--llama-cpp", str(tmp_path / "nope"), "--work", str(work)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "llama.cpp" in lines[0] and "make llama-cpp" in lines[0]
    assert not work.exists()


def test_llama_cpp_root_order_and_errors(tmp_path, monkeypatch):
    """An explicit path beats $SGLP_EDGE_LLAMA_CPP; a tree without build/bin is refused for tools but
    accepted as source."""
    tree = tmp_path / "lcpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv(llama_cpp.ENV, str(tree))
    assert llama_cpp.llama_cpp_root(need="source") == tree
    with pytest.raises(UserError, match="no build/bin/llama-bench"):
        llama_cpp.llama_cpp_root()
    (tree / "build" / "bin" / "llama-bench").write_text("")
    assert llama_cpp.llama_cpp_root() == tree
    with pytest.raises(UserError, match="--llama-cpp"):
        llama_cpp.llama_cpp_root(tmp_path / "other")
    with pytest.raises(UserError, match="no llama-perplexity"):
        llama_cpp.tool(tree, "llama-perplexity")
