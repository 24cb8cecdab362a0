"""CIFAR-style ResNet-20/32/44/56/110 (He et al. 2016, option-A identity shortcuts).

ResNet-56: 0.853 M params, 125.5 M MACs at 32x32 (matches the SGLP reference). Units: the stem
(conv1+bn1+relu) plus every BasicBlock; the first block of layer2 and layer3 (stride 2, channel
doubling) and the stem cannot be removed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sglp_edge.models.base import AdapterError, ModelAdapter, Unit

DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Stem(nn.Sequential):
    def __init__(self, in_ch: int = 3, planes: int = 16):
        super().__init__(nn.Conv2d(in_ch, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth not in DEPTHS:
            raise AdapterError(f"CIFAR ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        n = DEPTHS[depth]
        self.depth, self.num_classes, self.in_channels = depth, num_classes, in_channels
        self.stem = Stem(in_channels, 16)
        self.layer1 = self._make(16, 16, n, 1)
        self.layer2 = self._make(16, 32, n, 2)
        self.layer3 = self._make(32, 64, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int = 56, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(depth, num_classes, in_channels)


class CifarResNetAdapter(ModelAdapter):
    family = "cifar_resnet"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, CifarResNet)

    def units(self, model: nn.Module) -> list[Unit]:
        units = [Unit("stem", 0, False, "the stem conv cannot be removed")]
        for lname in ("layer1", "layer2", "layer3"):
            for i, blk in enumerate(getattr(model, lname)):
                shape_change = not isinstance(blk.shortcut, nn.Identity)
                units.append(
                    Unit(f"{lname}.{i}", len(units), not shape_change,
                         "stride-2 / channel-changing block: removing it would break the shapes" if shape_change else "")
                )
        return units

    def spec(self, model: nn.Module) -> dict[str, Any]:
        return {"family": self.family, "depth": model.depth, "num_classes": model.num_classes,
                "in_channels": model.in_channels}

    def build(self, spec: dict[str, Any]) -> nn.Module:
        return CifarResNet(int(spec["depth"]), int(spec.get("num_classes", 10)), int(spec.get("in_channels", 3)))
