"""A Ray Train run's checkpoints: reported every epoch by rank 0, found again when the run resumes."""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path

from tasks.project.files import atomic_path

# what torch.load raises on a checkpoint cut short by a crash (empty, truncated zip, short read)
_UNREADABLE = (EOFError, RuntimeError, OSError, pickle.UnpicklingError)


class RayReport:
    """Engine callback: ``ray.train.report`` the epoch's metrics from every rank, with a checkpoint from rank 0.

    ``local_dir``: local mode keeps no checkpoints of its own, so rank 0 persists the last two there."""

    def __init__(self, rank: int, local_dir: str | None = None):
        self.rank, self.local_dir = rank, local_dir

    def on_epoch_end(self, metrics: dict, state) -> None:
        import resource

        import ray.train
        import torch

        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kept in the history
        if self.rank != 0:
            ray.train.report(metrics)
        elif self.local_dir:
            d = Path(self.local_dir) / f"epoch_{metrics['epoch']:04d}"
            d.mkdir(parents=True, exist_ok=True)
            with atomic_path(d / "state.pt") as tmp:
                torch.save(state.state_dict(), tmp)
            for old in sorted(Path(self.local_dir).glob("epoch_*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
        else:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state.state_dict(), Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def load_state(checkpoint_dir: str | Path) -> dict:
    """The trainer state in a checkpoint directory written by :class:`RayReport`."""
    import torch

    return torch.load(Path(checkpoint_dir) / "state.pt", map_location="cpu", weights_only=True)


def latest_on_disk(run_dir: str | None) -> dict | None:
    """The newest readable ``state.pt`` under a local/shared run directory (Ray's or local mode's): a
    checkpoint persisted just before a crash may not have reached Ray's controller yet."""
    if not run_dir or not Path(run_dir).is_dir():
        return None
    files = sorted(Path(run_dir).glob("checkpoint_*/state.pt")) + sorted(Path(run_dir).glob("local/epoch_*/state.pt"))
    for f in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return load_state(f.parent)
        except _UNREADABLE:  # a file cut short by the crash: fall back to the one before
            continue
    return None


def resume_state(ray_checkpoint, run_dir: str | None) -> dict | None:
    """The state to resume from: Ray's checkpoint, or a newer one on disk; ``None`` to start fresh."""
    state = None
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as d:
            state = load_state(d)
    disk = latest_on_disk(run_dir)
    if disk is not None and (state is None or disk["epoch"] > state["epoch"]):
        state = disk
    return state
