"""Real image sizes and pretrained backbones (tasks/modeling/model_input.py): the image size, channels, resize / crop,
normalisation and augmentation a run feeds its model follow ``data.image_size``, ``data.channels``,
``data.augment``, the data and the ImageNet weights; one in-process run of a torchvision ResNet on a
folder of RGB photos of mixed sizes, with its weights read from the torch cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import image_folder

from tasks.project.config import ParamsError, load_params

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
SIZES = [(40, 30), (64, 64), (100, 50), (30, 80)]  # (width, height): mixed sizes and aspect ratios


def _photos(root: Path, n_train=4, n_test=2) -> Path:
    """An RGB ImageFolder: each class a colour (so grey input would lose what tells them apart), noisy, in
    mixed sizes, as JPEG and PNG."""

    def pixels(rng, cls, i):
        w, h = SIZES[i % len(SIZES)]
        return np.clip(np.array(COLOURS[cls]) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)

    return image_folder(root, COLOURS, n_train, n_test, pixels, suffix=lambda i: "jpg" if i % 2 else "png")


def _manifest(target_channels: int) -> dict:
    return {"source": {"channels": 1}, "target": {"channels": target_channels}}


def test_image_size_channels_and_augment_resolve_from_weights_and_data(project, tmp_path):
    from tasks.modeling.model_input import augment, input_spec

    photos = _photos(tmp_path / "photos", 1, 1)
    p = load_params(project / "params.yaml")
    spec = input_spec(p, "smallcnn", _manifest(1))  # the demo as before: 32x32 grey, stretched, affine warp
    assert (spec.input_size, spec.default_in_channels, spec.resize_size, spec.mean) == (32, 1, None, (0.5,))
    assert augment(p, "source") == augment(p, "target") == "digits"
    assert input_spec(p, "smallcnn", _manifest(3)).default_in_channels == 3  # colour target: colour kept
    p = load_params(
        project / "params.yaml",
        ["pretrain.backbone=resnet18", "pretrain.weights=IMAGENET1K_V1", f"data.target={photos}"],
    )
    spec = input_spec(p, "resnet18", _manifest(3))  # ImageNet weights: their resolution, crop and mean/std
    assert (spec.input_size, spec.resize_size, spec.default_in_channels) == (224, 256, 3)
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406)) and spec.std == pytest.approx((0.229, 0.224, 0.225))
    assert (augment(p, "source"), augment(p, "target")) == ("digits", "photo")
    p.data.image_size, p.data.augment = 64, "none"  # a smaller size keeps the weights' crop ratio (256/224)
    spec = input_spec(p, "resnet18", _manifest(3))
    assert (spec.input_size, spec.resize_size) == (64, 73) and augment(p, "target") == "none"
    p.data.channels = 1
    assert input_spec(p, "resnet18", _manifest(3)).default_in_channels == 1
    p.pretrain.weights = None  # random init: the backbone's own size, stretched
    assert (input_spec(p, "resnet18", _manifest(3)).resize_size, input_spec(p, "resnet18", _manifest(3)).mean) == (
        None,
        (0.485, 0.456, 0.406),
    )
    with pytest.raises(
        ParamsError,
        match=r"pretrain.weights = 'IMAGENET1K_V1' names torchvision weights .* but "
        r"pretrain.backbone = 'smallcnn' has none; pick one of resnet18",
    ):
        load_params(project / "params.yaml", ["pretrain.weights=IMAGENET1K_V1"])  # tl check says so too
    for bad, why in (
        ("data.channels=2", "'auto', 1 or 3"),
        ("data.channels=true", "true is a boolean"),
        ("data.image_size=4", "greater than or equal to 8"),
        ("data.augment=flip", "'photo'"),
    ):
        with pytest.raises(ParamsError, match=why):
            load_params(project / "params.yaml", [bad])


def _in_process(monkeypatch, seen: list):
    """Ray Train's local mode runs the same loop; here it runs in-process (no Ray in this test)."""
    from tasks.modeling.train import run_job
    from tasks.stages import baselines, finetune

    def run(job, params, stage, manifest):
        seen.append(job)
        model, history = run_job(job, "cpu", log=None)
        return model, history, {}

    monkeypatch.setattr(finetune, "run_job_ray", run)
    monkeypatch.setattr(baselines, "run_job_ray", run)


