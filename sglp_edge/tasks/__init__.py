"""Tasks: what a model is for (docs: architecture.md, seam 1). One file per task.

A task owns what differs between an image classifier, a causal LM that generates with a KV cache,
and (later) an encoder: calibration and fine-tune sizes, the loss (through the model adapter's
``modality``), the export signature, the evaluation data sent to the board, and the quality and
speed metrics reported. The model *adapter* says which units exist and how to remove them; the
task says what the model is for. Names follow Optimum's tasks.

Nothing heavy is imported here: :func:`get_task` imports the one task module it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from benchmarks.board.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from sglp_edge.tasks.base import Task

#: task name -> (module, class)
TASKS = {
    "image-classification": ("sglp_edge.tasks.image_classification", "ImageClassification"),
    "causal-lm": ("sglp_edge.tasks.causal_lm", "CausalLM"),
}
ALIASES = {"text-generation-with-past": "causal-lm", "text-generation": "causal-lm", "lm": "causal-lm",
           "image": "image-classification", "classification": "image-classification"}
PLANNED = {"feature-extraction": "encoders are not in `sglp-edge run` yet (the board-side cosine metrics are "
                                "missing); prune, fine-tune and export them with `sglp-edge prune minilm --data text ...`, "
                                "`sglp-edge finetune` and `sglp-edge export`"}
TEXT_DATA = ("text", "english", "python-docs")


def get_task(name: str) -> "Task":
    key = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key in PLANNED:
        raise UserError(f"task {name!r}: {PLANNED[key]}; use one of {', '.join(TASKS)}")
    if key not in TASKS:
        raise UserError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    mod, cls = TASKS[key]
    return getattr(importlib.import_module(mod), cls)()


def infer_task(data: str) -> str:
    """The task a data set implies when the config names none."""
    return "causal-lm" if str(data).strip().lower() in TEXT_DATA else "image-classification"
