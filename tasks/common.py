"""Helpers shared by the stages: atomic writes, devices, checkpoints, datasets, console output."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .config import Params, ParamsError, load_params


class StageError(RuntimeError):
    """A stage (or a CLI command) cannot go on; the message says why and what to do. Printed without a traceback."""


def say(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path next to ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def params_hash(params: Params) -> str:
    return hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:16]


def device_for(params: Params, cuda_available: bool | None = None):
    """The device this stage process computes on (evaluation, compression), by ``base.device``.

    Training runs where ``ray.use_gpu`` says (:mod:`tasks.distributed`); the config refuses the two
    disagreeing. ``cuda_available`` replaces ``torch.cuda.is_available()`` (tests)."""
    import torch

    if params.base.num_threads:
        torch.set_num_threads(params.base.num_threads)
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if params.base.device == "cuda" and not cuda:
        raise ParamsError("base.device = 'cuda' but this process sees no CUDA device (on a Ray cluster: the node "
                          "the stage runs on, often a GPU-less head node). Set base.device: auto; with "
                          "ray.use_gpu: true training still runs on the GPU workers.")
    if params.base.device == "auto":
        return torch.device("cuda" if cuda else "cpu")
    return torch.device(params.base.device)


def save_checkpoint(path: str | Path, model, classes: list[str], in_channels: int, extra: dict | None = None) -> None:
    """Save a model as plain tensors + metadata (loadable with ``weights_only=True``)."""
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"arch": model.arch, "num_classes": model.num_classes, "in_channels": in_channels,
            "classes": list(classes), "model": state, **(extra or {})}
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


def domain_dir(params: Params, role: str) -> Path:
    return params.path("data", role)


def load_domain(params: Params, role: str, arch: str):
    """(train, test) :class:`ImageDataset` of a materialised domain at ``arch``'s input size."""
    from tlcore import data, models

    spec = models.get_spec(arch)
    root = domain_dir(params, role)
    tr = data.load_split(root / "train", spec.input_size, spec.default_in_channels, params.data.skip_corrupt)
    te = data.load_split(root / "test", spec.input_size, spec.default_in_channels, params.data.skip_corrupt, tr.classes)
    tr.transform = data.build_transform(spec, train=True)
    te.transform = data.build_transform(spec, train=False)
    return tr, te


CODE_DIRS = ("tasks", "tlcore", "flows")


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    def run(*a):
        r = subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    if os.environ.get("TL_GIT_COMMIT"):  # set by `tl submit`: the job runs on an uploaded copy
        return {"git_commit": os.environ["TL_GIT_COMMIT"], "git_dirty": os.environ.get("TL_GIT_DIRTY", "unknown")}
    rev = run("rev-parse", "HEAD") or "unknown"
    # a change to any tracked file, or a new (untracked, not ignored) file where the code lives
    changed = (run("status", "--porcelain", "--untracked-files=no").splitlines()
               + run("status", "--porcelain", "--untracked-files=all", "--", *CODE_DIRS).splitlines())
    paths = sorted({line[3:].strip() for line in changed if line.strip()})
    return {"git_commit": rev, "git_dirty": str(bool(paths)).lower(), "git_dirty_paths": ",".join(paths)[:1000]}


def stage_main(fn: Callable[[Params], Any], argv: list[str] | None = None,
               load: Callable[[str, list[str]], Params] = load_params) -> None:
    """Thin ``main()`` for ``python -m tasks.<stage>``: parse args, load params, run, print errors plainly.

    ``load(path, overrides)`` reads the params (default: all of them, validated); a stage that must start
    fast may pass a loader that validates only what it reads."""
    import argparse

    ap = argparse.ArgumentParser(description=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = ap.parse_args(argv)
    try:
        fn(load(args.params, args.overrides))
    except (ParamsError, ValueError, FileNotFoundError, StageError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
