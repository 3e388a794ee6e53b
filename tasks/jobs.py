"""Ray Job submission behind ``tl submit / status / logs``: run the pipeline on a Ray cluster."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from .lineage import git_info

# never shipped to the cluster: environments, caches, outputs the job recreates, local stores
EXCLUDES = [".venv", ".dvc/cache", ".dvc/tmp", ".dvc-remote", "data", "models", "reports", "ray_results",
            "mlruns", "mlflow.db", "__pycache__", "*.egg-info", ".pytest_cache"]
PASS_ENV = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(address: str, overrides: list[str], workdir: Path = Path("."), pip: list[str] | None = None) -> str:
    """Submit ``tl run`` as a Ray Job; the working directory travels in ``runtime_env``."""
    sets = " ".join(f"-S {shlex.quote(o)}" for o in overrides)
    # the uploaded copy has no git history: make it a repo so DVC works, keep the real lineage in env vars
    entry = f"(test -d .git || (git init -q && git add -A >/dev/null && git -c user.name=ray -c user.email=ray@cluster " \
            f"commit -qm job)) && python -m tasks.cli run {sets} --no-push"
    info = git_info(workdir)
    env = {"TL_GIT_COMMIT": info["git_commit"], "TL_GIT_DIRTY": info["git_dirty"],
           "RAY_ADDRESS": "auto", **{k: os.environ[k] for k in PASS_ENV if k in os.environ}}
    runtime_env = {"working_dir": str(workdir), "excludes": EXCLUDES, "env_vars": env}
    if pip:
        runtime_env["pip"] = pip
    return _client(address).submit_job(entrypoint=f"bash -c {shlex.quote(entry)}", runtime_env=runtime_env,
                                       metadata={"job": "transfer-pipeline", "git_commit": info["git_commit"]})


def status(address: str, job_id: str) -> str:
    return str(_client(address).get_job_status(job_id))


def logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def follow(address: str, job_id: str):
    """Yield log lines as the job writes them."""
    import asyncio

    async def run():
        async for chunk in _client(address).tail_job_logs(job_id):
            yield chunk

    agen = run()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()
