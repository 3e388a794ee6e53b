import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tasks.project.env import configure_environment

# the tests are an entry point, like `tl`: the process environment is set before Prefect or Ray is imported
configure_environment()
# the per-machine precision measurement is cached here for the session (and every subprocess), not in ~/.cache
os.environ.setdefault("TL_CACHE_DIR", tempfile.mkdtemp(prefix="tl-test-cache-"))


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """Each test starts with the environment's MLflow URI; a test or library that exports one
    (``mlflow.set_tracking_uri`` does) must not point later tests' subprocesses at its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture()
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder holding the repository's params.yaml, as the working directory (a test module
    may define its own ``project``)."""
    p = tmp_path / "project"
    p.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", p / "params.yaml")
    monkeypatch.chdir(p)
    return p
