"""The `tl` CLI: lazy imports, and `tl submit` against a real local Ray head (Job Submission API)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import env as sh_env, make_repo, sh

TL = Path(sys.executable).parent / "tl"
RAY = Path(sys.executable).parent / "ray"


def test_cli_module_imports_no_heavy_packages():
    code = ("import sys, tasks.cli; heavy = [m for m in ('torch', 'ray', 'prefect', 'mlflow', 'dvc') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    r = subprocess.run([str(TL), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "submit" in r.stdout and "promote" in r.stdout


def test_cli_errors_are_one_paragraph(tmp_path):
    # --name: the model is named, so no params.yaml is needed and the error is about the image
    r = subprocess.run([str(TL), "predict", "--name", "digits-transfer", str(tmp_path / "missing.png")], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'missing.png'} does not exist; pass image files"), r.stderr
    r = subprocess.run([str(TL), "predict", "x.png"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "params.yaml not found; run from the project root" in r.stderr  # what it needed first
    r = subprocess.run([str(TL), "--debug", "check", "--params", str(tmp_path / "nope.yaml")], cwd=tmp_path,
                       capture_output=True, text=True)
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
    from tasks.jobs import SubmitRefused, check_stores

    repo = _project(tmp_path / "p")
    e = {k: v for k, v in sh_env().items() if k != "MLFLOW_TRACKING_URI"}
    t0 = time.time()
    # port 9 (discard): had it tried Ray, the error would be a connection error, after a wait
    r = subprocess.run([str(TL), "submit", "--address", "http://127.0.0.1:9", "-S", "finetune.epochs=1"], cwd=repo,
                       capture_output=True, text=True, env=e)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    msg = " ".join(r.stderr.split())
    for part in ("refusing to submit", f"sqlite:///{repo.resolve()}/mlflow.db", f"{repo.resolve()}/.dvc-remote",
                 "--allow-local", "Nothing was sent"):
        assert part in msg, (part, msg)
    assert "submitted" not in r.stdout and time.time() - t0 < 20
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert check_stores(repo, allow_local=True)["local"]  # --allow-local lets it through, with the absolute paths
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with pytest.raises(SubmitRefused, match="DVC remote 'team' is the local path"):
        check_stores(repo)
    team = _project(tmp_path / "t", "s3://dvc/project")
    assert check_stores(team) == {"tracking_uri": "http://mlflow:5000", "remote": "team", "remote_url": "s3://dvc/project",
                                  "local": False}
    # a remote that only config.local (not shipped) makes shared, or an address carrying a password: refused
    hidden = _project(tmp_path / "h", "/mnt/x", "['remote \"team\"']\n    url = s3://dvc/p\n")
    with pytest.raises(SubmitRefused, match="config.local is not shipped"):
        check_stores(hidden)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@mlflow:5000")
    with pytest.raises(SubmitRefused, match="contains a password") as err:
        check_stores(team)
    assert "s3cret" not in str(err.value)


def test_only_code_is_shipped(tmp_path):
    """Ray's own packaging, with the project's excludes (and without .gitignore's help): nothing of the
    issue's list reaches the cluster, the code does."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import _zip_files

    from tasks.jobs import EXCLUDES

    never = [".git/config", ".env", ".env.prod", "flows/.env.local", ".venv/bin/python", "data/target/x.png",
             "models/finetuned.pt", "mlruns/1/meta.yaml", "mlflow.db", "ray_results/r/ckpt", ".dvc/cache/files/md5/ab",
             ".tlcache/project.lock", ".dvc/config.local", "reports/metrics.json", "tasks/__pycache__/cli.pyc"]
    code = ["tasks/cli.py", "tasks/data.py", "tlcore/models.py", "tlcore/data/loaders.py", "flows/pipeline.py",
            "dvc.yaml", "dvc.lock", "params.yaml", ".dvc/config", ".gitignore"]
    for f in never + code:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("SENTINEL-SECRET" if ".env" in f else "x")
    out = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), EXCLUDES, str(out), include_gitignore=False)
    shipped = sorted(ZipFile(out).namelist())
    assert shipped == sorted(code), shipped


