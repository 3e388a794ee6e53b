"""Shared helpers for integration tests: a temporary git + DVC copy of the project with tiny params."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["tlcore", "tasks", "flows", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"]

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
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = ""  # stages import the copy (cwd), not the checkout
    e.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", RAY_USAGE_STATS_ENABLED="0",
             GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return e


def sh(*args, cwd, check=True, extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True,
                       text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def dvc(*args, cwd, check=True):
    return sh(Path(sys.executable).parent / "dvc", *args, cwd=cwd, check=check)


def up_to_date(status_stdout: str) -> bool:
    """`dvc status` says nothing is left to run: only the `inputs` fingerprint stage, which always runs, is listed."""
    lines = [ln.strip() for ln in status_stdout.strip().splitlines() if ln.strip()]
    return lines[-1:] == ["Data and pipelines are up to date."] or lines == ["inputs:", "always changed"]


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def set_params(repo: Path, updates: dict) -> None:
    p = repo / "params.yaml"
    doc = yaml.safe_load(p.read_text())
    p.write_text(yaml.safe_dump(deep_update(doc, updates), sort_keys=False))


def make_repo(dst: Path, params: dict | None = None) -> Path:
    """Copy the project into ``dst``, tiny params, ``git init`` + ``dvc init`` with a local remote, one commit."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dst / name)
    set_params(dst, deep_update(yaml.safe_load(yaml.safe_dump(TINY)), params or {}))
    sh("git", "init", "-q", cwd=dst)
    dvc("init", "-q", cwd=dst)
    dvc("config", "core.analytics", "false", cwd=dst)
    dvc("remote", "add", "-d", "local", str(dst / ".dvc-remote"), cwd=dst)
    sh("git", "add", "-A", cwd=dst)
    sh("git", "commit", "-qm", "init", cwd=dst)
    return dst
