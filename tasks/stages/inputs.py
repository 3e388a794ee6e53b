"""Stage ``inputs``: content fingerprints of the inputs that params name but DVC cannot see.

``data.source`` / ``data.target`` may be user ImageFolder trees and ``pretrain.weights`` a file or a
torchvision weights name (read from the local torch hub cache). DVC hashes only paths ``dvc.yaml``
lists, and these are params that may not be paths at all (``synth_digits``, ``IMAGENET1K_V1``). So
this stage runs on every ``dvc repro`` (``always_changed``) and writes two small JSON files:

- ``<data_dir>/inputs.json`` (a dep of ``data``): per role, the embedded name, or every class
  folder and file (sha256) of the user's ``train/`` and ``test/``, as the ``data`` stage reads them;
- ``<models_dir>/weights.json`` (a dep of ``pretrain``): the resolved weights file and its sha256.

DVC reruns ``data`` / ``pretrain`` (and what follows) only when these bytes change: an edited,
added or removed image reruns them, ``touch`` does not. File hashes are cached in
``.tlcache/hashes.json`` keyed by (size, mtime_ns, inode), as DVC's own state database does, so
an unchanged tree costs one ``stat`` per file. Imports no torch (only to resolve a torchvision
weights name the first time it is seen).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tasks.project.config import EMBEDDED, Base, Data, Params, ParamsError, Pretrain, load_raw
from tasks.project.files import file_sha256, write_json
from tasks.project.overrides import OverrideError, apply_overrides
from tasks.project.stage import stage_main

HASH_CACHE = Path(".tlcache") / "hashes.json"
SPLITS = ("train", "test")
RACY_NS = 2_000_000_000  # a file written this recently may change again within the clock's resolution: no cache


class HashCache:
    """sha256 of files, remembered per absolute path with the (size, mtime_ns, inode) it was computed for."""

    def __init__(self, path: str | Path = HASH_CACHE):
        self.path = Path(path)
        try:
            doc = json.loads(self.path.read_text())
            self.files, self.names = dict(doc.get("files", {})), dict(doc.get("names", {}))
        except (OSError, ValueError, TypeError, AttributeError):
            self.files, self.names = {}, {}
        self.seen: set[str] = set()
        self.roots: set[str] = set()
        self.hashed = 0  # files actually read this time (the rest came from the cache)
        self.dirty = False

    def sha256(self, path: str, st: os.stat_result | None = None) -> str:
        path = os.path.abspath(path)
        st = st or os.stat(path)
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        self.seen.add(path)
        hit = self.files.get(path)
        if hit and hit[:3] == key:
            return hit[3]
        digest = file_sha256(path)
        self.hashed += 1
        if time.time_ns() - st.st_mtime_ns > RACY_NS:
            self.files[path] = [*key, digest]
            self.dirty = True
        elif self.files.pop(path, None) is not None:
            self.dirty = True
        return digest

    def save(self) -> None:
        """Write the cache back, dropping files under the scanned trees that are gone."""
        prefixes = tuple(r.rstrip(os.sep) + os.sep for r in self.roots)
        stale = [p for p in self.files if p.startswith(prefixes) and p not in self.seen]
        for p in stale:
            del self.files[p]
        if not (self.dirty or stale):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"version": 1, "files": self.files, "names": self.names}))
        os.replace(tmp, self.path)


def folder_fingerprint(root: str | Path, cache: HashCache) -> dict:
    """``{split: {class: {file: sha256}}}`` of an ImageFolder root (files by path below their class folder);
    ``None`` for a missing split.

    The same entries ``tlcore.folders.validate_imagefolder`` reads (hidden names skipped): the data stage
    copies or rejects exactly these, so any change here may change its output and nothing else can."""
    root = Path(root).expanduser()
    cache.roots.add(os.path.abspath(root))
    out: dict = {}
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            out[split] = None
            continue
        classes = {}
        for c in sorted(os.scandir(d), key=lambda e: e.name):
            if c.name.startswith(".") or not c.is_dir():
                continue
            files = {}
            for dirpath, dirnames, filenames in os.walk(c.path):  # nested folders too, hidden names skipped
                dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
                for f in sorted(n for n in filenames if not n.startswith(".")):
                    full = os.path.join(dirpath, f)
                    if os.path.isfile(full):
                        files[os.path.relpath(full, c.path)] = cache.sha256(full)
            classes[c.name] = files
        out[split] = classes
    return out


def data_fingerprint(name: str, cache: HashCache) -> dict:
    """One role (source/target): an embedded dataset is its name; a user tree is its content."""
    if name in EMBEDDED:
        return {"name": name, "kind": "embedded"}
    return {"name": name, "kind": "folder", "splits": folder_fingerprint(name, cache)}


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub,
    else ~/.cache/torch/hub."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub"


def _torchvision_file(backbone: str, name: str) -> str | None:
    """The hub-cache file name ``tlcore.models`` loads for torchvision weights ``name`` of ``backbone``;
    ``None`` when ``backbone`` has no such weights (then tlcore treats ``name`` as a file path)."""
    try:
        from torchvision.models import get_model_weights

        enum = get_model_weights(backbone)
    except (ImportError, ValueError, KeyError):
        return None
    key = name.split(".")[-1].upper()
    w = enum.DEFAULT if key == "DEFAULT" else enum.__members__.get(key)
    return Path(w.url).name if w is not None else None


def _torchvision_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchvision")
    except PackageNotFoundError:
        return ""


def weights_fingerprint(weights: str | None, backbone: str, cache: HashCache) -> dict:
    """What ``pretrain.weights`` resolves to, as ``tlcore.models`` resolves it, and its content hash.

    A path (an existing file, or a name ending in .pt/.pth) is that file; any other name is looked up
    as torchvision weights of ``backbone`` in the local torch hub cache. ``sha256`` is ``None`` when
    the file is not there: ``pretrain`` then fails with its own message, and reruns once it appears."""
    if weights is None:
        return {"weights": None}
    p = Path(weights)
    if p.suffix in {".pt", ".pth"} or p.exists():
        return {"weights": weights, "kind": "file", "sha256": cache.sha256(str(p)) if p.is_file() else None}
    key = f"{backbone}|{weights}|{_torchvision_version()}"
    if key not in cache.names:  # importing torchvision costs seconds: once per (backbone, name, version)
        cache.names[key] = _torchvision_file(backbone, weights)
        cache.dirty = True
    fname = cache.names[key]
    if fname is None:
        return {"weights": weights, "kind": "file", "sha256": None}  # no such torchvision weights: a missing path
    f = torch_hub_dir() / "checkpoints" / fname
    return {
        "weights": weights,
        "kind": "torchvision",
        "file": fname,
        "sha256": cache.sha256(str(f)) if f.is_file() else None,
    }


def fingerprint(params: Params) -> dict:
    """Write the inputs' fingerprints (``inputs.json``, ``weights.json``); returns them."""
    t0, cache = time.perf_counter(), HashCache()
    data = {
        "source": data_fingerprint(params.data.source, cache),
        "target": data_fingerprint(params.data.target, cache),
    }
    weights = weights_fingerprint(params.pretrain.weights, params.pretrain.backbone, cache)
    write_json(params.path("data", "inputs.json"), data)
    write_json(params.path("models", "weights.json"), weights)
    cache.save()
    n = len(cache.seen)
    print(f"inputs: {n} file(s) checked, {cache.hashed} hashed, in {time.perf_counter() - t0:.2f} s", flush=True)
    return {"data": data, "weights": weights}


