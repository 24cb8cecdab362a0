"""Load a user's ``torch.export`` program (.pt2) without running anything it carries.

``torch.export.load`` trusts its file: a weight or constant marked ``use_pickle`` is unpickled with
``weights_only=False``, sample inputs fall back to ``weights_only=False``, opaque and custom objects
are unpickled, AOTInductor entries are loaded as native libraries, and the graph's shape expressions
go through ``sympy.sympify`` (``eval``). :func:`check_pt2_archive` reads the zip first (JSON and
tensor bytes only) and refuses any of those before torch sees the file; :func:`load_exported_program`
then loads it with every ``torch.load`` forced to the weights-only (allow-listed) unpickler.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

from benchmarks.board.errors import UserError

RESAVE = "export the model again with torch.export.save(torch.export.export(model, example), 'model.pt2')"
# names a shape expression may call: sympy's constructors and torch's sympy functions (no strings, no eval)
SYM_CALLS = frozenset((
    "Symbol Integer Rational Float Add Mul Pow Max Min Mod Abs floor ceiling sqrt Eq Ne Lt Le Gt Ge And Or Not "
    "Equality Unequality LessThan StrictLessThan GreaterThan StrictGreaterThan Piecewise ExprCondPair "
    "FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural "
    "FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt "
    "RoundDecimal ToFloat Identity"
).split())
GUARD_METHODS = frozenset(("size", "stride", "storage_offset", "dim", "numel"))
_OPS = (ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.boolop, ast.operator, ast.unaryop,
        ast.cmpop, ast.Load, ast.Tuple)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")


def _bad(path: Path, what: str) -> UserError:
    return UserError(f"{path} {what}; sglp-edge loads only plain tensors and graph JSON from a .pt2 - {RESAVE}")


def _plain_name(name: str) -> bool:
    return bool(_NAME.match(name)) and "__" not in name


def _symbol_strings(call: ast.Call) -> list[ast.AST] | None:
    """The string arguments of an allowed call: a symbol's name (``Symbol('s0', ...)``) or a number
    (``Float('0.5', ...)``), the only strings srepr writes; None when the call is not allowed."""
    if not (isinstance(call.func, ast.Name) and call.func.id in SYM_CALLS):
        return None
    if not all(k.arg is not None and isinstance(k.value, ast.Constant) and not isinstance(k.value.value, str)
               for k in call.keywords):
        return None
    strings = [a for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    for a in strings:
        fn, text = call.func.id, a.value  # type: ignore[attr-defined]
        if a is not call.args[0] or not ((fn == "Symbol" and _plain_name(text))
                                         or (fn == "Float" and _NUMBER.match(text))):
            return None
    return strings


def _safe_sym_expr(text: str) -> bool:
    """Plain arithmetic over symbols (what torch.export writes), safe to hand to ``sympy.sympify``."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    allowed_strings: set[int] = set()
    for node in ast.walk(tree):  # breadth first: a call before its arguments
        if isinstance(node, _OPS):
            continue
        if isinstance(node, ast.Name):
            ok = _plain_name(node.id)
        elif isinstance(node, ast.Call):
            strings = _symbol_strings(node)
            ok = strings is not None
            allowed_strings.update(id(a) for a in strings or ())
        elif isinstance(node, ast.keyword):
            ok = node.arg is not None and _plain_name(node.arg)
        elif isinstance(node, ast.Constant):
            ok = id(node) in allowed_strings or not isinstance(node.value, (str, bytes))
        else:
            ok = False
        if not ok:
            return False
    return True


