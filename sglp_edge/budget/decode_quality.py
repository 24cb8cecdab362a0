"""``ppl_layers(L)``: a cheap PyTorch ESTIMATE of the perplexity of a causal LM cut to ``L`` decoder
layers without any recovery, for the decode budget's joint choice of depth and precision
(:class:`sglp_edge.budget.decode_search.DecodeSearch`).

SGLP's own choice of which layers to remove is known only after its analysis, which runs after the
budget is settled; the estimate stands in for it with ShortGPT's block influence (``1 - cos`` of
each layer's input and output, :func:`sglp_edge.sglp.baselines.block_influence_scores`, one forward
pass): the model cut to ``L`` layers drops the ``n - L`` least influential ones, and its perplexity
is the next-token loss on a few held-out calibration-side blocks. The removals are nested (the
``L - 1`` cut drops one more layer than the ``L`` cut), and the search keeps the estimate monotone
(more layers are never predicted worse). It ranks candidates; it is not the run's perplexity, which
follows SGLP's pick and the fine-tune.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sglp_edge.sglp.baselines import block_influence_scores, calibration_loss


class LayerPerplexity:
    """``ppl(L)`` of ``model`` cut to ``L`` layers (least block influence dropped first), cached per ``L``."""

    def __init__(self, model: torch.nn.Module, adapter: Any, blocks: torch.Tensor) -> None:
        self.model, self.adapter, self.blocks = model, adapter, blocks
        units = adapter.units(model)
        self.n_layers = len(units)
        scores = block_influence_scores(adapter, model, units, [blocks])
        rank = sorted(range(len(units)), key=lambda i: (scores.get(units[i].name, math.inf), i))
        self.drop_order = [units[i].name for i in rank]
        self.values: dict[int, float] = {}

    def __call__(self, layers: int) -> float:
        if layers not in self.values:
            drop = self.drop_order[: self.n_layers - layers]
            net = self.adapter.remove(self.model, drop) if drop else self.model
            self.values[layers] = math.exp(calibration_loss(self.adapter, net, [self.blocks]))
            del net
        return self.values[layers]
