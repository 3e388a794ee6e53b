"""The shared stack on one machine, behind ``tl stack up | down | env``: real servers, as local processes.

- an S3-compatible object store (``moto_server``, the S3 HTTP API; in memory: its objects live as long
  as the stack runs) with the buckets for the DVC remote, MLflow artifacts and Ray checkpoints;
- an MLflow tracking server over HTTP (sqlite behind it, artifacts proxied to the ``mlflow`` bucket);
- a Prefect server, its ``process`` work pool and one worker that runs the project's deployments;
- a Ray head with the job server (``tl submit``'s address).

Ports, bucket names and credentials come from one env file (``infra/stack.env``, also read by
``infra/compose.yaml`` and the KubeRay secret); an environment variable of the same name wins. State lives
under ``.tlstack/`` (logs, the MLflow database, ``PREFECT_HOME``, ``state.json`` with the pid and process
group of everything started, ``env`` with the lines to export). ``up`` is idempotent (it starts only what
is not running and healthy); ``down`` stops exactly the recorded process groups, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.project.env import configure_environment, free_port, read_env_file, tool
from tasks.services.lock import pid_alive

STATE_DIR = ".tlstack"
ENV_FILE = "infra/stack.env"
ORDER = ("s3", "mlflow", "prefect", "worker", "ray")
MARK = "TL_STACK_ID"  # in the environment of everything the stack starts, inherited by what they start in turn


class StackError(RuntimeError):
    """A stack component did not start or stop."""


def default_env_file(root: Path, state: Path | None = None) -> Path:
    """The env file the running stack was started with (``state.json``), else the project's ``infra/stack.env``."""
    recorded = _read_state((state or root / STATE_DIR).resolve()).get("env_file")
    return Path(recorded) if recorded else root / ENV_FILE


def settings(env_file: Path) -> dict[str, str]:
    """The env file's values, each overridden by an environment variable of the same name."""
    if not env_file.is_file():
        raise StackError(
            f"the stack's env file {env_file} does not exist; pass --env-file PATH (KEY=VALUE lines as "
            f"in infra/stack.env)"
        )
    values = read_env_file(env_file)
    return {k: os.environ.get(k, v) for k, v in values.items()}


def urls(s: dict[str, str]) -> dict[str, str]:
    h = s["TL_STACK_HOST"]
    return {
        "mlflow": f"http://{h}:{s['MLFLOW_PORT']}",
        "s3": f"http://{h}:{s['S3_PORT']}",
        "prefect": f"http://{h}:{s['PREFECT_PORT']}/api",
        "ray": f"http://{h}:{s['RAY_DASHBOARD_PORT']}",
        "ray_gcs": f"{h}:{s['RAY_PORT']}",
    }


