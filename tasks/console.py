"""What a training run prints: one line per epoch, one summary line per stage, and Ray's own chatter only when asked.

``--verbose`` (``tl run --verbose``, ``python -m tasks.<stage> --verbose``) or ``TL_VERBOSE=1`` shows everything
Ray prints; :func:`verbose` is the one place that reads it. By default, on a Ray cluster:

- Ray Train's ``ray.train`` logs below WARNING (worker group start, "Checkpoint successfully created at",
  "Reporting training result ... TrainingReport(...)") are off (``RunConfig(logging_config=...)``);
- Ray's driver logs below ERROR (the token-authentication notice) are off (``ray.init(logging_level=...)``);
- lines streamed from Ray's actors that are known noise (:data:`RAY_NOISE`: the placement-group cleaner's
  "Failed to query Ray Train Controller actor state", the ``PreemptionWatcher`` restart notice) are dropped on
  the driver, as is all output of Ray Train's placement-group cleaner actor (:data:`QUIET_ACTORS`), and this
  project's own lines lose Ray's ``(RayTrainWorker pid=...)`` prefix.

Always: Ray Train's print patch is off (``RAY_TRAIN_ENABLE_PRINT_PATCH=0``), which otherwise prints every line
a worker prints twice (to stdout and again through the root logger).
"""
from __future__ import annotations

import os
import re
import time

VERBOSE_ENV = "TL_VERBOSE"
RAY_NOISE = ("Failed to query Ray Train Controller actor state", "PreemptionWatcher",
             "Checkpoint successfully created at", "Reporting training result", "TrainingReport(",
             "Requesting resources", "Attempting to start training worker group", "Started training worker group",
             "world_rank=", "Setting up process group for", "Token authentication is enabled")
# Ray Train's housekeeping actor: all it prints is about its own polling of the controller ("Failed to query Ray
# Train Controller actor state", and a traceback when another Ray instance on the machine confuses its lookup)
QUIET_ACTORS = ("PlacementGroupCleaner",)
OURS = re.compile(r"^\[[a-z_0-9]+( w\d+)?\] ")  # a stage's own lines: "[pretrain] ...", "[finetune w0] ..."


def verbose() -> bool:
    """Whether to show everything (``TL_VERBOSE`` set to 1/true/yes)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose(on: bool) -> None:
    """``--verbose``: for this process and every stage it starts (DVC, Prefect)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def ray_env() -> None:
    """Before Ray starts (its controller and workers inherit these): one copy of each printed line."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def ray_log_level() -> str:
    """``ray.init(logging_level=...)`` on the driver."""
    return "WARNING" if verbose() else "ERROR"


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)``: its INFO lines only with ``--verbose``."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def is_noise(line: str) -> bool:
    return any(s in line for s in RAY_NOISE)


def filter_ray_output() -> bool:
    """On the driver, after ``ray.init(log_to_driver=True)``: drop :data:`RAY_NOISE` from what Ray's workers and
    actors print here, and print this project's own lines without Ray's prefix. Nothing changes with
    ``--verbose``. Returns whether the filter is in place (Ray's stream dispatcher is not public API: when it is
    not where Ray 2.60 keeps it, output stays unfiltered)."""
    if verbose():
        return False
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or "ray_print_logs" not in [n for n, _ in getattr(dispatcher, "handlers", [])]:
        return False

    def handler(data: dict) -> None:
        if data.get("actor_name") in QUIET_ACTORS:
            return
        run: list[str] = []
        ours_run = None
        for line in data.get("lines", []):
            if is_noise(line):
                continue
            ours = bool(OURS.match(line))
            if run and ours != ours_run:
                printer({**data, "lines": run}, ignore_prefix=ours_run)
                run = []
            run.append(line)
            ours_run = ours
        if run:
            printer({**data, "lines": run}, ignore_prefix=ours_run)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handler)
    return True


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def epoch_line(stage: str, m: dict, epochs: int, elapsed: float, eta: float | None) -> str:
    """``[finetune] epoch 2/6  loss 0.412  val acc 76.5 %  2,310 img/s  0:14 elapsed  ETA 0:28``."""
    parts = [f"[{stage}] epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.3f}"]
    if m.get("val_accuracy") is not None:
        parts.append(f"val acc {m['val_accuracy'] * 100:.1f} %")
    parts.append(f"{m['train_images_per_s']:,.0f} img/s")
    parts.append(f"{_clock(elapsed)} elapsed")
    if eta is not None and m["epoch"] < epochs:
        parts.append(f"ETA {_clock(eta)}")
    return "  ".join(parts)


class EpochLine:
    """Engine callback: rank 0 prints :func:`epoch_line` once per epoch. Elapsed runs from this callback's
    creation (the stage's training start); the ETA is the mean epoch time so far times the epochs left."""

    def __init__(self, stage: str, epochs: int, say=print):
        self.stage, self.epochs, self.say = stage, epochs, say
        self.t0, self.times = time.perf_counter(), []

    def on_epoch_end(self, metrics: dict, state) -> None:
        self.times.append(metrics["epoch_time_s"])
        eta = sum(self.times) / len(self.times) * (self.epochs - metrics["epoch"])
        self.say(epoch_line(self.stage, metrics, self.epochs, time.perf_counter() - self.t0, eta))
