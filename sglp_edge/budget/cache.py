"""The measured-model cache of the budget searches: one JSON file per key under
``~/.cache/sglp-edge/latency/`` (``SGLP_EDGE_CACHE`` moves it), named ``<prefix><profile>-<digest>.json``.

A model class (:class:`sglp_edge.budget.latency_model.LatencyModel`,
:class:`sglp_edge.budget.decode_model.DecodeModel`) is a dataclass with ``key``, ``cached``,
``to_dict`` and ``from_dict``; an entry is used only when its stored key equals the key asked for.
This module is light (no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Type, TypeVar

from benchmarks.board.atomic import atomic_write_json

T = TypeVar("T")


def cache_dir() -> Path:
    root = os.environ.get("SGLP_EDGE_CACHE") or str(Path.home() / ".cache" / "sglp-edge")
    return Path(root) / "latency"


def cache_file(key: dict[str, Any], prefix: str = "") -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{prefix}{key['profile']}-{digest}.json"


def load_cached(cls: Type[T], key: dict[str, Any], prefix: str = "") -> Optional[T]:
    """The cached ``cls`` for ``key`` (marked ``cached``), or None (no entry, unreadable, another key)."""
    try:
        d = json.loads(cache_file(key, prefix).read_text())
    except (OSError, ValueError):
        return None
    if d.get("key") != key:
        return None
    m = cls.from_dict(d)  # type: ignore[attr-defined]
    m.cached = True  # type: ignore[attr-defined]
    return m


def save_cached(m: Any, prefix: str = "") -> Path:
    f = cache_file(m.key, prefix)
    f.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(f, {**m.to_dict(), "cached": False})
    return f