def _safe_guard(text: str) -> bool:
    """A guard as torch writes it (``L['x'].size()[0] <= 1024``): compared sizes, nothing called but
    a tensor's size/stride."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (*_OPS, ast.Subscript, ast.Slice)):
            continue
        if isinstance(node, ast.Name):
            ok = node.id in ("L", "args")
        elif isinstance(node, ast.Attribute):
            ok = node.attr in GUARD_METHODS
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Attribute) and node.func.attr in GUARD_METHODS and not node.keywords
        elif isinstance(node, ast.Constant):
            ok = isinstance(node.value, (int, float, bool, str))
        else:
            ok = False
        if not ok:
            return False
    return True


def _walk(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)
    else:
        yield key, obj


def _check_program_json(path: Path, name: str, doc: Any) -> None:
    """models/<name>.json: shape expressions and guards are evaluated by torch; pytree specs may import."""
    for key, value in _walk(doc):
        if key == "expr_str" and not (isinstance(value, str) and _safe_sym_expr(value)):
            raise _bad(path, f"holds a shape expression that is not plain arithmetic in {name} ({str(value)[:60]!r}), "
                             "which torch would evaluate as Python code")
        if key in ("in_spec", "out_spec") and isinstance(value, str) and (
                "default_factory_module" in value or "__enum__" in value):
            raise _bad(path, f"holds an input/output spec in {name} that imports a Python module (defaultdict or enum "
                             "context) when loaded")
    guards = doc.get("guards_code") if isinstance(doc, dict) else None
    for g in guards or []:
        if not (isinstance(g, str) and _safe_guard(g)):
            raise _bad(path, f"holds guard code in {name} that is not a plain size check ({str(g)[:60]!r}), which "
                             "torch would run as Python code")


def _check_payload_config(path: Path, name: str, doc: Any) -> None:
    """data/weights/*_weights_config.json, data/constants/*_constants_config.json."""
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise _bad(path, f"has an unreadable payload config {name}")
    for fqn, meta in config.items():
        pname = str((meta or {}).get("path_name", "")) if isinstance(meta, dict) else ""
        if not isinstance(meta, dict) or meta.get("use_pickle"):
            raise _bad(path, f"stores {fqn!r} as a pickle (use_pickle in {name}), which runs code when unpickled")
        if pname.startswith(("custom_obj_", "opaque_obj_")):
            raise _bad(path, f"stores {fqn!r} as a pickled Python object ({pname} in {name})")


def _weights_only(path: Path, name: str, data: bytes) -> None:
    import torch

    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything beyond tensors and containers
        raise _bad(path, f"holds {name}, a pickle that is not plain tensors ({type(e).__name__})") from None


def check_pt2_archive(path: Path) -> None:
    """Refuse (UserError, one line) a .pt2 whose loading could run code; reads only JSON and bytes."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a torch.export program (not a zip archive: {e}); save one with "
                        "torch.export.save(torch.export.export(model, example), 'model.pt2')") from None
    with zf:
        try:
            _check_entries(path, zf)
        except RecursionError:
            raise _bad(path, "holds JSON nested too deeply to inspect") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
            raise UserError(f"{path} is not a torch.export program (corrupt zip: {type(e).__name__}: {e}); save one "
                            "with torch.export.save(torch.export.export(model, example), 'model.pt2')") from None


def _check_entries(path: Path, zf: zipfile.ZipFile) -> None:
    """Every entry, duplicates included (another zip reader may pick another copy of a name), by what
    torch does with it: configs that may mark pickles, graph JSON whose strings it evaluates, .pt
    pickles it unpickles, compiled code it loads."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    versions = [zf.read(i).strip() for i in infos if i.filename.rsplit("/", 1)[-1] == "archive_version"]
    if not versions or any(v != b"0" for v in versions):
        raise _bad(path, "is not a torch.export archive of the current format (archive_version 0); older "
                         "formats are read through pickle")
    for info in infos:
        name, low = info.filename, info.filename.lower()
        if "data/aotinductor/" in low or low.endswith((".so", ".dll", ".dylib", ".pyd")):
            raise _bad(path, f"holds compiled code ({name}), which torch would load as a native library")
        if low.endswith(("_weights_config.json", "_constants_config.json")):
            _check_payload_config(path, name, _json(path, name, zf.read(info)))
        elif low.endswith(".json"):  # models/*.json, and the older serialized_exported_program.json
            doc = _json(path, name, zf.read(info), strict="models/" in name)
            if doc is not None:
                _check_program_json(path, name, doc)
        elif low.endswith((".pt", ".pth", ".pkl", ".pickle", ".bin")):
            _weights_only(path, name, zf.read(info))


def _json(path: Path, name: str, data: bytes, *, strict: bool = True) -> Any:
    """The parsed entry; an unparsable one is refused when ``strict``, else None (torch never parses it)."""
    try:
        return json.loads(data)
    except ValueError as e:
        if not strict:
            return None
        raise _bad(path, f"has an unreadable {name} ({e})") from None


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Every ``torch.load`` inside the block uses the weights-only unpickler, whatever the caller asks
    (torch.export.load asks for ``weights_only=False`` in places)."""
    import torch

    real = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def load_exported_program(path: Path) -> Any:
    """``torch.export.load(path)`` after :func:`check_pt2_archive`, with weights-only unpickling."""
    import torch

    check_pt2_archive(path)
    with _weights_only_torch_load():
        return torch.export.load(str(path))