def test_job_helpers(tmp_path):
    from tasks.jobs import job_dir, read_env_file, registration

    logs = ("Running stage 'register':\nregister: digits-transfer version 3 -> challenger only (not promoted)\n"
            "register:   accuracy 0.91 is not above the champion's 0.93\nregister:   p = 0.4\nDone.\n")
    assert registration(logs) == ["digits-transfer version 3 -> challenger only (not promoted)",
                                  "gate: accuracy 0.91 is not above the champion's 0.93", "gate: p = 0.4"]
    assert registration("register: this model, params and data are already m version 2 (reused)\nregister: m "
                        "version 2 -> champion\n") == ["m version 2 -> champion"]
    assert registration("Running stage 'data'\n") == []
    f = tmp_path / "cluster.env"
    f.write_text("# creds\nexport AWS_ACCESS_KEY_ID=abc\nAWS_SECRET_ACCESS_KEY='x y'\nURL=http://h:1 # c\n\nbad\n")
    assert read_env_file(f) == {"AWS_ACCESS_KEY_ID": "abc", "AWS_SECRET_ACCESS_KEY": "x y", "URL": "http://h:1"}
    assert job_dir("raysubmit_ab/../c").parent.name == "tl-jobs" and "/" not in job_dir("a/b").name


@pytest.fixture
def ray_head(tmp_path):
    import socket

    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    gcs, dash = free(), free()
    e = {"RAY_AUTH_MODE": "token"}
    sh(RAY, "get-auth-token", "--generate", cwd=tmp_path, extra_env=e)
    try:
        sh(RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats", cwd=tmp_path, extra_env=e)
        yield f"http://127.0.0.1:{dash}", e
    finally:
        sh(RAY, "stop", "--force", cwd=tmp_path, extra_env=e, check=False)


@pytest.mark.slow
def test_submit_runs_pipeline_as_ray_job(tmp_path, ray_head):
    """A team-safe job on a real Ray head: no secret of the submitter's environment (nor of an .env file or the
    cluster's env file) in the job's info; its own directory; pushed to the remote, registered in the submitter's
    registry (here local, hence --allow-local); `tl status` reports the registered version and the gate."""
    import sqlite3
    import tempfile

    address, e = ray_head
    repo = make_repo(tmp_path / "repo", {"compress": {"methods": ["int8"]}})
    secret, cluster_secret = "tl-sentinel-7f3a9c", "tl-cluster-sentinel-51d2"
    (repo / ".env").write_text(f"AWS_SECRET_ACCESS_KEY={secret}\n")  # not git-ignored: excludes must keep it home
    cluster_env = tmp_path / "cluster.env"  # "on the cluster": only its path travels
    cluster_env.write_text(f"AWS_SECRET_ACCESS_KEY={cluster_secret}\nTL_FROM_CLUSTER_ENV=1\n")
    submitter = {**e, "AWS_ACCESS_KEY_ID": secret, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": secret,
                 "MLFLOW_TRACKING_PASSWORD": secret, "MLFLOW_TRACKING_TOKEN": secret,
                 "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # an address: forwarded
    r = sh(TL, "submit", "--address", address, "-S", "finetune.epochs=1", "--allow-local",
           "--env-file-on-cluster", cluster_env, cwd=repo, extra_env=submitter)
    job_id = r.stdout.split("submitted job ")[1].split()[0]
    assert f"tl logs {job_id}" in r.stdout and "--allow-local: the job registers into" in r.stdout
    deadline, status = time.time() + 400, ""
    while time.time() < deadline:
        status = sh(TL, "status", job_id, "--address", address, cwd=repo, extra_env=e).stdout
        if status.split()[0] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = sh(TL, "logs", job_id, "--address", address, cwd=repo, extra_env=e).stdout
    assert status.startswith("SUCCEEDED"), logs[-3000:]
    for stage in ("data", "pretrain", "finetune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in logs
    assert "finetune.epochs=1" in logs and "register: digits-transfer version 1" in logs
    assert "registered: digits-transfer version 1 -> " in status, status
    # what anyone who can list the cluster's jobs sees
    seen = sh(sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
              "c = C(sys.argv[1]); print(repr(c.get_job_info(sys.argv[2]))); print(repr(c.list_jobs()))",
              address, job_id, cwd=repo, extra_env=e).stdout
    assert job_id in seen and "AWS_ENDPOINT_URL" in seen and "http://127.0.0.1:9" in seen
    for s in (secret, cluster_secret):
        assert s not in seen and s not in logs
    assert f"from {cluster_env}: AWS_SECRET_ACCESS_KEY, TL_FROM_CLUSTER_ENV" in logs
    # its own directory, removed once pushed and registered
    own = Path(tempfile.gettempdir()) / "tl-jobs" / job_id
    assert f"working in {own}" in logs and not own.exists()
    # pushed to the remote, registered into the submitter's registry
    assert any(p.is_file() for p in (repo / ".dvc-remote").rglob("*"))
    with sqlite3.connect(repo / "mlflow.db") as db:
        assert db.execute("select version from model_versions where name = 'digits-transfer'").fetchall() == [(1,)]
