"""Model registry: every model is a ``backbone`` (features, ``out_features``) plus a ``head``.

Modelled on timm's ``register_model``/``create_model`` and torchvision's ``get_model``::

    model = create("resnet18", num_classes=10, in_channels=1)
    logits = model(x); feats = model.backbone(x)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What a caller needs to feed a model: input size and normalisation (per backbone)."""

    name: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_in_channels: int
    builder: Callable[..., "TransferModel"]


_REGISTRY: dict[str, ModelSpec] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are not on local disk (we never download)."""


class TransferModel(nn.Module):
    """``backbone`` maps images to a flat feature vector of size ``out_features``; ``head`` classifies."""

    def __init__(self, backbone: nn.Module, out_features: int, num_classes: int, arch: str):
        super().__init__()
        self.backbone = backbone
        self.out_features = out_features
        self.arch = arch
        self.head = nn.Linear(out_features, num_classes)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def reset_head(self, num_classes: int) -> nn.Linear:
        """Replace the head with a freshly initialised ``Linear(out_features, num_classes)``."""
        ref = next(self.backbone.parameters())
        self.head = nn.Linear(self.out_features, num_classes).to(device=ref.device, dtype=ref.dtype)
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def register_model(name: str, *, input_size: int, mean, std, in_channels: int):
    """Decorator adding a builder ``fn(num_classes, in_channels, weights) -> TransferModel``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, input_size, tuple(mean), tuple(std), in_channels, fn)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def create(name: str, num_classes: int, in_channels: int | None = None, weights: str | None = None) -> TransferModel:
    """Build a registered model.

    Args:
        name: registry name (see :func:`list_models`).
        num_classes: size of the new head.
        in_channels: input channels; defaults to the backbone's own (3 for ImageNet nets).
        weights: ``None`` (random init), a torchvision weights name such as ``"IMAGENET1K_V1"``
            (loaded only from the local torch hub cache), or a path to a state_dict file.
    """
    spec = get_spec(name)
    model = spec.builder(num_classes=num_classes, in_channels=in_channels or spec.default_in_channels, weights=weights)
    model.arch = name
    return model


# --------------------------------------------------------------------------- compact CNN
def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _small_cnn(width: int, num_classes: int, in_channels: int, weights: str | None) -> TransferModel:
    w = width
    backbone = nn.Sequential(
        _conv_block(in_channels, w), _conv_block(w, 2 * w), _conv_block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    model = TransferModel(backbone, 4 * w, num_classes, "smallcnn")
    if weights is not None:
        load_weights_file(model, weights)
    return model


@register_model("smallcnn", input_size=32, mean=(0.5,), std=(0.5,), in_channels=1)
def smallcnn(num_classes: int, in_channels: int = 1, weights: str | None = None) -> TransferModel:
    """Compact 6-conv VGG-style net (~0.29 M params) that trains fast on 2 CPU cores at 32x32."""
    return _small_cnn(32, num_classes, in_channels, weights)


@register_model("tinycnn", input_size=32, mean=(0.5,), std=(0.5,), in_channels=1)
def tinycnn(num_classes: int, in_channels: int = 1, weights: str | None = None) -> TransferModel:
    """Quarter-size sibling of ``smallcnn``: the default distillation student."""
    return _small_cnn(16, num_classes, in_channels, weights)


# --------------------------------------------------------------------------- torchvision
def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict saved by this project (``weights_only=True``; never unpickles code)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(
            f"weights file {p} does not exist. Pass an existing state_dict file (e.g. the pipeline's "
            f"models/source.pt) or weights=None for random initialisation."
        )
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    load_transfer_state(model, state)


def from_state(arch: str, state: dict, in_channels: int | None = None) -> TransferModel:
    """A ``arch`` model holding ``state`` (a :class:`TransferModel` ``state_dict``), its head sized from the state."""
    model = create(arch, int(state["head.weight"].shape[0]), in_channels=in_channels)
    load_transfer_state(model, state)
    return model


def load_transfer_state(model: "TransferModel", state: dict) -> list[str]:
    """Load ``state`` into ``model``; a head of another shape is skipped (it is task-specific).

    Returns the names of skipped keys. The backbone must match exactly.
    """
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k.startswith("head.") and k in own and own[k].shape != v.shape]
    kept = {k: v for k, v in state.items() if k not in skipped}
    bad = [k for k, v in kept.items() if k not in own or own[k].shape != v.shape]
    bad += [k for k in own if k not in kept and not k.startswith("head.")]
    if bad:
        raise ValueError(
            f"weights do not fit a {getattr(model, 'arch', type(model).__name__)} backbone "
            f"(mismatched keys: {', '.join(bad[:5])}...). Use weights saved from the same architecture."
        )
    model.load_state_dict(kept, strict=False)
    return skipped


