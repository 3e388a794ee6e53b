"""Pipeline wall time: exactly what `make run` runs (`tl run`, default params), split by stage, then
a no-op rerun and the registry commands a user runs next (`tl models`, `tl predict`).

Copies the project into a temporary git + DVC repo with the default `params.yaml`, runs `tl run`
there with a fresh precision cache (so the one-off bf16/fp32 measurement is included), and times
each stage from the moment DVC starts it to the moment the next one starts.

    python -m bench.pipeline
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.docs import machine, write_section

TL = Path(sys.executable).parent / "tl"
GOAL_S = 150  # issue 16: the default pipeline on a 2-core machine without AMX


def _timed_run(repo: Path, env: dict, *args: str) -> tuple[list[tuple[str, float, float | None]], float, str]:
    """Run ``tl ARGS``; returns per stage (name, seconds, start-up seconds), total, output.

    A stage's seconds run from DVC's "Running stage" line to the next one; its start-up from that line
    to the stage's own first line of output (after DVC's ``> command`` echo): DVC spawning the
    process, Python, the imports and reading the params, before the stage does any work."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(TL), *args], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    marks, first, out = [], {}, []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter()))
            print(f"  {time.perf_counter() - t0:6.1f} s  {line.strip()}", flush=True)
        elif marks and marks[-1][0] not in first and line.strip() and not line.startswith("> "):
            first[marks[-1][0]] = time.perf_counter() - marks[-1][1]
    if proc.wait() != 0:
        raise SystemExit(f"tl {' '.join(args)} failed:\n{''.join(out)[-4000:]}")
    end = time.perf_counter()
    stages = [(s, (marks[i + 1][1] if i + 1 < len(marks) else end) - t, first.get(s)) for i, (s, t) in enumerate(marks)]
    return stages, end - t0, "".join(out)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _seconds(cmd: list[str], repo: Path, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def _export(split_dir: Path, out: Path, n: int) -> list[Path]:
    """The first ``n`` images of a prepared split written out as files, as a user would pass them to tl predict."""
    from tlcore.shards import ShardImages

    images = ShardImages(split_dir, 1, 1)
    out.mkdir(parents=True)
    files = []
    for i in range(min(n, len(images))):
        name = images.name(i)
        f = out / name.replace("/", "_")
        f.write_bytes(images.raw(i))
        files.append(f)
    return files


def _training_s(report: Path) -> float:
    if not report.is_file():
        return 0.0
    d = json.loads(report.read_text())
    hist = d.get("history") or d.get("scratch_history") or []
    return sum(h.get("epoch_time_s", 0.0) for h in hist)


def main() -> None:
    from tasks.project.env import copy_env, copy_project

    with tempfile.TemporaryDirectory() as d:
        repo = copy_project(Path(d) / "repo")  # the default params.yaml: what `make run` does
        e = {**copy_env(), "TL_CACHE_DIR": str(Path(d) / "cache")}
        print("tl run (default params):", flush=True)
        stages, total, out = _timed_run(repo, e, "run")
        _, noop, _ = _timed_run(repo, e, "run")
        cli = {"tl models": _seconds([str(TL), "models"], repo, e)}
        images = _export(repo / "data/target/test", Path(d) / "images", 55)
        cli[f"tl predict ({len(images)} images)"] = _seconds([str(TL), "predict", *map(str, images)], repo, e)
        cli[f"tl predict ({len(images)} images), second call"] = _seconds(
            [str(TL), "predict", *map(str, images)], repo, e
        )
        print("tl reproduce digits-transfer/1 (a fresh clone + the DVC remote):", flush=True)
        t = time.perf_counter()
        r = subprocess.run(
            [str(TL), "reproduce", "digits-transfer/1", "--json"], cwd=repo, env=e, capture_output=True, text=True
        )
        replay_s = time.perf_counter() - t
        if not r.stdout.strip().startswith("{"):
            raise SystemExit(f"tl reproduce failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        replay = json.loads(r.stdout)
        metrics = json.loads((repo / "reports" / "metrics.json").read_text())
        ft = json.loads((repo / "reports" / "finetune.json").read_text())
        train = {s: _training_s(repo / "reports" / f"{s}.json") for s in ("pretrain", "finetune", "baselines")}
        precision = ft.get("precision")
        why = next(
            (
                line.split("precision ", 1)[1].strip()
                for line in out.splitlines()
                if "[pretrain]" in line and "precision " in line
            ),
            precision,
        )
    startup = sum(up or 0.0 for _, _, up in stages)
    slowest = max(stages, key=lambda st: st[1])
    lines = [
        "## Pipeline wall time",
        "",
        f"`python -m bench.pipeline`: `tl run` with the default `params.yaml` (exactly what `make run` runs, "
        f"including the DVC push) in a fresh copy of the project, then a no-op rerun and the registry commands. "
        f"Machine: {machine()}. Training precision chosen by `auto`: {why}.",
        "",
        "| stage | wall (s) | of which start-up (s) | of which training epochs (s) |",
        "|---|---|---|---|",
        *(f"| {s} | {t:.1f} | {_num(up)} | {_num(train.get(s))} |" for s, t, up in stages),
        f"| **`tl run`, total** (incl. DVC and push) | **{total:.1f}** | {startup:.1f} | {sum(train.values()):.1f} |",
        f"| no-op rerun (`tl run`, everything up to date) | {noop:.1f} | – | – |",
        *(f"| `{k}` | {v:.1f} | – | – |" for k, v in cli.items()),
        f"| `tl reproduce digits-transfer/1` (clone, DVC pull, pretrain → evaluate) | {replay_s:.1f} | – | – |",
        "",
        f"Goal: the default pipeline in {GOAL_S} s or less on 2 cores: {'met' if total <= GOAL_S else 'missed'} "
        f"({total:.0f} s). Where the time goes: {startup:.0f} s stage start-up (process, imports, params), "
        f"{sum(train.values()):.0f} s training epochs, {total - startup - sum(train.values()):.0f} s the rest "
        f"(data rendering, evaluation, compression, registration, DVC and the push); the slowest stage is "
        f"`{slowest[0]}` ({slowest[1]:.0f} s).",
        "",
        "The replay of that model: "
        + ", ".join(
            f"{row['metric']} {row['original']:.4f} → {row['replay']:.4f} ({row['delta']:+.4f})"
            for row in replay["rows"]
            if row["delta"] is not None
        )
        + f"; identical predictions {replay['identical_predictions']}/{replay['test_images']}; model file "
        f"identical: {'yes' if replay['model_sha256_match'] else 'no'} (precision {precision}).",
        "",
        "The rest of a training stage's time, beyond its epochs, is process start-up (Python, torch), data "
        "loading and evaluation; Ray Train's local mode (`ray.num_workers: 0`, the default) starts no cluster.",
        "",
        f"That run's model (`{ft['strategy']}`): target test accuracy {metrics['accuracy'] * 100:.1f} % vs "
        f"{metrics['scratch_accuracy'] * 100:.1f} % for `scratch` on the same labels and "
        f"{metrics['source_only_accuracy'] * 100:.1f} % for the source model without adaptation.",
    ]
    print("\n".join(lines))
    print(f"wrote {write_section('pipeline', chr(10).join(lines))}")


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
