"""The ``sglp-edge run`` config schema (YAML -> pydantic), with defaults sized by the task.

Fields left out of the YAML (``None`` here) take the task's defaults (:mod:`sglp_edge.tasks`):
an image classifier calibrates on 4 batches of 128 images and fine-tunes at batch 128; a causal LM
on 8 batches of 2 sequences x 128 tokens, fine-tunes 4 sequences per step with AdamW for a few
minutes, and caps its validation set. After the defaults are filled, the task checks the config
cheaply (unknown task, a batch that cannot fit in this machine's memory) before any heavy work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from benchmarks.board.errors import UserError
from sglp_edge.budget.decode_search import check_auto_config
from sglp_edge.profiles.schema import BenchOverrides
from sglp_edge.tasks import get_task, infer_task
from sglp_edge.validate import check_file, check_host, check_path, check_threads, field_check


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PruneSection(_Strict):
    keep: Optional[Union[int, str]] = None  # units to keep, or "auto": the fewest removals meeting a latency budget
    # keep: auto -- the p90 budget on the first device (default: its profile's latency_p90_ms limit),
    # the fraction kept in reserve below it for the prediction, and the measured rounds allowed
    latency_budget_ms: Optional[float] = Field(None, gt=0)
    latency_margin: float = Field(0.05, ge=0, lt=0.9)
    latency_rounds: int = Field(3, ge=1, le=10)
    # keep: auto for a causal LM (sglp_edge.budget.decode_search) -- decode tokens/s and/or TTFT on the
    # first device (default: its profile's decode_tokens_per_s / ttft_ms limits); margin and rounds as above
    decode_budget_tps: Optional[float] = Field(None, gt=0)
    ttft_budget_ms: Optional[float] = Field(None, gt=0)
    # ... searched at these precisions with the layers (default: the profile's and every lower one it builds)
    decode_precisions: Optional[list[str]] = None
    target_macs: Optional[float] = Field(None, gt=0, lt=1)
    method: Literal["sglp", "random", "drop_last", "block_influence", "angular", "sleb"] = "sglp"
    k: Optional[int] = Field(None, ge=1)
    protocol: Literal["auto", "natural", "reference", "loss", "healed"] = "auto"
    calib_batches: Optional[int] = Field(None, ge=1)  # task default: 4 (images), 8 (LM)
    grad_batches: int = Field(1, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)  # images per batch, or SEQUENCES per batch for an LM
    seq_len: Optional[int] = Field(None, ge=1)  # LM: tokens per calibration sequence
    eval_budget: int = Field(80, ge=0)
    k_budget: Literal["raise", "search"] = "raise"
    allocation: Literal["auto", "proportional", "redundancy"] = "auto"
    heal: Literal["none", "linear"] = "none"

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"keep is a number of units (>= 1) or auto, got {v!r}")

    @model_validator(mode="after")
    def _one_target(self) -> "PruneSection":
        budgets = [k for k in ("latency_budget_ms", "decode_budget_tps", "ttft_budget_ms") if getattr(self, k) is not None]
        if budgets and self.keep is None and self.target_macs is None:
            self.keep = "auto"
        if budgets and self.keep != "auto":
            raise ValueError(f"prune.{budgets[0]} goes with prune.keep: auto (not a fixed keep or target_macs)")
        if self.decode_precisions is not None and self.keep != "auto":
            raise ValueError("prune.decode_precisions goes with a decode budget (prune.keep: auto)")
        if (self.keep is None) == (self.target_macs is None):
            raise ValueError("give exactly one of prune.keep or prune.target_macs")
        return self


class FinetuneSection(_Strict):
    enabled: bool = True
    epochs: Optional[float] = Field(None, gt=0)
    steps: Optional[int] = Field(None, gt=0)
    minutes: Optional[float] = Field(None, gt=0)
    batch_size: Optional[int] = Field(None, ge=1)  # images, or sequences of text.block_size tokens
    lr: Optional[float] = Field(None, gt=0)
    optimizer: Optional[Literal["sgd", "adamw"]] = None
    weight_decay: Optional[float] = Field(None, ge=0)
    val_samples: Optional[int] = Field(None, ge=1)  # cap on validation items (LM default: 16 blocks)
    test_samples: Optional[int] = Field(None, ge=1)  # cap on the held-out items scored once at the end (LM: 64)
    alpha: float = Field(0.9, ge=0, le=1)
    temperature: float = Field(4.0, gt=0)
    feature_kd: float = Field(0.0, ge=0)


class ExportSection(_Strict):
    opset: Optional[int] = None
    simplify: Literal["onnxslim", "onnxsim", "none"] = "onnxslim"


class EvalSection(_Strict):
    samples: Optional[int] = Field(None, ge=1)  # held-out images (image task) or held-out text blocks (LM perplexity)
    calib_samples: int = Field(300, ge=1)  # training samples for INT8 calibration (images)
    prompt_tokens: int = Field(128, ge=1)  # LM: TTFT prompt (llama-bench pp128)
    gen_tokens: int = Field(128, ge=1)  # LM: decode tokens timed (tg128)
    greedy_prompts: int = Field(8, ge=1)  # LM: greedy agreement prompts ...
    greedy_tokens: int = Field(32, ge=1)  # ... of this many generated tokens each


class TextSection(_Strict):
    block_size: int = Field(128, ge=2)  # tokens per block (calibration, fine-tune, perplexity)
    max_tokens: Optional[int] = Field(400_000, ge=1)  # cap on tokens per split (tokenising the whole corpus is slow)


class BoardSection(_Strict):
    device: str
    host: Optional[str] = None
    emulate: Optional[Literal["qemu-aarch64"]] = None  # the emulated ARM board (sglp_edge.targets)
    port: Optional[int] = Field(None, ge=1, le=65535)
    identity: Optional[str] = None
    known_hosts: Optional[str] = None
    remote_python: Optional[str] = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: Optional[str]) -> Optional[str]:
        return field_check(check_host, "host", v)


class RunConfig(_Strict):
    name: str = "run"
    task: Optional[str] = None  # image-classification | causal-lm; default: from the data (text -> causal-lm)
    model: str = "default"
    data: str = "fashion-mnist"
    data_root: Optional[str] = None
    units: Optional[str] = None  # layer units by module path globs, for models sglp-edge does not know
    trust_builder: bool = False  # run a checkpoint's builder file whose sha256 no longer matches (--trust-builder)
    trust_remote_code: bool = False  # run a Hugging Face folder's own code, auto_map (--trust-remote-code)
    seed: int = 0
    threads: int = 0  # torch CPU threads on the host (0 = default; sglp_edge.validate.MAX_THREADS at most)
    prune: PruneSection
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    export: ExportSection = Field(default_factory=ExportSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    text: TextSection = Field(default_factory=TextSection)
    devices: list[str | BoardSection] = Field(default_factory=lambda: ["local-cpu-ort"], min_length=1)
    bench: dict[str, Any] = Field(default_factory=dict)  # overrides of the profiles' bench settings

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int) -> int:
        return field_check(check_threads, "threads", v)

    @field_validator("bench")
    @classmethod
    def _bench(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            return BenchOverrides.model_validate(v).model_dump(exclude_unset=True)
        except ValidationError as e:  # one line: the bench setting and what is wrong with it
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None

    def boards(self) -> list[BoardSection]:
        return [d if isinstance(d, BoardSection) else BoardSection(device=d) for d in self.devices]


def apply_task_defaults(cfg: RunConfig) -> RunConfig:
    """Fill every field left ``None`` with the task's default, then let the task check the config."""
    task = get_task(cfg.task or infer_task(cfg.data))
    cfg.task = task.name
    for section, values in task.defaults.items():
        sec = getattr(cfg, section)
        for k, v in values.items():
            if getattr(sec, k) is None:
                setattr(sec, k, v)
    if cfg.prune.keep == "auto":  # the budget that fits the task (a p90 for images, decode for causal LMs)
        check_auto_config(task.name, cfg.prune, cfg.boards()[0].device)
    task.check_config(cfg)
    return cfg


def _read_mapping(path: Path) -> dict[str, Any]:
    """A run config's YAML as a mapping: a binary, non-UTF-8 or non-mapping file is one line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file (not UTF-8): give a run config YAML "
                        "(see configs/default.yaml)") from None
    if "\x00" in text:
        raise UserError(f"{path} is a binary file, not a run config YAML (see configs/default.yaml)")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a run config is a mapping of sections (name:, model:, prune:, ...), got a "
                        f"{type(raw).__name__} (see configs/default.yaml)")
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = check_path(path, "run config")
    if not path.exists() and not path.is_dir():
        raise UserError(f"run config {path} does not exist (see configs/default.yaml for an example)")
    raw = _read_mapping(check_file(path, "run config"))
    for k, v in (overrides or {}).items():
        cur = raw
        *head, last = k.split(".")
        for h in head:
            cur = cur.setdefault(h, {})
            if not isinstance(cur, dict):
                raise UserError(f"{path}: {h}: must be a mapping of settings, got {cur!r}")
        cur[last] = v
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        err = max(e.errors(), key=lambda r: len(r["loc"]))  # the deepest: a device's host, not "not a string"
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{path}: {where}: {msg}") from None
    try:
        return apply_task_defaults(cfg)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
