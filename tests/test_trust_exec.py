"""Nothing in a model file a user was sent runs code (issue 24, items 1, 2 and 16): a .pt2 whose
weight is a pickle, whose shape expression is Python, or whose sample inputs are a pickle of objects;
a checkpoint whose builder file no longer has the sha256 it was saved with (runs only with
--trust-builder); a Hugging Face folder that ships its own code (auto_map: refused without a
prompt, runs only with --trust-remote-code). Every refusal: exit 2, one ``error:`` line, no marker."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this creates ``path`` (a stand-in for any command)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def sh(*args, cwd=REPO, stdin_text=None, env=None):
    return subprocess.run([sys.executable, "-m", "sglp_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, input=stdin_text if stdin_text is not None else "",
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **(env or {})})


def one_error_line(p, *needles):
    """Exit 2, exactly one ``error:`` line on stderr holding every needle, no traceback."""
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(err) == 1 and all(n in err[0] for n in needles), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    return err[0]


# ---------------------------------------------------------------------------------------------
# .pt2 programs
# ---------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory):
    torch.manual_seed(0)
    ep = torch.export.export(_Net().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(ep, str(path))
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the zip ``src`` to ``dst``, passing each entry through ``edit(name, data) -> data``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return dst


def _pickle_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    return buf.getvalue()


def _pickled_weight(good: Path, dst: Path, marker: Path) -> Path:
    """body.0.weight marked ``use_pickle: true``, its payload a pickle that creates ``marker``."""
    with zipfile.ZipFile(good) as z:
        cfg_name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        cfg = json.loads(z.read(cfg_name))
    entry = cfg["config"]["body.0.weight"]
    entry["use_pickle"] = True
    payload_name = cfg_name.rsplit("/", 1)[0] + "/" + entry["path_name"]

    def edit(name, data):
        if name == cfg_name:
            return json.dumps(cfg).encode()
        return _pickle_bytes(marker) if name == payload_name else data

    return _rewrite(good, dst, edit)


def test_pt2_with_a_pickled_weight_is_refused_before_anything_is_unpickled(tmp_path, good_pt2):
    marker = tmp_path / "MARKER"
    evil = _pickled_weight(good_pt2, tmp_path / "evil.pt2", marker)
    p = sh("prune", evil, "--units", "body.*", "--keep", "2", "--out", tmp_path / "o")
    line = one_error_line(p, str(evil), "body.0.weight", "pickle")
    assert "not a torch.export program" not in line  # says what is wrong, not a generic failure
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "o").exists()


def _shape_expression(good: Path, dst: Path, marker: Path) -> Path:
    """A symbolic-shape string that, through sympy.sympify (eval), opens ``marker``."""
    def edit(name, data):
        if name.endswith("models/model.json"):
            text = data.decode()
            expr = json.loads(text)["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"]
            code = f"Symbol.__new__.__globals__['__builtins__']['open']({str(marker)!r}, 'w') and {expr}"
            return text.replace(json.dumps(expr)[1:-1], json.dumps(code)[1:-1]).encode()
        return data

    return _rewrite(good, dst, edit)


def _pickled_sample_inputs(good: Path, dst: Path, marker: Path) -> Path:
    """Sample inputs that are not tensors: torch retries them with weights_only=False."""
    return _rewrite(good, dst, lambda name, data: _pickle_bytes(marker) if "/sample_inputs/" in name else data)


def _compiled_code(good: Path, dst: Path, marker: Path) -> Path:
    """An AOTInductor entry: torch would load it as a native library."""
    root = zipfile.ZipFile(good).namelist()[0].split("/")[0]
    out = _rewrite(good, dst, lambda name, data: data)
    with zipfile.ZipFile(out, "a") as z:
        z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF not really")
    return out


@pytest.mark.parametrize("make,needle", [(_shape_expression, "shape expression"),
                                         (_pickled_sample_inputs, "sample_inputs"),
                                         (_compiled_code, "compiled code")])
def test_pt2_code_paths_other_than_weights_are_refused(tmp_path, good_pt2, make, needle):
    from benchmarks.board.errors import UserError
    from sglp_edge.models.registry import load_model

    marker = tmp_path / "MARKER"
    evil = make(good_pt2, tmp_path / "evil.pt2", marker)
    with pytest.raises(UserError) as e:
        load_model(str(evil), units="body.*")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists(), "the file ran code while loading"


def test_a_plain_pt2_still_loads(good_pt2):
    from sglp_edge.models.registry import load_model

    lm = load_model(str(good_pt2), units="body.*")
    assert len(lm.adapter.units(lm.model)) == 4
    assert lm.model(torch.randn(3, 4)).shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# checkpoint folders naming a builder file
# ---------------------------------------------------------------------------------------------
BUILDER = '''
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def build():
    return Tiny()
'''


@pytest.fixture()
def tampered_checkpoint(tmp_path):
    """A checkpoint saved from builder.py, whose builder.py then changed: it now creates MARKER."""
    from sglp_edge.models.registry import load_model, save_checkpoint

    builder = tmp_path / "elsewhere" / "builder.py"
    builder.parent.mkdir()
    builder.write_text(BUILDER)
    lm = load_model(f"{builder}:build", units="body.*")
    ckpt = save_checkpoint(lm.model, lm.adapter, tmp_path / "ckpt")
    saved = json.loads((ckpt / "sglp_model.json").read_text())["spec"]["base"]["sha256"]
    marker = tmp_path / "MARKER"
    builder.write_text(BUILDER + f"\nopen({str(marker)!r}, 'w').close()\n")
    return ckpt, builder, saved, marker


def test_a_builder_file_whose_hash_changed_is_not_run(tmp_path, tampered_checkpoint):
    ckpt, builder, saved, marker = tampered_checkpoint
    p = sh("export", ckpt, "--out", tmp_path / "x.onnx")
    one_error_line(p, str(builder), saved, "--trust-builder")
    assert not marker.exists(), "the changed builder file ran"
    assert not (tmp_path / "x.onnx").exists()


def test_trust_builder_runs_the_changed_builder_knowingly(tmp_path, tampered_checkpoint):
    ckpt, builder, saved, marker = tampered_checkpoint
    p = sh("export", ckpt, "--out", tmp_path / "x.onnx", "--input-shape", "3x8x8", "--exporter", "legacy",
           "--simplify", "none", "--parity-samples", "4", "--trust-builder")
    assert p.returncode == 0, p.stderr
    assert marker.exists() and (tmp_path / "x.onnx").is_file()
    assert str(builder) in p.stderr and "--trust-builder" in p.stderr  # said what it ran, and why


def test_a_builder_reference_without_a_hash_is_not_run(tmp_path, tampered_checkpoint):
    from benchmarks.board.errors import UserError
    from sglp_edge.models.registry import load_model

    ckpt, builder, _, marker = tampered_checkpoint
    meta = json.loads((ckpt / "sglp_model.json").read_text())
    del meta["spec"]["base"]["sha256"]
    (ckpt / "sglp_model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="--trust-builder"):
        load_model(str(ckpt))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Hugging Face folders with their own code (auto_map)
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def remote_code_folder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "sglp_test_custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "custom_config.CustomConfig"}}))
    (folder / "custom_config.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'sglp_test_custom'\n")
    return folder, marker


def test_a_folder_with_its_own_code_is_refused_without_a_prompt(tmp_path, remote_code_folder):
    pytest.importorskip("transformers")
    folder, marker = remote_code_folder
    # "y" on stdin: a prompt, had there been one, would have been answered yes
    p = sh("export", folder, "--out", tmp_path / "x.onnx", stdin_text="y\n", env={"HF_HOME": str(tmp_path / "hf_home")})
    one_error_line(p, str(folder), "auto_map", "--trust-remote-code")
    assert "[y/N]" not in p.stdout + p.stderr
    assert not marker.exists(), "the folder's code ran"


def test_trust_remote_code_hands_the_choice_to_transformers(tmp_path, remote_code_folder):
    pytest.importorskip("transformers")
    folder, marker = remote_code_folder
    p = sh("export", folder, "--out", tmp_path / "x.onnx", "--trust-remote-code",
           env={"HF_HOME": str(tmp_path / "hf_home")})
    assert marker.exists(), p.stderr  # asked for: the folder's code ran
    one_error_line(p, "sglp_test_custom")  # and the unsupported family is still one line
