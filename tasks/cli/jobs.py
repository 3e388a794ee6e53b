"""Ray Job submission behind ``tl submit / status / logs``: run the pipeline on a Ray cluster, safely for a team.

What travels with a job, and what never does:

- the code only: :data:`EXCLUDES` keeps out git history, ``.env*`` files, environments, local stores
  and outputs (the job's data comes from the DVC remote or is rebuilt);
- non-secret addresses only (:data:`PASS_ENV`): Ray returns ``runtime_env.env_vars`` unredacted to
  anyone who can list jobs, so credentials come from the cluster (IAM role / workload identity, a
  Kubernetes secret in the pods' environment, or ``--env-file-on-cluster PATH``, a file that exists
  on the cluster and that the job reads; only its path travels).

Each job copies its working dir (Ray's content-addressed package, shared by every job uploaded from
the same tree) into its own directory, :func:`job_dir`, and runs ``tl run`` there, so concurrent jobs
never share ``data/``, ``models/``, ``dvc.lock`` or ``params.yaml``. ``python -m tasks.cli.jobs`` is that
entry point (:func:`run_job`).
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from tasks.project.env import read_env_file
from tasks.project.lineage import git_info
from tasks.project.settings import settings
from tasks.project.stage import say as stage_say

# never shipped to the cluster (Ray's gitignore-style `excludes`, matched from the project root; a leading
# "/" anchors a pattern there): git history, secrets, environments, caches, local stores, outputs the job
# rebuilds or pulls
EXCLUDES = [
    ".git",
    ".env*",
    ".venv",
    "venv",
    "/data",
    "/models",
    "/reports",
    "/mlruns",
    "/mlflow.db*",
    "/ray_results",
    "/.tlstack",
    ".dvc/cache",
    ".dvc/tmp",
    ".dvc/config.local",
    "/.dvc-remote",
    ".tlcache",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
]
# forwarded from the submitter's shell when set: addresses, never credentials
PASS_ENV = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
JOBS_DIR = "tl-jobs"  # under TL_JOB_ROOT, default the system temp dir of the node that runs the job


class SubmitRefused(RuntimeError):
    """The submission would lose or leak something; nothing was sent."""


# ---------------------------------------------------------------- submitter side


def _is_local_uri(uri: str) -> bool:
    scheme = urlsplit(uri).scheme.lower()
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # "C:\..." is a path, not a scheme


def dvc_default_remote(root: Path) -> tuple[str | None, str | None, str]:
    """(name, url, note) of the default DVC remote the job will see: the one in ``.dvc/config`` (the
    git-ignored ``.dvc/config.local`` is not shipped), a local path made absolute
    (:func:`tasks.project.env.dvc_remotes`). ``note`` says when ``config.local`` changes it for you but not for
    the job."""
    from tasks.project.env import dvc_remotes

    name, shipped = dvc_remotes(root, local=False)
    url = shipped.get(name, {}).get("url") if name else None
    lname, seen = dvc_remotes(root)
    note = ""
    if lname != name or (lname and seen.get(lname, {}).get("url") != url):
        note = (
            f" (.dvc/config.local sets {'remote ' + repr(lname) if lname != name else 'its url'} for you, but "
            f"config.local is not shipped: put the remote in .dvc/config with `dvc remote add -d`, and its "
            f"credentials on the cluster)"
        )
    return name, url, note


def check_stores(root: Path, allow_local: bool = False) -> dict:
    """Where the job will register and push: ``{"tracking_uri", "remote", "remote_url", "local"}``.

    Raises :class:`SubmitRefused` (one paragraph) when the registry is a local file or the DVC remote a local
    path (or missing) and ``allow_local`` is false; also when a forwarded address embeds a password, since
    it would travel in the job's visible environment."""
    from tasks.services.tracking import tracking_uri, uri_secrets

    for k in PASS_ENV:
        if found := uri_secrets(os.environ.get(k, "")):
            raise SubmitRefused(
                f"{k} contains a credential ({', '.join(found)}); it would be shown to anyone who can list the "
                f"cluster's jobs. Give the cluster its credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or a "
                f"token in a Kubernetes secret or --env-file-on-cluster) and set {k} without them."
            )
    uri = tracking_uri(root)
    name, url, note = dvc_default_remote(root)
    problems = []
    if _is_local_uri(uri):
        problems.append(
            f"the MLflow registry is the local file {uri} (set MLFLOW_TRACKING_URI to the team's "
            f"tracking server, e.g. http://mlflow:5000): a job would register into a copy the cluster "
            f"cannot share, see no champion and promote every model"
        )
    if name is None or url is None:
        problems.append(
            f"there is no default DVC remote in .dvc/config{note}: the job's data and models would never "
            f"leave the node, yet the registry would cite their hashes"
        )
    elif _is_local_uri(url):
        problems.append(
            f"the default DVC remote {name!r} is the local path {url}{note} (use object storage: "
            f"`dvc remote add -d team s3://bucket/path`): the job would push where nobody else can pull"
        )
    if problems and not allow_local:
        raise SubmitRefused(
            "refusing to submit: " + "; and ".join(problems) + ". Nothing was sent. Pass --allow-local "
            "only when the Ray head runs on this machine (or every node mounts these paths): the job "
            "then registers into and pushes to the same local files."
        )
    return {"tracking_uri": uri, "remote": name, "remote_url": url, "local": bool(problems)}