def load_inputs_params(path: str | Path, overrides: list[str]) -> Params:
    """params.yaml with only the sections this stage reads validated (``base``, ``data``): validating
    ``pretrain.backbone`` or ``finetune.strategy`` imports torch, seconds on every ``dvc repro``. The
    stages that use the rest validate all of it (``data`` runs next)."""
    from pydantic import ValidationError

    try:
        raw = apply_overrides(load_raw(path), overrides or [])
    except OverrideError as e:
        raise ParamsError(str(e)) from None
    raw = raw if isinstance(raw, dict) else {}
    origin = str(path) + (" with overrides " + " ".join(overrides) if overrides else "")
    sections = {}
    for name, cls in (("base", Base), ("data", Data)):
        try:
            sections[name] = cls.model_validate(raw.get(name) or {})
        except ValidationError as e:
            raise ParamsError(
                f"invalid parameters in {origin}:\n"
                + "\n".join(
                    f"  {name}.{'.'.join(map(str, x['loc']))} = {x.get('input')!r}: "
                    f"{x['msg'].removeprefix('Value error, ')}"
                    for x in e.errors()
                )
            ) from None
    pre = raw.get("pretrain") or {}
    weights = pre.get("weights")
    sections["pretrain"] = Pretrain.model_construct(
        backbone=str(pre.get("backbone", Pretrain.model_fields["backbone"].default)),
        weights=None if weights is None else str(weights),
    )
    return Params.model_construct(**sections)


if __name__ == "__main__":
    stage_main(fingerprint, load=load_inputs_params)
