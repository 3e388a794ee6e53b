"""Datasets and loaders: in-memory or streamed splits, label budgets, resumable training loaders.

Images are decoded once into a uint8 tensor at the model's input size (:func:`load_split` for an ImageFolder
split, validated by :mod:`tlcore.folders`; :func:`open_split` for a prepared one, :mod:`tlcore.shards`), so
small-image training is not bound by PNG decoding. Training loaders leave the transform
(:mod:`tlcore.transforms`) to their consumer, which applies it batched on its device (:func:`batch_to`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .folders import validate_split
from .images import decode_image
from .shards import ShardImages


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
        transform such as :class:`tlcore.transforms.ImageTransform`, else one per image."""
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
    canvas: int | None = None,
) -> ImageDataset:
    """A prepared split (:mod:`tlcore.shards`) as an :class:`ImageDataset` at ``size`` x ``size``, ``channels``
    1 (grey) or 3 (RGB), resized as :func:`load_split` does. Decoded into memory once when its pixels take at
    most ``memory_bytes`` (small data trains fastest from memory), else streamed: each image decoded when read,
    by whichever process reads it. The pixels are the same either way. ``max_images``: only a seeded random
    sample of that many (in split order), as :func:`load_split` takes it.

    ``canvas`` (a training canvas, :func:`tlcore.transforms.train_canvas`): decode on a square of at most this
    side instead, no bigger than the split's images as stored (their median shorter side): upsampling most of
    them there would add no pixels the random crop does not make itself, only decoding time. ``resize`` (if
    set) follows the side. A side no bigger than ``size`` decodes at ``size``, as without a canvas."""
    images = ShardImages(split_dir, size, channels, resize, interpolation)
    side = min(canvas, images.stored_side() or canvas) if canvas is not None else size
    if side > size:  # else as if there were no canvas: the transform takes a square of the input size as the view
        images = ShardImages(split_dir, side, channels, side if resize else None, interpolation, columns=images.columns)
    if max_images is not None and len(images) > max_images:
        images = images.take(np.sort(np.random.default_rng(seed).permutation(len(images))[:max_images]))
    classes, targets = images.classes, torch.from_numpy(images.labels())
    held = images[np.arange(len(images))] if len(images) * channels * images.size**2 <= memory_bytes else images
    return ImageDataset(held, targets, classes)


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
