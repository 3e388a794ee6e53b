"""The project on disk, as the CLI and the flows both drive it: its environment, `dvc`, params overrides, and
fresh copies of it (benchmarks and integration tests run the pipeline in one, never in the checkout).

Both entry points (``tl`` and the Prefect flows) import this; it imports neither.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
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
    "DVC_NO_ANALYTICS": "1",  # also: no detached DVC daemon that would inherit the run's lock (see dvc())
}
#: file descriptors every `dvc` this process starts keeps open: the project lock while it is held
#: (tasks/services/lock.py), so that the lock lives as long as any process of the run does
_HANDED_DOWN: set[int] = set()


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


@contextmanager
def handed_down(fd: int):
    """While the block runs, every `dvc` this process starts (:func:`dvc`) inherits ``fd``."""
    _HANDED_DOWN.add(fd)
    try:
        yield
    finally:
        _HANDED_DOWN.discard(fd)


def dvc(args: list[str], repo: str | Path = ".", capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``repo`` with this environment (see :func:`configure_environment`), handing it the
    descriptors of :func:`handed_down`.

    An interrupt (Ctrl-C reaches ``dvc`` and its stage too) is not answered by killing ``dvc``, as
    ``subprocess.run`` would: it lets its stage stop and then ends by itself, holding what it inherited until then."""
    configure_environment()
    pipe = subprocess.PIPE if capture else None
    with subprocess.Popen(
        [tool("dvc"), *args],
        cwd=repo,
        env=dict(os.environ),
        stdout=pipe,
        stderr=pipe,
        text=True,
        pass_fds=tuple(sorted(_HANDED_DOWN)),
    ) as p:
        out, err = p.communicate()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _stages(repo: str | Path) -> dict:
    import yaml

    with open(Path(repo) / "dvc.yaml") as f:
        return (yaml.safe_load(f) or {}).get("stages") or {}


def stage_names(repo: str | Path = ".") -> list[str]:
    """The pipeline's stages in ``dvc.yaml`` order (the one list of stages)."""
    return list(_stages(repo))


def always_changed_stages(repo: str | Path = ".") -> set[str]:
    """Stages DVC runs every time (``always_changed: true``: the input fingerprints, the registration); not news
    when they run."""
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
    params.yaml, as a git repo with DVC initialised with the shipped ``.dvc/config`` (its default remote is the
    relative ``../.dvc-remote``: ``dst/.dvc-remote``, as in a clone of the project) and one commit."""
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

    def run(*cmd: str) -> None:
        r = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed in {dst} ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            )

    run("git", "init", "-q")
    run(tool("dvc"), "init", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", dst / ".dvc" / "config")  # as a clone has it (and no config.local)
    run("git", "add", "-A")
    run("git", *identity, "commit", "-qm", "init")
    return dst


def dvc_remotes(root: str | Path, local: bool = True) -> tuple[str | None, dict[str, dict[str, str]]]:
    """The DVC remotes of the project at ``root`` as DVC sees them there: ``.dvc/config`` with the git-ignored
    ``.dvc/config.local`` over it (``local=False``: ``.dvc/config`` only, what a copy of the commit sees), a local
    path's ``url`` made absolute (DVC reads a relative one against ``.dvc/``, so in another folder it would name
    another place). Returns ``(default remote, {name: options})``."""
    import re
    from urllib.parse import urlsplit

    from configobj import ConfigObj

    dvc_dir = Path(root).resolve() / ".dvc"
    default, remotes = None, {}
    for name in ("config", "config.local") if local else ("config",):
        if not (dvc_dir / name).is_file():
            continue
        conf = ConfigObj(str(dvc_dir / name))
        default = (conf.get("core") or {}).get("remote", default)
        for section, opts in conf.items():
            if m := re.fullmatch(r'remote\s+"(.+)"', section):
                remotes.setdefault(m.group(1), {}).update(opts)
    for opts in remotes.values():
        url = opts.get("url", "")
        if url and (len(urlsplit(url).scheme) <= 1 or url.startswith("file:")):  # a local path (or file: URL)
            path = urlsplit(url).path if url.startswith("file:") else url
            opts["url"] = str((dvc_dir / Path(path).expanduser()).resolve())
    return default, remotes


def pin_remotes(src: str | Path, dst: str | Path) -> None:
    """Give the project at ``dst`` (a clone of ``src`` elsewhere) the remotes ``src`` sees, by absolute path
    (:func:`dvc_remotes`), in ``dst/.dvc/config.local``: what ``src`` pushed, ``dst`` pulls."""
    from configobj import ConfigObj

    default, remotes = dvc_remotes(src)
    conf = ConfigObj()
    conf.filename = str(Path(dst) / ".dvc" / "config.local")
    if default:
        conf["core"] = {"remote": default}
    for name, opts in remotes.items():
        conf[f'remote "{name}"'] = opts
    conf.write()


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
