"""Augmentation and normalisation of uint8 or float image batches, batched on whatever device they are on.

:func:`build_transform` makes a backbone's :class:`ImageTransform`: scale to [0, 1], an optional train-time
augmentation profile (:data:`AUGMENT`: :func:`random_affine` for digits, :func:`random_photo` for photos),
then the backbone's normalisation.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .models import ModelSpec


def random_affine(
    x: torch.Tensor, degrees: float, translate: float, scale: tuple[float, float], shear: float
) -> torch.Tensor:
    """Apply an independent random affine warp to each image of a float batch ``(N, C, H, W)``.

    Same parameter ranges as ``torchvision.transforms.v2.RandomAffine`` (rotation in
    ``[-degrees, degrees]``, shift up to ``translate`` of the size, zoom in ``scale``, x-shear in
    ``[-shear, shear]`` degrees), but one ``grid_sample`` for the whole batch instead of a Python
    call per image: torchvision draws one set of parameters per call, so a batch would share it.
    """
    n, _, h, w = x.shape
    dev = x.device

    def u(lo, hi):
        return torch.empty(n, device=dev).uniform_(lo, hi)

    ang, sh = torch.deg2rad(u(-degrees, degrees)), torch.deg2rad(u(-shear, shear))
    s = u(*scale)
    cos, sin, tan = torch.cos(ang), torch.sin(ang), torch.tan(sh)
    # forward map in pixel units: rotation @ shear @ zoom, then a shift
    a = (
        torch.stack([torch.stack([cos, cos * tan - sin], 1), torch.stack([sin, sin * tan + cos], 1)], 1)
        * s[:, None, None]
    )
    t = torch.stack([u(-translate, translate) * w, u(-translate, translate) * h], 1)
    # grid_sample wants the inverse map in normalised coords: D^-1 A^-1 D with D = diag(w/2, h/2)
    ratio, half = _half_size(dev, h, w)
    inv = torch.linalg.inv_ex(a).inverse  # never singular (zoom > 0, |shear| < 90 degrees); no device sync
    theta = torch.cat([inv * ratio, (-inv @ t[:, :, None]) / half], 2)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=16)
def _half_size(device: torch.device, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D_j / D_i, D_i)`` as ``(1, 2, 2)`` and ``(1, 2, 1)`` tensors on ``device``, with ``D = (w/2, h/2)``: made once
    per device and size, since a tensor built from host numbers on a GPU waits for the queued work there."""
    d = torch.tensor([w / 2, h / 2], device=device)
    return d[None, None, :] / d[None, :, None], d[None, :, None]


