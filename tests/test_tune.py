"""`tl tune`: the search space from params.yaml, a real Ray Tune search with ASHA over finetune jobs resumed after
its driver is killed, MLflow child runs, the best configuration applied like `dvc exp apply`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, env

from tasks.project.config import ParamsError, load_params
from tasks.project.measured import AUTO_VALIDATOR
from tlcore.validators import HIGHER_IS_BETTER


def _params(tmp_path, *overrides):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return load_params(tmp_path / "params.yaml", list(overrides))


def test_space_is_the_grid_and_the_objective_follows_the_labels(tmp_path):
    from tasks.cli.tune import objective, overrides, space

    p = _params(
        tmp_path,
        "tune.strategies=[finetune, mcc]",
        "tune.lr=[0.001, 0.01]",
        "tune.strategy_params={mcc: {temperature: [2.0, 3.0]}}",
        "tune.validator=entropy",
    )
    grid = space(p)
    assert len(grid) == 2 + 2 * 2
    assert {"strategy": "mcc", "lr": 0.01, "strategy_params": {"temperature": 3.0}} in grid
    assert objective(p) == ("val_free_entropy", "min")  # lower entropy is better
    assert objective(p.model_copy(update={"data": p.data.model_copy(update={"val_per_class": 3})})) == (
        "val_accuracy",
        "max",
    )
    assert overrides(grid[-1]) == [
        "finetune.strategy=mcc",
        "finetune.lr=0.01",
        'finetune.strategy_params={"temperature": 3.0}',
    ]


@pytest.mark.parametrize(
    "override,says",
    [
        ("tune.strategies=[nope]", "unknown strategy 'nope'"),
        ("tune.strategy_params={mcc: {bogus: [1]}}", "not accepted by strategy 'mcc'"),
        ("tune.strategy_params={dann: {lam: [1.0]}}", "not in tune.strategies"),
        ("tune.strategy_params={mcc: {temperature: []}}", "empty list"),
        ("tune.lr=[0]", "greater than 0"),
        ("tune.validator=accuracy", "tune.validator"),
    ],
)
def test_bad_search_space_is_refused_before_any_work(tmp_path, override, says):
    with pytest.raises(ParamsError, match=says):
        _params(tmp_path, override)


def test_a_space_the_data_cannot_run_is_refused_with_the_fix(tmp_path, monkeypatch):
    from tasks.cli.tune import _check_space, tune
    from tasks.project.stage import StageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="run the data and pretrain stages first"):
        tune(_params(tmp_path))  # no data/manifest.json, no models/source.pt
    digits = [str(d) for d in range(10)]
    manifest = {
        "source": {"name": "synth_digits", "classes": digits},
        "target": {"name": "optdigits", "classes": digits},
    }
    _check_space(_params(tmp_path, "data.labels_per_class=0", "tune.strategies=[mcc, semi]"), manifest)
    with pytest.raises(ParamsError, match="tune.strategies lists 'finetune', which cannot run here"):
        _check_space(_params(tmp_path, "data.labels_per_class=0", "tune.strategies=[mcc, finetune]"), manifest)
    manifest["target"]["classes"] = ["a", "b"]  # other classes: only a new head can learn them
    with pytest.raises(ParamsError, match="'mcc', which cannot run here"):
        _check_space(_params(tmp_path, "tune.strategies=[finetune, mcc]"), manifest)


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project with its data stage run (tiny synthetic source, the embedded target) and a source model."""
    from tasks.modeling.checkpoints import save_checkpoint
    from tasks.stages.data import prepare
    from tlcore import models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TL_MLFLOW_ARTIFACTS", str(tmp_path / "mlruns"))
    # synthetic digits on both sides: small (the embedded optdigits target would be 1,797 images to write)
    sets = [
        "data.target=synth_digits",
        "data.synth_per_class=20",
        "data.synth_test_per_class=5",
        "base.num_threads=1",
        "finetune.steps_per_epoch=3",
        "finetune.batch_size=16",
        "tune.strategies=[finetune, mcc]",
        "tune.lr=[0.003]",
        "tune.strategy_params={mcc: {temperature: [2.0, 3.0]}}",
        "tune.epochs=2",
    ]
    p = _params(tmp_path, *sets)
    prepare(p)
    save_checkpoint(p.path("models", "source.pt"), models.create("tinycnn", 10), [str(d) for d in range(10)], 1)
    return tmp_path, sets


