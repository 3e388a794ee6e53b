"""The `tl` CLI: lazy imports, and `tl submit` against a real local Ray head (Job Submission API)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_repo, sh

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
    address, e = ray_head
    repo = make_repo(tmp_path / "repo", {"compress": {"methods": ["int8"]}})
    r = sh(TL, "submit", "--address", address, "-S", "finetune.epochs=1", cwd=repo, extra_env=e)
    job_id = r.stdout.split("submitted job ")[1].split()[0]
    assert f"tl logs {job_id}" in r.stdout
    deadline, status = time.time() + 400, ""
    while time.time() < deadline:
        status = sh(TL, "status", job_id, "--address", address, cwd=repo, extra_env=e).stdout.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = sh(TL, "logs", job_id, "--address", address, cwd=repo, extra_env=e).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    for stage in ("data", "pretrain", "finetune", "evaluate", "register"):
        assert f"Running stage '{stage}'" in logs
    assert "finetune.epochs=1" in logs and "register: digits-transfer version 1" in logs
