"""Where a result came from, as the registry and the tracking runs record it: the code's git state and
a hash of the resolved params."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from tasks.project.config import Params
from tasks.project.settings import settings

CODE_DIRS = ("tasks", "tlcore", "flows")


def params_hash(params: Params) -> str:
    return hashlib.sha256(params.model_dump_json().encode()).hexdigest()[:16]


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    """``git_commit``, ``git_dirty`` (``"true"``/``"false"``) and ``git_dirty_paths`` of the checkout at ``cwd``."""

    def run(*a):
        r = subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    env = settings()
    if env.git_commit:  # set by `tl submit`: the job runs on an uploaded copy
        return {"git_commit": env.git_commit, "git_dirty": env.git_dirty}
    rev = run("rev-parse", "HEAD") or "unknown"
    # a change to any tracked file, or a new (untracked, not ignored) file where the code lives
    changed = (
        run("status", "--porcelain", "--untracked-files=no").splitlines()
        + run("status", "--porcelain", "--untracked-files=all", "--", *CODE_DIRS).splitlines()
    )
    paths = sorted({line[3:].strip() for line in changed if line.strip()})
    return {"git_commit": rev, "git_dirty": str(bool(paths)).lower(), "git_dirty_paths": ",".join(paths)[:1000]}
