"""What a training run prints: one line per epoch, one summary line per stage, and Ray's own chatter only when asked.

``--verbose`` (``tl run --verbose``, ``python -m tasks.<stage> --verbose``) or ``TL_VERBOSE=1`` shows everything
Ray prints; :func:`verbose` is the one place that reads it. By default, on a Ray cluster (``ray.num_workers`` >= 1):

- Ray sends nothing its workers and actors print to the driver (``ray.init(log_to_driver=False)``,
  :func:`log_to_driver`): no worker-group start, checkpoint paths, ``TrainingReport(...)`` dicts, placement-group
  cleaner or ``PreemptionWatcher`` notices, and no ``(RayTrainWorker pid=...)`` prefix.
- What the training function itself prints on a worker still reaches the user, through Ray's public
  ``ray.util.queue.Queue``: on each worker :func:`forward_output` copies every line written to Python's
  ``sys.stdout``/``sys.stderr`` into the queue, and on the driver :class:`WorkerOutput` prints them as they come
  (stdout lines on stdout, stderr lines on stderr). This project's own lines (:data:`OURS`: rank 0's
  ``[finetune] epoch 2/6 ...`` from :class:`EpochLine`, ``[finetune] resumed from checkpoint ...``) are printed as
  they are; any other line (a Python warning, a ``ray.train`` WARNING of that worker) after ``(worker <rank>) ``.
- Still not shown without ``--verbose``: what Ray's own processes print (the Train controller, the placement-group
  cleaner, Ray Tune's trials), what a worker writes below Python (C++ logs of torch, gloo or NCCL, a crash's last
  words); Ray's session folder keeps all of it (``ray logs``), Ray Train raises a failed worker's error on the
  driver anyway, and Ray itself still prints its ``(raylet) A worker died ...`` notice when a worker process dies.
- Ray Train's ``ray.train`` logs below WARNING are off on the workers too (``RunConfig(logging_config=...)``), and
  Ray's driver logs below ERROR (the token-authentication notice) (``ray.init(logging_level=...)``).

With ``--verbose``: ``log_to_driver=True`` and Ray Train's INFO logs, so everything Ray prints, each line from a
worker or actor after Ray's ``(RayTrainWorker pid=...)``-style prefix; no forwarding.

Always: Ray Train's print patch is off (``RAY_TRAIN_ENABLE_PRINT_PATCH=0``), which otherwise prints every line
a worker prints twice (to stdout and again through the root logger).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

VERBOSE_ENV = "TL_VERBOSE"
OURS = re.compile(r"^\[[a-z_0-9]+( w\d+)?\] ")  # a stage's own lines: "[pretrain] ...", "[finetune w0] ..."


def verbose() -> bool:
    """Whether to show everything (``TL_VERBOSE`` set to 1/true/yes)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose(on: bool) -> None:
    """``--verbose``: for this process and every stage it starts (DVC, Prefect)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def ray_env() -> None:
    """Before Ray starts (its controller and workers inherit these): one copy of each printed line, and a relative
    ``TL_CACHE_DIR`` made absolute against this folder (Ray's workers and Tune's trials run in folders of their
    own, where it would name another cache in each)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    cache = os.environ.get("TL_CACHE_DIR")
    if cache and not Path(cache).expanduser().is_absolute():
        os.environ["TL_CACHE_DIR"] = str(Path(cache).expanduser().resolve())


def ray_log_level() -> str:
    """``ray.init(logging_level=...)`` on the driver."""
    return "WARNING" if verbose() else "ERROR"


def log_to_driver() -> bool:
    """``ray.init(log_to_driver=...)``: whether Ray streams what its workers and actors print to the driver (only
    with ``--verbose``; otherwise :class:`WorkerOutput` brings the training function's lines)."""
    return verbose()


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)``: its INFO lines only with ``--verbose``."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


class _Sender:
    """One worker's end of the queue: puts ``(is_err, text)``, ``text`` as :class:`WorkerOutput` prints it."""

    def __init__(self, queue, rank: int):
        self.queue, self.rank, self.pid = queue, rank, os.getpid()
        self.lock, self.local, self.broken = threading.RLock(), threading.local(), False

    def off(self) -> bool:
        """Not now: in a forked child (a DataLoader worker must not use this process's Ray connection), while this
        thread is sending (a line Ray writes meanwhile would loop), or once the queue is gone."""
        return self.broken or os.getpid() != self.pid or getattr(self.local, "sending", False)

    def send(self, is_err: bool, line: str) -> None:
        text = line if not line.strip() or OURS.match(line) else f"(worker {self.rank}) {line}"
        self.local.sending = True
        try:
            self.queue.put((is_err, text))
        except Exception:  # the driver and its queue are gone (Ctrl-C): the line stays in this worker's log only
            self.broken = True
        finally:
            self.local.sending = False


