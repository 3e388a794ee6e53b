"""Stage ``finetune``: transfer the source model to the target with the configured strategy."""
from __future__ import annotations

from .common import save_checkpoint, say, stage_main, write_json
from .config import Params
from .distributed import run_job_ray
from .training import target_job


def finetune(params: Params) -> dict:
    """Fine-tune; writes ``models/finetuned.pt`` and ``reports/finetune.json`` (history)."""
    from tlcore import models

    job, manifest = target_job(params, params.finetune.strategy, params.finetune.strategy_params)
    classes = manifest["target"]["classes"]
    budget = "all" if params.data.labels_per_class is None else f"{params.data.labels_per_class} per class"
    say(f"finetune: strategy {job.strategy} on {len(job.labeled)} labeled target images ({budget}), "
        f"{params.finetune.epochs} epochs")
    model, history, info = run_job_ray(job, params, "finetune", manifest)
    save_checkpoint(params.path("models", "finetuned.pt"), model, classes, models.get_spec(job.arch).default_in_channels,
                    {"stage": "finetune", "strategy": job.strategy})
    summary = {"strategy": job.strategy, "labeled": len(job.labeled), **info, "history": history}
    write_json(params.path("reports", "finetune.json"), summary)
    return summary


if __name__ == "__main__":
    stage_main(finetune)
