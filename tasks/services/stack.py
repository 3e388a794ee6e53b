"""The shared stack on one machine, behind ``tl stack up | down | env``: real servers, as local processes.

- an S3-compatible object store (``rclone serve s3``, objects kept as files under ``.tlstack/s3/``, one folder per
  bucket) with the buckets for the DVC remote, MLflow artifacts and Ray checkpoints;
- an MLflow tracking server over HTTP with MLflow's basic-auth app (its backend store: sqlite under ``.tlstack/``
  by default, ``MLFLOW_BACKEND_STORE_URI`` for PostgreSQL; artifacts proxied to the ``mlflow`` bucket);
- a Prefect server (HTTP basic auth, CSRF protection, CORS limited to its own origin), its ``process`` work
  pool and one worker that runs the project's deployments;
- a Ray head with the job server (``tl submit``'s address), token authentication on.

What persists: everything under ``.tlstack/`` (0700) outlives ``tl stack down``: the objects, the MLflow and
Prefect databases, and ``secrets.env`` (0600): credentials generated for this stack at its first ``up`` (S3
keys, MLflow's admin password, Prefect's auth string, Ray's token in ``ray_token``), never the fixed ones of a
committed file. Ports and bucket names come from one env file (``infra/stack.env``, also read by
``infra/compose.yaml``); an environment variable of the same name wins, except for the credentials.

``up`` is idempotent (it starts only what is not running and healthy) and checks that each port is answered by
the process it started (a squatter on a port gets neither data nor credentials); a failed ``up`` stops what it
started. ``down`` stops exactly the recorded process groups, and nothing else. ``up`` prints no secret: ``tl stack
env`` prints the lines a client exports (state: ``state.json`` with the pid and process group of everything
started; ``env``, 0600, the same lines for ``--env-file-on-cluster``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
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
SECRETS_FILE = "secrets.env"
RAY_TOKEN_FILE = "ray_token"
# generated per stack at its first `up`, kept in .tlstack/secrets.env (0600); never taken from the environment
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
MLFLOW_ADMIN = "admin"


class StackError(RuntimeError):
    """A stack component did not start or stop."""


def default_env_file(root: Path, state: Path | None = None) -> Path:
    """The env file the running stack was started with (``state.json``), else the project's ``infra/stack.env``."""
    recorded = _read_state((state or root / STATE_DIR).resolve()).get("env_file")
    return Path(recorded) if recorded else root / ENV_FILE


