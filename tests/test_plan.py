"""A user's own data, any label budget (tasks/modeling/plan.py): ``finetune.strategy: auto`` and
``data.labels_per_class: auto``
resolve from the label sets, and a strategy the data cannot support is refused before any training, in
``tl check``, ``tl run`` and the finetune stage. Tiny image folders; the stages themselves run every combination in
tests/test_matrix.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import image_folder

from tasks.modeling.plan import budget_text, label_sets, labels_per_class, plan
from tasks.project.config import ParamsError, load_params


def _folder(root: Path, classes=("cat", "dog"), n_train=3, n_test=2) -> Path:
    return image_folder(root, classes, n_train, n_test, seed=len(classes))


def _plan(project, sets=()):
    return plan(load_params(project / "params.yaml", list(sets)), root=project)


def test_defaults_are_auto_and_keep_the_embedded_demo_as_it_was(project):
    p = load_params(project / "params.yaml")
    assert (p.data.labels_per_class, p.finetune.strategy) == ("auto", "auto")
    choice, sets = _plan(project)
    assert (choice.strategy, labels_per_class(p), sets.same) == ("semi", 2, True)  # as the old explicit defaults
    assert choice.describe() == "semi (auto: source and target share one label set)" and not choice.measured
    # no target labels: the plan (tl check, tl run) says the finetune stage will measure, not that semi runs
    choice, _ = _plan(project, ["data.labels_per_class=0"])
    assert choice.measured and choice.describe().startswith("measured (auto: no target labels: the finetune stage")
    assert not _plan(project, ["data.labels_per_class=0", "finetune.strategy=mcc"])[0].measured


def test_auto_picks_a_plain_method_for_other_classes_and_all_of_a_user_folders_labels(project, tmp_path):
    target = _folder(tmp_path / "pets")
    p = load_params(project / "params.yaml", [f"data.target={target}"])
    choice, sets = plan(p, root=project)
    assert (choice.strategy, choice.requested, sets.same) == ("gradual_unfreeze", "auto", False)
    assert sets.target == ["cat", "dog"] and sets.origin == "the class folders of train/"
    assert labels_per_class(p) is None and budget_text(None) == "all"
    assert (
        labels_per_class(load_params(project / "params.yaml", [f"data.target={target}", "data.labels_per_class=3"]))
        == 3
    )
    same = _folder(tmp_path / "pets_src")  # the same class folders on both sides: semi again
    assert _plan(project, [f"data.target={target}", f"data.source={same}"])[0].strategy == "semi"


def test_auto_with_no_labels_and_other_classes_says_why(project, tmp_path):
    target = _folder(tmp_path / "pets")
    with pytest.raises(
        ParamsError,
        match=r"labels_per_class = 0 cannot work.*cat, dog.*read from the class folders"
        r".*new classifier head.*data\.labels_per_class >= 1",
    ):
        _plan(project, [f"data.target={target}", "data.labels_per_class=0"])


@pytest.mark.parametrize("strategy", ["semi", "mcc", "dann"])
def test_a_strategy_that_needs_one_label_set_is_refused_with_what_where_and_fix(project, tmp_path, strategy):
    target = _folder(tmp_path / "pets")
    with pytest.raises(ParamsError) as e:
        _plan(project, [f"data.target={target}", f"finetune.strategy={strategy}"])
    msg = str(e.value)
    assert f"finetune.strategy = '{strategy}' cannot work with this data" in msg
    assert "source 'synth_digits' has classes 0, 1, 2, 3, 4, 5, ... (10 classes)" in msg and "cat, dog" in msg
    assert "Set finetune.strategy to auto (it picks gradual_unfreeze here)" in msg and "finetune" in msg
    for ok in ("finetune", "gradual_unfreeze", "joint", "linear_probe"):
        assert _plan(project, [f"data.target={target}", f"finetune.strategy={ok}"])[0].strategy == ok


def test_the_manifest_decides_when_it_was_written_for_this_source_and_target(project):
    p = load_params(project / "params.yaml")
    (project / "data").mkdir()
    m = {
        "source": {"name": "synth_digits", "classes": ["0", "1"]},
        "target": {"name": "optdigits", "classes": ["a"]},
        "same_label_space": False,
    }
    (project / "data" / "manifest.json").write_text(json.dumps(m))
    sets = label_sets(p, root=project)
    assert not sets.same and sets.origin.endswith("manifest.json")
    m["target"]["name"] = "elsewhere"  # a manifest of other data: the folders (here: the embedded names) decide
    (project / "data" / "manifest.json").write_text(json.dumps(m))
    assert label_sets(p, root=project).same


def test_labels_per_class_keys(project):
    assert load_params(project / "params.yaml", ["data.labels_per_class=null"]).data.labels_per_class is None
    with pytest.raises(ParamsError, match="true is a boolean"):  # auto did not open the door to booleans
        load_params(project / "params.yaml", ["data.labels_per_class=true"])
    with pytest.raises(ParamsError, match="larger than the smallest optdigits class"):
        load_params(project / "params.yaml", ["data.labels_per_class=500"])


# --- refused before any training: tl check, tl run, the finetune stage --------------------------------------


def test_tl_check_and_tl_run_refuse_before_any_stage(project, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tasks.cli import main as cli

    monkeypatch.setattr(cli, "_dvc", lambda *a, **k: pytest.fail("tl run started DVC despite an impossible strategy"))
    target = _folder(tmp_path / "pets")
    bad = ["-S", f"data.target={target}", "-S", "finetune.strategy=semi"]
    for cmd in ("check", "run"):
        r = CliRunner().invoke(cli.app, [cmd, *bad])
        assert r.exit_code == 2 and "'semi' cannot work with this data" in r.output
    assert "strategy: auto" in (project / "params.yaml").read_text()  # tl run wrote nothing
    r = CliRunner().invoke(cli.app, ["check", "-S", f"data.target={target}"])
    assert (
        r.exit_code == 0
        and "plan: strategy gradual_unfreeze (auto: source and target have different label sets); target labels: all"
        in r.output
    )


def _stage_project(project, tmp_path, target_classes=("cat", "dog")):
    """Data stage on tiny folders and a stand-in source model: what the finetune stage needs."""
    from tasks.modeling.checkpoints import save_checkpoint
    from tasks.stages.data import prepare
    from tlcore import models

    src, tgt = _folder(tmp_path / "src", ("x", "y")), _folder(tmp_path / "tgt", target_classes)
    from tasks.project.env import write_overrides

    write_overrides(
        project / "params.yaml",
        [
            f"data.source={src}",
            f"data.target={tgt}",
            "finetune.epochs=1",
            "finetune.steps_per_epoch=1",
            "finetune.batch_size=4",
            "finetune.precision=fp32",
            "evaluate.latency_iters=2",
        ],
    )
    params = load_params(project / "params.yaml")
    prepare(params)
    save_checkpoint(params.path("models", "source.pt"), models.create("smallcnn", 2), ["x", "y"], 1)
    return params


def test_finetune_stage_refuses_before_loading_data(project, tmp_path, monkeypatch):
    from tasks.stages import finetune

    params = _stage_project(project, tmp_path)
    monkeypatch.setattr(finetune, "target_job", lambda *a, **k: pytest.fail("loaded data for an impossible strategy"))
    params.finetune.strategy = "mcc"
    with pytest.raises(ParamsError, match=r"'mcc' cannot work with this data.*read from .*manifest\.json"):
        finetune.finetune(params)


# the strategy used, printed and recorded with real stages for every label budget and label set: tests/test_matrix.py


def _train_split(per_class=(6, 6, 6)):
    import torch

    from tlcore.data import ImageDataset

    y = torch.tensor([c for c, n in enumerate(per_class) for _ in range(n)])
    images = torch.arange(len(y), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return ImageDataset(images, y, [str(c) for c in range(len(per_class))])  # pixel value = index: subsets trace back


def _ids(ds) -> list[int]:
    return [] if ds is None else ds.images[:, 0, 0, 0].tolist()


@pytest.mark.parametrize("k,val", [(2, 1), (0, 2), (None, 1), ("auto", 0)])
def test_target_splits_labeled_pool_and_validation(k, val):
    """The finetune and compress stages' split of the target's training images for a label budget."""
    from tasks.modeling.train import target_splits
    from tasks.project.config import Params
    from tasks.project.measured import DEMO_LABELS_PER_CLASS

    train = _train_split()
    params = Params.model_validate({"data": {"labels_per_class": k, "val_per_class": val}, "base": {"seed": 3}})
    labeled, pool, v = target_splits(params, train)
    per_class = {"auto": DEMO_LABELS_PER_CLASS, None: 6 - val}.get(k, k)
    assert np.bincount(labeled.targets.numpy(), minlength=3).tolist() == [per_class] * 3
    assert np.bincount(train.targets[_ids(v)].numpy(), minlength=3).tolist() == [val] * 3 and (v is None) == (val == 0)
    # the pool is every training image outside validation, labeled ones included; validation never trains
    assert _ids(pool) == sorted(set(range(18)) - set(_ids(v))) and set(_ids(labeled)) <= set(_ids(pool))
    assert _ids(target_splits(params, train)[0]) == _ids(labeled)  # the same split on every run
    other = Params.model_validate({"data": {"labels_per_class": 2, "val_per_class": 1}, "base": {"seed": 4}})
    if k == 2:
        assert _ids(target_splits(other, train)[0]) != _ids(labeled)  # drawn from base.seed


def test_val_per_class_auto_holds_out_labels_only_when_every_label_is_used(project):
    """``data.val_per_class: auto`` (the default): validation images to choose the registered model by, carved from
    the training labels when all of them are used and the smallest class can spare 5 (20 %, at most 100); never
    beside a label budget, which would spend labels the budget says are not there."""
    from tasks.modeling.plan import train_counts, val_per_class

    p = load_params(project / "params.yaml")
    assert p.data.val_per_class == "auto" and val_per_class(p) == 0  # the embedded demo: 2 labels per class, none
    every = load_params(project / "params.yaml", ["data.labels_per_class=null"])
    assert val_per_class(every, [125, 140, 121]) == 24  # 20 % of the smallest class
    assert val_per_class(every, [47, 60, 52]) == 9  # a user's small photo folder
    assert val_per_class(every, [24, 60]) == 0 and val_per_class(every, [25, 60]) == 5  # too few to spare: none
    assert val_per_class(every, [5000, 9000]) == 100
    assert val_per_class(load_params(project / "params.yaml", ["data.labels_per_class=0"]), [100, 100]) == 0
    assert val_per_class(load_params(project / "params.yaml", ["data.val_per_class=7"]), [100, 100]) == 7
    assert train_counts({"target": {"splits": {"train": {"per_class": {"a": 30, "b": 40}}}}}) == [30, 40]
    with pytest.raises(ParamsError, match="data.val_per_class"):
        load_params(project / "params.yaml", ["data.val_per_class=-1"])
