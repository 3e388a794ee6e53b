"""The prepared domains (``<data_dir>/source``, ``<data_dir>/target``: shards, see ``tasks.stages.data``) as
datasets for a backbone."""

from __future__ import annotations

import numpy as np

from tasks.modeling.model_input import augment, input_spec, spec_from_meta
from tasks.project.config import Params
from tasks.project.files import read_json


def load_domain(params: Params, role: str, arch: str, manifest: dict | None = None):
    """(train, test) :class:`ImageDataset` of a materialised domain as ``arch`` is fed in this run
    (:func:`tasks.modeling.model_input.input_spec`: size, channels, crop, normalisation; the role's augmentation).
    With a photo augmentation the training split is decoded on a bigger canvas (:func:`tlcore.transforms.
    train_canvas`) that its transforms crop to the input size; evaluate a subset of it with the test split's
    transform, which takes the centre view."""
    from tlcore import data, transforms

    manifest = manifest or read_json(params.path("data", "manifest.json"))
    spec = input_spec(params, arch, manifest)
    root = params.path("data", role)
    kw = dict(
        resize=spec.resize_size, interpolation=spec.interpolation, memory_bytes=params.data.hold_in_memory_mib * 2**20
    )
    c = spec.default_in_channels
    aug = augment(params, role, manifest)
    # a random resized crop cuts from a bigger canvas of the stored image (transforms.train_canvas); every other
    # profile, and the test split, decode at the model's input size
    tr = data.open_split(root / "train", spec.input_size, c, **kw, canvas=transforms.train_canvas(spec, aug))
    te = data.open_split(root / "test", spec.input_size, c, **kw)
    tr.transform = transforms.build_transform(spec, train=True, augment=aug)
    te.transform = transforms.build_transform(spec, train=False)  # also what a subset of tr is evaluated with
    return tr, te


def split_as_trained(split_dir, meta: dict, max_images: int | None = None, seed: int = 0):
    """A prepared split (test images, no augmentation) as the checkpoint with ``meta`` was trained to see it:
    its recorded size, resize, crop, interpolation, channels and normalisation
    (:func:`tasks.modeling.model_input.spec_from_meta`), whatever this run's params say. How a model made by
    another run (the champion) is measured as it was trained. ``max_images``: a seeded sample, in split order."""
    from tlcore import data, transforms

    spec = spec_from_meta(meta)
    ds = data.open_split(
        split_dir,
        spec.input_size,
        meta["in_channels"],
        resize=spec.resize_size,
        interpolation=spec.interpolation,
        max_images=max_images,
        seed=seed,
    )
    ds.transform = transforms.build_transform(spec, train=False)
    return ds


VALIDATOR_IMAGES = 2000  # target pool images a label-free score reads


def pool_sample(indices, seed: int) -> np.ndarray:
    """Up to :data:`VALIDATOR_IMAGES` of ``indices`` drawn at random with ``seed``, in order: a split is ordered
    class by class, so its first images would be one class."""
    return np.sort(np.random.default_rng(seed).permutation(indices)[:VALIDATOR_IMAGES])
