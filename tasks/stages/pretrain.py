"""Stage ``pretrain``: train the source model on the source domain -> ``models/source.pt``.

Skipped (the backbone is only wrapped and saved) when ``pretrain.weights`` names torchvision
ImageNet weights or a file the user has.
"""

from __future__ import annotations

from tasks.modeling.checkpoints import save_checkpoint
from tasks.modeling.domains import load_domain
from tasks.modeling.hardware import device_for, set_torch_threads
from tasks.modeling.model_input import input_spec
from tasks.modeling.ray_train import run_job_ray
from tasks.modeling.train import TrainJob
from tasks.project.config import Params
from tasks.project.files import read_json, write_json
from tasks.project.stage import say, stage_main


def pretrain(params: Params) -> dict:
    """Train (or load) the source model; returns a summary."""
    from tlcore import data, metrics, models

    manifest = read_json(params.path("data", "manifest.json"))
    classes = manifest["source"]["classes"]
    arch = params.pretrain.backbone
    spec = input_spec(params, arch, manifest)
    out = params.path("models", "source.pt")
    set_torch_threads(params)
    device = device_for(params)
    channels = spec.default_in_channels
    say(
        f"pretrain: {arch} sees {spec.input_size}x{spec.input_size} {'grey' if channels == 1 else 'RGB'} images"
        + (f" (shorter side resized to {spec.resize_size}, centre crop)" if spec.resize_size else "")
    )
    if params.pretrain.weights:
        say(f"pretrain: using given weights {params.pretrain.weights} for {arch}; no source training")
        model = models.create(arch, len(classes), in_channels=channels, weights=params.pretrain.weights)
        summary = {"weights": params.pretrain.weights, "history": [], "source_test_accuracy": None}
    else:
        train_ds, test_ds = load_domain(params, "source", arch, manifest)
        say(
            f"pretrain: {arch} on {manifest['source']['name']} ({len(train_ds)} images, {params.pretrain.epochs} "
            f"epochs)"
        )
        job = TrainJob(
            arch, len(classes), "scratch", params.pretrain, params.base.seed, labeled=train_ds, in_channels=channels
        )
        model, history, info = run_job_ray(job, params, "pretrain", manifest)
        acc = metrics.accuracy(model, data.make_loader(test_ds, 256, train=False), device)
        say(f"pretrain: source test accuracy {acc * 100:.1f} %")
        summary = {"weights": None, **info, "history": history, "source_test_accuracy": acc}
    save_checkpoint(out, model, classes, channels, {"stage": "pretrain"}, spec=spec)
    write_json(params.path("reports", "pretrain.json"), summary)
    return summary


if __name__ == "__main__":
    stage_main(pretrain)
