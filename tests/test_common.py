import pytest

from tasks.modeling.checkpoints import load_checkpoint, save_checkpoint
from tasks.project.files import atomic_path, write_json


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "metrics.json"
    write_json(p, {"accuracy": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text('{"accur')  # interrupted half-way
            raise RuntimeError("killed")
    assert p.read_text().startswith('{\n  "accuracy": 0.9')
    assert [f.name for f in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoint_roundtrip_weights_only(tmp_path):
    import torch

    from tlcore import models

    m = models.create("smallcnn", 4)
    save_checkpoint(tmp_path / "m.pt", m, ["a", "b", "c", "d"], 1)
    m2, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["classes"] == ["a", "b", "c", "d"] and meta["arch"] == "smallcnn"
    x = torch.randn(2, 1, 32, 32)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        load_checkpoint(tmp_path / "missing.pt")


def test_registry_client_leaves_the_environment_alone(tmp_path, monkeypatch):
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI; a flow process that read the registry
    would then send every later DVC stage (a subprocess) to that store."""
    import os

    from tasks.services.tracking import client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert client().search_registered_models() == []
    assert "MLFLOW_TRACKING_URI" not in os.environ and (tmp_path / "mlflow.db").is_file()


def test_default_registry_is_anchored_to_the_project_root(tmp_path, monkeypatch):
    from tasks.services.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "reports" / "figures").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "reports" / "figures")
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///team.db")  # relative: against the root, not the cwd
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/team.db"


def test_overrides_are_written_atomically_keeping_comments_and_mode(tmp_path):
    import os

    from tasks.project.env import write_overrides

    p = tmp_path / "params.yaml"
    p.write_text("finetune:\n  strategy: semi   # the default\n  lr: 0.003\n")
    os.chmod(p, 0o644)
    write_overrides(p, ["finetune.strategy=mcc", "finetune.lr=1e-3"])
    text = p.read_text()
    assert "strategy: mcc" in text and "# the default" in text and "lr: 0.001" in text  # a number, not '1e-3'
    assert oct(p.stat().st_mode & 0o777) == "0o644" and [f.name for f in tmp_path.iterdir()] == ["params.yaml"]


@pytest.mark.parametrize(
    "strategy,ok",
    [("linear_probe", False), ("finetune", False), ("joint", False), ("mcc", True), ("semi", True), ("dann", True)],
)
def test_zero_labels_refuse_strategies_that_need_them_before_any_work(strategy, ok):
    from helpers import ROOT

    from tasks.project.config import ParamsError, load_params

    sets = [f"finetune.strategy={strategy}", "data.labels_per_class=0"]
    if ok:
        assert load_params(ROOT / "params.yaml", sets).finetune.strategy == strategy
    else:
        with pytest.raises(ParamsError, match="labels_per_class = 0"):
            load_params(ROOT / "params.yaml", sets)


def test_git_dirty_counts_a_new_untracked_module(tmp_path, monkeypatch):
    import subprocess

    from tasks.project.lineage import git_info

    monkeypatch.delenv("TL_GIT_COMMIT", raising=False)
    e = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for k, v in e.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "stage.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=tmp_path, check=True)
    assert git_info(tmp_path)["git_dirty"] == "false"
    (tmp_path / "notes.txt").write_text("scratch")  # untracked outside the code: still clean
    assert git_info(tmp_path)["git_dirty"] == "false"
    (tmp_path / "tasks" / "new_helper.py").write_text("y = 2\n")  # code the run may import, in no commit
    assert git_info(tmp_path)["git_dirty"] == "true"


def test_git_dirty_paths_name_every_changed_file_whole(tmp_path, monkeypatch):
    """`tl run -S` rewrites params.yaml (the first line of `git status`): its name must survive intact, so that
    `tl reproduce` sees a restorable params change, not uncommitted code."""
    import subprocess

    from tasks.cli.reproduce import uncommitted_code
    from tasks.project.lineage import git_info

    monkeypatch.delenv("TL_GIT_COMMIT", raising=False)
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@t")
    (tmp_path / "tasks").mkdir()
    for f in ("params.yaml", "dvc.lock", "tasks/stage.py", "tasks/old name.py"):
        (tmp_path / f).write_text("x: 1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("x: 2\n")  # what `tl run -S x=2` does
    (tmp_path / "dvc.lock").write_text("x: 2\n")
    info = git_info(tmp_path)
    assert info["git_dirty"] == "true" and info["git_dirty_paths"] == "dvc.lock,params.yaml"
    assert uncommitted_code(info) == []  # both are restored by the replay: not dirty code
    (tmp_path / "tasks" / "stage.py").write_text("x: 3\n")
    subprocess.run(["git", "mv", "tasks/old name.py", "tasks/new name.py"], cwd=tmp_path, check=True)
    info = git_info(tmp_path)
    assert info["git_dirty_paths"] == "dvc.lock,params.yaml,tasks/new name.py,tasks/old name.py,tasks/stage.py"
    assert uncommitted_code(info) == ["tasks/new name.py", "tasks/old name.py", "tasks/stage.py"]
    assert uncommitted_code({"git_dirty": "true"}) is None  # dirty, but which files was not recorded
    assert uncommitted_code({"git_dirty": "false", "git_dirty_paths": ""}) == []
