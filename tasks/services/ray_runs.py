"""A Ray Train run's identity: its name, the code it hashes, where it is stored and whether it finished.

A run's name is ``<stage>-<hash of params, data and code>``. Starting the same stage again after a crash
or Ctrl-C reuses the name, and Ray hands the loop the last checkpoint. A finished run is marked done
(:data:`DONE_MARKER`), so it is never resumed by accident: the next run with that name gets a timestamp.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tasks.project.config import Params

DONE_MARKER = "_TL_DONE"


def code_hash(stage: str) -> str:
    """Hash of the stage's code, the same files ``dvc.yaml`` lists as its code deps
    (:func:`tasks.project.codedeps.stage_code_files`), so a code change never resumes an old run and a change
    DVC ignores does not start a new one."""
    from tasks.project.codedeps import ROOT, stage_code_files

    try:
        files = stage_code_files(stage)
    except FileNotFoundError:  # a job that is not a stage (a benchmark, a test): all of the project's code
        files = sorted((ROOT / "tasks").rglob("*.py")) + sorted((ROOT / "tlcore").rglob("*.py"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def run_name(stage: str, params: Params, manifest: dict, strategy: str = "") -> str:
    """``strategy``: the one the job trains, which params alone may not fix (``finetune.strategy: auto`` with no
    target labels measures candidates, tasks/modeling/strategy_choice.py): a resume never continues another strategy's
    run."""
    blob = json.dumps(
        {
            "params": params.model_dump(exclude={"register", "evaluate", "compress"}),
            "data": {r: manifest[r]["splits"] for r in ("source", "target")},
            "code": code_hash(stage),
            **({"strategy": strategy} if strategy else {}),
        },
        sort_keys=True,
        default=str,
    )
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def storage_path(params: Params) -> str:
    sp = params.ray.storage_path
    return sp if "://" in sp else str(Path(sp).expanduser().resolve())


def storage_filesystem(storage: str):
    """``(pyarrow filesystem, path in it)`` of a storage location: a folder, or a URI. ``s3://`` goes through
    s3fs, which talks to AWS and to S3-compatible servers alike (``AWS_ENDPOINT_URL``: MinIO, the local stack's
    rclone); pyarrow's own S3 client streams uploads without a length, which rclone refuses (HTTP 411). Checksums
    are checked where the server gives them for the bytes sent (a ranged read of a whole-object checksum is not)."""
    import pyarrow.fs as pafs

    if storage.startswith("s3://") and "?" not in storage:  # options in the URI (endpoint_override=...): pyarrow's
        import s3fs

        checks = {"response_checksum_validation": "when_required", "request_checksum_calculation": "when_required"}
        # no listing cache: an object another process rewrote is seen as it is now (a staged split made again)
        fs = s3fs.S3FileSystem(config_kwargs=checks, use_listings_cache=False, skip_instance_cache=True)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), storage.removeprefix("s3://").rstrip("/")
    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), str(Path(storage).expanduser().resolve())


def live_nodes() -> list[str]:
    """The ids of the connected Ray cluster's live nodes."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def worker_nodes(resources: dict[str, float]) -> list[str]:
    """The ids of the live nodes whose resources hold one worker's ``resources`` (``{"CPU": 2, "GPU": 1}``): where
    Ray may place a worker (a head node started with ``num-cpus: 0``, or a CPU node in a GPU run, is not)."""
    import ray

    return [
        n["NodeID"]
        for n in ray.nodes()
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0) >= v for k, v in resources.items() if v)
    ]


class StorageNotShared(RuntimeError):
    """``ray.storage_path`` is a folder that some node of the cluster does not see."""


def blind_nodes(path: str | Path, nodes: list[str], timeout_s: float = 60, digest: str | None = None) -> list[str]:
    """The ids of ``nodes`` on which ``path`` does not exist (or whose file there has not the SHA-256 ``digest``,
    when given; or that could not say in ``timeout_s``): a task pinned to each node looks, all at once."""
    import hashlib
    import os

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(p: str, want: str | None) -> bool:
        if want is None:
            return os.path.exists(p)
        try:
            with open(p, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest() == want
        except OSError:
            return False

    refs = {
        nid: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(str(path), digest)
        for nid in nodes
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)  # one wait for all
    blind = []
    for nid, ref in refs.items():
        try:
            if ref not in ready or not ray.get(ref):
                blind.append(nid)
        except ray.exceptions.RayError:  # the node died or could not run the task: not proven either
            blind.append(nid)
    return blind


def prove_shared_storage(storage: str, timeout_s: float = 60) -> list[str]:
    """On a cluster of more than one node, show that every live node sees ``storage`` before any work: Ray Train
    persists each checkpoint there and a replacement worker on another node reads it back ("Unable to set up
    cluster storage" otherwise, after the first epoch). A URI (``s3://``, ``gs://`` ...) is shared by
    construction; a folder is proven by a marker file this driver writes and a task on each node reads.
    Returns the node ids checked ([] for a URI or one node); raises :class:`StorageNotShared`."""
    import uuid

    nodes = live_nodes()
    if "://" in storage or len(nodes) < 2:
        return []
    marker = Path(storage) / f".tl-shared-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by the driver; every node must see it\n")
    try:
        blind = blind_nodes(marker, nodes, timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise StorageNotShared(
            f"ray.storage_path {storage} is a folder that {len(blind)} of the cluster's {len(nodes)} nodes do not "
            f"see (node {', '.join(n[:8] for n in blind)}): Ray Train could not persist a checkpoint that another "
            f"node resumes from. Nothing was trained. Set ray.storage_path to object storage "
            f"(-S ray.storage_path=s3://BUCKET/PREFIX, or gs://...) or to a path every node mounts (NFS)."
        )
    return nodes


def resolve_run(stage: str, params: Params, manifest: dict, strategy: str = "") -> tuple[str, str, Path | None]:
    """``(name, storage, local run directory)`` of the run to start or resume; the directory is ``None``
    for remote storage. A finished run's name gets a timestamp, so it starts fresh."""
    storage = storage_path(params)
    name = run_name(stage, params, manifest, strategy)
    local = Path(storage) / name if "://" not in storage else None
    if local is not None and (local / DONE_MARKER).exists():
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        local = Path(storage) / name
    return name, storage, local


def mark_done(run_dir: Path | None, epochs: int) -> None:
    if run_dir is not None and run_dir.is_dir():
        (run_dir / DONE_MARKER).write_text(json.dumps({"epochs": epochs}))