class _Tee:
    """A text stream that writes through to ``stream`` and hands each complete line to a :class:`_Sender`."""

    def __init__(self, stream, sender: _Sender, is_err: bool):
        self._stream, self._sender, self._is_err, self._part = stream, sender, is_err, ""

    def write(self, s: str) -> int:
        n = self._stream.write(s)
        if s and not self._sender.off():
            with self._sender.lock:
                *lines, self._part = (self._part + s).split("\n")
                for line in lines:
                    self._sender.send(self._is_err, line)
        return len(s) if n is None else n

    def flush(self) -> None:
        self._stream.flush()

    def end(self) -> None:
        """Send an unfinished last line."""
        if self._part and not self._sender.off():
            with self._sender.lock:
                part, self._part = self._part, ""
                self._sender.send(self._is_err, part)

    def __getattr__(self, name: str):  # encoding, fileno, isatty, buffer, ...: the real stream's
        return getattr(self._stream, name)


def _warning_or_worse(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextlib.contextmanager
def forward_output(queue, rank: int):
    """On a Ray Train worker, around the training function: every line written to ``sys.stdout``/``sys.stderr``
    (by any thread of this process) still goes where it went (the worker's log file), and also to ``queue``, a
    ``ray.util.queue.Queue`` that :class:`WorkerOutput` empties on the driver. ``queue`` None (``--verbose``, Ray
    streams the workers' output itself): nothing changes.

    While forwarding, the root logger's console handlers (Ray Train's, on its workers) print WARNING and worse
    only, as ``LoggingConfig(log_level="WARNING")`` does for ``ray.train``: Ray Train also logs "Reporting training
    result ... TrainingReport(...)" at INFO under a logger named after its file, which that setting misses. Log
    files keep everything."""
    if queue is None:
        yield
        return
    sender = _Sender(queue, rank)
    consoles = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for h in consoles:
        h.addFilter(_warning_or_worse)
    saved = sys.stdout, sys.stderr
    tees = _Tee(sys.stdout, sender, False), _Tee(sys.stderr, sender, True)
    sys.stdout, sys.stderr = tees
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for t in tees:
            t.end()
        for h in consoles:
            h.removeFilter(_warning_or_worse)


def show(item: tuple[bool, str]) -> None:
    """Print one forwarded line on the driver: ``(is_err, text)``."""
    is_err, text = item
    print(text, file=sys.stderr if is_err else sys.stdout, flush=True)


class WorkerOutput:
    """On the driver, around a Ray Train run started with ``log_to_driver=False``: :attr:`queue` (a
    ``ray.util.queue.Queue``, for the workers' :func:`forward_output`) and a thread that prints what arrives, as it
    arrives; on leaving, the lines still queued, then the queue's actor is shut down."""

    POLL_S = 0.5

    def __init__(self):
        self.queue = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WorkerOutput:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})  # never waits for a CPU the workers hold
        self._thread = threading.Thread(target=self._pump, name="tl-worker-output", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._done.is_set():
            try:
                item = self.queue.get(timeout=self.POLL_S)
            except Empty:
                continue
            except Exception:  # Ray is gone (shut down, interrupted)
                return
            show(item)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5 * self.POLL_S + 5)
        try:
            n = self.queue.qsize()
            rest = self.queue.get_nowait_batch(n) if n else []
        except Exception:
            rest = []
        for item in rest:
            show(item)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


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
    """Engine callback: rank 0 prints :func:`epoch_line` once per epoch (on a Ray worker, :func:`forward_output`
    brings it to the driver). Elapsed runs from this callback's creation (the stage's training start); the ETA is
    the mean epoch time so far times the epochs left."""

    def __init__(self, stage: str, epochs: int, say=print):
        self.stage, self.epochs, self.say = stage, epochs, say
        self.t0, self.times = time.perf_counter(), []

    def on_epoch_end(self, metrics: dict, state) -> None:
        self.times.append(metrics["epoch_time_s"])
        eta = sum(self.times) / len(self.times) * (self.epochs - metrics["epoch"])
        self.say(epoch_line(self.stage, metrics, self.epochs, time.perf_counter() - self.t0, eta))
