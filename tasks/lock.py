"""One run at a time per project: an exclusive lock on ``<project>/.tlcache/project.lock``.

Everything that writes the project's state takes it: ``tl run`` (before it touches ``params.yaml``),
the Prefect flows (so ``tl serve``'s scheduled runs too), the ``register`` stage, ``tl promote`` and
``tl rollback``. A second taker fails at once with who holds it; nothing is written.

The lock is ``fcntl.flock`` on the file, so the kernel frees it when the holder dies, however it
dies (a killed run never leaves the project locked); the file's text says who held it last, for
the error message and for "took over a lock left by ...". Processes started by the holder (``dvc``
and its stages, Prefect tasks) inherit a token in :data:`TOKEN_ENV` and pass through.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from .stage import StageError

TOKEN_ENV = "TL_PROJECT_LOCK"
LOCK_FILE = ".tlcache/project.lock"


class ProjectLocked(StageError):
    """Another process holds the project lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def holder(root: str | Path) -> dict:
    """Who holds (or last held) the lock of the project at ``root``: pid, command, since, host, token."""
    return _read(Path(root) / LOCK_FILE)


@contextmanager
def project_lock(root: str | Path, what: str | None = None):
    """Hold the project's lock for the ``with`` block; raise :class:`ProjectLocked` if another run has it.

    Re-entrant down the process tree: inside a holder (same process or a child that inherited
    :data:`TOKEN_ENV`) it yields at once."""
    import fcntl

    path = Path(root).resolve() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken = True
        except BlockingIOError:
            taken = False
        if not taken:
            info = _read(path)
            mine = os.environ.get(TOKEN_ENV)
            if mine and info.get("token") == mine:  # our own run holds it (we are it, or it started us)
                yield info
                return
            raise ProjectLocked(
                f"another run (pid {info.get('pid', '?')}, `{info.get('command', '?')}`, since "
                f"{info.get('since', '?')}) holds the project lock {path}. Nothing was changed. Wait for it to "
                f"finish (or stop it) and run again; one run at a time keeps params.yaml, dvc.lock and the "
                f"registry in step.")
        before = _read(path)
        if before.get("pid") and before.get("host") == socket.gethostname() and before.get("pid") != os.getpid() \
                and not _alive(int(before["pid"])):
            print(f"lock: took over the project lock left by pid {before['pid']} (`{before.get('command', '?')}`, "
                  f"no longer running)", file=sys.stderr, flush=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": secrets.token_hex(8),
                "command": what or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
                "since": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        old = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = info["token"]
        try:
            yield info
        finally:
            if old is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = old
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
