"""Stage ``finetune``: transfer the source model to the target with the configured strategy."""
from __future__ import annotations

from .common import load_checkpoint, load_domain, read_json, save_checkpoint, say, stage_main, write_json
from .config import Params
from .distributed import run_job_ray
from .training import TrainJob, target_splits


def make_job(params: Params, strategy: str, strategy_params: dict | None = None) -> tuple[TrainJob, dict]:
    """The target-side training job for ``strategy`` on the configured label budget, and the data manifest."""
    from tlcore import strategies

    manifest = read_json(params.path("data", "manifest.json"))
    source_model, meta = load_checkpoint(params.path("models", "source.pt"))
    classes = manifest["target"]["classes"]
    train_ds, _ = load_domain(params, "target", meta["arch"])
    labeled, unlabeled, val = target_splits(params, train_ds)
    cls = strategies.strategy_class(strategy)
    uses, transfers = cls.uses, cls.transfers
    source = load_domain(params, "source", meta["arch"])[0] if "source" in uses else None
    job = TrainJob(
        arch=meta["arch"], num_classes=len(classes), strategy=strategy, optim=params.finetune, seed=params.base.seed,
        init_state=source_model.state_dict() if transfers else None,
        strategy_params=strategy_params or {}, same_label_space=manifest["same_label_space"],
        source=source, labeled=labeled, unlabeled=unlabeled if "unlabeled" in uses else None, val=val,
    )
    return job, manifest


def finetune(params: Params) -> dict:
    """Fine-tune; writes ``models/finetuned.pt`` and ``reports/finetune.json`` (history)."""
    from tlcore import models

    job, manifest = make_job(params, params.finetune.strategy, params.finetune.strategy_params)
    classes = manifest["target"]["classes"]
    # the device is chosen where training runs (each Ray worker logs its own)
    say(f"finetune: strategy {job.strategy} on {len(job.labeled)} labeled target images "
        f"({params.data.labels_per_class} per class), {params.finetune.epochs} epochs")
    model, history = run_job_ray(job, params, "finetune", manifest)
    save_checkpoint(params.path("models", "finetuned.pt"), model, classes, models.get_spec(job.arch).default_in_channels,
                    {"stage": "finetune", "strategy": job.strategy})
    summary = {"strategy": job.strategy, "labeled": len(job.labeled), "history": history}
    write_json(params.path("reports", "finetune.json"), summary)
    return summary


if __name__ == "__main__":
    stage_main(finetune)
