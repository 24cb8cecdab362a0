"""Models the user brings: a builder function in their own Python file (``file.py:build_fn``) or a
``torch.export`` program (``.pt2``).

The model remembers how it was built (``model._sglp_builder``: the file, the function and its
keyword arguments, or the .pt2 path, each with the file's sha256). A saved pruned checkpoint stores
that reference instead of pickled code: reloading calls the builder again, replays the removed
units and loads the state dict (safetensors).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.pt2_guard import load_exported_program


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_file_ref(src: str) -> bool:
    """``path/to/file.py:fn`` (or a bare ``file.py``, answered with an error naming the fix)."""
    head = src.rsplit(":", 1)[0] if ":" in src else src
    return head.endswith(".py")


def is_pt2(src: str) -> bool:
    return src.endswith(".pt2")


def load_file_builder(src: str, *, num_classes: int | None = None, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Import the user's file and call its builder: ``file.py:build_fn`` -> an ``nn.Module``."""
    if ":" not in src or not src.rsplit(":", 1)[1]:
        raise UserError(f"--model {src}: name the function that builds the model, e.g. {src.rstrip(':')}:build_model")
    path_s, fn_name = src.rsplit(":", 1)
    path = Path(path_s)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    kw = dict(kwargs or {})
    if num_classes is not None:
        kw.setdefault("num_classes", num_classes)
    return build_from_reference({"kind": "file", "path": str(path.resolve()), "fn": fn_name, "kwargs": kw}, check=False)


def _import_file(path: Path) -> Any:
    name = "sglp_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
        sys.modules.pop(name, None)
        raise UserError(f"importing {path} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return module


def check_builder_hash(path: Path, ref: dict[str, Any], *, trust: bool = False) -> str:
    """The builder file's sha256. A checkpoint names the file that rebuilds it and the hash it was
    saved with; a file that does not match (changed, or placed there by whoever sent the checkpoint)
    is not run unless the user trusts it (``--trust-builder``)."""
    actual = _sha256(path)
    expected = ref.get("sha256")
    if actual == expected:
        return actual
    if not trust:
        raise UserError(f"the checkpoint is rebuilt from {path}, which does not match the sha256 it was saved with "
                        f"(expected {expected or 'a recorded hash'}, found {actual}); it was not run. Restore the "
                        "original file, or pass --trust-builder to run the current one")
    print(f"warning: running {path} (sha256 {actual}, saved with {expected or 'none'}): --trust-builder",
          file=sys.stderr)
    return actual


def build_from_reference(ref: dict[str, Any], *, check: bool = True, trust: bool = False) -> nn.Module:
    """Rebuild the UNPRUNED model from a builder reference (see the module docstring). ``check``: the
    reference comes from a saved checkpoint, so its file runs only when its sha256 matches (or
    ``trust``, the user's ``--trust-builder``); without ``check`` the user named the file themselves."""
    kind = ref.get("kind")
    path = Path(ref.get("path", ""))
    if not path.is_file():
        raise UserError(f"the model was built by {path}, which no longer exists; restore that file to load it")
    sha = check_builder_hash(path, ref, trust=trust) if check else _sha256(path)
    if kind == "file":
        module = _import_file(path)
        fn = getattr(module, ref["fn"], None)
        if not callable(fn):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserError(f"{path} has no function {ref['fn']!r}; callables there: {', '.join(found[:10]) or 'none'}")
        try:
            model = fn(**ref.get("kwargs", {}))
        except TypeError as e:
            raise UserError(f"{path}:{ref['fn']} cannot be called with {ref.get('kwargs') or 'no arguments'} ({e})") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"{path}:{ref['fn']} returned {type(model).__name__}, not a torch.nn.Module")
    elif kind == "pt2":
        model = load_pt2_module(path)
    else:
        raise UserError(f"unknown model builder kind {kind!r} in the checkpoint")
    model.eval()
    model._sglp_builder = {**ref, "sha256": sha}
    return model


def load_pt2_module(path: Path) -> nn.Module:
    """A ``torch.export`` program as a module with its original module hierarchy (unflattened), so
    its layer units can be named by module path. Export it with a dynamic batch dimension."""
    import torch

    try:
        ep = load_exported_program(path)  # refuses pickles, compiled code and eval'd text before loading
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a torch.export program ({type(e).__name__}); save one with "
                        "torch.export.save(torch.export.export(model, example), 'model.pt2')") from None
    return torch.export.unflatten(ep)


def load_pt2(src: str) -> nn.Module:
    path = Path(src)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    return build_from_reference({"kind": "pt2", "path": str(path.resolve())}, check=False)
