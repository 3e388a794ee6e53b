"""Shared helpers for integration tests: a temporary git + DVC copy of the project with tiny params."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from tasks.project.env import copy_env, copy_project, deep_update

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"synth_per_class": 50, "synth_test_per_class": 10, "labels_per_class": 2},
    "pretrain": {"epochs": 3, "batch_size": 32},
    "finetune": {"epochs": 2, "steps_per_epoch": 5, "batch_size": 32},
    "evaluate": {"latency_iters": 3},
    # int8 only: pruning and distillation are covered once, by the first run of tests/test_pipeline.py
    "compress": {"methods": ["int8"], "distill_epochs": 1, "prune_finetune_epochs": 1},
    "base": {"num_threads": 1},
    "ray": {"num_workers": 0},  # Ray Train local mode: the same loop, no cluster start-up per stage
}


def env() -> dict:
    e = copy_env()  # stages import the copy (cwd), not the checkout
    e.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        RAY_USAGE_STATS_ENABLED="0",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    return e


def sh(*args, cwd, check=True, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(a) for a in args], cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, **kw
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        )
    return r


def dvc(*args, cwd, check=True):
    return sh(Path(sys.executable).parent / "dvc", *args, cwd=cwd, check=check)


def up_to_date(status_stdout: str) -> bool:
    """`dvc status` says nothing is left to run: it lists only the stages DVC runs every time (`always changed`:
    the `inputs` fingerprints and `register`)."""
    lines = [ln.strip() for ln in status_stdout.strip().splitlines() if ln.strip()]
    if lines[-1:] == ["Data and pipelines are up to date."]:
        return True
    listed = dict(zip(lines[::2], lines[1::2]))
    return len(lines) % 2 == 0 and set(listed.items()) <= {(f"{s}:", "always changed") for s in ("inputs", "register")}


def set_params(repo: Path, updates: dict) -> None:
    p = repo / "params.yaml"
    doc = yaml.safe_load(p.read_text())
    p.write_text(yaml.safe_dump(deep_update(doc, updates), sort_keys=False))


def make_repo(dst: Path, params: dict | None = None) -> Path:
    """Copy the project into ``dst`` with the tiny params (``params`` merged in), as a git + DVC repo with a
    local remote and one commit (:func:`tasks.project.env.copy_project`)."""
    return copy_project(dst, deep_update(yaml.safe_load(yaml.safe_dump(TINY)), params or {}), env())


def grey_pixels(size=(12, 12)):
    """``pixels`` for :func:`image_folder`: random grey images of one size."""
    return lambda rng, cls, i: rng.integers(0, 256, size, dtype=np.uint8)


def image_folder(
    root: Path, classes=("cat", "dog"), n_train=3, n_test=2, pixels=None, seed=0, suffix=lambda i: "png"
) -> Path:
    """A user's ImageFolder (``root/{train,test}/<class>/<i>.<suffix(i)>``), images from ``pixels(rng, class, i)``
    (an ``HxW`` or ``HxWx3`` uint8 array; random grey 12x12 by default), drawn in order from one seeded rng."""
    from PIL import Image

    pixels, rng = pixels or grey_pixels(), np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pixels(rng, c, i)).save(root / split / c / f"{i}.{suffix(i)}")
    return root


def prepared_digits(tmp_path: Path, split_dir: Path, n: int, seed: int, **write_kw) -> Path:
    """``n`` rendered digits per class written as PNG files under ``tmp_path/tree`` and prepared into shards at
    ``split_dir`` (:func:`tlcore.shards.write_split`, ``max_side`` 64); returns ``split_dir``."""
    from PIL import Image

    from tlcore import datasets, shards

    x, y = datasets.render_synth_digits(n, seed=seed)
    files = []
    for i, (img, label) in enumerate(zip(x, y)):
        f = tmp_path / "tree" / f"{i:03d}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(f)
        files.append((f, int(label), f"{label}/{f.name}"))
    shards.write_split(files, list(datasets.CLASSES), split_dir, max_side=64, **write_kw)
    return split_dir