def test_resnet18_with_cached_imagenet_weights_on_rgb_photos_of_mixed_sizes(project, tmp_path, monkeypatch, capsys):
    """data -> pretrain (ImageNet weights from the torch cache, no download) -> finetune -> baselines -> evaluate ->
    predict, in-process on CPU: colour kept for the photos, the grey digit source decoded as RGB to match, the
    weights' crop and normalisation recorded with the model and used again by predict."""
    from torchvision.models import ResNet18_Weights, resnet18

    from tasks.modeling.checkpoints import load_checkpoint
    from tasks.modeling.serving import classify
    from tasks.project.env import write_overrides
    from tasks.stages.baselines import baselines
    from tasks.stages.compress import compress
    from tasks.stages.data import prepare
    from tasks.stages.evaluate import evaluate
    from tasks.stages.finetune import finetune
    from tasks.stages.pretrain import pretrain
    from tlcore import metrics as tl_metrics

    start = time.perf_counter()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    imagenet = resnet18().state_dict()  # stands in for the real file, at the exact path torchvision uses
    torch.save(imagenet, cached)
    photos = _photos(tmp_path / "photos")
    write_overrides(
        project / "params.yaml",
        [
            f"data.target={photos}",
            "data.synth_per_class=3",
            "data.synth_test_per_class=2",
            "pretrain.backbone=resnet18",
            "pretrain.weights=IMAGENET1K_V1",
            "data.image_size=32",
            "finetune.epochs=1",
            "finetune.steps_per_epoch=1",
            "finetune.batch_size=4",
            "finetune.precision=fp32",
            "evaluate.latency_iters=2",
            "base.num_threads=1",
            "compress.methods=[int8, distill]",
            "compress.distill_epochs=1",
        ],
    )
    params = load_params(project / "params.yaml")
    jobs: list = []
    _in_process(monkeypatch, jobs)
    monkeypatch.setattr(tl_metrics, "throughput", lambda *a, **k: 0.0)  # batch-256 timing: not what is tested here
    monkeypatch.setattr("tasks.stages.data.PROGRESS_EVERY", 0.0)  # a progress line per image, not per 10 s

    manifest = prepare(params)
    assert (manifest["source"]["channels"], manifest["target"]["channels"]) == (1, 3)
    assert manifest["target"]["colour_images"] == 18
    pretrain(params)
    src, meta = load_checkpoint(params.path("models", "source.pt"))
    assert torch.equal(src.backbone.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])  # the cached file
    assert meta["in_channels"] == 3 and meta["input"]["size"] == 32 and meta["input"]["resize"] == 37
    ft = finetune(params)
    assert ft["strategy"] == "gradual_unfreeze" and ft["labeled"] == 12  # other classes; all of a folder's labels
    job = jobs[0]
    assert job.labeled.transform.photo and job.image_shape() == (3, 32, 32)  # colour, photo augmentation
    # decoded on a canvas its random crops cut 32 px from: 55 px for the crop, capped by the photos as stored (the
    # median of the shorter sides 30, 64, 50, 30 of each class is 40)
    assert job.labeled.images.shape[1:] == (3, 40, 40)
    assert job.labeled.images.float().std(1).mean() > 10  # the channels differ: not grey repeated three times
    baselines(params)
    m = evaluate(params)
    assert 0 <= m["accuracy"] <= 1 and m["test_images"] == 6
    comp = compress(params)  # the tinycnn student learns from the teacher's 32x32 RGB pixels
    assert {"fp32", "int8", "distill_tinycnn"} <= set(comp)

    model, meta = load_checkpoint(params.path("models", "finetuned.pt"))
    assert meta["input"] == {
        "size": 32,
        "resize": 37,
        "mean": list(ResNet18_Weights.IMAGENET1K_V1.transforms().mean),
        "std": list(ResNet18_Weights.IMAGENET1K_V1.transforms().std),
        "interpolation": "bilinear",
    }
    files = sorted((photos / "test").rglob("*.*"))
    rows = list(classify(model, meta, files))
    assert [r["path"] for r in rows] == [str(f) for f in files] and all(r["class"] in COLOURS for r in rows)
    out = capsys.readouterr().out
    assert "pretrain: resnet18 sees 32x32 RGB images (shorter side resized to 37, centre crop)" in out
    assert f"data: target {photos}: train 12, test 6 (18 in colour)" in out
    progress = [line for line in out.splitlines() if line.startswith("data: test: ") and " of 6 images " in line]
    assert [line.split()[2] for line in progress[-6:]] == ["1", "2", "3", "4", "5", "6"] and "(100%)" in progress[-1]
    print(f"resnet18 photo pipeline: {time.perf_counter() - start:.1f} s")


def test_a_source_model_on_other_channels_is_refused_before_training(project, tmp_path):
    from tasks.modeling.checkpoints import save_checkpoint
    from tasks.modeling.train import target_job
    from tasks.project.env import write_overrides
    from tasks.stages.data import prepare
    from tlcore import models

    photos = _photos(tmp_path / "photos", 1, 1)
    write_overrides(project / "params.yaml", [f"data.source={photos}", f"data.target={photos}"])
    params = load_params(project / "params.yaml")
    prepare(params)
    save_checkpoint(params.path("models", "source.pt"), models.create("smallcnn", 3, in_channels=1), list(COLOURS), 1)
    with pytest.raises(
        ParamsError,
        match=r"source model .*source\.pt takes 1-channel images, but this run feeds "
        r"3-channel ones \(data\.channels = 'auto'; the target .* is in colour\)"
        r".*Rerun pretrain .* or set data\.channels: 1",
    ):
        target_job(params, "finetune")
    params.data.channels = 1
    job, _ = target_job(params, "finetune")
    assert job.labeled.images.shape[1] == 1  # data.channels: 1 decodes the photos grey, as the model takes them
