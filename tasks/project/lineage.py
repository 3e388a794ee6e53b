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
        return r.stdout if r.returncode == 0 else ""

    env = settings()
    if env.git_commit:  # set by `tl submit`: the job runs on an uploaded copy
        return {"git_commit": env.git_commit, "git_dirty": env.git_dirty}
    rev = run("rev-parse", "HEAD").strip() or "unknown"
    # a change to any tracked file, or a new (untracked, not ignored) file where the code lives
    paths = sorted(
        set(
            _porcelain_paths(run("status", "--porcelain", "-z", "--untracked-files=no"))
            + _porcelain_paths(run("status", "--porcelain", "-z", "--untracked-files=all", "--", *CODE_DIRS))
        )
    )
    return {"git_commit": rev, "git_dirty": str(bool(paths)).lower(), "git_dirty_paths": ",".join(paths)[:1000]}


def _porcelain_paths(out: str) -> list[str]:
    """The paths of ``git status --porcelain -z``: entries ``XY PATH`` separated by NUL, a rename or copy
    followed by its original path as one more entry (both are changes). Names are verbatim, never quoted."""
    paths, entries = [], iter(out.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC" or entry[1] in "RC":
            paths.append(next(entries, ""))
    return [p for p in paths if p]
