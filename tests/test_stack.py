"""The shared stack (`tl stack up|down`: S3 object store, MLflow server, Prefect server + worker, Ray head) as
real local processes, and the team workflow against it: concurrent `tl submit` jobs, the shared registry,
the S3 DVC remote, a fresh clone that pulls and loads the champion. One stack for the whole module."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, make_repo, sh
from helpers import env as sh_env

from tasks.project.env import free_port

pytestmark = pytest.mark.slow
PORTS = ("MLFLOW_PORT", "S3_PORT", "PREFECT_PORT", "RAY_PORT", "RAY_DASHBOARD_PORT")
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
MODEL = "digits-transfer"


def _exports(text: str) -> dict[str, str]:
    import shlex

    return {
        k: shlex.split(v)[0] if v else ""
        for k, v in (ln.removeprefix("export ").split("=", 1) for ln in text.splitlines() if ln.startswith("export "))
    }


def tl(*args, cwd, extra_env=None, check=True, **kw):
    """This checkout's CLI (the copy's code, from its cwd), not the installed `tl` entry point."""
    return sh(sys.executable, "-m", "tasks.cli.main", *args, cwd=cwd, extra_env=extra_env, check=check, **kw)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A project with the team remote (S3, in the stack) committed in .dvc/config, and the stack started from it
    on free ports. Yields (repo, client env, seconds `tl stack up` took)."""
    repo = make_repo(
        tmp_path_factory.mktemp("stack") / "repo",
        {
            "data": {"synth_per_class": 20, "synth_test_per_class": 5},
            "pretrain": {"backbone": "tinycnn", "epochs": 1},
            "finetune": {"epochs": 1, "steps_per_epoch": 3},
            "evaluate": {"latency_iters": 1},
            "compress": {"methods": []},  # compression is covered by tests/test_compress.py
            "register": {"min_accuracy": 0.0, "require_positive_transfer": False},
        },
    )
    ports = {k: str(free_port()) for k in PORTS}
    t0 = time.monotonic()
    up = tl("stack", "up", "--env-file", ROOT / "infra" / "stack.env", cwd=repo, extra_env=ports, timeout=300)
    up_s = time.monotonic() - t0
    env = _exports(tl("stack", "env", cwd=repo).stdout)  # a new shell: no port in its environment
    for k in SECRETS:  # made for this stack, and never printed by `up`
        assert env[k] and env[k] not in up.stdout + up.stderr and env[k] not in ("minio", "minio-secret"), k
    try:
        sh("dvc", "remote", "add", "-d", "team", "s3://dvc/project", cwd=repo)
        sh("dvc", "remote", "modify", "team", "endpointurl", env["AWS_ENDPOINT_URL"], cwd=repo)
        sh("git", "commit", "-qam", "team remote", cwd=repo)
        yield repo, {**env, **ports}, up_s
    finally:
        tl("stack", "down", cwd=repo, check=False)


