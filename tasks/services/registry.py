"""Model-registry operations behind ``tl models / promote / rollback`` (MLflow); loading a registered
model and classifying with it is :mod:`tasks.modeling.serving`.

Reading a sqlite registry through MLflow costs ~3 s on a small machine (MLflow and SQLAlchemy
imports, store set-up), more than the answer is worth when nothing changed. So the listing and the
aliases are cached in ``.tlcache/registry/`` next to the database, keyed by the database files'
size, modification and change times and inode: any write (a registration, a promotion, by any
process) changes them and the next call asks MLflow again; a store written in the last 2 s is
never used as a key. Downloaded model files are cached in ``.tlcache/models/`` by
version and run, and checked before use against the SHA-256 the register stage recorded on the
version (``model_sha256``). A tracking server (HTTP) is always asked; only its model files are
cached.
"""

from __future__ import annotations

import getpass
import json
import shutil
import time
from pathlib import Path

from tasks.project.files import file_sha256, write_json
from tasks.services.lock import project_lock, registry_lock
from tasks.services.tracking import client, project_root, public_uri, sqlite_path, tracking_uri, version_by_alias

CACHE_DIR = ".tlcache"


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


def _signature(uri: str) -> list | None:
    """A key that changes whenever the (sqlite) store is written; ``None`` where none can be trusted now. In
    SQLite's default rollback-journal mode (MLflow's) the header's file change counter goes up at every commit:
    a write is seen at once. Otherwise (WAL mode, or not a database yet) the files' sizes and times, trusted only
    when older than the clock's resolution (:func:`refresh` then waits that long before it caches)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    journal, wal = db.with_name(db.name + "-journal"), db.with_name(db.name + "-wal")
    try:
        if journal.stat().st_size > 0:  # a transaction in progress (or a hot journal): nothing settled to key on
            return None
    except FileNotFoundError:
        pass
    try:
        with open(db, "rb") as f:
            head = f.read(100)
        st = db.stat()
    except FileNotFoundError:
        return [db.name, None]
    # bytes 18-19: 1, 1 in rollback-journal mode (2, 2 in WAL mode, where the counter is not kept). Reading the
    # header opens and closes the file, which would drop POSIX locks this process held on it: none is held here,
    # between MLflow's statements
    if head.startswith(b"SQLite format 3\0") and len(head) == 100 and head[18:20] == b"\x01\x01":
        return [db.name, "counter", int.from_bytes(head[24:28], "big"), st.st_size, st.st_ino]
    sig = []
    for f in (db, wal):
        try:
            st = f.stat()
            if time.time() - st.st_mtime < 2:  # written within the clock's resolution: do not trust a key
                return None
            sig.append([f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        except FileNotFoundError:
            sig.append([f.name, None])
    return sig


def _cache_root(uri: str) -> Path | None:
    db = sqlite_path(uri)
    return db.parent / CACHE_DIR if db is not None else None


def refresh(name: str, c=None) -> dict:
    """Read ``name``'s versions and aliases from MLflow (and cache them for a sqlite store)."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    sig = _signature(uri)  # before reading: a write during the read makes the next call read again
    if sig is None and sqlite_path(uri) is not None:  # just written (by us, usually): let the key settle
        time.sleep(2.1)
        sig = _signature(uri)
    c = c or client(uri)
    try:
        aliases = c.get_registered_model(name).aliases or {}
    except MlflowException:
        return {"rows": [], "aliases": {}}
    by_version: dict[str, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(str(v), []).append(a)
    rows, sources = [], {}
    for v in c.search_model_versions(f"name = '{name}'"):
        t = v.tags
        sources[str(v.version)] = {"source": v.source, "run_id": v.run_id, "sha256": t.get("model_sha256")}
        rows.append(
            {
                "version": int(v.version),
                "aliases": ",".join(sorted(by_version.get(str(v.version), []))),
                "accuracy": t.get("accuracy"),
                "transfer_gain": t.get("transfer_gain"),
                "gain_over": t.get("gain_baseline", "scratch"),
                "strategy": t.get("strategy"),
                "candidate": t.get("candidate_why"),  # why this model, not the run's other one, was registered
                "adaptation": t.get("adaptation_check"),  # with no target labels: did the adaptation probably fail?
                "gate": t.get("gate_decision"),
                "evidence": _evidence(t),
                "data": (t.get("data_target_dvc_md5") or "")[:10],
                "git": (t.get("git_commit") or "")[:8],
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
            }
        )
    snap = {
        "rows": sorted(rows, key=lambda r: r["version"]),
        "aliases": {a: {"version": str(v), **sources.get(str(v), {})} for a, v in aliases.items()},
        "versions": {v: {"version": v, **src} for v, src in sources.items()},
    }
    root = _cache_root(uri)
    if root is not None and sig is not None:
        try:
            write_json(root / "registry" / f"{name}.json", {"signature": sig, **snap})
        except OSError:  # a read-only project: no cache, still correct
            pass
    return snap


def _evidence(tags: dict) -> str:
    """The gate's evidence, short: ``vs v3 -0.4pt p=0.21, vs scratch +12.0pt p=1.4e-09``. Each p-value is one-sided,
    in the direction observed: the chance of a difference at least this large that way round if the two models were
    equally accurate (not the chance that the difference is real)."""

    def pts(key: str) -> str:
        v = tags.get(key)
        return f"{float(v) * 100:+.1f}pt " if v else ""

    parts = []
    if tags.get("gate_p_champion"):
        parts.append(
            f"vs v{tags.get('gate_compared_with', '?')} {pts('gate_delta_champion')}p={tags['gate_p_champion']}"
        )
    if tags.get("gate_p_baseline"):
        parts.append(
            f"vs {tags.get('gain_baseline', 'baseline')} {pts('gate_delta_baseline')}p={tags['gate_p_baseline']}"
        )
    return ", ".join(parts)


def cached(name: str) -> dict | None:
    """``name``'s versions and aliases as :func:`refresh` last read them, if the (sqlite) store has not been
    written since; else None: a tracking server, or a store changed since (ask MLflow). Needs no MLflow."""
    uri = tracking_uri()
    root, sig = _cache_root(uri), _signature(uri)
    if root is None or sig is None:
        return None
    try:
        snap = json.loads((root / "registry" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    # "versions": a listing cached before versions were kept is not enough
    return snap if snap.get("signature") == sig and "versions" in snap else None


def snapshot(name: str) -> dict:
    return cached(name) or refresh(name)


def versions(name: str) -> list[dict]:
    rows = snapshot(name)["rows"]
    if not rows:
        raise RegistryError(
            f"no registered model named {name!r} in the tracking store {public_uri(tracking_uri())}; "
            f"run the pipeline first (tl run)."
        )
    return rows


def promote(name: str, version: int, why: str, who: str | None = None) -> dict:
    """Move ``champion`` to ``version`` explicitly (bypassing the gate), recording who and why."""
    from mlflow.exceptions import MlflowException

    c = client()
    # the locks the gate holds while it decides: this checkout's runs, and every registration of `name` anywhere
    with (
        project_lock(project_root(), f"tl promote {name} {version}"),
        registry_lock(c, name, f"tl promote {name} {version} in {project_root()}", wait_s=0),
    ):
        try:
            c.get_model_version(name, str(version))
        except MlflowException:
            raise RegistryError(f"{name} has no version {version}; see `tl models`.") from None
        old = version_by_alias(c, name, "champion")
        if old is not None and str(old.version) == str(version):
            raise RegistryError(f"{name} version {version} is already the champion; nothing changed.")
        who = who or getpass.getuser()
        c.set_registered_model_alias(name, "champion", str(version))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        for k, v in {
            "promoted_by": who,
            "promoted_why": why,
            "promoted_at": stamp,
            "previous_champion": old.version if old else "",
        }.items():
            c.set_model_version_tag(name, str(version), k, str(v))
    refresh(name, c)  # after the lock is gone: its release writes to the store too
    return {"champion": version, "previous": int(old.version) if old else None}


def rollback(name: str, why: str, who: str | None = None) -> dict:
    """Move ``champion`` back to the version it replaced (recorded when it was promoted)."""
    c = client()
    with (
        project_lock(project_root(), f"tl rollback {name}"),
        registry_lock(c, name, f"tl rollback {name} in {project_root()}", wait_s=0),
    ):
        cur = version_by_alias(c, name, "champion")
        prev = cur.tags.get("previous_champion") if cur else None
        if not prev or prev == str(cur.version):
            raise RegistryError(
                f"{name} has no earlier champion to roll back to; use `tl promote {name} VERSION` instead."
            )
        who = who or getpass.getuser()
        c.set_registered_model_alias(name, "champion", prev)
        c.set_model_version_tag(name, cur.version, "rolled_back_by", who)
        c.set_model_version_tag(name, cur.version, "rolled_back_why", why)
        c.set_model_version_tag(name, prev, "restored_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    refresh(name, c)
    return {"champion": int(prev), "replaced": int(cur.version)}


def parse_model(spec: str, default_name: str) -> tuple[str, str | None, int | None]:
    """``tl predict --model``: ``NAME@ALIAS``, ``NAME/VERSION``, ``@ALIAS`` or ``VERSION`` (the default model name)
    -> ``(name, alias, version)``, one of alias and version set."""
    name, sep, rest = spec.rpartition("@") if "@" in spec else spec.rpartition("/")
    name = name or default_name
    if sep == "@" and rest and "/" not in rest:
        return name, rest, None
    if rest.isdigit() and int(rest) > 0 and "@" not in name:
        return name, None, int(rest)
    raise RegistryError(
        f"--model {spec!r}: give NAME@ALIAS (digits-transfer@champion), NAME/VERSION "
        f"(digits-transfer/3), @ALIAS or a version number; see `tl models` for what is registered."
    )


def model_file(name: str, entry: dict) -> Path:
    """The registered ``model.pt`` of a version: cached copy if its checksum holds, else downloaded."""
    uri = tracking_uri()
    root = _cache_root(uri) or Path(CACHE_DIR).resolve()
    d = root / "models" / name / f"v{entry['version']}-{(entry.get('run_id') or 'norun')[:12]}"
    f, sha = d / "model.pt", d / "model.pt.sha256"
    want = entry.get("sha256")  # recorded at registration (versions registered before it have none)
    if f.is_file() and sha.is_file():
        cached = file_sha256(f)
        if cached == sha.read_text().strip() and want in (None, cached):
            return f
    import mlflow

    try:
        src = Path(mlflow.artifacts.download_artifacts(entry["source"], tracking_uri=uri)) / "model.pt"
    except Exception as e:  # MlflowException or a missing artifact store
        raise RegistryError(
            f"cannot download {name} version {entry['version']} ({entry['source']}): {e}. See `tl models`."
        ) from None
    got = file_sha256(src)
    if want and got != want:
        raise RegistryError(
            f"{name} version {entry['version']}: the stored model.pt has SHA-256 {got[:12]}…, but "
            f"{want[:12]}… was registered; the artifact store holds another file than was registered."
        )
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, f)
    sha.write_text(got)
    return f
