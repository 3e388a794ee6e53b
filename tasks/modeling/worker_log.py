"""A per-worker diagnostics log a caller can ask a Ray Train run (:func:`tasks.modeling.ray_train.run_job_ray`) for:
which epochs each worker ran, where, and on which part of the training set."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