def _kill_after_first_trial(root, sets) -> None:
    """`tl tune` in its own process group, killed (SIGKILL, the driver and its local Ray) once the first trial
    has reported both epochs, i.e. in the middle of the search."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import env

    cmd = [sys.executable, "-m", "tasks.cli.main", "tune", *sum((["-S", s] for s in sets), [])]
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env={**env(), "PYTHONPATH": str(ROOT)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [
                f for f in root.glob("ray_results/tune/*/trial_*/result.json") if len(f.read_text().splitlines()) >= 2
            ]
            if done:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"tl tune ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        assert done, "the first trial did not finish in 90 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_tune_resumes_after_a_crash_logs_every_trial_and_applies_the_best(project):
    from tasks.cli.tune import experiment_name
    from tasks.project.config import load_params
    from tasks.project.files import read_json
    from tasks.services.tracking import client

    root, sets = project
    _kill_after_first_trial(root, sets)
    assert not (root / "reports" / "tune.json").exists()
    first = {
        f.parent.name: f.read_text()
        for f in root.glob("ray_results/tune/*/trial_*/result.json")
        if len(f.read_text().splitlines()) >= 2
    }

    # the same command again: the experiment is restored, the finished trial kept, the rest run; --apply writes back
    # in its own process, as a user reruns it (not in pytest's, where an earlier test's Ray session may linger)
    r = subprocess.run(
        [sys.executable, "-m", "tasks.cli.main", "tune", "--apply", "--json", *sum((["-S", s] for s in sets), [])],
        cwd=root,
        env={**env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout)  # --json: stdout is the result alone (progress goes to stderr)
    assert out == json.loads((root / "reports" / "tune.json").read_text())
    # tune.validator auto: the selection benchmark's best (entropy: lower is better)
    assert out["restored"] and out["objective"] == f"val_free_{AUTO_VALIDATOR}"
    assert out["mode"] == ("max" if HIGHER_IS_BETTER[AUTO_VALIDATOR] else "min")
    assert {
        f.parent.name: f.read_text()
        for f in root.glob("ray_results/tune/*/trial_*/result.json")
        if f.parent.name in first
    } == first  # not rerun: its results are the killed driver's, byte for byte
    assert len(out["trials"]) == 3 and not any(t["error"] for t in out["trials"])
    assert {t["config"]["strategy"] for t in out["trials"]} == {"finetune", "mcc"}
    assert all(1 <= t["epochs"] <= 2 for t in out["trials"]) and max(t["epochs"] for t in out["trials"]) == 2
    assert out["best_objective"] == (max if out["mode"] == "max" else min)(t["objective"] for t in out["trials"])

    c = client()
    runs = c.search_runs(
        [c.get_experiment_by_name("transfer-pipeline").experiment_id], f"tags.tl_tune = '{out['experiment']}'"
    )
    parent = [r for r in runs if r.data.tags["tl_tune_role"] == "parent"]
    children = [r for r in runs if r.data.tags["tl_tune_role"] == "trial"]
    assert len(parent) == 1 and len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    assert {r.data.params["strategy"] for r in children} == {"finetune", "mcc"}
    assert all(f"val_free_{AUTO_VALIDATOR}" in r.data.metrics for r in children)

    applied = load_params("params.yaml")
    assert (applied.finetune.strategy, applied.finetune.lr, applied.finetune.strategy_params) == (
        out["best"]["strategy"],
        out["best"]["lr"],
        out["best"]["strategy_params"],
    )
    assert "# tl tune: a grid search" in (root / "params.yaml").read_text()  # comments kept
    # the applied values are not part of the search's identity: the next `tl tune` finds the same experiment
    assert experiment_name(load_params("params.yaml", sets), read_json("data/manifest.json")) == out["experiment"]
