"""The `tl` CLI: lazy imports, and `tl submit`'s checks (the submission itself runs against the stack in
tests/test_stack.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env as sh_env

TL = Path(sys.executable).parent / "tl"


def test_cli_module_imports_no_heavy_packages():
    code = (
        "import sys, tasks.cli.main; heavy = [m for m in ('torch', 'ray', 'prefect', 'mlflow', 'dvc') if m in "
        "sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    r = subprocess.run([str(TL), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "submit" in r.stdout and "promote" in r.stdout


def test_cli_errors_are_one_paragraph(tmp_path):
    # --name: the model is named, so no params.yaml is needed and the error is about the image
    r = subprocess.run(
        [str(TL), "predict", "--name", "digits-transfer", str(tmp_path / "missing.png")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'missing.png'} does not exist; pass image files"), r.stderr
    r = subprocess.run([str(TL), "predict", "x.png"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "params.yaml not found; run from the project root" in r.stderr  # what it needed first
    r = subprocess.run(
        [str(TL), "--debug", "check", "--params", str(tmp_path / "nope.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "nope.yaml" in r.stderr  # --debug shows it


def _project(root: Path, remote: str = "../.dvc-remote", local_conf: str = "") -> Path:
    """The least a project needs for `tl submit`'s checks: dvc.yaml and a DVC config."""
    (root / ".dvc").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / ".dvc" / "config").write_text(f"[core]\n    remote = team\n['remote \"team\"']\n    url = {remote}\n")
    if local_conf:
        (root / ".dvc" / "config.local").write_text(local_conf)
    return root


