"""Stage ``baselines``: the yardsticks every transfer claim is measured against.

``scratch``: the same target label budget and schedule, trained from random weights (skipped,
``null``, when there are no target labels: nothing to train on). Its weights are kept
(``<models_dir>/baselines/scratch.pt``, with the input it was trained on): when it beats the transfer model on the
validation images, it is the model the run registers (:mod:`tasks.modeling.candidate`).
``source_only``: the source model applied to the target test split with no adaptation (``null``
when source and target have different label sets).
"""

from __future__ import annotations

from tasks.modeling.candidate import SCRATCH_MODEL
from tasks.modeling.checkpoints import load_checkpoint, save_checkpoint
from tasks.modeling.domains import load_domain
from tasks.modeling.hardware import device_for, set_torch_threads
from tasks.modeling.model_input import input_spec
from tasks.modeling.plan import budget_text, labels_per_class
from tasks.modeling.ray_train import run_job_ray
from tasks.modeling.train import target_job
from tasks.project.config import Params
from tasks.project.files import write_json
from tasks.project.report import pct
from tasks.project.stage import say, stage_main


def baselines(params: Params) -> dict:
    from tlcore import data, metrics

    set_torch_threads(params)
    device = device_for(params)
    job, manifest = target_job(params, "scratch")
    _, test_ds = load_domain(params, "target", job.arch, manifest)
    test_loader = data.make_loader(test_ds, 256, train=False)
    # per-image correctness on the test split (loader order) too: the gate compares models on the same images
    out = {
        "scratch_accuracy": None,
        "scratch_history": [],
        "source_only_accuracy": None,
        "scratch_correct": None,
        "source_only_correct": None,
        "scratch_val_accuracy": None,  # on the held-out labeled validation images, as finetune.json's val_accuracy
        "val_images": len(job.val) if job.val is not None else 0,
    }
    kept = params.path("models", *SCRATCH_MODEL)
    kept.parent.mkdir(parents=True, exist_ok=True)  # a DVC output: the folder exists even with no scratch model
    kept.unlink(missing_ok=True)
    if len(job.labeled):
        say(f"baselines: scratch on {len(job.labeled)} labeled target images ({budget_text(labels_per_class(params))})")
        model, out["scratch_history"], _ = run_job_ray(job, params, "baselines", manifest)
        ok = metrics.correct(model, test_loader, device)
        out["scratch_accuracy"], out["scratch_correct"] = float(ok.mean()), ok.astype(int).tolist()
        out["scratch_val_accuracy"] = (out["scratch_history"][-1:] or [{}])[0].get("val_accuracy")
        save_checkpoint(
            kept,
            model,
            manifest["target"]["classes"],
            job.in_channels,
            {"stage": "baselines", "strategy": "scratch"},
            spec=input_spec(params, job.arch, manifest),
        )
    else:
        say("baselines: scratch skipped (no target labels to train it on); the gain is measured over source_only")
    if manifest["same_label_space"]:
        source_model, _ = load_checkpoint(params.path("models", "source.pt"))
        ok = metrics.correct(source_model, test_loader, device)
        out["source_only_accuracy"], out["source_only_correct"] = float(ok.mean()), ok.astype(int).tolist()
    say(
        "baselines: "
        + ", ".join(
            f"{k.removesuffix('_accuracy')} {pct(out[k])}" for k in ("scratch_accuracy", "source_only_accuracy")
        )
        + (
            f"; scratch on the {out['val_images']} validation images {pct(out['scratch_val_accuracy'])}"
            if out["scratch_val_accuracy"] is not None
            else ""
        )
    )
    write_json(params.path("reports", "baselines.json"), out)
    return out


if __name__ == "__main__":
    stage_main(baselines)
