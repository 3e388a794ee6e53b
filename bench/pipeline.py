"""Pipeline overhead: wall time of the default pipeline split by stage, and of a no-op rerun.

Copies the project into a temporary git + DVC repo (default params), runs each stage with
`dvc repro --single-item` and times it, then times a full `dvc repro` that has nothing to do.

    python -m bench.pipeline
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.docs import machine, write_section

STAGES = ("data", "pretrain", "finetune", "baselines", "evaluate", "compress", "register")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import TINY, dvc, make_repo

    TINY.clear()  # default params: what `make run` does
    with tempfile.TemporaryDirectory() as d:
        repo = make_repo(Path(d) / "repo")
        rows = []
        for s in STAGES:
            t = time.perf_counter()
            dvc("repro", "--single-item", s, cwd=repo)
            rows.append((s, time.perf_counter() - t))
            print(f"{s}: {rows[-1][1]:.1f} s", flush=True)
        t = time.perf_counter()
        out = dvc("repro", cwd=repo).stdout
        noop = time.perf_counter() - t
        assert "Running stage" not in out
        import json

        metrics = json.loads((repo / "reports" / "metrics.json").read_text())
        strategy = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["strategy"]
    total = sum(t for _, t in rows)
    lines = ["## Pipeline overhead", "", f"`python -m bench.pipeline`: the default `params.yaml` (what `make run` runs, "
             f"without the DVC push), each stage via `dvc repro --single-item`. Machine: {machine()}.", "",
             "| stage | wall (s) |", "|---|---|", *(f"| {s} | {t:.1f} |" for s, t in rows),
             f"| **total** | **{total:.1f}** |", f"| no-op rerun (`dvc repro`, everything up to date) | {noop:.1f} |",
             "", f"That run's model (`{strategy}`): target test accuracy {metrics['accuracy'] * 100:.1f} % vs "
             f"{metrics['scratch_accuracy'] * 100:.1f} % for `scratch` on the same labels."]
    print("\n".join(lines))
    print(f"wrote {write_section('pipeline', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
