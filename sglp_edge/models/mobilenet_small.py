"""A MobileNetV2-style inverted-residual network sized for Fashion-MNIST (Sandler et al. 2018):
single-channel 28x28 images (the project's loader zero-pads them to 32x32), a stride-2 stem
(32 -> 16), two stride-2 stages (16 -> 8 -> 4) and small widths, so it trains in minutes on a CPU.

Units: the stem (not removable) and every inverted-residual block in forward order. A block is
removable only when it has the identity shortcut (stride 1, in == out channels): removing it
leaves the shapes intact. The first block of each stage (stride or channel change) stays.
Removal is real: the block leaves its ``nn.Sequential`` and the network is re-indexed, so a pruned
checkpoint reloads from the spec plus the removed unit names.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sglp_edge.models.base import AdapterError, ModelAdapter, Unit

#: (expansion t, output channels c, blocks n, first stride s) per stage, as in the MobileNetV2 paper;
#: after the stride-2 stem the feature maps are 16x16 -> 16x16 -> 8x8 -> 8x8 -> 4x4
DEFAULT_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 2, 1),   # 16x16
    (4, 24, 3, 2),   # 8x8
    (4, 32, 4, 1),   # 8x8
    (4, 64, 3, 2),   # 4x4
)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1) -> 3x3 depthwise (stride s) -> 1x1 linear projection;
    identity shortcut when the block keeps the shape."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class SmallMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem: int = 16, last: int = 256,
                 setting: Sequence[Sequence[int]] = DEFAULT_SETTING):
        super().__init__()
        self.num_classes, self.in_channels, self.stem_width, self.last_width = num_classes, in_channels, stem, last
        self.setting = [list(map(int, s)) for s in setting]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = []
        c_in = stem
        for t, c, n, s in self.setting:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenetv2_fmnist(num_classes: int = 10, in_channels: int = 1) -> SmallMobileNetV2:
    return SmallMobileNetV2(num_classes=num_classes, in_channels=in_channels)


class SmallMobileNetV2Adapter(ModelAdapter):
    family = "mobilenetv2_small"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, SmallMobileNetV2)

    def units(self, model: nn.Module) -> list[Unit]:
        units = [Unit("stem", 0, False, "the stem conv cannot be removed")]
        for i, blk in enumerate(model.blocks):
            ok = bool(blk.use_res_connect)
            units.append(Unit(f"blocks.{i}", len(units), ok,
                              "" if ok else "block without an identity shortcut (stride or channel change)"))
        return units

    def spec(self, model: nn.Module) -> dict[str, Any]:
        return {"family": self.family, "num_classes": model.num_classes, "in_channels": model.in_channels,
                "stem": model.stem_width, "last": model.last_width, "setting": model.setting}

    def build(self, spec: dict[str, Any]) -> nn.Module:
        setting = spec.get("setting", DEFAULT_SETTING)
        if not all(len(s) == 4 for s in setting):
            raise AdapterError("mobilenetv2_small spec: 'setting' must be a list of [t, c, n, s] stages")
        return SmallMobileNetV2(int(spec.get("num_classes", 10)), int(spec.get("in_channels", 1)),
                                int(spec.get("stem", 16)), int(spec.get("last", 256)), setting)