def _client(env, monkeypatch):
    from mlflow import MlflowClient

    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # read by the client at each request
        monkeypatch.setenv(k, env[k])
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def _status(url: str, headers: dict | None = None) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _s3(env):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def test_stack_up_is_healthy_and_idempotent(stack):
    import urllib.request

    repo, env, up_s = stack
    print(f"tl stack up: {up_s:.1f} s")
    state = json.loads((repo / ".tlstack" / "state.json").read_text())
    assert {"s3", "mlflow", "prefect", "worker", "ray"} <= set(state)
    for url in (env["MLFLOW_TRACKING_URI"] + "/health", env["PREFECT_API_URL"] + "/health"):
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200, url
    assert {b["Name"] for b in _s3(env).list_buckets()["Buckets"]} >= {"dvc", "mlflow", "ray-checkpoints"}
    # only the stack's owner gets in: every service refuses a request without this stack's credentials
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError):
        _s3({**env, "AWS_SECRET_ACCESS_KEY": "wrong"}).list_buckets()
    assert _status(env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _status(env["PREFECT_API_URL"] + "/flows/filter") in (401, 405)
    assert _status(env["PREFECT_API_URL"] + "/deployments/") == 401
    assert _status(env["TL_RAY_ADDRESS"] + "/api/jobs/") == 401
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert _status(env["TL_RAY_ADDRESS"] + "/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
    st = repo / ".tlstack"
    assert st.stat().st_mode & 0o777 == 0o700
    for f in ("secrets.env", "env", "ray_token", "mlflow_auth.ini"):
        assert (st / f).stat().st_mode & 0o777 == 0o600, f
    again = tl("stack", "up", cwd=repo, extra_env=env, timeout=60)  # a second `up` starts nothing
    assert again.stderr.count("already running") == 5, again.stderr
    assert json.loads((repo / ".tlstack" / "state.json").read_text()) == state
    assert _exports((repo / ".tlstack" / "env").read_text()) == {k: v for k, v in env.items() if k not in PORTS}


def test_two_concurrent_jobs_share_registry_and_remote(stack, tmp_path, monkeypatch):
    """Two `tl submit` jobs at once with different -S: both succeed; two new versions in the MLflow server, the
    later gated against the earlier; both jobs' data and models in the S3 remote; no submitter secret in what
    Ray shows; a fresh clone with only the stack's URLs and keys pulls them and loads the champion."""
    repo, env, _ = stack
    secret = "tl-sentinel-7f3a9c"
    (repo / ".env").write_text(f"AWS_SESSION_TOKEN={secret}\n")  # not git-ignored: excludes must keep it home
    submitter = {
        **env,
        "AWS_SESSION_TOKEN": secret,
        "MLFLOW_TRACKING_PASSWORD": secret,
        "MLFLOW_TRACKING_TOKEN": secret,
    }
    cluster_env = repo / ".tlstack" / "env"  # "on the cluster": the stack's keys; only its path travels
    t0 = time.monotonic()
    subs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasks.cli.main",
                "submit",
                "-S",
                f"finetune.lr={lr}",
                "--env-file-on-cluster",
                str(cluster_env),
            ],
            cwd=repo,
            env={**sh_env(), **submitter},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for lr in ("0.003", "0.01")
    ]
    outs = [p.communicate(timeout=300)[0] for p in subs]
    assert all(p.returncode == 0 for p in subs), outs
    jobs = [o.split("submitted job ")[1].split()[0] for o in outs]
    # one poller process (a CLI start per poll would cost CPU), with the stack's env (RAY_AUTH_MODE=token)
    sh(
        sys.executable,
        "-c",
        "import sys, time; from ray.job_submission import JobSubmissionClient as C; "
        "c = C(sys.argv[1]); end = time.time() + 500\n"
        "while time.time() < end and not all(str(c.get_job_status(j)) in ('SUCCEEDED', 'FAILED', 'STOPPED') "
        "for j in sys.argv[2:]): time.sleep(3)",
        env["TL_RAY_ADDRESS"],
        *jobs,
        cwd=repo,
        extra_env=env,
        timeout=600,
    )
    statuses = {j: tl("status", j, cwd=repo, extra_env=env).stdout for j in jobs}
    logs = {j: tl("logs", j, cwd=repo, extra_env=env).stdout for j in jobs}
    print(f"two jobs: {time.monotonic() - t0:.1f} s")
    for j, lr in zip(jobs, ("0.003", "0.01")):
        assert statuses.get(j, "").startswith("SUCCEEDED"), logs[j][-4000:]
        assert "registered: digits-transfer version " in statuses[j]
        assert f"finetune.lr={lr}" in logs[j] and "Running stage 'register'" in logs[j]
        assert f"from {cluster_env}: " in logs[j] and "AWS_SECRET_ACCESS_KEY" in logs[j]  # the cluster's env file, read
        own = logs[j].split("job: working in ")[1].split()[0]  # its own directory, removed once pushed and registered
        assert own.endswith(f"/tl-jobs/{j}") and not Path(own).exists()
    # what anyone who can list the cluster's jobs sees: addresses, never a key
    seen = sh(
        sys.executable,
        "-c",
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "c = C(sys.argv[1]); print(repr([c.get_job_info(j) for j in sys.argv[2:]])); print(repr(c.list_jobs()))",
        env["TL_RAY_ADDRESS"],
        *jobs,
        cwd=repo,
        extra_env=env,
    ).stdout
    assert env["MLFLOW_TRACKING_URI"] in seen
    for s in (secret, env["AWS_SECRET_ACCESS_KEY"]):
        assert s not in seen and all(s not in lg for lg in logs.values())

    # the shared registry: two versions, the later gated against the earlier, aliases agree with the gate
    c = _client(env, monkeypatch)
    vs = sorted(c.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [v.version for v in vs] == ["1", "2"]
    v1, v2 = vs
    assert v1.tags["gate_decision"] == "promoted" and v1.tags["gate_compared_with"] == ""
    assert v2.tags["gate_compared_with"] == "1" and v2.tags["gate_decision"] in ("promoted", "rejected")
    champion = c.get_model_version_by_alias(MODEL, "champion").version
    assert champion == ("2" if v2.tags["gate_decision"] == "promoted" else "1")
    assert v1.run_id != v2.run_id and v1.tags["model_sha256"] != v2.tags["model_sha256"]

    # both jobs' data and models in the S3 remote: every output of each version's dvc.lock (from its MLflow
    # run, through the server's artifact proxy to the mlflow bucket) is an object under s3://dvc/project
    s3 = _s3(env)
    keys = {
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="dvc", Prefix="project/")
        for o in page.get("Contents", [])
    }
    locks = {}
    for v in vs:
        d = c.download_artifacts(v.run_id, "lineage", str(tmp_path / f"v{v.version}"))
        locks[v.version] = Path(d) / "dvc.lock"
        lock = yaml.safe_load(locks[v.version].read_text())
        md5s = {
            o["md5"]
            for st in lock["stages"].values()
            for o in st.get("outs", [])
            if o["path"].split("/")[0] in ("data", "models")
        }  # cached outputs (reports are git-tracked metrics)
        assert md5s and all(f"project/files/md5/{m[:2]}/{m[2:]}" in keys for m in md5s), (v.version, md5s)

    # a fresh clone, with only the stack's URLs and keys: `dvc pull` the champion's lineage, load the champion
    _fresh_clone_pulls_and_predicts(repo, env, tmp_path / "fresh", locks[champion], vs[int(champion) - 1])


