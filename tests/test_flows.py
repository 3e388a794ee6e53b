"""Prefect flows against a real temporary Prefect API (prefect_test_harness), real DVC, real MLflow."""

from __future__ import annotations

import pytest
from helpers import dvc, make_repo, set_params, up_to_date

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory, harness):
    return make_repo(
        tmp_path_factory.mktemp("flows") / "repo",
        {"register": {"min_accuracy": 0.0, "require_positive_transfer": False}},
    )


def _artifact(key):
    from prefect.artifacts import Artifact

    return Artifact.get(key)


def test_transfer_pipeline_end_to_end(repo):
    from flows.pipeline import transfer_pipeline

    out = transfer_pipeline(repo=str(repo), strategy="finetune", labels_per_class=2)
    assert out["registration"]["version"] == 1 and out["registration"]["promoted"]
    assert set(out["stages_run"]) == {"data", "pretrain", "finetune", "baselines", "evaluate", "compress", "register"}
    report = _artifact("transfer-report")
    assert "Transfer gain over scratch" in report.data and "models:/digits-transfer/1" in report.data
    table = _artifact("per-class-metrics")
    assert "precision" in str(table.data)
    assert up_to_date(dvc("status", cwd=repo).stdout)
    assert any((repo / ".dvc-remote").rglob("*"))  # pushed
    # the flow and `dvc repro` agree: nothing left to run but the two stages DVC runs every time
    out = dvc("repro", cwd=repo).stdout
    assert "Running stage" not in out.replace("Running stage 'inputs'", "").replace("Running stage 'register'", "")
    assert "digits-transfer version 1 -> champion, as registered" in out  # from the registry's cache, no MLflow


def test_transient_failure_is_retried(repo, monkeypatch):
    import flows.pipeline as pipeline

    real, pushes = pipeline.dvc, []

    def push_fails_once(args, *a, **kw):  # the network drops on the first `dvc push`
        if args[0] == "push":
            pushes.append(args)
            if len(pushes) == 1:
                raise ConnectionError("injected transient failure in dvc push")
        return real(args, *a, **kw)

    monkeypatch.setattr(pipeline, "dvc", push_fails_once)
    out = pipeline.transfer_pipeline(repo=str(repo))
    assert len(pushes) == 2  # the push failed once, was retried ...
    assert out["stages_run"] == []  # ... and the (up-to-date) flow completed


def test_retrain_skips_unchanged_data_and_retrains_changed(repo):
    from flows.retrain import retrain

    state = retrain(repo=str(repo), return_state=True)
    assert state.is_completed() and "nothing to do" in state.message
    assert up_to_date(dvc("status", cwd=repo).stdout)
    set_params(repo, {"data": {"target_test_fraction": 0.25}})  # a different target split: new data
    out = retrain(repo=str(repo))
    assert out["retrained"] is True and "finetune" in out["stages_run"]
    assert out["registration"]["version"] == 2


def test_bad_override_fails_before_any_work(repo):
    from flows.pipeline import transfer_pipeline
    from tasks.project.config import ParamsError

    before = (repo / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="finetune.lr"):
        transfer_pipeline(repo=str(repo), overrides=["finetune.lr=-1"])
    assert (repo / "params.yaml").read_text() == before


def test_tl_serve_fires_its_schedule(repo, tmp_path):
    """`tl serve` with no PREFECT_API_URL starts a local server (the ephemeral API has no scheduler), and its
    schedule (every 5 s here, rather than a cron's wait for the next minute) really fires a `retrain` run that
    completes. A cron and an interval at once are refused before anything starts."""
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from helpers import env

    e = {k: v for k, v in env().items() if not k.startswith("PREFECT_API")}
    e["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    tl = str(Path(sys.executable).parent / "tl")
    both = subprocess.run(
        [tl, "serve", "--cron", "* * * * *", "--interval", "5"],
        cwd=repo,
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert both.returncode == 2 and "not both" in both.stderr and "Traceback" not in both.stderr, both.stderr
    proc = subprocess.Popen(
        [tl, "serve", "--interval", "5"], cwd=repo, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()

    def finished_run():
        started = [
            m.group(1) for ln in lines if (m := re.search(r"Beginning flow run '([\w-]+)' for flow 'retrain'", ln))
        ]
        return next(
            (r for r in started if any(f"Flow run '{r}' - Finished in state Completed" in ln for ln in lines)), None
        )

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not finished_run():
        time.sleep(2)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
    reader.join(timeout=5)
    out = "".join(lines)
    assert "is being served" in out and finished_run(), out[-4000:]  # the schedule fired and the run completed
    assert "Cannot schedule flows" not in out and "Traceback" not in out, out[-4000:]
