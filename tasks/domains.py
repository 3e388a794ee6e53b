"""The materialised domains (``<data_dir>/source``, ``<data_dir>/target``) as datasets for a backbone."""
from __future__ import annotations

from .config import Params


def load_domain(params: Params, role: str, arch: str):
    """(train, test) :class:`ImageDataset` of a materialised domain at ``arch``'s input size."""
    from tlcore import data, models

    spec = models.get_spec(arch)
    root = params.path("data", role)
    tr = data.load_split(root / "train", spec.input_size, spec.default_in_channels, params.data.skip_corrupt)
    te = data.load_split(root / "test", spec.input_size, spec.default_in_channels, params.data.skip_corrupt, tr.classes)
    tr.transform = data.build_transform(spec, train=True)
    te.transform = data.build_transform(spec, train=False)
    return tr, te
