"""Model checkpoints the stages hand each other: plain tensors plus metadata, loaded with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

from tasks.project.files import atomic_path


def save_checkpoint(
    path: str | Path, model, classes: list[str], in_channels: int, extra: dict | None = None, spec=None
) -> None:
    """Save a model as plain tensors + metadata (loadable with ``weights_only=True``); with ``spec`` (the
    :class:`tlcore.models.ModelSpec` it was trained with), how to feed it (``input``: size, resize,
    mean/std; :func:`tasks.modeling.model_input.spec_from_meta` reads it back)."""
    import torch

    from tasks.modeling.model_input import input_meta

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_channels": in_channels,
        "classes": list(classes),
        "model": state,
        **({"input": input_meta(spec)} if spec else {}),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(path: str | Path):
    """Rebuild a model saved by :func:`save_checkpoint`; returns ``(model, meta)``."""
    import torch

    from tlcore import models

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; run the stage that produces it first (dvc repro).")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = models.create(blob["arch"], blob["num_classes"], in_channels=blob["in_channels"])
    model.load_state_dict(blob["model"])
    return model, {k: v for k, v in blob.items() if k != "model"}
