"""Stage ``finetune``: transfer the source model to the target with the configured strategy."""

from __future__ import annotations

import time

from tasks.modeling.checkpoints import save_checkpoint
from tasks.modeling.model_input import input_spec
from tasks.modeling.plan import Choice, budget_text, labels_per_class, plan
from tasks.modeling.ray_train import run_job_ray
from tasks.modeling.strategy_choice import select_strategy
from tasks.modeling.train import target_job
from tasks.project.config import Params
from tasks.project.files import read_json, write_json
from tasks.project.stage import say, stage_main


def finetune(params: Params) -> dict:
    """Fine-tune; writes ``models/finetuned.pt`` and ``reports/finetune.json`` (history and the strategy used)."""
    # refused here, before any data is loaded, when the data cannot support the strategy (tasks/modeling/plan.py)
    choice, _ = plan(params, read_json(params.path("data", "manifest.json")))
    k = labels_per_class(params)
    selection = (
        select_strategy(params) if choice.measured else None
    )  # no target labels (tasks/modeling/strategy_choice.py)
    if choice.measured:
        choice = (
            Choice(selection["strategy"], "auto", selection["why"])
            if selection
            else Choice(choice.strategy, "auto", "no target labels, and no strategy of tune.strategies fits: the rule")
        )
    job, manifest = target_job(params, choice.strategy, params.finetune.strategy_params)
    classes = manifest["target"]["classes"]
    n_labeled = len(job.labeled) if job.labeled is not None else 0  # None: a strategy without the target stream
    say(
        f"finetune: strategy {choice.describe()} on {n_labeled} labeled target images ({budget_text(k)}), "
        f"{params.finetune.epochs} epochs"
        + (f"; {len(job.val)} more held out as validation images" if job.val is not None else "")
    )
    t0 = time.perf_counter()
    model, history, info = run_job_ray(job, params, "finetune", manifest)
    last = history[-1] if history else {}
    val = last.get("val_accuracy")
    say(
        f"finetune: {job.strategy} done in {time.perf_counter() - t0:.0f} s"
        + (f", last epoch loss {last['train_loss']:.3f}" if "train_loss" in last else "")
        + (f", validation accuracy {val * 100:.1f} %" if val is not None else "")
    )
    save_checkpoint(
        params.path("models", "finetuned.pt"),
        model,
        classes,
        job.in_channels,
        {"stage": "finetune", "strategy": job.strategy},
        spec=input_spec(params, job.arch, manifest),
    )
    summary = {
        "strategy": job.strategy,
        "strategy_requested": choice.requested,
        "strategy_why": choice.why,
        "selection": selection,
        "labels_per_class": k,
        "labeled": n_labeled,
        # the trained model on the held-out labeled validation images (the engine's last-epoch validation): what
        # the registration candidate is chosen by (tasks/modeling/candidate.py)
        "val_images": len(job.val) if job.val is not None else 0,
        "val_accuracy": val,
        **info,
        "history": history,
    }
    write_json(params.path("reports", "finetune.json"), summary)
    return summary


if __name__ == "__main__":
    stage_main(finetune)