def _fresh_clone_pulls_and_predicts(repo: Path, env: dict, fresh: Path, lock: Path, version) -> None:
    """A fresh clone with only the stack's addresses and keys (no port variable, no cache) pulls ``version``'s data
    and model from the S3 remote (its ``dvc.lock``), and ``tl predict --model`` downloads and runs it."""
    sh("git", "clone", "-q", repo, fresh, cwd=fresh.parent)
    (fresh / "dvc.lock").write_bytes(lock.read_bytes())
    only_stack = {k: v for k, v in env.items() if k not in PORTS}
    pulled = sh("dvc", "pull", cwd=fresh, extra_env=only_stack)
    assert (fresh / "models" / "finetuned.pt").is_file(), pulled.stdout
    assert (
        hashlib.sha256((fresh / "models" / "finetuned.pt").read_bytes())
        .hexdigest()
        .startswith(version.tags["model_sha256"])
    )
    test = json.loads((fresh / "data/target/test/index.json").read_text())
    first = f"data/target/test/{test['name'][0]}"  # the pulled shards, read by tl predict
    pred = tl(
        "predict", "--model", f"{MODEL}/{version.version}", first.rsplit("/", 1)[0], cwd=fresh, extra_env=only_stack
    )
    lines = pred.stdout.strip().splitlines()
    assert lines[0].split("\t")[0].endswith(first) and all(len(p.split("\t")) == 3 for p in lines), pred


_CSRF: dict[str, dict] = {}


def _api(env, path: str, body: dict | None = None, method: str = "POST"):
    """One call to the stack's Prefect REST API, as Prefect's own client makes it: with the stack's auth string and,
    for a change, a CSRF token; retried as the client retries, since the server answers 503 (or 429) for errors a
    client may retry, such as its sqlite database being busy."""
    import base64
    import urllib.error
    import urllib.request

    headers = {
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode(),
    }
    if method != "GET":
        url = env["PREFECT_API_URL"]
        if url not in _CSRF:
            with urllib.request.urlopen(
                urllib.request.Request(f"{url}/csrf-token?client=tl-tests", headers=headers), timeout=10
            ) as r:
                _CSRF[url] = {"Prefect-Csrf-Token": json.loads(r.read())["token"], "Prefect-Csrf-Client": "tl-tests"}
        headers.update(_CSRF[url])
    req = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        method=method,
        data=None if method == "GET" else json.dumps(body or {}).encode(),
        headers=headers,
    )
    for attempt in range(10):
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out = r.read()
                return json.loads(out) if out else None
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503) or attempt == 9:
                raise
            time.sleep(1 + attempt)