def random_photo(
    x: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: float,
    brightness: float,
    contrast: float,
    saturation: float,
    out_size: int | None = None,
) -> torch.Tensor:
    """Photo augmentation of a float batch ``(N, C, H, W)`` in [0, 1], independently per image: a random resized
    crop (area ``scale`` of the image, aspect ratio in ``ratio``, resampled to ``out_size`` x ``out_size``, or back
    to ``H`` x ``W``; from a canvas bigger than the output a small crop still samples real pixels), a horizontal
    flip with probability ``flip``, and colour jitter (brightness, contrast, saturation factors in
    ``[1 - j, 1 + j]``, in that order, clamped to [0, 1] after each, as ``torchvision.transforms.v2``'s
    ``RandomResizedCrop``, ``RandomHorizontalFlip`` and ``ColorJitter`` without hue).

    One ``grid_sample`` for the crop and flip of the whole batch. Unlike torchvision, a crop that does not fit
    is shrunk to fit rather than redrawn (torchvision retries 10 times, then takes the centre).
    """
    n, c, h, w = x.shape
    dev = x.device

    def u(lo, hi):
        return torch.empty(n, device=dev).uniform_(lo, hi)

    area = u(*scale)
    logr = u(float(np.log(ratio[0])), float(np.log(ratio[1])))
    cw = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)  # crop width, as a fraction of the image width
    ch = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx, cy = (1 - cw) * u(-1, 1), (1 - ch) * u(-1, 1)  # the crop's centre, in grid_sample's [-1, 1] coords
    sign = torch.where(torch.rand(n, device=dev) < flip, -1.0, 1.0)
    zero = torch.zeros(n, device=dev)
    theta = torch.stack([torch.stack([cw * sign, zero, cx], 1), torch.stack([zero, ch, cy], 1)], 1)
    out = [n, c, out_size or h, out_size or w]
    grid = torch.nn.functional.affine_grid(theta, out, align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def factor(j):
        return u(max(0.0, 1 - j), 1 + j)[:, None, None, None]

    x = (x * factor(brightness)).clamp(0, 1)
    grey = _luma(x)
    x = ((x - grey.mean((1, 2, 3), keepdim=True)) * factor(contrast) + grey.mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    if c == 3:
        grey = _luma(x)
        x = ((x - grey) * factor(saturation) + grey).clamp(0, 1)
    return x


def random_colour(x: torch.Tensor, p: float, grid: int) -> torch.Tensor:
    """Domain randomisation of colour and polarity for an RGB batch ``(N, 3, H, W)`` in [0, 1]: with probability
    ``p`` an image becomes ``|texture - grey|``, its grey level blended over a random smooth colour texture (a
    ``grid`` x ``grid`` field of random colours, upsampled), the MNIST-M blend: the ink takes the texture's
    colours inverted, bright on dark patches and dark on bright ones. A grey-source model then has seen the
    colours and both polarities a colour target may have (grey input, one channel, is returned as it is)."""
    n, c, h, w = x.shape
    if c != 3:
        return x
    tex = torch.rand(n, 3, grid, grid, device=x.device)
    tex = torch.nn.functional.interpolate(tex, size=(h, w), mode="bilinear", align_corners=False)
    mixed = (tex - _luma(x)).abs()
    pick = (torch.rand(n, 1, 1, 1, device=x.device) < p).to(x.dtype)
    return pick * mixed + (1 - pick) * x


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Grey level ``(N, 1, H, W)`` of a batch: ITU-R 601 weights for RGB (as torchvision), the channel itself for
    grey."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


# Train-time augmentation profiles (``data.augment``): a mild affine warp for digits (a flip or a colour change
# would make another digit or nothing), crops, flips and colour jitter for photos.
AUGMENT = {
    "digits": {"affine": dict(degrees=12.0, translate=0.1, scale=(0.85, 1.15), shear=8.0)},
    "photo": {
        "photo": dict(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5, brightness=0.4, contrast=0.4, saturation=0.4)
    },
    # digits whose target is in colour (a grey source): the warp, then colour and polarity randomisation
    "digits_colour": {
        "affine": dict(degrees=12.0, translate=0.1, scale=(0.85, 1.15), shear=8.0),
        "colour": dict(p=0.8, grid=4),
    },
    "none": {},
}


class ImageTransform(torch.nn.Module):
    """uint8 ``(C, H, W)`` or a batch ``(N, C, H, W)`` -> normalised float, with an optional per-image
    random affine (:func:`random_affine`, digits) or photo augmentation (:func:`random_photo`) at train
    time. Batch-capable (``batched = True``), so :class:`tlcore.data.ImageDataset` transforms a whole
    DataLoader batch in one call, and it runs on whatever device the batch is on (the engine applies a training
    loader's transform on the training device, see :func:`tlcore.data.device_transform`); the random draws come
    from that device's default generator."""

    batched = True

    def __init__(
        self,
        mean,
        std,
        affine: dict | None = None,
        photo: dict | None = None,
        colour: dict | None = None,
        size: int | None = None,
        crop: float = 1.0,
    ):
        super().__init__()
        # the model's input size: a bigger image (a training canvas, :func:`train_canvas`) is cropped to it at
        # random by the photo augmentation, or else (evaluation) to its centre ``crop`` of a side, then resized
        self.size, self.crop = size, crop
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.affine = affine
        self.photo = photo
        self.colour = colour
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_on_device": {}}  # a copy (a loader process, a Ray worker) makes its own

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({"_on_device": {}, **state})

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation constants on ``device``, copied there once per device (a blocking copy per batch
        would make the host wait for the GPU at every step), again only if ``.to()`` replaced the buffers."""
        hit = self._on_device.get(device)
        if hit is None or hit[0] is not self.mean or hit[1] is not self.std:
            hit = self._on_device[device] = (self.mean, self.std, self.mean.to(device), self.std.to(device))
        return hit[2], hit[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3
        x = x[None] if single else x
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if self.photo:
            x = random_photo(x, **self.photo, out_size=self.size)
        elif self.size is not None and x.shape[-1] != self.size:
            x = centre_view(x, self.size, self.crop)
        if self.affine:
            x = random_affine(x, **self.affine)
        if self.colour:
            x = random_colour(x, **self.colour)
        mean, std = self._mean_std(x.device)
        x = (x - mean) / std
        return x[0] if single else x

    def extra_repr(self) -> str:
        return (
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, affine={self.affine}, "
            f"photo={self.photo}, colour={self.colour}, size={self.size}, crop={self.crop}"
        )


def centre_view(x: torch.Tensor, size: int, crop: float = 1.0) -> torch.Tensor:
    """The evaluation view of a float batch decoded on a bigger square canvas: its centre ``crop`` of a side,
    resized (bilinear, antialiased) to ``size`` x ``size``; the pixels a direct decode at ``size`` gives, up to
    resampling."""
    h = x.shape[-1]
    k = max(1, round(h * crop))
    o = (h - k) // 2
    x = x[..., o : o + k, o : o + k]
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def train_canvas(spec: ModelSpec, augment: str) -> int | None:
    """The side of the square a training split is decoded on when ``augment``'s random resized crop samples it:
    big enough that the smallest crop (``scale[0]`` of the area) still holds ``input_size`` real pixels a side
    (224 and scale 0.35: 379), so crops are cut from the stored image, not upsampled from the model's centre
    crop. ``None`` for a profile without such a crop (the split is decoded at the input size)."""
    photo = AUGMENT[augment].get("photo")
    if not photo:
        return None
    return int(np.ceil(spec.input_size / np.sqrt(photo["scale"][0])))


def augment_profile(role: str, source_grey: bool, target_colour: bool, kind: str = "digits") -> str:
    """The ``auto`` augmentation of domain ``role`` for ``kind`` (``digits`` or ``photo``), decided from the data:
    a grey source for a colour target gets colour and polarity randomisation (``digits_colour``), so that the
    source model meets the target's colours; every other case keeps ``kind``."""
    if kind == "digits" and role == "source" and source_grey and target_colour:
        return "digits_colour"
    return kind


def build_transform(spec: ModelSpec, train: bool, channels: int | None = None, augment: str = "digits"):
    """Per-backbone transform on uint8 tensors: (train-time) augmentation of profile ``augment`` (a key of
    :data:`AUGMENT`: ``digits``, ``photo`` or ``none``), scale to [0,1], normalise with the spec's mean/std
    (averaged over colour channels for grey input). Its output is ``spec.input_size`` square: a bigger input (a
    :func:`train_canvas`) is cropped at random (training) or to the view evaluation decodes (``resize_size``'s
    centre crop)."""
    if augment not in AUGMENT:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of: {', '.join(AUGMENT)}")
    c = channels or spec.default_in_channels
    mean = spec.mean if len(spec.mean) == c else (sum(spec.mean) / len(spec.mean),) * c
    std = spec.std if len(spec.std) == c else (sum(spec.std) / len(spec.std),) * c
    crop = spec.input_size / spec.resize_size if spec.resize_size else 1.0
    return ImageTransform(mean, std, **(AUGMENT[augment] if train else {}), size=spec.input_size, crop=crop)
