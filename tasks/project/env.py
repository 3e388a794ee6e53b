"""The project on disk, as the CLI and the flows both drive it: its environment, `dvc`, params overrides, and
fresh copies of it (benchmarks and integration tests run the pipeline in one, never in the checkout).

Both entry points (``tl`` and the Prefect flows) import this; it imports neither.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: what a copy of the project needs to run the pipeline: the code, the pipeline and its params
PROJECT_FILES = ("tlcore", "tasks", "flows", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore")

# What every process of a run needs, whoever started it (`tl`, `make`, a Prefect worker, a test):
# no telemetry calls from an offline machine (their failures print tracebacks), and a Prefect
# ephemeral API that is given time to start on a slow 2-core machine (its default is 20 s).
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_API_REQUEST_TIMEOUT": "120",
}


def configure_environment() -> None:
    """Set :data:`QUIET_ENV` in this process (values the user set win) and put this interpreter's
    ``bin/`` first on ``PATH``, so `dvc` and the stages' ``python -m tasks.stages.<stage>`` run from the
    same environment as the caller even when the venv is not activated."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def tool(name: str) -> str:
    """The executable ``name`` next to this interpreter, else from ``PATH``."""
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def dvc(args: list[str], repo: str | Path = ".", capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``repo`` with this environment (see :func:`configure_environment`)."""
    configure_environment()
    return subprocess.run([tool("dvc"), *args], cwd=repo, env=dict(os.environ), capture_output=capture, text=True)


def _stages(repo: str | Path) -> dict:
    import yaml

    with open(Path(repo) / "dvc.yaml") as f:
        return (yaml.safe_load(f) or {}).get("stages") or {}


def stage_names(repo: str | Path = ".") -> list[str]:
    """The pipeline's stages in ``dvc.yaml`` order (the one list of stages)."""
    return list(_stages(repo))


def always_changed_stages(repo: str | Path = ".") -> set[str]:
    """Stages DVC runs every time (``always_changed: true``: the input fingerprints); not news when they run."""
    return {k for k, v in _stages(repo).items() if v.get("always_changed")}


def write_overrides(params_file: Path, overrides: list[str]) -> None:
    """Apply ``-S key=value`` to params.yaml, keeping comments (as ``dvc exp run -S`` does).

    The new file is written next to the old one and renamed over it, so a reader never sees half a file."""
    from ruamel.yaml import YAML

    from tasks.project.config import ParamsError
    from tasks.project.files import atomic_path
    from tasks.project.overrides import OverrideError, set_overrides

    y = YAML()
    y.preserve_quotes = True
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    with params_file.open() as f:
        doc = y.load(f)
    try:
        set_overrides(doc, overrides)
    except OverrideError as e:
        raise ParamsError(str(e)) from None
    with atomic_path(params_file) as tmp:
        with tmp.open("w") as f:
            y.dump(doc, f)
        os.chmod(tmp, params_file.stat().st_mode)


def copy_env() -> dict:
    """The environment to run a copy of the project in: this process's, plus :data:`QUIET_ENV`, this
    interpreter's ``bin/`` first on ``PATH`` and no ``PYTHONPATH`` (the copy imports its own code, from its cwd)."""
    e = {**os.environ, **{k: v for k, v in QUIET_ENV.items() if k not in os.environ}}
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = ""
    return e


def deep_update(d: dict, u: dict) -> dict:
    """``d`` with ``u`` merged in, nested dicts key by key (in place)."""
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def copy_project(dst: Path, params: dict | None = None, env: dict | None = None) -> Path:
    """A fresh copy of this project at ``dst``: :data:`PROJECT_FILES`, with ``params`` merged into its
    params.yaml, as a git repo with DVC initialised, a local DVC remote (``dst/.dvc-remote``) and one commit."""
    import yaml

    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dst / name)
    if params:
        doc = yaml.safe_load((dst / "params.yaml").read_text())
        (dst / "params.yaml").write_text(yaml.safe_dump(deep_update(doc, params), sort_keys=False))
    env = env or copy_env()
    identity = ["-c", "user.name=tl", "-c", "user.email=tl@localhost"]  # a machine without a git identity
    for cmd in (
        ["git", "init", "-q"],
        [tool("dvc"), "init", "-q"],
        [tool("dvc"), "config", "core.analytics", "false"],
        [tool("dvc"), "remote", "add", "-d", "local", str(dst / ".dvc-remote")],
        ["git", "add", "-A"],
        ["git", *identity, "commit", "-qm", "init"],
    ):
        r = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed in {dst} ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            )
    return dst


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` prefix, quotes, ``#`` comments allowed), as compose and dotenv write them."""
    out = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.removeprefix("export ").split("=", 1)
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        elif " #" in v:
            v = v.split(" #", 1)[0].rstrip()
        out[k.strip()] = v
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
