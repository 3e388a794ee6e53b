"""Model registry: every model is a ``backbone`` (features, ``out_features``) plus a ``head``.

Modelled on timm's ``register_model``/``create_model`` and torchvision's ``get_model``::

    model = create("resnet18", num_classes=10, in_channels=1)
    logits = model(x); feats = model.backbone(x)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What a caller needs to feed a model: input size and normalisation (per backbone).

    ``resize_size``: ``None`` resizes an image to ``input_size`` x ``input_size`` (aspect ratio not kept);
    a number resizes its shorter side to that many pixels and centre-crops ``input_size`` (the evaluation
    transform of torchvision's pretrained weights). A run's own variant (another image size, channels,
    the weights' normalisation) is a :func:`dataclasses.replace` of the registered spec.
    """

    name: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_in_channels: int
    builder: Callable[..., TransferModel]
    resize_size: int | None = None
    interpolation: str = "bilinear"


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
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _small_cnn(width: int, num_classes: int, in_channels: int, weights: str | None) -> TransferModel:
    w = width
    backbone = nn.Sequential(
        _conv_block(in_channels, w),
        _conv_block(w, 2 * w),
        _conv_block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
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


def load_transfer_state(model: TransferModel, state: dict) -> list[str]:
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


def _is_file(weights: str) -> bool:
    p = Path(weights)
    return p.suffix in {".pt", ".pth"} or p.exists()


def torchvision_weights(arch: str, weights: str):
    """The torchvision weights enum member ``weights`` names for ``arch`` (``"IMAGENET1K_V1"``,
    ``"DEFAULT"``, ``"ResNet18_Weights.IMAGENET1K_V1"``), or ``None`` when ``weights`` is a file path."""
    from torchvision.models import get_model_weights

    if _is_file(weights):
        return None
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(
            f"{arch} has no torchvision weights; give pretrain.weights as a file saved from a {arch} "
            f"model, or pick a torchvision backbone ({', '.join(sorted(TORCHVISION_ARCHS))})."
        )
    enum = get_model_weights(arch)
    key = weights.split(".")[-1].upper()
    if key == "DEFAULT":
        return enum.DEFAULT
    if key in enum.__members__:
        return enum[key]
    raise ValueError(
        f"unknown weights {weights!r} for {arch}; choose one of: {', '.join(enum.__members__)}, "
        f"or give the path of a weights file"
    )


def weights_preprocessing(arch: str, weights: str | None) -> dict | None:
    """How the images were prepared when torchvision's ``weights`` were trained: ``{"crop_size", "resize_size",
    "mean", "std", "interpolation"}`` from the weights' own ``transforms()`` (ImageNet weights: resize to 256,
    centre-crop 224, ImageNet mean/std). ``None`` when ``weights`` is ``None`` or a file (nothing recorded)."""
    w = torchvision_weights(arch, weights) if weights else None
    if w is None:
        return None
    t = w.transforms()
    return {
        "crop_size": int(t.crop_size[0]),
        "resize_size": int(t.resize_size[0]),
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "interpolation": t.interpolation.value,
    }


def torchvision_cache_path(w) -> Path:
    """Where torchvision keeps the file of weights ``w``: ``$TORCH_HOME/hub/checkpoints/<file name of its URL>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name


def _torchvision_state(arch: str, weights: str) -> tuple[dict, Path]:
    """Resolve ``weights`` for a torchvision ``arch`` from local disk only: ``(state_dict, file)``."""
    w = torchvision_weights(arch, weights)
    p = Path(weights) if w is None else torchvision_cache_path(w)
    if w is None and not p.is_file():
        raise WeightsNotFoundError(f"weights file {p} for {arch} does not exist; check the path.")
    if not p.is_file():
        raise WeightsNotFoundError(
            f"{arch} weights {w} are not in the local torch cache: expected {p}. This pipeline never "
            f"downloads at run time. Copy the file there (it comes from {w.url}), set TORCH_HOME to a "
            f"directory that has hub/checkpoints/{p.name}, or pass a local file path as weights."
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors alike: the file is not a state_dict
        raise ValueError(
            f"weights file {p} for {arch} cannot be read as a torch state_dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Replace it with the {arch} weights file"
            + (f" from {w.url}" if w is not None else "")
            + "."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"weights file {p} holds a {type(state).__name__}, not a {arch} state_dict.")
    return state, p


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Return a copy of ``conv`` taking ``in_channels`` inputs; pretrained filters are channel-averaged."""
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
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
        state, path = _torchvision_state(arch, weights)
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [
            f"{k} {tuple(state[k].shape)} (a {arch} has {tuple(own[k].shape)})"
            for k in own
            if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
        ]
        if missing or unexpected or shapes:
            found = "; ".join(
                x
                for x in (
                    f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}" if missing else "",
                    f"{len(unexpected)} unknown key(s), e.g. {', '.join(unexpected[:3])}" if unexpected else "",
                    f"other shapes: {', '.join(shapes[:3])}" if shapes else "",
                )
                if x
            )
            raise ValueError(
                f"weights file {path} does not fit a torchvision {arch} ({found}): it holds another "
                f"architecture or a changed one. Put the {arch} weights file there (torchvision's own, e.g. "
                f"{_weights_url(arch)}), or point pretrain.weights at weights saved from a {arch}."
            )
        net.load_state_dict(state)
    return net


def _weights_url(arch: str) -> str:
    from torchvision.models import get_model_weights

    return get_model_weights(arch).DEFAULT.url


TORCHVISION_ARCHS = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0")


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