def _runs(env, deployment: str) -> list[dict]:
    dep = _api(env, "/deployments/filter", {"deployments": {"name": {"any_": [deployment]}}})
    return _api(env, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep[0]["id"]]}}}) if dep else []


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _wait_finished(env, deployment: str, timeout_s: float, auto_scheduled: bool = False, count: int = 1) -> list[dict]:
    """The first ``count`` runs of ``deployment`` to finish (in any final state), in the order they ended."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        runs = [r for r in _runs(env, deployment) if r["auto_scheduled"] == auto_scheduled]
        done = sorted((r for r in runs if r["state_type"] in FINAL), key=lambda r: r["end_time"] or "")
        if len(done) >= count:
            return done[:count]
        time.sleep(2)
    raise AssertionError(f"{count} {deployment} run(s) did not finish within {timeout_s} s: {_runs(env, deployment)}")


def test_prefect_deployments_run_on_the_stack_worker(stack, monkeypatch, tmp_path):
    """prefect.yaml deploys to the stack's Prefect server; its process worker runs a `transfer-pipeline`
    deployment run (registering into the stack's MLflow, pushing to its S3 remote), and refuses a run asked to work
    in another directory; then a scheduled `retrain`
    (every 10 s here, then paused) fires and completes: the data did not change, so it has nothing to do. Two runs
    due at once run one after the other (prefect.yaml's concurrency limit queues the second) rather than fail."""
    repo, env, _ = stack
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (repo / "prefect.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    t0 = time.monotonic()
    sh("prefect", "--no-prompt", "deploy", "--name", "transfer-pipeline", cwd=repo, extra_env=env)
    sh("prefect", "deployment", "run", "transfer-pipeline/transfer-pipeline", cwd=repo, extra_env=env)
    (run,) = _wait_finished(env, "transfer-pipeline", 400)
    assert run["state_type"] == "COMPLETED", run
    print(f"transfer-pipeline deployment run: {time.monotonic() - t0:.1f} s")
    # whoever may create a flow run cannot point the worker at another directory's dvc.yaml
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "dvc.yaml").write_text(f"stages:\n  own:\n    cmd: touch {other / 'pwned'}\n")
    dep = _api(env, "/deployments/filter", {"deployments": {"name": {"any_": ["transfer-pipeline"]}}})[0]["id"]
    rid = _api(env, f"/deployments/{dep}/create_flow_run", {"parameters": {"repo": str(other)}})["id"]
    deadline = time.time() + 120
    while (refused := _api(env, f"/flow_runs/{rid}", method="GET"))["state_type"] not in FINAL:
        assert time.time() < deadline, refused
        time.sleep(2)
    assert refused["state_type"] in ("FAILED", "CRASHED"), refused
    assert "runs only the project" in (refused["state"]["message"] or ""), refused["state"]
    assert not (other / "pwned").exists()
    c = _client(env, monkeypatch)
    reg = json.loads((repo / "reports" / "registration.json").read_text())
    assert reg["tracking_uri"] == env["MLFLOW_TRACKING_URI"] and c.get_model_version(MODEL, str(reg["version"]))
    # the nightly schedule, made every 10 s (a cron waits for the next minute): the worker picks it up and the
    # run completes. Then the schedule is paused, and two manual runs, due at once, show the deployment's concurrency
    # limit of 1: one waits for the other (without the limit the project lock would fail it). Whatever is left is
    # cancelled and drained, so `down` finds no flow run mid-way
    for d in doc["deployments"]:
        if d["name"] == "retrain-nightly":
            d["schedules"] = [{"interval": 10, "timezone": "UTC"}]
    (repo / "prefect.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    t1 = time.monotonic()
    sh("prefect", "--no-prompt", "deploy", "--name", "retrain-nightly", cwd=repo, extra_env=env)
    dep = _api(env, "/deployments/filter", {"deployments": {"name": {"any_": ["retrain-nightly"]}}})[0]["id"]
    try:
        (scheduled,) = _wait_finished(env, "retrain-nightly", 240, auto_scheduled=True)
        _api(env, f"/deployments/{dep}/pause_deployment", {})  # no more scheduled runs; manual ones still run
        for _ in range(2):
            _api(env, f"/deployments/{dep}/create_flow_run", {})
        manual = _wait_finished(env, "retrain-nightly", 240, count=2)
        print(f"one scheduled and two queued retrains: {time.monotonic() - t1:.1f} s")
    finally:
        _api(env, f"/deployments/{dep}/pause_deployment", {})
        deadline = time.time() + 90
        while time.time() < deadline:
            live = [r for r in _runs(env, "retrain-nightly") if r["state_type"] not in FINAL]
            for r in live:
                if r["state_type"] in ("SCHEDULED", "PENDING"):
                    _api(env, f"/flow_runs/{r['id']}/set_state", {"state": {"type": "CANCELLED"}, "force": True})
            if not live:
                break
            time.sleep(2)
    assert all(r["state_type"] in FINAL for r in _runs(env, "retrain-nightly"))
    for run in (scheduled, *manual):
        assert run["state_type"] == "COMPLETED" and "nothing to do" in (run["state"]["message"] or ""), run
    states = [
        [st["name"] for st in _api(env, f"/flow_run_states/?flow_run_id={r['id']}", method="GET")] for r in manual
    ]
    assert any("AwaitingConcurrencySlot" in names for names in states), states  # queued by the limit
    done = sorted((scheduled, *manual), key=lambda r: r["start_time"])
    assert all(b["start_time"] >= a["end_time"] for a, b in zip(done, done[1:])), done  # one after the other


def test_stack_down_stops_what_it_started_and_nothing_else(stack, tmp_path):
    repo, env, _ = stack
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        state = json.loads((repo / ".tlstack" / "state.json").read_text())
        t0 = time.monotonic()
        out = tl("stack", "down", cwd=repo, timeout=120).stdout
        print(f"tl stack down: {time.monotonic() - t0:.1f} s")
        for name in ("s3", "mlflow", "prefect", "worker", "ray"):
            assert f"stopped {name}" in out or f"killed {name}" in out, out
            with pytest.raises(ProcessLookupError):
                os.killpg(state[name]["pgid"], 0)
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(repo) in _cmd(p)]
        assert not left, [_cmd(p) for p in left]
        assert decoy.poll() is None  # not ours: untouched
        assert "nothing running" in tl("stack", "down", cwd=repo).stdout
    finally:
        decoy.send_signal(signal.SIGKILL)


def _cmd(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_stack_up_again_keeps_models_data_and_credentials(stack, tmp_path, monkeypatch):
    """The drill: after `tl stack down` (the test above), `tl stack up` again: the same credentials, the registry
    lists the champion, its model file downloads through MLflow from the persisted S3 store, and a fresh clone's
    `dvc pull` gets the champion's data and model."""
    repo, env, _ = stack
    t0 = time.monotonic()
    up = tl("stack", "up", cwd=repo, extra_env={k: env[k] for k in PORTS}, timeout=300)
    print(f"tl stack up again: {time.monotonic() - t0:.1f} s")
    assert "already running" not in up.stderr
    again = _exports(tl("stack", "env", cwd=repo).stdout)
    assert again == {k: v for k, v in env.items() if k not in PORTS}  # the same keys: the kept data still opens
    c = _client(env, monkeypatch)
    champ = c.get_model_version_by_alias(MODEL, "champion")
    d = c.download_artifacts(champ.run_id, "lineage", str(tmp_path / "lineage"))
    _fresh_clone_pulls_and_predicts(repo, env, tmp_path / "fresh", Path(d) / "dvc.lock", champ)


def test_stack_up_refuses_a_port_answered_by_another_process(tmp_path):
    """A process squatting on the MLflow port would receive models and credentials: `up` names it and refuses,
    before it starts anything (the check is repeated while each server starts)."""
    squatter = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = int(squatter.stdout.readline().split(" port ")[1].split()[0])
        ports = {k: str(free_port()) for k in PORTS} | {"MLFLOW_PORT": str(port)}
        env_file = ROOT / "infra" / "stack.env"
        out = tl(
            "stack", "up", "--env-file", env_file, "--dir", tmp_path / "st", cwd=ROOT, extra_env=ports, check=False
        )
        assert out.returncode != 0
        assert f"127.0.0.1:{port} for mlflow is answered by pid {squatter.pid}" in out.stderr, out.stderr
        assert squatter.poll() is None
        assert not (tmp_path / "st" / "state.json").exists()  # nothing started, nothing recorded
        assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(tmp_path / "st") in _cmd(p)]
    finally:
        squatter.kill()
