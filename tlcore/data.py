"""ImageFolder data: validation with clear errors, in-memory loading, transforms, label budgets.

Trees look like ``root/{train,test}/<class_name>/*.png``. Images are decoded once into a
uint8 tensor at the model's input size, so small-image training is not bound by PNG decoding.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .images import IMG_EXTENSIONS, ImageDecodeError, decode_image, is_grey, show_path
from .models import ModelSpec
from .shards import ShardImages

log = logging.getLogger(__name__)
SPLITS = ("train", "test")


class DataValidationError(ValueError):
    """An ImageFolder tree is not usable; the message names the files and the fix."""


@dataclass
class FolderReport:
    """What :func:`validate_imagefolder` found for one split."""

    classes: list[str]
    files: list[tuple[Path, int]]
    skipped: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # files without an image extension
    colour: int = 0  # images whose channels differ somewhere (the others are grey, whatever their file mode)

    @property
    def counts(self) -> dict[str, int]:
        c = {k: 0 for k in self.classes}
        for _, y in self.files:
            c[self.classes[y]] += 1
        return c


def _list(paths: list, n: int = 5) -> str:
    shown = ", ".join(p if isinstance(p, str) else show_path(p) for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _walk_class(cdir: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) below one class folder, nested folders included, hidden names skipped."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(cdir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith("."):
                p = Path(dirpath, f)
                (images if p.suffix.lower() in IMG_EXTENSIONS else others).append(p)
    return sorted(images), sorted(others)


def list_split(split_dir: Path, classes: list[str] | None = None) -> FolderReport:
    """The images of one split folder, by class, without decoding them; :class:`DataValidationError` when the
    folder or its classes are not usable.

    Images are the files with an image extension (torchvision ``ImageFolder``'s list) anywhere below a
    class folder, nested folders included; hidden files and folders are skipped, and other files
    (``notes.txt``, ``Thumbs.db``) are ignored and counted (``FolderReport.ignored``).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataValidationError(
            f"{show_path(split_dir)} does not exist. An ImageFolder root needs train/ and test/ folders, each with "
            f"one sub-folder per class holding its images (e.g. {show_path(split_dir)}/cat/001.png)."
        )
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataValidationError(
            f"{show_path(split_dir)} has no class folders; put each class's images in "
            f"{show_path(split_dir)}/<class_name>/."
        )
    classes = classes or found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataValidationError(
            f"{show_path(split_dir)} has classes that train/ does not: {_list(extra, 20)}. A model cannot learn a "
            f"class it never sees; add training images for them under train/<class>/ or remove them from "
            f"{show_path(split_dir)}."
        )
    files, ignored = [], []
    for y, name in enumerate(classes):
        cdir = split_dir / name
        imgs, others = _walk_class(cdir) if cdir.is_dir() else ([], [])
        ignored += others
        files += [(p, y) for p in imgs]
    if ignored:
        log.info(
            "ignored %d file(s) without an image extension in %s: %s",
            len(ignored),
            show_path(split_dir),
            _list(ignored),
        )
    return FolderReport(classes, files, [], ignored, 0)


def check_decoded(
    split_dir: Path, report: FolderReport, corrupt: list[tuple[Path, str]], skip_corrupt: bool = False
) -> FolderReport:
    """``report`` with the files that did not decode (``corrupt``: ``(path, why)``) left out; raises
    :class:`DataValidationError` for them unless ``skip_corrupt``, and for a training class left with no image."""
    split_dir, bad = Path(split_dir), {p for p, _ in corrupt}
    files = [(p, y) for p, y in report.files if p not in bad]
    held = {y for _, y in files}
    empty = [split_dir / c for y, c in enumerate(report.classes) if y not in held] if split_dir.name == "train" else []
    if corrupt and not skip_corrupt:
        raise DataValidationError(
            f"{len(corrupt)} image(s) in {show_path(split_dir)} are corrupt or unreadable: "
            f"{_list([why for _, why in corrupt], 3)}. Delete or re-export them, or set data.skip_corrupt: true "
            f"to skip them (the count is logged)."
        )
    if corrupt:
        log.warning(
            "skipped %d corrupt image(s) in %s: %s",
            len(corrupt),
            show_path(split_dir),
            _list([why for _, why in corrupt], 3),
        )
    if empty:
        raise DataValidationError(
            f"class folder(s) with no readable images: {_list(empty)}. Add images or delete the empty folder(s)."
        )
    return FolderReport(report.classes, files, [p for p, _ in corrupt], report.ignored, report.colour)


def validate_split(split_dir: Path, skip_corrupt: bool = False, classes: list[str] | None = None) -> FolderReport:
    """Check one split folder (:func:`list_split`) and decode each image with :func:`decode_image`: one that does
    not decode stops the run, or is skipped with ``skip_corrupt``; a training class with no readable image stops
    it. Raises :class:`DataValidationError` on the first kind of problem."""
    rep, corrupt = list_split(split_dir, classes), []
    for p, _ in rep.files:
        try:
            rep.colour += not is_grey(decode_image(p))
        except ImageDecodeError as e:
            corrupt.append((p, str(e)))
    return check_decoded(split_dir, rep, corrupt, skip_corrupt)


def validate_imagefolder(root: str | Path, skip_corrupt: bool = False) -> dict[str, FolderReport]:
    """Validate ``root/train`` and ``root/test``; the test classes must be a subset of train's."""
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(
            f"data root {show_path(root)} does not exist; point data.source/data.target at an "
            f"ImageFolder root or an embedded dataset name."
        )
    train = validate_split(root / "train", skip_corrupt)
    test = validate_split(root / "test", skip_corrupt, classes=train.classes)
    return {"train": train, "test": test}


class ImageDataset(Dataset):
    """Images ``(N, C, H, W)`` uint8 with int labels; ``transform`` maps uint8 -> float. The images are a tensor
    in memory, or a prepared split's :class:`tlcore.shards.ShardImages`, decoded as they are read (the same
    pixels, memory flat in ``N``): one dataset, loader and sampler for both.

    ``defer_transform`` (a batch-capable ``transform`` only): items stay uint8 and whoever consumes the
    batches applies ``transform`` after copying them to its device (:func:`device_transform`). Training
    loaders do this (:func:`make_loader`), so the augmentation runs batched on the training device.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: list[str],
        transform=None,
        defer_transform: bool = False,
    ):
        if defer_transform and not getattr(transform, "batched", False):
            raise ValueError(f"defer_transform needs a batch-capable transform (batched = True), got {transform!r}")
        self.images, self.targets, self.classes, self.transform = images, targets.long(), classes, transform
        self.defer_transform = defer_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.defer_transform:
            return x, self.targets[i]
        return (self.transform(x) if self.transform else x.float() / 255), self.targets[i]

    def __getitems__(self, idx: list[int]) -> list:
        """A whole batch at once (the DataLoader calls this): one transform call for a batch-capable
        transform such as :class:`ImageTransform`, else one per image."""
        if self.transform is not None and not getattr(self.transform, "batched", False):
            return [self[i] for i in idx]
        ii = torch.as_tensor(idx, dtype=torch.long)
        x = self.images[ii]
        if not self.defer_transform:
            x = self.transform(x) if self.transform else x.float() / 255
        return list(zip(x.unbind(0), self.targets[ii].unbind(0)))

    def deferred(self) -> ImageDataset:
        """This dataset (sharing its tensors) yielding uint8, its batch-capable transform left to the consumer;
        itself when the transform is missing or works per image only."""
        if self.defer_transform or not getattr(self.transform, "batched", False):
            return self
        return ImageDataset(self.images, self.targets, self.classes, self.transform, defer_transform=True)

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, classes: list[str], transform=None) -> ImageDataset:
        """From ``(N, H, W)`` or ``(N, H, W, C)`` uint8 arrays."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
        return cls(x, torch.from_numpy(np.asarray(labels)), classes, transform)

    @property
    def streamed(self) -> bool:
        """Whether images are decoded as they are read (a prepared split too big to hold), not held in memory."""
        return isinstance(self.images, ShardImages)

    def subset(self, idx, transform="same") -> ImageDataset:
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        same = isinstance(transform, str) and transform == "same"
        images = self.images.take(idx.numpy()) if self.streamed else self.images[idx]
        return ImageDataset(
            images,
            self.targets[idx],
            self.classes,
            self.transform if same else transform,
            defer_transform=self.defer_transform and same,
        )


def load_split(
    split_dir: str | Path,
    size: int,
    channels: int,
    skip_corrupt: bool = False,
    classes: list[str] | None = None,
    max_images: int | None = None,
    seed: int = 0,
    resize: int | None = None,
    interpolation: str = "bilinear",
) -> ImageDataset:
    """Validate and decode one split into an :class:`ImageDataset` at ``size`` x ``size``, ``channels`` 1 (grey)
    or 3 (RGB; a grey image repeats its grey).

    ``max_images``: decode only a seeded random sample of that many files (in folder order). ``resize``: the
    shorter side to this, then a centre crop (:func:`tlcore.images.resize_image`); ``None`` stretches."""
    rep = validate_split(Path(split_dir), skip_corrupt, classes)
    files = rep.files
    if max_images is not None and len(files) > max_images:
        keep = np.sort(np.random.default_rng(seed).permutation(len(files))[:max_images])
        files = [files[i] for i in keep]
    mode = "L" if channels == 1 else "RGB"
    arr = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, (p, _) in enumerate(files):
        arr[i] = decode_image(p, mode, size, resize, interpolation)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images, torch.tensor([y for _, y in files], dtype=torch.long), rep.classes)