def job_env(stores: dict, workdir: Path) -> dict[str, str]:
    """``runtime_env.env_vars`` of a job: lineage, addresses (:data:`PASS_ENV`), never a credential."""
    info = git_info(workdir)
    env = {
        "TL_GIT_COMMIT": info["git_commit"],
        "TL_GIT_DIRTY": info["git_dirty"],
        "RAY_ADDRESS": "auto",
        **{k: os.environ[k] for k in PASS_ENV if os.environ.get(k)},
    }
    env["MLFLOW_TRACKING_URI"] = stores["tracking_uri"]  # resolved: a relative sqlite path means nothing there
    return env


def entrypoint(submission_id: str, overrides: list[str], stores: dict, env_file: str | None = None) -> str:
    args = ["python", "-m", "tasks.cli.jobs", "--job-id", submission_id]
    if env_file:
        args += ["--env-file", env_file]
    if stores["remote_url"] and _is_local_uri(stores["remote_url"]):  # --allow-local: the same path, absolute
        args += ["--remote", stores["remote"], "--remote-url", stores["remote_url"]]
    if not stores["remote_url"]:
        args.append("--no-push")  # --allow-local without any remote: nothing to push to
    for o in overrides:
        args += ["-S", o]
    return shlex.join(args)


def check_storage(address: str, overrides: list[str], workdir: Path, nodes: int | None = None) -> None:
    """Before anything is sent: on a cluster of more than one node, ``ray.storage_path`` must be object storage or
    an absolute path (which the job proves every node sees before training); a relative one would be a folder
    in the job's own directory on one node. ``nodes``: the cluster's live nodes (asked of ``address`` if None)."""
    from tasks.project.config import load_params

    sp = load_params(workdir / "params.yaml", overrides).ray.storage_path
    if "://" in sp or Path(sp).expanduser().is_absolute():
        return
    if nodes is None:
        from ray.util.state import list_nodes

        nodes = sum(1 for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")]))
    if nodes > 1:
        raise SubmitRefused(
            f"refusing to submit: ray.storage_path is the relative folder {sp!r}, which on the cluster at {address} "
            f"({nodes} nodes) would be a folder in the job's own directory on one node; Ray Train could not resume "
            f"a worker on another node from it. Nothing was sent. Pass -S ray.storage_path=s3://BUCKET/PREFIX "
            f"(or gs://..., or a path every node mounts)."
        )


def submit(
    address: str,
    overrides: list[str],
    workdir: Path = Path("."),
    pip: list[str] | None = None,
    allow_local: bool = False,
    env_file: str | None = None,
    agent_wait_s: float = 120,
) -> str:
    """Submit the pipeline as a Ray Job (checks first: :func:`check_stores` refuses before any connection)."""
    workdir = workdir.resolve()
    stores = check_stores(workdir, allow_local)
    check_storage(address, overrides, workdir)
    submission_id = "raysubmit_" + secrets.token_hex(8)
    runtime_env = {"working_dir": str(workdir), "excludes": EXCLUDES, "env_vars": job_env(stores, workdir)}
    if pip:
        runtime_env["pip"] = pip
    client = _client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint(submission_id, overrides, stores, env_file),
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata={"job": "transfer-pipeline", "git_commit": runtime_env["env_vars"]["TL_GIT_COMMIT"]},
            )
        except RuntimeError as e:  # a head that has just started answers before its job agent is up
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def status(address: str, job_id: str) -> str:
    return str(_client(address).get_job_status(job_id))


FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


def registration(log_text: str) -> list[str]:
    """The register stage's verdict in a job's logs: the last ``register: NAME version N -> ...`` line (or
    ``... already NAME version N (reused)``) and the gate's reasons after it; [] when it did not register."""
    lines = [ln.strip() for ln in log_text.splitlines()]
    heads = [
        i
        for i, ln in enumerate(lines)
        if ln.startswith("register: ") and " version " in ln and ("->" in ln or "(reused)" in ln)
    ]
    if not heads:
        return []
    out = [lines[heads[-1]].removeprefix("register: ")]
    for ln in lines[heads[-1] + 1 :]:
        if not ln.startswith("register:   "):
            break
        out.append("gate: " + ln.removeprefix("register:").strip())
    return out


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


# ---------------------------------------------------------------- cluster side: the job's entry point


def job_dir(job_id: str) -> Path:
    import tempfile

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in job_id)
    return (settings().job_root or Path(tempfile.gettempdir())) / JOBS_DIR / safe


def run_job(
    job_id: str,
    overrides: list[str],
    env_file: str | None = None,
    push: bool = True,
    remote: str | None = None,
    remote_url: str | None = None,
) -> int:
    """Copy the working dir into :func:`job_dir`, make it a git repo, load the cluster's env file, run
    ``tl run`` there (pushing to the DVC remote); remove the dir when the run succeeded, keep it otherwise."""
    import shutil
    import subprocess

    def say(msg):
        stage_say(msg, prefix="job: ")

    if env_file:
        if not Path(env_file).is_file():
            say(
                f"error: the env file {env_file} does not exist on this node ({os.uname().nodename}); create it "
                f"on every node (or mount it from a secret), or submit without --env-file-on-cluster"
            )
            return 2
        values = read_env_file(env_file)
        os.environ.update(values)
        say(f"loaded {len(values)} variable(s) from {env_file}: {', '.join(sorted(values))}")
    d = job_dir(job_id)
    if d.exists():  # the same submission run again (a retried driver): start clean
        shutil.rmtree(d)
    shutil.copytree(Path.cwd(), d, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    say(f"working in {d}")
    if remote and remote_url:  # --allow-local: the submitter's local remote, by its absolute path
        (d / ".dvc" / "config.local").write_text(f"['remote \"{remote}\"']\n    url = {remote_url}\n")
    git = ["git", "-c", "user.name=ray", "-c", "user.email=ray@cluster"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", f"job {job_id}"]):
        subprocess.run([*git, *args], cwd=d, check=True, stdout=subprocess.DEVNULL)
    sets = [a for o in overrides for a in ("-S", o)]
    rc = subprocess.run(
        [sys.executable, "-m", "tasks.cli.main", "run", *sets, *([] if push else ["--no-push"])], cwd=d
    ).returncode
    if rc == 0:
        shutil.rmtree(d, ignore_errors=True)
        say(
            f"done; removed {d} (outputs pushed to the DVC remote, model in the registry)"
            if push
            else f"done; removed {d}"
        )
    else:
        say(f"failed (exit {rc}); kept {d} for inspection")
    return rc


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Entry point of a `tl submit` job (runs on the cluster).")
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--env-file")
    ap.add_argument("--remote")
    ap.add_argument("--remote-url")
    ap.add_argument("--no-push", dest="push", action="store_false")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    sys.exit(run_job(a.job_id, a.overrides, a.env_file, a.push, a.remote, a.remote_url))


if __name__ == "__main__":
    main()
