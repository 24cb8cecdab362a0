"""Adapters for torchvision families: ResNet, VGG-BN, MobileNetV2 / EfficientNet (inverted
residual blocks), ViT. Nothing is downloaded: architectures are built with ``weights=None`` and a
user's state dict is loaded from disk.

Removability rule everywhere: a unit can go only if it preserves its input's shape, i.e. it has a
residual path with no projection (ResNet blocks without ``downsample``, inverted-residual blocks
with ``use_res_connect``), or it is a VGG conv with in == out channels (its BN and ReLU go with
it), or it is a ViT encoder block. Stems, stride/channel-changing blocks and heads are kept.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from benchmarks.board.errors import UserError
from sglp_edge.models.base import ModelAdapter, Unit

_TV_BUILDERS = {
    "resnet": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    "vgg": ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"),
    "inverted_residual": ("mobilenet_v2",) + tuple(f"efficientnet_b{i}" for i in range(8)),
    "vit": ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32"),
}


def build_torchvision(arch: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    import torchvision.models as tvm

    known = sorted(a for group in _TV_BUILDERS.values() for a in group)
    if arch not in known:
        raise UserError(f"torchvision architecture {arch!r} is not supported; choose one of {', '.join(known)}")
    fn = getattr(tvm, arch)
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    model = fn(weights=None, **kw)
    model._sglp_arch = (arch, kw)  # remembered for spec()
    return model


class _TorchvisionAdapter(ModelAdapter):
    def spec(self, model: nn.Module) -> dict[str, Any]:
        arch, kw = getattr(model, "_sglp_arch", (None, None))
        if arch is None:
            raise UserError(f"{self.family}: model was not built by sglp-edge; build it with torchvision:<arch>")
        return {"family": self.family, "arch": arch, "kwargs": kw}

    def build(self, spec: dict[str, Any]) -> nn.Module:
        return build_torchvision(spec["arch"], **spec.get("kwargs", {}))


class ResNetAdapter(_TorchvisionAdapter):
    family = "tv_resnet"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torchvision.models.resnet import ResNet

        return isinstance(model, ResNet)

    def units(self, model: nn.Module) -> list[Unit]:
        units = [Unit("maxpool", 0, False, "the stem (conv1, bn1, relu, maxpool) cannot be removed")]
        for lname in ("layer1", "layer2", "layer3", "layer4"):
            for i, blk in enumerate(getattr(model, lname)):
                ok = blk.downsample is None
                units.append(Unit(f"{lname}.{i}", len(units), ok,
                                  "" if ok else "block with a downsample projection (stride or channel change)"))
        return units


class VGGAdapter(_TorchvisionAdapter):
    """Units are the conv layers of ``features``; a unit's output is taken after its ReLU."""

    family = "tv_vgg"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torchvision.models.vgg import VGG

        return isinstance(model, VGG)

    @staticmethod
    def _convs(model: nn.Module) -> list[int]:
        return [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]

    def units(self, model: nn.Module) -> list[Unit]:
        units = []
        feats = model.features
        for n, i in enumerate(self._convs(model)):
            conv = feats[i]
            ok = conv.in_channels == conv.out_channels and conv.stride == (1, 1) and n > 0
            why = "" if ok else ("the first conv (stem) cannot be removed" if n == 0 else
                                 f"conv changes channels {conv.in_channels}->{conv.out_channels}")
            # the output compared is the ReLU after conv (+BN)
            j = i + 1
            while j < len(feats) and not isinstance(feats[j], nn.ReLU):
                j += 1
            units.append(Unit(f"features.{j}", n, ok, why))
        return units

    def removal_paths(self, model: nn.Module, names) -> list[str]:
        """A VGG conv unit (named by its ReLU) goes together with its BatchNorm and ReLU."""
        paths = []
        for n in names:
            relu = int(n.split(".")[1])
            j = relu
            while not isinstance(model.features[j], nn.Conv2d):
                j -= 1
            paths += [f"features.{k}" for k in range(j, relu + 1)]
        return paths


class InvertedResidualAdapter(_TorchvisionAdapter):
    """MobileNetV2 and EfficientNet: every inverted-residual block is a unit; blocks with a skip
    connection (``use_res_connect``) are removable."""

    family = "tv_inverted_residual"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torchvision.models.efficientnet import EfficientNet
        from torchvision.models.mobilenetv2 import MobileNetV2

        return isinstance(model, (MobileNetV2, EfficientNet))

    def units(self, model: nn.Module) -> list[Unit]:
        units: list[Unit] = []
        for name, m in model.features.named_modules():
            if hasattr(m, "use_res_connect") and name:
                ok = bool(m.use_res_connect)
                units.append(Unit(f"features.{name}", len(units), ok,
                                  "" if ok else "block without a skip connection (stride or channel change)"))
        return units


class ViTAdapter(_TorchvisionAdapter):
    family = "tv_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from torchvision.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def units(self, model: nn.Module) -> list[Unit]:
        return [Unit(f"encoder.layers.{n}", i, True) for i, (n, _) in enumerate(model.encoder.layers.named_children())]


ADAPTERS = (ResNetAdapter, VGGAdapter, InvertedResidualAdapter, ViTAdapter)