def open_split(
    split_dir: str | Path,
    size: int,
    channels: int,
    resize: int | None = None,
    interpolation: str = "bilinear",
    memory_bytes: int = 256 * 2**20,
    max_images: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """A prepared split (:mod:`tlcore.shards`) as an :class:`ImageDataset` at ``size`` x ``size``, ``channels``
    1 (grey) or 3 (RGB), resized as :func:`load_split` does. Decoded into memory once when its pixels take at
    most ``memory_bytes`` (small data trains fastest from memory), else streamed: each image decoded when read,
    by whichever process reads it. The pixels are the same either way. ``max_images``: only a seeded random
    sample of that many (in split order), as :func:`load_split` takes it."""
    images = ShardImages(split_dir, size, channels, resize, interpolation)
    if max_images is not None and len(images) > max_images:
        images = images.take(np.sort(np.random.default_rng(seed).permutation(len(images))[:max_images]))
    classes, targets = images.classes, torch.from_numpy(images.labels())
    held = images[np.arange(len(images))] if len(images) * channels * size * size <= memory_bytes else images
    return ImageDataset(held, targets, classes)


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
    d = torch.tensor([w / 2, h / 2], device=dev)
    inv = torch.linalg.inv_ex(a).inverse  # never singular (zoom > 0, |shear| < 90 degrees); no device sync
    theta = torch.cat([inv * (d[None, None, :] / d[None, :, None]), (-inv @ t[:, :, None]) / d[None, :, None]], 2)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_photo(
    x: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: float,
    brightness: float,
    contrast: float,
    saturation: float,
) -> torch.Tensor:
    """Photo augmentation of a float batch ``(N, C, H, W)`` in [0, 1], independently per image: a random resized
    crop (area ``scale`` of the image, aspect ratio in ``ratio``, resampled back to ``H`` x ``W``), a horizontal
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
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
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
    "none": {},
}


class ImageTransform(torch.nn.Module):
    """uint8 ``(C, H, W)`` or a batch ``(N, C, H, W)`` -> normalised float, with an optional per-image
    random affine (:func:`random_affine`, digits) or photo augmentation (:func:`random_photo`) at train
    time. Batch-capable (``batched = True``), so :class:`ImageDataset` transforms a whole DataLoader batch
    in one call, and it runs on whatever device the batch is on (the engine applies a training loader's
    transform on the training device, see :func:`device_transform`); the random draws come from that
    device's default generator."""

    batched = True

    def __init__(self, mean, std, affine: dict | None = None, photo: dict | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.affine = affine
        self.photo = photo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3
        x = x[None] if single else x
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if self.affine:
            x = random_affine(x, **self.affine)
        if self.photo:
            x = random_photo(x, **self.photo)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x[0] if single else x

    def extra_repr(self) -> str:
        return (
            f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, affine={self.affine}, "
            f"photo={self.photo}"
        )


def build_transform(spec: ModelSpec, train: bool, channels: int | None = None, augment: str = "digits"):
    """Per-backbone transform on uint8 tensors: (train-time) augmentation of profile ``augment`` (a key of
    :data:`AUGMENT`: ``digits``, ``photo`` or ``none``), scale to [0,1], normalise with the spec's mean/std
    (averaged over colour channels for grey input)."""
    if augment not in AUGMENT:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of: {', '.join(AUGMENT)}")
    c = channels or spec.default_in_channels
    mean = spec.mean if len(spec.mean) == c else (sum(spec.mean) / len(spec.mean),) * c
    std = spec.std if len(spec.std) == c else (sum(spec.std) / len(spec.std),) * c
    return ImageTransform(mean, std, **(AUGMENT[augment] if train else {}))


@dataclass
class BudgetSplit:
    """Sorted index arrays into a training set: the one definition of the label budget's parts.

    ``labeled``: the images whose labels train (``labels_per_class`` per class); ``unlabeled``: the
    unlabeled pool, every image outside ``val`` with its label unused (the labeled images included, as in
    FixMatch: with all labels the pool is still the whole split); ``val``: the validation hold-out,
    disjoint from both.
    """

    labeled: np.ndarray
    unlabeled: np.ndarray
    val: np.ndarray


def label_budget_split(targets, labels_per_class: int | None, seed: int, val_per_class: int = 0) -> BudgetSplit:
    """Stratified, seeded split of a training set into labeled / unlabeled pool / validation indices
    (:class:`BudgetSplit`).

    ``labels_per_class=None`` labels everything (after the validation hold-out). Raises
    ``ValueError`` when a class has fewer images than asked for.
    """
    y = np.asarray(targets)
    rng = np.random.default_rng(seed)
    lab, unl, val = [], [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = len(idx) - val_per_class if labels_per_class is None else labels_per_class
        if k + val_per_class > len(idx) or k < 0:
            raise ValueError(
                f"class {c} has {len(idx)} training images, fewer than labels_per_class={labels_per_class} + "
                f"val_per_class={val_per_class}; lower the label budget."
            )
        val.append(idx[:val_per_class])
        lab.append(idx[val_per_class : val_per_class + k])
        unl.append(idx[val_per_class:])
    return BudgetSplit(*(np.sort(np.concatenate(a)).astype(np.int64) for a in (lab, unl, val)))


class ResumableSampler(DistributedSampler):
    """A training sampler whose order depends on ``(seed, epoch)`` alone, and that can start a pass part-way.

    It is torch's ``DistributedSampler`` (a shuffle drawn from ``seed + epoch``; with ``replicas`` > 1
    this rank's shard, the same permutation on every worker) plus :meth:`skip`: the next pass leaves
    out its first ``n`` indices. That is how a resumed run picks each data stream up exactly where the
    checkpoint left it, without loading (and augmenting) the images it skips. Ray's
    ``prepare_data_loader`` keeps it, since it is a ``DistributedSampler``.
    """

    def __init__(self, ds: Dataset, seed: int, replicas: int = 1, rank: int = 0):
        super().__init__(ds, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self._start = 0

    def skip(self, n: int) -> None:
        """Leave out the first ``n`` indices of the next pass (only that one)."""
        self._start = int(n)

    def __iter__(self):
        start, self._start = self._start, 0
        return itertools.islice(super().__iter__(), start, None)


def make_loader(
    ds: Dataset,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int | None = None,
    replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader; training loaders shuffle with a seeded generator and never return empty epochs.

    A training loader shuffles with a :class:`ResumableSampler` (its order a function of ``seed`` and the
    pass number; ``set_epoch`` reshuffles). With ``replicas`` > 1 data-parallel workers, this is worker
    ``rank``'s shard: the training sampler's shard of one shared permutation, an evaluation loader every
    ``replicas``-th item from ``rank`` on, so the shards cover the set exactly once (no padding: sums over
    them are exact). ``num_workers`` loader processes; ``None``: none for images held in memory,
    :func:`decode_workers` for a streamed split (they decode ahead of the consumer). ``pin_memory`` (for a
    CUDA device) makes the engine's ``non_blocking`` copies overlap with compute.

    A training loader over an :class:`ImageDataset` with a batch-capable transform yields uint8 batches and
    leaves the transform (augmentation, normalisation) to its consumer, on its device
    (:func:`device_transform`): the warp runs batched where the model trains, and its random draws stay in
    the training process, so ``num_workers`` loader processes change neither the batches nor a resume. (A
    transform that works per image only stays in the loader; with ``num_workers`` > 0 its random draws come
    from the loader processes, which a resume does not restore.)
    """
    if num_workers is None:  # decode a streamed split in loader processes, ahead of its consumer
        num_workers = decode_workers() if getattr(ds, "streamed", False) else 0
    g = torch.Generator().manual_seed(seed)
    if train and len(ds) < batch_size * replicas:
        # a tiny labeled set (1 label/class) is repeated so every worker's shard fills one batch
        reps = -(-batch_size * replicas // max(1, len(ds)))
        ds = (
            ds.subset(np.tile(np.arange(len(ds)), reps))
            if isinstance(ds, ImageDataset)
            else torch.utils.data.ConcatDataset([ds] * reps)
        )
    sampler = None
    if train:
        ds = ds.deferred() if isinstance(ds, ImageDataset) else ds
        sampler = ResumableSampler(ds, seed, replicas, rank)
    elif replicas > 1:
        idx = np.arange(rank, len(ds), replicas)
        ds = ds.subset(idx) if isinstance(ds, ImageDataset) else torch.utils.data.Subset(ds, idx.tolist())
    # the generator only seeds loader worker processes; without one each new pass would draw from (and so
    # shift) the global RNG that augmentation uses
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        drop_last=train,
        generator=g,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def decode_workers() -> int:
    """Loader processes for a streamed split by default: every CPU of this process's set but one, up to 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus - 1))


def device_transform(loader) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transform a consumer applies to ``loader``'s image batches once they are on its device, or ``None``
    when the loader yields them ready (:meth:`ImageDataset.deferred`)."""
    ds = getattr(loader, "dataset", None)
    return ds.transform if getattr(ds, "defer_transform", False) else None


def batch_to(x: torch.Tensor, device: torch.device | str, loader) -> torch.Tensor:
    """A batch of ``loader``'s images on ``device``, ready for the model: copied (asynchronously from pinned
    memory), then transformed there if the loader left that to its consumer (:func:`device_transform`)."""
    x = x.to(device, non_blocking=True)
    tf = device_transform(loader)
    return tf(x) if tf is not None else x
