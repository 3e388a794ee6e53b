"""One run at a time per project: an exclusive lock on ``<project>/.tlcache/project.lock``.

Everything that writes the project's state takes it: ``tl run`` (before it touches ``params.yaml``),
the Prefect flows (so ``tl serve``'s scheduled runs too), the ``register`` stage, ``tl promote`` and
``tl rollback``. A second taker fails at once with who holds it; nothing is written.

The lock is ``fcntl.flock`` on the file, so the kernel frees it when the holder dies, however it
dies (a killed run never leaves the project locked); the file's text says who held it last, for
the error message and for "took over a lock left by ...". Processes started by the holder (``dvc``
and its stages, Prefect tasks) inherit a token in :data:`TOKEN_ENV` and pass through. Every ``dvc``
the holder starts also inherits the locked file itself (:func:`tasks.project.env.handed_down`): a flock
belongs to the open file, not to a process, so the lock is freed only when the last process of the
run that has it ends. Killing ``tl run`` leaves its ``dvc repro`` and the stage under it running, and
the project locked, until they finish too.
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

from tasks.project.env import handed_down
from tasks.project.settings import settings
from tasks.project.stage import StageError

TOKEN_ENV = "TL_PROJECT_LOCK"
LOCK_FILE = ".tlcache/project.lock"


class ProjectLocked(StageError):
    """Another process holds the project lock."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
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


def _survivors(path: Path, info: dict) -> str:
    """When the recorded holder is gone but the lock is held: which processes of its run still hold it (they
    are found on Linux, in ``/proc``), for the error message."""
    pid = info.get("pid")
    if not pid or info.get("host") != socket.gethostname() or pid_alive(int(pid)):
        return ""
    held = {}
    procs = os.listdir("/proc") if os.path.isdir("/proc") else []
    for p in (p for p in procs if p.isdigit() and int(p) != os.getpid()):  # not this taker: it opened the file too
        try:
            if any(os.readlink(f"/proc/{p}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{p}/fd")):
                held[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    who = ", ".join(f"pid {p} (`{cmd.strip()[:80]}`)" for p, cmd in held.items())
    return (
        f"; pid {pid} has exited, but a process it started still holds the lock (its `dvc`, which waits for the "
        f"stage running under it){': ' + who if who else ''}. The lock is free when that ends; to stop the run "
        f"now, stop it and its stage (`kill {' '.join(held) or 'PID'}`, then the stage)"
    )


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
            mine = settings().project_lock
            if mine and info.get("token") == mine:  # our own run holds it (we are it, or it started us)
                yield info
                return
            raise ProjectLocked(
                f"another run (pid {info.get('pid', '?')}, `{info.get('command', '?')}`, since "
                f"{info.get('since', '?')}) holds the project lock {path}{_survivors(path, info)}. Nothing was "
                f"changed. Wait for it to finish (or stop it) and run again; one run at a time keeps params.yaml, "
                f"dvc.lock and the registry in step."
            )
        before = _read(path)
        if (
            before.get("pid")
            and before.get("host") == socket.gethostname()
            and before.get("pid") != os.getpid()
            and not pid_alive(int(before["pid"]))
        ):
            print(
                f"lock: took over the project lock left by pid {before['pid']} (`{before.get('command', '?')}`, "
                f"no longer running)",
                file=sys.stderr,
                flush=True,
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": secrets.token_hex(8),
            "command": what or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
            "since": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        old = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = info["token"]
        try:
            with handed_down(fd):
                yield info
        finally:
            if old is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = old
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RegistryLocked(StageError):
    """Another registration of the same model holds the registry lock for too long."""


REGISTRY_LOCK_SUFFIX = ".registration-lock"


@contextmanager
def registry_lock(c, name: str, what: str, wait_s: float = 900, stale_s: float = 900):
    """One registration of ``name`` at a time, across processes *and machines*: the lock lives in the registry
    every job shares. Creating a registered model is atomic (its name is unique in the tracking store's
    database), so whoever creates ``<name>.registration-lock`` holds the lock, and deletes it when done.
    Others wait (up to ``wait_s``); a lock whose holder is gone is taken over: at once when the holder ran on
    this host and its process is dead, else once its heartbeat (the ``since`` tag, refreshed every
    ``stale_s / 10`` while held) is older than ``stale_s``, so a slow but live registration is never taken over."""
    import random
    import threading
    import time

    from mlflow.exceptions import MlflowException

    lock = name + REGISTRY_LOCK_SUFFIX
    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    deadline, waited = time.monotonic() + wait_s, False
    while True:
        try:
            c.create_registered_model(
                lock,
                tags={"holder": token, "since": f"{time.time():.3f}", "what": what},
                description="held while a registration gates and moves aliases (tasks/services/lock.py)",
            )
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = c.get_registered_model(lock).tags
        except MlflowException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue  # released in between: try again
        host, _, pid = (held.get("holder") or "::").partition(":")
        dead_here = (
            host == socket.gethostname() and pid.split(":")[0].isdigit() and not pid_alive(int(pid.split(":")[0]))
        )
        if dead_here or time.time() - float(held.get("since") or 0) > stale_s:
            why = "its process is gone" if dead_here else f"taken more than {stale_s:.0f} s ago"
            print(
                f"register: taking over the registry lock of {name} left by {held.get('holder')} "
                f"({held.get('what')}; {why})",
                flush=True,
            )
            try:  # only the lock we judged stale: another waiter may have taken it over since
                if c.get_registered_model(lock).tags.get("holder") == held.get("holder"):
                    c.delete_registered_model(lock)
            except MlflowException:
                pass
            continue
        if time.monotonic() > deadline:
            raise RegistryLocked(
                f"the registry lock of {name} ({lock} in {c.tracking_uri}) is held by pid {pid.split(':')[0]} on "
                f"{host} ({held.get('what')}) and was not released within {wait_s:.0f} s: another registration, "
                f"promotion or rollback of {name} is moving its aliases. Nothing was changed; run again when it "
                f"has finished. If that holder died, delete the lock model (`{lock}`) in the MLflow UI, "
                f"or wait: it is taken over after {stale_s:.0f} s."
            )
        if not waited:
            print(
                f"register: waiting for the registry lock of {name}, held by {held.get('holder')} ({held.get('what')})",
                flush=True,
            )
            waited = True
        time.sleep(0.5 + random.random())
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(stale_s / 10):
            try:
                if c.get_registered_model(lock).tags.get("holder") == token:
                    c.set_registered_model_tag(lock, "since", f"{time.time():.3f}")
            except MlflowException:
                pass

    beat = threading.Thread(target=heartbeat, name="registry-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=5)
        try:
            if c.get_registered_model(lock).tags.get("holder") == token:
                c.delete_registered_model(lock)
        except MlflowException:
            pass
