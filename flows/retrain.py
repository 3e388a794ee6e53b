"""``retrain``: for schedules. Refresh the data; retrain only if it changed since the champion."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.states import Completed

from .pipeline import project_repo, run_stage, transfer_pipeline


@task(name="champion-data-hash", retries=2, retry_delay_seconds=[2, 10])
def champion_data_hashes(repo: str) -> dict | None:
    """Target data hashes recorded on the current champion (None if there is none)."""
    from tasks.project.config import load_params
    from tasks.services.tracking import client, tracking_uri, version_by_alias

    params = load_params(Path(repo) / "params.yaml")
    v = version_by_alias(client(tracking_uri(repo)), params.register.model_name, "champion")
    if v is None:
        return None
    return {"version": v.version, **{k: v.tags.get(k) for k in ("data_target_train_sha256", "data_target_test_sha256")}}


@flow(name="retrain", log_prints=True)
def retrain(repo: str = ".", force: bool = False):
    """Re-materialise / re-validate the data; run ``transfer_pipeline`` only when it changed."""
    from tasks.services.lock import project_lock

    repo = project_repo(repo)
    with project_lock(repo, "retrain flow"):  # a scheduled run never overlaps a `tl run` in the same project
        return _retrain(repo, force)


def _retrain(repo: str, force: bool):
    from tasks.project.config import load_params
    from tasks.project.files import read_json

    run_stage(stage="inputs", repo=repo)  # fingerprint user folders / weights first, so dvc.lock records them
    run_stage(stage="data", repo=repo, force=True)  # refresh: render embedded data / re-read user folders into shards
    params = load_params(Path(repo) / "params.yaml")
    manifest = read_json(Path(repo) / params.base.data_dir / "manifest.json")
    now = {f"data_target_{s}_sha256": manifest["target"]["splits"][s]["sha256"] for s in ("train", "test")}
    champ = champion_data_hashes(repo)
    if champ and not force and all(champ.get(k) == v for k, v in now.items()):
        msg = f"nothing to do: target data unchanged since champion version {champ['version']}"
        print(msg)
        return Completed(message=msg, data={"retrained": False, "reason": msg})
    print("target data changed since the champion (or no champion): retraining" if champ or not force else "forced")
    result = transfer_pipeline(repo=repo)
    return {"retrained": True, **result}


if __name__ == "__main__":
    retrain()
