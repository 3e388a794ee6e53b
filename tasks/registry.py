"""Model-registry operations behind ``tl models / promote / rollback / predict`` (MLflow)."""
from __future__ import annotations

import getpass
import time
from pathlib import Path

from .register import client, tracking_uri


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


def versions(name: str) -> list[dict]:
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        aliases = c.get_registered_model(name).aliases or {}
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r} in the tracking store; run the pipeline first (tl run).") from None
    by_version: dict[str, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(str(v), []).append(a)
    rows = []
    for v in c.search_model_versions(f"name = '{name}'"):
        t = v.tags
        rows.append({"version": int(v.version), "aliases": ",".join(sorted(by_version.get(str(v.version), []))),
                     "accuracy": t.get("accuracy"), "transfer_gain": t.get("transfer_gain"), "strategy": t.get("strategy"),
                     "gate": t.get("gate_decision"), "data": (t.get("data_target_dvc_md5") or "")[:10],
                     "git": (t.get("git_commit") or "")[:8], "created": time.strftime(
                         "%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000))})
    if not rows:
        raise RegistryError(f"no registered model named {name!r} in the tracking store; run the pipeline first (tl run).")
    return sorted(rows, key=lambda r: r["version"])


def _champion(c, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def promote(name: str, version: int, why: str, who: str | None = None) -> dict:
    """Move ``champion`` to ``version`` explicitly (bypassing the gate), recording who and why."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}; see `tl models`.") from None
    old = _champion(c, name)
    who = who or getpass.getuser()
    c.set_registered_model_alias(name, "champion", str(version))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for k, v in {"promoted_by": who, "promoted_why": why, "promoted_at": stamp,
                 "previous_champion": old.version if old else ""}.items():
        c.set_model_version_tag(name, str(version), k, str(v))
    return {"champion": version, "previous": int(old.version) if old else None}


def rollback(name: str, why: str, who: str | None = None) -> dict:
    """Move ``champion`` back to the version it replaced (recorded when it was promoted)."""
    c = client()
    cur = _champion(c, name)
    prev = cur.tags.get("previous_champion") if cur else None
    if not prev:
        raise RegistryError(f"{name} has no earlier champion to roll back to; use `tl promote {name} VERSION` instead.")
    who = who or getpass.getuser()
    c.set_registered_model_alias(name, "champion", prev)
    c.set_model_version_tag(name, cur.version, "rolled_back_by", who)
    c.set_model_version_tag(name, cur.version, "rolled_back_why", why)
    c.set_model_version_tag(name, prev, "restored_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    return {"champion": int(prev), "replaced": int(cur.version)}


def load_alias(name: str, alias: str = "champion"):
    import mlflow

    from .common import load_checkpoint

    try:
        # resolved through our client: a models:/ URI would go through MLflow's global registry URI
        source = client().get_model_version_by_alias(name, alias).source
        path = Path(mlflow.artifacts.download_artifacts(source, tracking_uri=tracking_uri())) / "model.pt"
    except Exception as e:  # MlflowException or a missing artifact store
        raise RegistryError(f"cannot load {name}@{alias}: {e}. See `tl models`.") from None
    return load_checkpoint(path)


def predict(paths: list[Path], name: str, alias: str = "champion") -> list[dict]:
    """Classify image files (folders are searched recursively) with the registered model."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from tlcore import data, models

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise RegistryError(f"{p} does not exist; pass image files or folders of images.")
    if not files:
        raise RegistryError(f"no images found in {', '.join(map(str, paths))} ({', '.join(sorted(IMG_EXTENSIONS))}).")
    model, meta = load_alias(name, alias)
    spec = models.get_spec(meta["arch"])
    tf = data.build_transform(spec, train=False, channels=meta["in_channels"])
    mode = "L" if meta["in_channels"] == 1 else "RGB"
    out = []
    model.eval()
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.array(im.convert(mode).resize((spec.input_size, spec.input_size), Image.BILINEAR))
        except (UnidentifiedImageError, OSError) as e:
            raise RegistryError(f"{f} is not a readable image ({e}).") from None
        x = torch.from_numpy(arr.reshape(spec.input_size, spec.input_size, -1)).permute(2, 0, 1)
        with torch.no_grad():
            p = torch.softmax(model(tf(x).unsqueeze(0)), dim=1)[0]
        conf, k = p.max(0)
        out.append({"path": str(f), "class": meta["classes"][int(k)], "confidence": float(conf)})
    return out
