"""Test-only fault injection for Ray Train runs: one worker exits hard once, at a chosen step.

Handed to :func:`tasks.modeling.ray_train.run_job_ray` as ``callbacks=[inject(Fault(...))]``. This module is
pickled by value (cloudpickle), so Ray's workers need no ``tests/`` on their path to run it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Fault:
    """Worker ``rank`` exits hard at ``step`` (0-based) of ``epoch`` (1-based), once: the first to get there writes
    its pid to ``marker``, and no worker fires while ``marker`` exists."""

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
            print(f"[fault injection] worker rank {self.rank} exits hard in epoch {epoch + 1}", flush=True)
            os._exit(1)

    def on_epoch_end(self, metrics: dict, state) -> None:
        pass


def inject(fault: Fault):
    """A ``run_job_ray(callbacks=...)`` factory: each worker makes its injector with its rank."""
    return partial(FaultInjector, fault)
