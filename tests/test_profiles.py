"""Device profiles: the shipped YAML files, validation errors, lookup, constraint evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.board.run_bench import build_parser
from benchmarks.board.errors import UserError
from sglp_edge.profiles.load import ENV_VAR, list_profiles, load_profile, profile_dirs
from sglp_edge.profiles.schema import DeviceProfile, evaluate_constraints

DEVICES = Path(__file__).resolve().parents[1] / "devices"


def write(d: Path, name: str, body: str) -> Path:
    p = d / f"{name}.yaml"
    p.write_text(body)
    return p


MINIMAL = "arch: x86_64\nbackend: onnxruntime\n"


def test_shipped_profiles_load_and_match_the_issue():
    names = list_profiles()
    for n in ("jetson-orin-nano", "jetson-agx-orin", "intel-core-cpu", "raspberry-pi-5", "local-cpu-ort",
              "local-cpu-openvino", "local-cpu"):
        assert n in names
    nano = load_profile("jetson-orin-nano")
    assert (nano.backend, nano.precision, nano.arch) == ("tensorrt", "fp16", "aarch64")
    agx = load_profile("jetson-agx-orin")
    assert agx.backend == "tensorrt" and agx.precision in ("fp16", "int8")
    assert load_profile("intel-core-cpu").backend == "openvino"
    pi = load_profile("raspberry-pi-5")
    assert (pi.backend, pi.arch, pi.threads) == ("onnxruntime", "aarch64", 4)
    for n in ("local-cpu-ort", "local-cpu-openvino", "local-cpu"):
        p = load_profile(n)
        assert (p.threads, p.precision, p.arch) == (2, "fp32", "x86_64")
        lim = {c.metric: c.limit for c in p.constraints}
        assert lim["latency_p90_ms"] == 10 and lim["accuracy_drop_pct"] == 1.5 and lim["model_size_mb"] == 5
        assert p.inputs[0].shape == [1, 3, 32, 32]
    assert load_profile("local-cpu-openvino").backend == "openvino"
    local = load_profile("local-cpu")
    assert local.extends == "local-cpu-ort" and local.backend == "onnxruntime" and local.name == "local-cpu"
    # every shipped profile documents the one-profile-one-backend choice in its header
    for f in DEVICES.glob("*.yaml"):
        head = f.read_text().splitlines()[0:6]
        assert any("One profile = one backend" in line for line in head), f.name
        p = load_profile(f)
        assert p.constraints, f.name
        assert p.source == str(f)


def test_every_metric_named_in_the_issue_is_accepted(tmp_path):
    body = MINIMAL + "constraints:\n" + "".join(
        f"  - {{metric: {m}, op: '<=', limit: 1}}\n"
        for m in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "accuracy_drop_pct", "ppl_increase_pct",
                  "model_size_mb", "peak_memory_mb", "energy_mj"))
    p = load_profile(write(tmp_path, "all-metrics", body))
    assert len(p.constraints) == 8


@pytest.mark.parametrize(
    "body,expect",
    [
        (MINIMAL + "threadz: 2\n", r"threadz: unknown field"),
        (MINIMAL + "constraints:\n  - {metric: latency_p95_ms, op: '<=', limit: 3}\n",
         r"constraints\[0\]\.metric: Input should be 'latency_p50_ms'"),
        (MINIMAL + "constraints:\n  - {metric: latency_p90_ms, op: '<', limit: 3}\n", r"constraints\[0\]\.op"),
        (MINIMAL + "constraints:\n  - {metric: latency_p90_ms, op: '<=', limit: fast}\n",
         r"constraints\[0\]\.limit: Input should be a valid number"),
        (MINIMAL + "constraints:\n  - latency_p90_ms < 3\n", r"constraints\[0\]: write a constraint as"),
        ("arch: riscv64\nbackend: onnxruntime\n", r"arch: Input should be 'x86_64' or 'aarch64'"),
        ("arch: x86_64\nbackend: tflite\n", r"backend: unknown backend 'tflite': use one of openvino, onnxruntime, tensorrt"),
        ("arch: x86_64\nbackend: openvino\nproviders: [CPUExecutionProvider]\n", r"providers: only applies"),
        (MINIMAL + "threads: 0\n", r"threads: Input should be greater than 0"),
        (MINIMAL + "inputs:\n  - shape: []\n", r"inputs\[0\]\.shape"),
        (MINIMAL + "constraints:\n  - latency_p90_ms <= 3\n  - latency_p90_ms <= 4\n", r"given twice"),
        (MINIMAL + "ssh: {host: '-oProxyCommand=x'}\n", r"ssh\.host: .*not starting with '-'"),
        (MINIMAL + "bench: {min_duration_s: 5, max_duration_s: 1}\n", r"bench: max_duration_s must be >="),
        ("arch: [x86_64\nbackend: x\n", r"line \d+ not valid YAML"),
        ("", r"is empty"),
        ("- a\n- b\n", r"must be a mapping"),
        ("name: something-else\n" + MINIMAL, r"name: is 'something-else' but the file is broken.yaml"),
    ],
)
def test_invalid_profiles_give_one_line_errors_naming_file_and_field(tmp_path, body, expect):
    path = write(tmp_path, "broken", body)
    with pytest.raises(UserError, match=expect) as e:
        load_profile(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg


def test_lookup_by_name_env_folders_shadow_builtins_and_extends(tmp_path, monkeypatch):
    write(tmp_path, "my-board", "extends: local-cpu-openvino\ndescription: mine\nthreads: 8\n"
                                "constraints: ['latency_p99_ms <= 2']\n")
    write(tmp_path, "local-cpu", "arch: aarch64\nbackend: onnxruntime\n")  # shadows the built-in
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert profile_dirs()[0] == tmp_path
    assert "my-board" in list_profiles()
    mine = load_profile("my-board")
    assert (mine.backend, mine.threads, mine.streams, mine.description) == ("openvino", 8, 1, "mine")
    assert [str(c) for c in mine.constraints] == ["latency_p99_ms <= 2"]  # lists are replaced whole
    assert mine.inputs[0].shape == [1, 3, 32, 32]  # inherited
    assert load_profile("local-cpu").arch == "aarch64"
    with pytest.raises(UserError, match="no device profile named 'nope'.*known: .*local-cpu"):
        load_profile("nope")
    with pytest.raises(UserError, match="bad profile name"):
        load_profile("bad name!")
    with pytest.raises(UserError, match="profile file not found"):
        load_profile("../nowhere/x.yaml")


def test_extends_cycle_is_reported(tmp_path, monkeypatch):
    write(tmp_path, "a", "extends: b\n" + MINIMAL)
    write(tmp_path, "b", "extends: a\n")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(UserError, match="cycle"):
        load_profile("a")


def test_evaluate_constraints_pass_fail_and_not_measured():
    p = DeviceProfile.model_validate({
        "name": "t", "arch": "x86_64", "backend": "openvino",
        "constraints": ["latency_p90_ms <= 8", "accuracy_drop_pct <= 1.5", {"metric": "energy_mj", "limit": 5},
                        "model_size_mb >= 0.5", "peak_memory_mb <= 100"],
    })
    res = evaluate_constraints(p, {"latency_p90_ms": 7.99, "accuracy_drop_pct": 2.0, "model_size_mb": 0.4,
                                   "peak_memory_mb": float("nan")})
    got = {r.metric: (r.passed, r.measured, r.verdict) for r in res}
    assert got["latency_p90_ms"] == (True, 7.99, "pass")
    assert got["accuracy_drop_pct"] == (False, 2.0, "FAIL")
    assert got["energy_mj"] == (None, None, "not measured")  # never a silent pass
    assert got["model_size_mb"] == (False, 0.4, "FAIL")  # the >= direction
    assert got["peak_memory_mb"][0] is None
    assert all(r.note == "not measured" for r in res if r.passed is None)


def test_run_bench_args_are_understood_by_the_board_entry_point():
    p = load_profile("raspberry-pi-5")
    args = p.run_bench_args(artifact="artifact/m.onnx", out="results/result.json", data="data/e v a l.npz",
                            overrides={"min_duration_s": 0.5, "batch_sizes": [1, 4]})
    ns = build_parser().parse_args(args)
    assert ns.backend == "onnxruntime" and ns.threads == 4 and ns.precision == "fp32"
    assert ns.batch_sizes == "1,4" and ns.min_duration_s == 0.5 and ns.min_iters == p.bench.min_iters
    assert ns.providers == "CPUExecutionProvider" and ns.input_shape == ["1x3x32x32"]
    assert ns.data == "data/e v a l.npz" and ns.eval_batch == 1 and ns.power == "off"


def test_artifact_must_suit_the_backend():
    load_profile("local-cpu-openvino").check_artifact("m.xml")
    load_profile("local-cpu-ort").check_artifact("m.onnx")
    with pytest.raises(UserError, match="onnxruntime, which takes .onnx/.ort files, not 'm.xml'"):
        load_profile("local-cpu-ort").check_artifact("m.xml")
    load_profile("jetson-orin-nano").check_artifact("m.onnx")  # the engine is built on the board
    with pytest.raises(UserError, match="tensorrt, which takes .engine/.plan/.trt/.onnx files, not 'm.xml'"):
        load_profile("jetson-orin-nano").check_artifact("m.xml")


def test_genai_backend_is_for_causal_lm_profiles_only(tmp_path):
    """onnxruntime-genai is an LM-only entry of the backend registry: a causal-lm profile may name it
    (fp32/int8/int4, artifact = a folder with genai_config.json); an image profile gets one line."""
    g = load_profile("local-cpu-genai-lm")
    assert (g.task, g.backend, g.precision, g.threads) == ("causal-lm", "onnxruntime-genai", "fp32", 2)
    assert {c.metric for c in g.constraints} == {c.metric for c in load_profile("local-cpu-ort-lm").constraints}
    for prec in ("int8", "int4"):
        body = f"name: g-{prec}\narch: aarch64\ntask: causal-lm\nbackend: onnxruntime-genai\nprecision: {prec}\n"
        assert load_profile(write(tmp_path, f"g-{prec}", body)).precision == prec
    with pytest.raises(UserError, match="precision fp16 is not available on onnxruntime-genai") as e:
        load_profile(write(tmp_path, "g16", "name: g16\narch: x86_64\ntask: causal-lm\nbackend: onnxruntime-genai\n"
                                             "precision: fp16\n"))
    with pytest.raises(UserError, match="backend onnxruntime-genai runs causal-lm only; this profile is task "
                                        "image-classification") as e:
        load_profile(write(tmp_path, "img", "name: img\narch: x86_64\nbackend: onnxruntime-genai\n"))
    assert "\n" not in str(e.value)
    # the artifact is a folder holding genai_config.json
    (tmp_path / "genai").mkdir()
    with pytest.raises(UserError, match="takes a folder holding genai_config.json"):
        g.check_artifact(tmp_path / "genai")
    (tmp_path / "genai" / "genai_config.json").write_text("{}")
    g.check_artifact(tmp_path / "genai")
    # and the image compile step refuses it in one line
    from exporters.compile import check_request

    with pytest.raises(UserError, match="runs decoder LMs only"):
        check_request("onnxruntime-genai", "fp32")
