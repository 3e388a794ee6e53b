"""Optional engine callbacks a caller hands a Ray Train run (:func:`tasks.modeling.ray_train.run_job_ray`) to watch
or break its workers: a per-worker diagnostics log and, for tests, fault injection."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.project.stage import say

WORKER_LOG_ENV = "TL_WORKER_LOG_DIR"  # a stage process's default for run_job_ray(worker_log_dir=...)


class WorkerLog:
    """Each worker appends one JSON line per epoch to ``<log_dir>/rank<r>.jsonl``: epoch, pid, node and its
    shard of the training set (the first 64 indices and the size)."""

    def __init__(self, log_dir: str, rank: int, shard: list[int]):
        self.log_dir, self.rank, self.shard = log_dir, rank, shard

    def on_epoch_end(self, metrics: dict, state) -> None:
        from tasks.services.ray_cluster import node_id

        rec = {
            "epoch": metrics["epoch"],
            "pid": os.getpid(),
            "shard": self.shard[:64],
            "shard_size": len(self.shard),
            "node": node_id(),
        }
        with open(Path(self.log_dir) / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


@dataclass(frozen=True)
class Fault:
    """Test-only: worker ``rank`` exits hard at ``step`` (0-based) of ``epoch`` (1-based), once: the first to
    get there writes its pid to ``marker``, and no worker fires while ``marker`` exists."""

    marker: str
    epoch: int = 2
    step: int = 1
    rank: int = 1


class FaultInjector:
    """Engine callback that carries out a :class:`Fault` on one worker."""

    def __init__(self, fault: Fault, rank: int):
        self.fault, self.rank = fault, rank

    def on_step_end(self, state, epoch: int, step: int) -> None:
        f = self.fault
        if self.rank == f.rank and epoch + 1 == f.epoch and step == f.step and not Path(f.marker).exists():
            Path(f.marker).write_text(str(os.getpid()))
            say(f"[fault injection] worker rank {self.rank} exits hard in epoch {epoch + 1}")
            os._exit(1)

    def on_epoch_end(self, metrics: dict, state) -> None:
        pass