def _torchvision_state(arch: str, weights: str) -> dict:
    """Resolve ``weights`` for a torchvision ``arch`` from local disk only."""
    from torchvision.models import get_model_weights

    p = Path(weights)
    if p.suffix in {".pt", ".pth"} or p.exists():
        if not p.is_file():
            raise WeightsNotFoundError(f"weights file {p} for {arch} does not exist; check the path.")
        return torch.load(p, map_location="cpu", weights_only=True)
    enum = get_model_weights(arch)
    key = weights.split(".")[-1].upper()
    if key == "DEFAULT":
        w = enum.DEFAULT
    elif key in enum.__members__:
        w = enum[key]
    else:
        raise ValueError(f"unknown weights {weights!r} for {arch}; choose one of: {', '.join(enum.__members__)}")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if not cache.is_file():
        raise WeightsNotFoundError(
            f"{arch} weights {w} are not in the local torch cache: expected {cache}. This pipeline never "
            f"downloads at run time. Copy the file there (it comes from {w.url}), set TORCH_HOME to a "
            f"directory that has hub/checkpoints/{cache.name}, or pass a local file path as weights."
        )
    return torch.load(cache, map_location="cpu", weights_only=True)


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Return a copy of ``conv`` taking ``in_channels`` inputs; pretrained filters are channel-averaged."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        mean_w = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean_w.repeat(1, in_channels, 1, 1) * (3.0 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _tv_build(arch: str, in_channels: int, weights: str | None) -> nn.Module:
    from torchvision import models as tvm

    net = tvm.get_model(arch, weights=None)
    if weights is not None:
        net.load_state_dict(_torchvision_state(arch, weights))
    return net


def _wrap(num_classes: int, backbone: nn.Module, out_features: int, arch: str) -> TransferModel:
    return TransferModel(backbone, out_features, num_classes, arch)


@register_model("resnet18", input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_channels=3)
def resnet18(num_classes: int, in_channels: int = 3, weights: str | None = None) -> TransferModel:
    return _resnet("resnet18", num_classes, in_channels, weights)


@register_model("resnet50", input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_channels=3)
def resnet50(num_classes: int, in_channels: int = 3, weights: str | None = None) -> TransferModel:
    return _resnet("resnet50", num_classes, in_channels, weights)


def _resnet(arch: str, num_classes: int, in_channels: int, weights: str | None) -> TransferModel:
    net = _tv_build(arch, in_channels, weights)
    net.conv1 = _adapt_first_conv(net.conv1, in_channels)
    out = net.fc.in_features
    net.fc = nn.Identity()  # a ResNet has no `.features`: the backbone is the whole net minus `fc`
    return _wrap(num_classes, net, out, arch)


@register_model("mobilenet_v3_small", input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_channels=3)
def mobilenet_v3_small(num_classes: int, in_channels: int = 3, weights: str | None = None) -> TransferModel:
    net = _tv_build("mobilenet_v3_small", in_channels, weights)
    net.features[0][0] = _adapt_first_conv(net.features[0][0], in_channels)
    out = net.classifier[-1].in_features
    net.classifier[-1] = nn.Identity()  # keep the pretrained 576->1024 projection in the backbone
    return _wrap(num_classes, net, out, "mobilenet_v3_small")


@register_model("efficientnet_b0", input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, in_channels=3)
def efficientnet_b0(num_classes: int, in_channels: int = 3, weights: str | None = None) -> TransferModel:
    net = _tv_build("efficientnet_b0", in_channels, weights)
    net.features[0][0] = _adapt_first_conv(net.features[0][0], in_channels)
    out = net.classifier[-1].in_features
    net.classifier[-1] = nn.Identity()
    return _wrap(num_classes, net, out, "efficientnet_b0")


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
