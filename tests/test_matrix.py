"""Every label budget and label-space combination end to end (issue 11): {0, 1, all target labels per class} x
{same, different label set} x {embedded target, a user's ImageFolder target}. Each cell either runs the real
finetune -> baselines -> evaluate stages (Ray Train local mode, ``tinycnn``, one tiny epoch) with the strategy
``auto`` chose, or is refused before any training with the error that says why (0 labels, different label sets).

Four projects (one per target kind x label set), two source models: each source is pretrained once, by the real
stage, and its ``models/source.pt`` shared by the two projects that use it. Stage functions run in this process
(``python -m tasks.stages.<stage>`` would pay a torch import per stage and cell); tests/test_pipeline.py runs them as
DVC
runs them."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, image_folder

from tasks.project.config import ParamsError, load_params

pytestmark = pytest.mark.slow

TINY = [
    "data.synth_per_class=12",
    "data.synth_test_per_class=4",
    "pretrain.backbone=tinycnn",
    "pretrain.epochs=1",
    "pretrain.steps_per_epoch=2",
    "pretrain.batch_size=16",
    "finetune.epochs=1",
    "finetune.steps_per_epoch=2",
    "finetune.batch_size=16",
    "pretrain.precision=fp32",
    "finetune.precision=fp32",
    "evaluate.latency_iters=2",
    "base.num_threads=1",
    "ray.num_workers=0",
    "tune.epochs=1",
]
PETS = ("cat", "dog")
N_TRAIN, N_TEST = 5, 3  # per class in the user folders
OPTDIGITS_TRAIN = 1257  # images in the embedded optdigits target's training split


def _folder(root: Path, seed: int) -> Path:
    """A user's ImageFolder: RGB photos of mixed sizes (read in colour, resized to the backbone's 32x32)."""

    def pixels(rng, cls, i):
        size = tuple(int(s) for s in rng.integers(20, 48, 2))
        return rng.integers(0, 256, (*size, 3), dtype=np.uint8)

    return image_folder(root, PETS, N_TRAIN, N_TEST, pixels, seed)


# (target kind, label set) -> (source, target): the user folders are made by the fixture
PROJECTS = {
    ("embedded", "same"): ("synth_digits", "optdigits"),
    ("embedded", "different"): ("PETS_SOURCE", "optdigits"),
    ("user", "same"): ("PETS_SOURCE", "PETS_TARGET"),
    ("user", "different"): ("synth_digits", "PETS_TARGET"),
}


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    from tasks.project.env import write_overrides
    from tasks.stages.data import prepare
    from tasks.stages.pretrain import pretrain

    base = tmp_path_factory.mktemp("matrix")
    folders = {"PETS_SOURCE": _folder(base / "pets_source", 0), "PETS_TARGET": _folder(base / "pets_target", 1)}
    out, trained = {}, {}
    for key, (src, tgt) in PROJECTS.items():
        p = base / "-".join(key)
        p.mkdir()
        shutil.copy(ROOT / "params.yaml", p / "params.yaml")
        write_overrides(
            p / "params.yaml", [f"data.source={folders.get(src, src)}", f"data.target={folders.get(tgt, tgt)}", *TINY]
        )
        with contextlib.chdir(p):
            params = load_params("params.yaml")
            prepare(params)
            # one source model per source and channel count (data.channels auto follows the target), shared
            model_key = (src, json.loads((p / "data" / "manifest.json").read_text())["target"]["channels"])
            if model_key in trained:
                (p / "models").mkdir()
                shutil.copy(trained[model_key] / "models" / "source.pt", p / "models" / "source.pt")
                (p / "reports").mkdir()
                shutil.copy(trained[model_key] / "reports" / "pretrain.json", p / "reports" / "pretrain.json")
            else:
                pretrain(params)
                trained[model_key] = p
        out[key] = p
    return out


_DECODED: dict = {}  # (data folder, role, arch, skip_corrupt) -> (train, test), for the module's projects


@pytest.fixture()
def decoded_once(monkeypatch):
    """Each stage decodes its domains again (the 1,797 optdigits PNGs up to four times per cell); decoding is
    tested in tests/test_data.py and tests/test_images.py, so here each domain is decoded once per project and
    every stage gets fresh datasets over the same pixels."""
    from tasks.modeling import domains
    from tasks.stages import baselines, evaluate
    from tlcore.data import ImageDataset

    real, memo = domains.load_domain, _DECODED

    def load_domain(params, role, arch, manifest=None):
        key = (
            str(params.path("data", role).resolve()),
            role,
            arch,
            params.model_dump_json(include={"data"}),
            json.dumps(manifest, sort_keys=True, default=str),
        )
        if key not in memo:
            memo[key] = real(params, role, arch, manifest)
        return tuple(ImageDataset(d.images, d.targets, d.classes, d.transform) for d in memo[key])

    for module in (domains, baselines, evaluate):
        monkeypatch.setattr(module, "load_domain", load_domain)


CELLS = [
    (kind, labels, budget)
    for kind in ("embedded", "user")
    for labels in ("same", "different")
    for budget in (0, 1, "all")
]


@pytest.mark.parametrize("kind,labels,budget", CELLS, ids=["-".join(map(str, c)) for c in CELLS])
def test_every_label_budget_and_label_set(projects, decoded_once, kind, labels, budget, monkeypatch, capsys):
    from tasks.modeling.plan import plan
    from tasks.stages.baselines import baselines
    from tasks.stages.evaluate import evaluate
    from tasks.stages.finetune import finetune

    project = projects[(kind, labels)]
    monkeypatch.chdir(project)
    # "all": null for the embedded target (whose auto is the demo's 2), auto for a user's folder (auto = all)
    k = {0: "0", 1: "1", "all": "null" if kind == "embedded" else "auto"}[budget]
    params = load_params("params.yaml", [f"data.labels_per_class={k}"])
    same = labels == "same"
    if budget == 0 and not same:
        # refused before any training, by the plan (tl check, tl run) and by the finetune stage itself
        for attempt in (lambda: plan(params), lambda: finetune(params)):
            with pytest.raises(
                ParamsError,
                match=r"labels_per_class = 0 cannot work with this data.*new classifier "
                r"head.*data\.labels_per_class >= 1",
            ):
                attempt()
        assert not (project / "models" / "finetuned.pt").exists()
        return
    ft = finetune(params)
    want = "semi" if same else "gradual_unfreeze"
    sel = ft["selection"]
    if budget == 0:  # no labels at all: auto measures tune.strategies by the benchmark's best validator, no rule
        from tasks.project.measured import AUTO_STRATEGY_VALIDATOR as auto
        from tlcore.validators import HIGHER_IS_BETTER

        assert sel["objective"] == auto and set(sel["scores"]) == set(params.tune.strategies) and not sel["dropped"]
        pick = (max if HIGHER_IS_BETTER[auto] else min)(sel["scores"], key=sel["scores"].get)
        assert sel["strategy"] == pick and ft["strategy_why"] == sel["why"]
        # the adaptation check: the pick against a dann witness on the pool, flagged below half agreement
        check = sel["check"]
        assert check["witness"] == "dann" and 0 <= check["agreement"] <= 1
        assert check["failed"] == (check["agreement"] < 0.5) and f"{check['agreement'] * 100:.0f} %" in check["why"]
        want = pick
    else:
        assert sel is None
    n_train = OPTDIGITS_TRAIN if kind == "embedded" else N_TRAIN * len(PETS)
    n_classes = 10 if kind == "embedded" else len(PETS)
    assert (ft["strategy"], ft["strategy_requested"]) == (want, "auto")
    # all labels: data.val_per_class auto holds 20 % of the smallest class out to choose the registered model by
    # (optdigits: 24 per class); a label budget, or the user folder's 5 images per class, spare none
    val = ft["val_images"] // n_classes
    assert val == (24 if (kind, budget) == ("embedded", "all") else 0)
    assert ft["labeled"] == {0: 0, 1: n_classes, "all": n_train - val * n_classes}[budget]
    base = baselines(params)
    m = evaluate(params)
    out = capsys.readouterr().out
    assert f"finetune: strategy {want} (auto: " + ("no target labels; " if budget == 0 else "source and target ") in out
    said = {0: "none", 1: "1 per class", "all": "all"}[budget]
    assert f"{ft['labeled']} labeled target images ({said})" in out
    assert m["strategy"] == want == json.loads((project / "reports" / "metrics.json").read_text())["strategy"]
    if budget == 0:  # nothing to train scratch on: skipped, and the gain is measured over source_only
        assert "finetune: adaptation check: " in out
        report = (project / "reports" / "report.md").read_text()
        assert ("Adaptation probably failed." if check["failed"] else "Adaptation check passed.") in report
        assert base["scratch_accuracy"] is None and "scratch skipped" in out
        assert m["gain_baseline"] == "source_only"
        assert m["transfer_gain"] == pytest.approx(m["accuracy"] - m["source_only_accuracy"])
    else:
        assert m["gain_baseline"] == "scratch" and 0 <= base["scratch_accuracy"] <= 1
        assert m["transfer_gain"] == pytest.approx(m["accuracy"] - m["scratch_accuracy"])
    # source_only applies only when the source classifier knows the target's classes
    assert (m["source_only_accuracy"] is not None) == same
    assert ("source_only n/a" in out) == (not same) and "None" not in out
    assert 0 <= m["accuracy"] <= 1
    free = {k: v for k, v in m.items() if k.startswith("val_free_")}
    assert set(free) == {"val_free_entropy", "val_free_im", "val_free_snd", "val_free_bnm", "val_free_dev"}
    assert (free.pop("val_free_dev") is None) == (not same)  # DEV needs the source's classes
    assert all(isinstance(v, float) for v in free.values())
    report = (project / "reports" / "report.md").read_text()
    assert f"strategy `{want}`, target labels: {said} ({ft['labeled']} labeled target images)" in report
    # the model the run would register: scratch or the transfer model, by accuracy on the validation images
    cand = "scratch" if val and base["scratch_val_accuracy"] > ft["val_accuracy"] else want
    assert f"**Registration candidate: {cand} (" in report and m["candidate"] == cand
    assert (f"on {ft['val_images']} validation images" in report) == (val > 0)
    assert ("Transfer gain over source_only" if budget == 0 else "Transfer gain over scratch") in report