def client_env(s: dict[str, str]) -> dict[str, str]:
    """What a machine that uses the stack exports: addresses and the object store's credentials."""
    u = urls(s)
    return {
        "MLFLOW_TRACKING_URI": u["mlflow"],
        "PREFECT_API_URL": u["prefect"],
        "AWS_ENDPOINT_URL": u["s3"],
        "MLFLOW_S3_ENDPOINT_URL": u["s3"],
        "AWS_ACCESS_KEY_ID": s["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": s["AWS_DEFAULT_REGION"],
        "TL_RAY_ADDRESS": u["ray"],
        "RAY_AUTH_MODE": "token",
    }


def export_lines(s: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in client_env(s).items())  # safe to eval


def _ray_temp_dir(state: Path) -> Path:
    # Ray's unix sockets live under it: keep the path short, and unique to this stack
    return Path("/tmp") / f"tlstack-{hashlib.sha1(str(state.resolve()).encode()).hexdigest()[:10]}"


def _components(s: dict[str, str], state: Path, root: Path) -> dict[str, dict]:
    u, h = urls(s), s["TL_STACK_HOST"]
    creds = {k: s[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    prefect_env = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "5",  # a dev stack: pick runs up within 5 s (default 10)
        "PREFECT_API_URL": u["prefect"],
    }
    return {
        "s3": {
            "argv": [tool("moto_server"), "-H", h, "-p", s["S3_PORT"]],
            "env": creds,
            "health": u["s3"] + "/moto-api/",
        },
        "mlflow": {
            "argv": [
                tool("mlflow"),
                "server",
                "--host",
                h,
                "--port",
                s["MLFLOW_PORT"],
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{s['MLFLOW_BUCKET']}",
            ],
            "env": {**creds, "MLFLOW_S3_ENDPOINT_URL": u["s3"], "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            "health": u["mlflow"] + "/health",
        },
        "prefect": {
            "argv": [tool("prefect"), "server", "start", "--host", h, "--port", s["PREFECT_PORT"]],
            "env": {k: v for k, v in prefect_env.items() if k != "PREFECT_API_URL"},
            "health": u["prefect"] + "/health",
        },
        # runs the project's deployments (prefect.yaml) as local processes, against the stack
        "worker": {
            "argv": [tool("prefect"), "worker", "start", "--pool", s["PREFECT_WORK_POOL"], "--type", "process"],
            "env": {**prefect_env, **client_env(s), "TL_PROJECT_DIR": str(root), "PYTHONPATH": str(root)},
        },
        # Ray's other fixed default ports (job agent 52365, client 10001, ...) would collide with any other Ray on
        # this machine (the job agent then never starts: "No available agent"): free ones, picked now
        "ray": {
            "argv": [
                tool("ray"),
                "start",
                "--head",
                "--block",
                f"--port={s['RAY_PORT']}",
                f"--node-ip-address={h}",
                "--include-dashboard=true",
                f"--dashboard-host={h}",
                f"--dashboard-port={s['RAY_DASHBOARD_PORT']}",
                f"--temp-dir={_ray_temp_dir(state)}",
                "--disable-usage-stats",
                *(
                    f"--{opt}={free_port()}"
                    for opt in (
                        "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port",
                        "ray-client-server-port",
                        "metrics-export-port",
                        "runtime-env-agent-port",
                    )
                ),
            ],
            "env": {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"},
            "health": u["ray"] + "/api/version",
        },
    }


def _ok(url: str) -> bool:
    """It answers: 200, or 401 from Ray's token-protected dashboard (up, and asking for the token)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 401 and "/api/version" in url
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(rec: dict) -> bool:
    """The recorded process still runs (the same command: a reused pid is not ours)."""
    return pid_alive(rec["pid"]) and rec["argv0"] in _cmdline(rec["pid"])


def _read_state(state: Path) -> dict:
    f = state / "state.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_state(state: Path, procs: dict) -> None:
    (state / "state.json").write_text(json.dumps(procs, indent=2))


def _buckets(s: dict[str, str]) -> None:
    import boto3

    c = boto3.client(
        "s3",
        endpoint_url=urls(s)["s3"],
        aws_access_key_id=s["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s["AWS_SECRET_ACCESS_KEY"],
        region_name=s["AWS_DEFAULT_REGION"],
    )
    have = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
    for b in (s["DVC_BUCKET"], s["MLFLOW_BUCKET"], s["RAY_BUCKET"]):
        if b not in have:
            c.create_bucket(Bucket=b)


def _work_pool(s: dict[str, str], state: Path, log) -> None:
    env = {**os.environ, "PREFECT_HOME": str(state / "prefect"), "PREFECT_API_URL": urls(s)["prefect"]}
    r = subprocess.run(
        [tool("prefect"), "work-pool", "create", s["PREFECT_WORK_POOL"], "--type", "process"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if r.returncode != 0:  # it exists already (an earlier `up`): fine, if it answers
        r = subprocess.run(
            [tool("prefect"), "work-pool", "inspect", s["PREFECT_WORK_POOL"]],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if r.returncode != 0:
        raise StackError(f"could not create the Prefect work pool {s['PREFECT_WORK_POOL']}; see {state / 'logs'}")


def up(
    root: Path, env_file: Path | None = None, state: Path | None = None, timeout_s: float = 180, say=print
) -> dict[str, str]:
    """Start what is not running (and healthy), wait until each answers; return the client env."""
    configure_environment()
    state = (state or root / STATE_DIR).resolve()
    env_file = (env_file or default_env_file(root, state)).resolve()
    s = settings(env_file)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    comps = _components(s, state, root.resolve())
    procs = _read_state(state)
    t0 = time.monotonic()

    def start(name):
        rec = procs.get(name)
        if rec and _alive(rec):
            say(f"stack: {name} already running (pid {rec['pid']})")
            return
        c = comps[name]
        with open(state / "logs" / f"{name}.log", "a") as log:
            p = subprocess.Popen(
                c["argv"],
                cwd=state,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **c["env"], MARK: str(state)},
                start_new_session=True,
            )
        procs[name] = {"pid": p.pid, "pgid": p.pid, "argv0": c["argv"][0], "started": time.time()}
        _write_state(state, procs)

    def wait(name):
        c, deadline = comps[name], time.monotonic() + timeout_s
        while not (_ok(c["health"]) if "health" in c else True):
            if not _alive(procs[name]):
                raise StackError(f"stack: {name} exited while starting; its log: {state / 'logs' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise StackError(
                    f"stack: {name} did not answer {c['health']} within {timeout_s:.0f} s; its log: "
                    f"{state / 'logs' / (name + '.log')}. Is the port taken? Change it in {env_file} or "
                    f"the environment."
                )
            time.sleep(0.5)
        say(f"stack: {name} up ({time.monotonic() - t0:.1f} s)")

    procs["env_file"] = str(env_file)
    if not (procs.get("ray") and _alive(procs["ray"])):  # Ray's token auth: the token in ~/.ray/auth_token
        subprocess.run(
            [tool("ray"), "get-auth-token", "--generate"],
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    for name in ("s3", "mlflow", "prefect", "ray"):  # all at once: they start in parallel
        start(name)
    for name in ("s3", "mlflow", "prefect", "ray"):
        wait(name)
        if name == "s3":
            _buckets(s)
        if name == "prefect" and not (procs.get("worker") and _alive(procs["worker"])):
            with open(state / "logs" / "worker.log", "a") as log:
                _work_pool(s, state, log)
            start("worker")
            wait("worker")
        elif name == "prefect":
            say(f"stack: worker already running (pid {procs['worker']['pid']})")
    env_path = state / "env"
    env_path.touch(mode=0o600)  # it holds the object store's secret key
    env_path.chmod(0o600)
    env_path.write_text(export_lines(s))
    return client_env(s)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal is not ours
        return False


def down(root: Path, state: Path | None = None, grace_s: float = 10, say=print) -> list[str]:
    """Stop every process group ``up`` recorded (SIGTERM to all, SIGKILL after ``grace_s``), and Ray's daemons
    under this stack's temp dir; return the names stopped. Nothing it did not start is touched."""
    state = (state or root / STATE_DIR).resolve()
    procs = _read_state(state)
    t0 = time.monotonic()
    ours = {name: procs[name] for name in ORDER if name in procs and _alive(procs[name])}
    for rec in ours.values():
        try:
            os.killpg(rec["pgid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    pending = dict(ours)
    while pending and time.monotonic() - t0 < grace_s:
        for name in [n for n, rec in pending.items() if not _group_alive(rec["pgid"])]:
            say(f"stack: stopped {name} (pid {pending.pop(name)['pid']}, {time.monotonic() - t0:.1f} s)")
        time.sleep(0.2)
    for name, rec in pending.items():
        try:
            os.killpg(rec["pgid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        say(f"stack: killed {name} (pid {rec['pid']}: no exit {grace_s:.0f} s after SIGTERM)")
    deadline = time.monotonic() + 5  # SIGKILL is not instant: return once the groups are gone
    while any(_group_alive(rec["pgid"]) for rec in pending.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    # what left the groups (Ray's daemons, the Ray jobs' drivers and their `dvc repro`, flow runs): ours carry the
    # stack's mark in their environment, or run under its Ray temp dir
    tmp, mark = str(_ray_temp_dir(state)), f"{MARK}={state}".encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            ours_too = mark in (p / "environ").read_bytes().split(b"\0") or tmp in _cmdline(int(p.name))
        except OSError:  # gone, or another user's
            continue
        if ours_too:
            try:
                os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                pass
    if ours.get("ray"):
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # Ray's session files (logs, sockets) of this stack
    for name in ORDER:
        procs.pop(name, None)
    _write_state(state, procs)
    if not ours:
        say(f"stack: nothing running under {state}")
    (state / "env").unlink(missing_ok=True)
    return list(ours)


def status(root: Path, state: Path | None = None) -> dict[str, bool]:
    procs = _read_state((state or root / STATE_DIR).resolve())
    return {name: bool(procs.get(name)) and _alive(procs[name]) for name in ORDER}