def test_submit_refuses_local_registry_and_remote_before_any_connection(tmp_path, monkeypatch):
    from tasks.cli.jobs import SubmitRefused, check_stores

    repo = _project(tmp_path / "p")
    e = {k: v for k, v in sh_env().items() if k != "MLFLOW_TRACKING_URI"}
    listener = socket.create_server(("127.0.0.1", 0))  # a Ray address that records any connection made to it
    listener.setblocking(False)
    address = f"http://127.0.0.1:{listener.getsockname()[1]}"
    r = subprocess.run(
        [str(TL), "submit", "--address", address, "-S", "finetune.epochs=1"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=e,
    )
    with pytest.raises(BlockingIOError):  # nothing connected: refused before any connection
        listener.accept()
    listener.close()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    msg = " ".join(r.stderr.split())
    for part in (
        "refusing to submit",
        f"sqlite:///{repo.resolve()}/mlflow.db",
        f"{repo.resolve()}/.dvc-remote",
        "--allow-local",
        "Nothing was sent",
    ):
        assert part in msg, (part, msg)
    assert "submitted" not in r.stdout
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert check_stores(repo, allow_local=True)["local"]  # --allow-local lets it through, with the absolute paths
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with pytest.raises(SubmitRefused, match="DVC remote 'team' is the local path"):
        check_stores(repo)
    team = _project(tmp_path / "t", "s3://dvc/project")
    assert check_stores(team) == {
        "tracking_uri": "http://mlflow:5000",
        "remote": "team",
        "remote_url": "s3://dvc/project",
        "local": False,
    }
    # a remote that only config.local (not shipped) makes shared, or an address carrying a password: refused
    hidden = _project(tmp_path / "h", "/mnt/x", "['remote \"team\"']\n    url = s3://dvc/p\n")
    with pytest.raises(SubmitRefused, match="config.local is not shipped"):
        check_stores(hidden)
    for uri, what in (
        ("http://alice:s3cret@mlflow:5000", "user info"),
        ("https://s3cret@mlflow:5000", "user info"),  # a token as the user name
        ("https://mlflow:5000/?access_token=s3cret", "access_token"),
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(SubmitRefused, match=f"contains a credential \\({what}\\)") as err:
            check_stores(team)
        assert "s3cret" not in str(err.value)


def test_records_keep_no_credential_of_a_tracking_uri():
    """What registration.json, tags and messages keep of a tracking URI: the address, never its secrets."""
    from tasks.services.tracking import public_uri, uri_secrets

    assert public_uri("http://alice:pw@mlflow:5000/x") == "http://mlflow:5000/x"
    assert public_uri("https://tok@db.example/api?workspace=3&Token=abc&X-Amz-Signature=f") == (
        "https://db.example/api?workspace=3"
    )
    assert public_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert uri_secrets("http://mlflow:5000?run=1") == []


def test_only_code_is_shipped(tmp_path):
    """Ray's own packaging, with the project's excludes (and without .gitignore's help): nothing of the
    issue's list reaches the cluster, the code does."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import _zip_files

    from tasks.cli.jobs import EXCLUDES

    never = [
        ".git/config",
        ".env",
        ".env.prod",
        "flows/.env.local",
        ".venv/bin/python",
        "data/target/x.png",
        "models/finetuned.pt",
        "mlruns/1/meta.yaml",
        "mlflow.db",
        "ray_results/r/ckpt",
        ".dvc/cache/files/md5/ab",
        ".tlcache/project.lock",
        ".tlstack/env",
        ".dvc/config.local",
        "reports/metrics.json",
        "tasks/__pycache__/cli.pyc",
    ]
    code = [
        "tasks/cli/main.py",
        "tasks/stages/data.py",
        "tlcore/models.py",
        "tlcore/data/loaders.py",
        "flows/pipeline.py",
        "dvc.yaml",
        "dvc.lock",
        "params.yaml",
        ".dvc/config",
        ".gitignore",
    ]
    for f in never + code:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("SENTINEL-SECRET" if ".env" in f else "x")
    out = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), EXCLUDES, str(out), include_gitignore=False)
    shipped = sorted(ZipFile(out).namelist())
    assert shipped == sorted(code), shipped


def test_job_helpers(tmp_path):
    from tasks.cli.jobs import job_dir, read_env_file, registration

    logs = (
        "Running stage 'register':\nregister: digits-transfer version 3 -> challenger only (not promoted)\n"
        "register:   accuracy 0.91 is not above the champion's 0.93\nregister:   p = 0.4\nDone.\n"
    )
    assert registration(logs) == [
        "digits-transfer version 3 -> challenger only (not promoted)",
        "gate: accuracy 0.91 is not above the champion's 0.93",
        "gate: p = 0.4",
    ]
    assert registration(
        "register: this model, params and data are already m version 2 (reused)\nregister: m version 2 -> champion\n"
    ) == ["m version 2 -> champion"]
    assert registration("Running stage 'data'\n") == []
    f = tmp_path / "cluster.env"
    f.write_text("# creds\nexport AWS_ACCESS_KEY_ID=abc\nAWS_SECRET_ACCESS_KEY='x y'\nURL=http://h:1 # c\n\nbad\n")
    assert read_env_file(f) == {"AWS_ACCESS_KEY_ID": "abc", "AWS_SECRET_ACCESS_KEY": "x y", "URL": "http://h:1"}
    assert job_dir("raysubmit_ab/../c").parent.name == "tl-jobs" and "/" not in job_dir("a/b").name


def test_a_clone_elsewhere_sees_the_remotes_the_checkout_pushed_to(tmp_path):
    """`tl reproduce` clones into a temporary folder: a remote that `.dvc/config` (as shipped, `../.dvc-remote`) or
    `config.local` names by a relative path must still name the checkout's remote there, and `config.local`'s
    choice of default and its options must come along (what `dvc` itself then reads in the clone)."""
    from tasks.project.env import pin_remotes

    local = "[core]\n    remote = backup\n['remote \"backup\"']\n    url = ../../backup\n    timeout = 7\n"
    src, dst = _project(tmp_path / "src", local_conf=local), _project(tmp_path / "tmp" / "clone")
    pin_remotes(src, dst)
    dvc = [str(Path(sys.executable).parent / "dvc"), "remote", "list"]
    listed = subprocess.run(dvc, cwd=dst, capture_output=True, text=True, env=sh_env(), check=True).stdout.split()
    assert dict(zip(listed[::2], listed[1::2])) == {
        "team": str(src.resolve() / ".dvc-remote"),
        "backup": str(tmp_path.resolve() / "backup"),
    }
    conf = subprocess.run([dvc[0], "config", "--local", "--list"], cwd=dst, capture_output=True, text=True).stdout
    assert {"core.remote=backup", "remote.backup.timeout=7"} <= set(conf.split())