def private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (created 0600: never readable, even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _state_dir(state: Path) -> Path:
    """``.tlstack/``, created owner-only: the objects, databases and secrets under it are the team's."""
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    return state


def stack_secrets(state: Path, create: bool = False) -> dict[str, str]:
    """This stack's credentials, from ``secrets.env`` (made at the first ``up`` when ``create``, each missing piece on
    its own); {} if none yet. Refuses a store that outlived its credentials: MLflow keeps the admin password it was
    created with, so new ones would lock every client out."""
    f = state / SECRETS_FILE
    have = {k: v for k, v in read_env_file(f).items() if k in SECRET_KEYS} if f.is_file() else {}
    missing = [k for k in SECRET_KEYS if not have.get(k)]
    if missing and not create:
        return have if not have else _broken(f, missing)
    if missing:
        if "MLFLOW_TRACKING_PASSWORD" in missing and (state / "mlflow_auth.db").exists():
            raise StackError(
                f"stack: {state / 'mlflow_auth.db'} holds MLflow's users, but {f} lacks their admin password "
                f"(MLFLOW_TRACKING_PASSWORD): new credentials would lock every client out. Restore {f} from a "
                f"backup, or delete {state / 'mlflow_auth.db'} to start the users afresh, then `tl stack up`."
            )
        new = {
            "AWS_ACCESS_KEY_ID": "tl-" + secrets.token_hex(8),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
            "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
            "PREFECT_API_AUTH_STRING": "tl:" + secrets.token_urlsafe(24),
        }
        have = {**{k: new[k] for k in missing}, **have}
        private_file(
            f,
            "# generated by `tl stack up` for this stack; keep it (the data under .tlstack/ needs it)\n"
            + "".join(f"{k}={have[k]}\n" for k in SECRET_KEYS),
        )
    token = state / RAY_TOKEN_FILE
    if create and not (token.is_file() and token.read_text().strip()):
        private_file(token, secrets.token_hex(32))
    for g in (f, token):
        if g.is_file() and g.stat().st_mode & 0o077:
            g.chmod(0o600)
    return have


def _broken(f: Path, missing: list[str]) -> dict:
    raise StackError(f"stack: {f} lacks {', '.join(missing)}; `tl stack up` adds what is missing")


def _fingerprint(state: Path) -> str:
    """Which credentials the running components were started with (a hash, not the secrets)."""
    h = hashlib.sha256()
    for name in (SECRETS_FILE, RAY_TOKEN_FILE):
        f = state / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()[:16]


def settings(env_file: Path, state: Path | None = None) -> dict[str, str]:
    """The env file's values, each overridden by an environment variable of the same name, and the stack's
    credentials (from ``state``'s ``secrets.env``; an environment variable never replaces those)."""
    if not env_file.is_file():
        raise StackError(
            f"the stack's env file {env_file} does not exist; pass --env-file PATH (KEY=VALUE lines as "
            f"in infra/stack.env)"
        )
    values = read_env_file(env_file)
    out = {k: os.environ.get(k, v) for k, v in values.items() if k not in SECRET_KEYS}
    out.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    out.setdefault("MLFLOW_BACKEND_STORE_URI", "")
    if state is not None:
        out.update(stack_secrets(state))
        out["RAY_AUTH_TOKEN_PATH"] = str(state / RAY_TOKEN_FILE)
        out["STATE_DIR"] = str(state)
    return out


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
    """What a machine that uses the stack exports: addresses, and the credentials of each service."""
    u = urls(s)
    return {
        "MLFLOW_TRACKING_URI": u["mlflow"],
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": s["MLFLOW_TRACKING_PASSWORD"],
        "PREFECT_API_URL": u["prefect"],
        "PREFECT_API_AUTH_STRING": s["PREFECT_API_AUTH_STRING"],
        "AWS_ENDPOINT_URL": u["s3"],
        "MLFLOW_S3_ENDPOINT_URL": u["s3"],
        "AWS_ACCESS_KEY_ID": s["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": s["AWS_DEFAULT_REGION"],
        "TL_RAY_ADDRESS": u["ray"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": s["RAY_AUTH_TOKEN_PATH"],
    }


def public_env(s: dict[str, str]) -> dict[str, str]:
    """:func:`client_env` without what is secret: what ``up`` prints."""
    return {k: v for k, v in client_env(s).items() if k not in SECRET_KEYS}


def export_lines(s: dict[str, str]) -> str:
    # safe to eval; a RAY_AUTH_TOKEN of another cluster in that shell would win over the stack's token file
    return "unset RAY_AUTH_TOKEN\n" + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in client_env(s).items())


def _ray_parent(state: Path) -> Path:
    # Ray's unix sockets live under it: keep the path short, and unique to this stack and user
    return Path("/tmp") / f"tlstack-{os.getuid()}-{hashlib.sha1(str(state.resolve()).encode()).hexdigest()[:10]}"


def _ray_temp_dir(state: Path) -> Path:
    """Ray's temp dir, inside a folder only this user may enter: Ray makes its session, socket and log folders
    world-writable (0777), so without that private parent other local users could read job logs and reach the
    raylet's sockets (and could create a predictable folder first)."""
    return _ray_parent(state) / "r"


def _private_ray_parent(state: Path) -> None:
    parent = _ray_parent(state)
    parent.mkdir(mode=0o700, exist_ok=True)
    st = parent.lstat()
    if parent.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise StackError(
            f"stack: {parent} exists but is not a private folder of this user (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o777:o}); Ray's sockets and logs would be open to others. Remove it, then `tl stack up`."
        )


def _basic(user_pass: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def _mlflow_auth_config(s: dict[str, str], state: Path) -> Path:
    """MLflow's basic-auth app: its own users database under ``.tlstack/``; nobody but the admin gets anything."""
    f = state / "mlflow_auth.ini"
    private_file(
        f,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{state / 'mlflow_auth.db'}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return f


def _components(s: dict[str, str], state: Path, root: Path) -> dict[str, dict]:
    u, h = urls(s), s["TL_STACK_HOST"]
    creds = {k: s[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    prefect_origin = u["prefect"].removesuffix("/api")
    prefect_env = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "5",  # a dev stack: pick runs up within 5 s (default 10)
        "PREFECT_API_URL": u["prefect"],
        "PREFECT_API_AUTH_STRING": s["PREFECT_API_AUTH_STRING"],
    }
    store = s.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{state / 'mlflow.db'}"
    (state / "s3").mkdir(exist_ok=True)
    return {
        "s3": {
            # the key pair travels in the environment (0400 in /proc), never on the command line (world-readable)
            "argv": [tool("rclone"), "serve", "s3", str(state / "s3"), "--addr", f"{h}:{s['S3_PORT']}"],
            "env": {
                "RCLONE_AUTH_KEY": f'"{s["AWS_ACCESS_KEY_ID"]},{s["AWS_SECRET_ACCESS_KEY"]}"',
                "RCLONE_CONFIG": "/dev/null",
            },
            "port": s["S3_PORT"],
            "health": u["s3"] + "/",
            "answers": (400, 403),  # an unsigned request: refused, by a server that is up
        },
        "mlflow": {
            "argv": [
                tool("mlflow"),
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                h,
                "--port",
                s["MLFLOW_PORT"],
                "--workers",
                "1",
                "--artifacts-destination",
                f"s3://{s['MLFLOW_BUCKET']}",
                "--cors-allowed-origins",
                u["mlflow"],
                "--allowed-hosts",  # MLflow answers only these Host headers (DNS rebinding): the stack's address
                f"{h},{h}:{s['MLFLOW_PORT']},localhost,localhost:{s['MLFLOW_PORT']},127.0.0.1:{s['MLFLOW_PORT']}",
            ],
            "env": {
                **creds,
                "MLFLOW_S3_ENDPOINT_URL": u["s3"],
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                # the store (a PostgreSQL URI holds a password) through the environment: argv is world-readable
                "MLFLOW_BACKEND_STORE_URI": store,
                "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_config(s, state)),
                "MLFLOW_AUTH_ADMIN_PASSWORD": s["MLFLOW_TRACKING_PASSWORD"],  # used once, when the admin is created
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            },
            "port": s["MLFLOW_PORT"],
            "health": u["mlflow"] + "/health",
        },
        "prefect": {
            "argv": [tool("prefect"), "server", "start", "--host", h, "--port", s["PREFECT_PORT"]],
            "env": {
                "PREFECT_HOME": prefect_env["PREFECT_HOME"],
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_AUTH_STRING": s["PREFECT_API_AUTH_STRING"],
                "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
                "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": prefect_origin,
            },
            "port": s["PREFECT_PORT"],
            "health": u["prefect"] + "/health",
            "headers": _basic(s["PREFECT_API_AUTH_STRING"]),
        },
        # runs the project's deployments (prefect.yaml) as local processes, against the stack; the flows it runs
        # accept only this project (TL_PROJECT_DIR)
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
            "env": {
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": s["RAY_AUTH_TOKEN_PATH"],
            },
            "port": s["RAY_DASHBOARD_PORT"],
            "health": u["ray"] + "/api/version",
            "headers": {"Authorization": "Bearer " + Path(s["RAY_AUTH_TOKEN_PATH"]).read_text().strip()},
        },
    }


def _ok(c: dict) -> bool:
    """The health URL answers as this component does when up (200; an unsigned S3 request: refused)."""
    try:
        req = urllib.request.Request(c["health"], headers=c.get("headers", {}))
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code in c.get("answers", ())
    except OSError:
        return False


def listener(host: str, port: int) -> int | None:
    """The pid listening on ``host:port`` (or on all interfaces), if this user may see it; None otherwise."""
    import socket

    import psutil

    try:  # a host name (localhost, the machine's name) listens on its addresses
        ips = {a[4][0] for a in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        ips = {host}
    ips |= {"0.0.0.0", "::"} | {"::ffff:" + ip for ip in ips}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.laddr.ip in ips:
            return conn.pid if conn.pid is not None else -1
    return None


def _marked(pid: int, state: Path) -> bool:
    """``pid`` was started by this stack: it carries the stack's mark in its environment (inherited by every
    process a component starts, also those that leave its process group)."""
    try:
        return f"{MARK}={state}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or another user's
        return False


def _owner_error(name: str, host: str, port: str, pid: int, env_file: Path) -> StackError:
    who = "a process of another user" if pid < 0 else f"pid {pid} ({_cmdline(pid)[:120].strip()})"
    return StackError(
        f"stack: port {host}:{port} for {name} is answered by {who}, not by the {name} this stack started; "
        f"nothing was sent to it. Stop that process, or give {name} another port in {env_file} or the "
        f"environment (e.g. {_port_key(name)}=...), then `tl stack up` again."
    )


def _port_key(name: str) -> str:
    return {"s3": "S3_PORT", "mlflow": "MLFLOW_PORT", "prefect": "PREFECT_PORT", "ray": "RAY_DASHBOARD_PORT"}[name]


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
    env = {
        **os.environ,
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_URL": urls(s)["prefect"],
        "PREFECT_API_AUTH_STRING": s["PREFECT_API_AUTH_STRING"],
    }
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
    """Start what is not running (and healthy), wait until each answers from its own process; return the
    client env without its secrets (:func:`public_env`; ``tl stack env`` prints the whole). If a component
    fails, what this call started is stopped again."""
    configure_environment()
    state = _state_dir((state or root / STATE_DIR).resolve())
    env_file = (env_file or default_env_file(root, state)).resolve()
    stack_secrets(state, create=True)
    s = settings(env_file, state)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    _private_ray_parent(state)
    comps = _components(s, state, root.resolve())
    procs = _read_state(state)
    started: list[str] = []
    t0 = time.monotonic()
    host = s["TL_STACK_HOST"]
    running = [n for n in ORDER if procs.get(n) and _alive(procs[n])]
    if running and procs.get("fingerprint") != _fingerprint(state):
        raise StackError(
            f"stack: {', '.join(running)} run(s) with other credentials than {state / SECRETS_FILE} (started by an "
            f"older `tl stack up`, or before the credentials changed), and would keep serving without them: "
            f"`tl stack down`, then `tl stack up`. The data under {state} stays."
        )
    procs["fingerprint"] = _fingerprint(state)
    # a RAY_AUTH_TOKEN in this shell (a cluster's) would win over the stack's token file in everything started here
    base_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}

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
                env={**base_env, **c["env"], MARK: str(state)},
                start_new_session=True,
            )
        procs[name] = {"pid": p.pid, "pgid": p.pid, "argv0": c["argv"][0], "started": time.time()}
        started.append(name)
        _write_state(state, procs)

    def wait(name):
        c, deadline = comps[name], time.monotonic() + timeout_s
        while True:
            pid = listener(host, int(c["port"])) if "port" in c else None
            if pid is not None and not _marked(pid, state):
                raise _owner_error(name, host, c["port"], pid, env_file)
            if ("port" not in c or pid is not None) and (_ok(c) if "health" in c else True):
                break
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
    for name in ("s3", "mlflow", "prefect", "ray"):  # a port taken by another process: say by whom, start nothing
        rec = procs.get(name)
        if not (rec and _alive(rec)) and (pid := listener(host, int(comps[name]["port"]))) is not None:
            if _marked(pid, state):  # a process of this stack outlived its group (killed by hand, a crash)
                raise StackError(
                    f"stack: port {host}:{comps[name]['port']} for {name} is held by pid {pid}, left over from this "
                    f"stack ({_cmdline(pid)[:80].strip()}); `tl stack down` stops it, then `tl stack up`."
                )
            raise _owner_error(name, host, comps[name]["port"], pid, env_file)
    try:
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
    except BaseException:
        if started:
            say(f"stack: stopping what this `up` started ({', '.join(started)})")
            _stop(state, {n: procs[n] for n in started}, grace_s=5, say=say, sweep=False)  # only those groups
            for n in started:
                procs.pop(n, None)
            _write_state(state, procs)
        raise
    private_file(state / "env", export_lines(s))  # for --env-file-on-cluster: it holds the secrets
    return public_env(s)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal is not ours
        return False


def _stop(state: Path, ours: dict[str, dict], grace_s: float, say, sweep: bool = True) -> None:
    """SIGTERM each recorded process group, SIGKILL after ``grace_s``; then, with ``sweep`` (``down``), whatever
    left the groups but carries the stack's mark (Ray's daemons, the Ray jobs' drivers and their `dvc repro`, flow
    runs). A failed ``up`` does not sweep: the components it did not start, and their work, run on."""
    t0 = time.monotonic()
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
    tmp = str(_ray_temp_dir(state))
    for p in Path("/proc").iterdir() if sweep else ():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        if _marked(int(p.name), state) or tmp in _cmdline(int(p.name)):
            try:
                os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                pass
    if "ray" in ours and sweep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # Ray's session files (logs, sockets) of this stack


def down(root: Path, state: Path | None = None, grace_s: float = 10, say=print) -> list[str]:
    """Stop every process group ``up`` recorded (SIGTERM to all, SIGKILL after ``grace_s``), and Ray's daemons
    under this stack's temp dir; return the names stopped. Nothing it did not start is touched; the data under
    ``.tlstack/`` stays for the next ``up``."""
    state = (state or root / STATE_DIR).resolve()
    procs = _read_state(state)
    ours = {name: procs[name] for name in ORDER if name in procs and _alive(procs[name])}
    _stop(state, ours, grace_s, say)
    for name in ORDER:
        procs.pop(name, None)
    if state.is_dir():
        _write_state(state, procs)
    if not ours:
        say(f"stack: nothing running under {state}")
    (state / "env").unlink(missing_ok=True)
    return list(ours)


def status(root: Path, state: Path | None = None) -> dict[str, bool]:
    procs = _read_state((state or root / STATE_DIR).resolve())
    return {name: bool(procs.get(name)) and _alive(procs[name]) for name in ORDER}
