"""Stage ``baselines``: the yardsticks every transfer claim is measured against.

``scratch``: the same target label budget and schedule, trained from random weights.
``source_only``: the source model applied to the target test split with no adaptation.
"""
from __future__ import annotations

from .common import device_for, load_checkpoint, load_domain, say, stage_main, write_json
from .config import Params
from .finetune import make_job
from .pretrain import accuracy
from .distributed import run_job_ray


def baselines(params: Params) -> dict:
    device = device_for(params)
    job, manifest = make_job(params, "scratch")
    say(f"baselines: scratch on {len(job.labeled)} labeled target images")
    model, history = run_job_ray(job, params, "baselines", manifest)
    _, test_ds = load_domain(params, "target", job.arch)
    out = {"scratch_accuracy": accuracy(model, test_ds, device), "scratch_history": history, "source_only_accuracy": None}
    if manifest["same_label_space"]:
        source_model, _ = load_checkpoint(params.path("models", "source.pt"))
        out["source_only_accuracy"] = accuracy(source_model.to(device), test_ds, device)
    say(f"baselines: scratch {out['scratch_accuracy']:.4f}, source_only {out['source_only_accuracy']}")
    write_json(params.path("reports", "baselines.json"), out)
    return out


if __name__ == "__main__":
    stage_main(baselines)
