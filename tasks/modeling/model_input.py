"""The pixels a model sees, resolved once from params and the data: image size, channels, resize / crop,
normalisation and train-time augmentation (``data.image_size``, ``data.channels``, ``data.augment``).

- size: ``data.image_size``, or (``auto``) the resolution of the ImageNet weights in ``pretrain.weights``
  (torchvision's own ``weights.transforms()``: 224, after resizing the shorter side to 256), else the
  backbone's registered size (32 for ``smallcnn``, 64 for the ResNets);
- resize / normalisation: with torchvision weights, theirs (resize, centre crop, mean/std; at another
  ``image_size`` the resize scales with it); else the image is stretched to size and normalised as the
  backbone registers;
- channels: ``data.channels``, or (``auto``) the target's (1 when every target image is grey, else 3, as the
  ``data`` stage records in the manifest); the source is decoded in the same channels;
- augmentation: ``data.augment``, or (``auto``) ``digits`` (a mild affine warp; ``digits_colour``, with colour and
  polarity randomisation, for a grey source whose target is in colour) for an embedded dataset and
  ``photo`` (crops, flips, colour jitter) for a user folder, per domain.
"""

from __future__ import annotations

import dataclasses

from tasks.project.config import EMBEDDED, Params, ParamsError


def input_spec(params: Params, arch: str, manifest: dict):
    """The :class:`tlcore.models.ModelSpec` of ``arch`` as this run feeds it (see the module docstring)."""
    from tlcore import models

    weights = params.pretrain.weights if arch == params.pretrain.backbone else None
    channels = params.data.channels
    if channels == "auto":
        channels = manifest["target"].get("channels", models.get_spec(arch).default_in_channels)
    try:
        return weights_spec(arch, weights, params.data.image_size, channels)
    except ValueError as e:
        raise ParamsError(f"pretrain.weights = {weights!r}: {e}") from None


def weights_spec(arch: str, weights: str | None, image_size: int | str = "auto", channels: int | None = None):
    """``arch``'s spec at ``image_size`` (``auto``: the resolution of torchvision ``weights``, else the
    backbone's), with the resize, crop and normalisation those weights were trained with (none for a file or
    no weights), and ``channels`` (``None``: the backbone's)."""
    from tlcore import models

    spec = models.get_spec(arch)
    pre = models.weights_preprocessing(arch, weights)
    size = image_size if image_size != "auto" else pre["crop_size"] if pre else spec.input_size
    spec = dataclasses.replace(spec, input_size=size, default_in_channels=channels or spec.default_in_channels)
    if pre is None:
        return spec
    return dataclasses.replace(
        spec,
        mean=pre["mean"],
        std=pre["std"],
        interpolation=pre["interpolation"],
        resize_size=round(size * pre["resize_size"] / pre["crop_size"]),
    )


def augment(params: Params, role: str, manifest: dict | None = None) -> str:
    """The train-time augmentation profile of domain ``role`` (``source`` / ``target``); for ``auto``, from the data
    (:func:`tlcore.transforms.augment_profile`): ``digits`` for an embedded dataset, ``photo`` for a folder, and
    ``digits_colour`` for a grey embedded source whose target has colour images (the data stage counts them)."""
    from tlcore.transforms import augment_profile

    if params.data.augment != "auto":
        return params.data.augment
    name = params.data.source if role == "source" else params.data.target
    kind = "digits" if name in EMBEDDED else "photo"
    if manifest is None:
        return kind
    colour = {r: manifest[r].get("colour_images", 0) for r in ("source", "target")}
    return augment_profile(role, colour["source"] == 0, colour["target"] > 0, kind)


def input_meta(spec) -> dict:
    """What a checkpoint records of ``spec`` so that prediction feeds the model as training did."""
    return {
        "size": spec.input_size,
        "resize": spec.resize_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
    }


def spec_from_meta(meta: dict):
    """The spec a checkpoint was trained with (:func:`input_meta`); the backbone's registered one for a
    checkpoint that predates it, with its recorded channels."""
    from tlcore import models

    spec = dataclasses.replace(models.get_spec(meta["arch"]), default_in_channels=meta["in_channels"])
    m = meta.get("input")
    if not m:
        return spec
    return dataclasses.replace(
        spec,
        input_size=m["size"],
        resize_size=m["resize"],
        mean=tuple(m["mean"]),
        std=tuple(m["std"]),
        interpolation=m["interpolation"],
    )
