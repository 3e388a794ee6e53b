"""Prepared splits on a cluster of several nodes: the data stage's shards live in this project's ``data/`` on the
driver's node, where a worker on another node cannot read them. Before training, the driver copies each split a job
streams to the run's shared storage (``ray.storage_path``, the storage that
:func:`tasks.services.ray_runs.prove_shared_storage` proved every node sees) under ``shards/<key>/``, ``key`` the
hash of the split's index (which holds every image's SHA-256 and place), so a split is uploaded once per data
version, whatever the run. A worker that does not see the driver's split (or sees another version of it) fetches
the staged copy into a cache on its node's disk, once per node and version (a file lock keeps the node's other
workers waiting, not copying), and reads from there: memory stays flat, the disk holds one copy per node. The
driver has each node fetch before training starts (:func:`prefetch`), so no worker copies while the others wait
for it at their first collective.

Where the driver's ``data/`` is seen by every worker (one node, or a shared mount holding the same bytes) nothing
is copied.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from pathlib import Path

from tlcore.shards import INDEX, ShardImages

STAGED = "shards"


def split_key(split_dir: Path) -> str:
    """The version of a prepared split: the hash of its index (each image's SHA-256, shard, offset and length)."""
    return index_key((Path(split_dir) / INDEX).read_bytes())


def index_key(index: bytes, digits: int = 24) -> str:
    """The key of a split from its ``index.json`` bytes (``digits=64``: the whole SHA-256)."""
    return hashlib.sha256(index).hexdigest()[:digits]


def job_datasets(job) -> list:
    """The datasets a :class:`tasks.modeling.train.TrainJob` reads."""
    return [job.source, job.labeled, job.unlabeled, job.val]


def streamed_images(datasets) -> list[ShardImages]:
    """Every streamed view of a prepared split that ``datasets`` (a job: its datasets) read; several views may
    share a split."""
    out = []
    for ds in job_datasets(datasets) if hasattr(datasets, "labeled") else datasets:
        images = getattr(ds, "images", None)
        if isinstance(images, ShardImages):
            out.append(images)
    return out


def stage(datasets, storage: str, nodes: list[str] | None = None, log=print) -> dict[str, str]:
    """Copy the splits ``datasets`` (a job: its datasets) stream to ``<storage>/shards/<key>/`` where they are not
    yet, or not whole (the index last, under a temporary name, then moved: a copy cut short is never taken for a
    whole one, and is made again). With ``nodes``, only the splits that some of those nodes do not see as this
    node does (the same index at the same path) are staged. Returns ``{driver's split folder: key}`` of the staged
    splits, for the workers."""

    import pyarrow.fs as pafs

    from tasks.services.ray_runs import blind_nodes, storage_filesystem

    fs, root = storage_filesystem(storage)
    local = pafs.LocalFileSystem()
    keys: dict[str, str] = {}
    seen: set[str] = set()
    for images in streamed_images(datasets):
        src = images.split_dir
        if str(src) in seen:
            continue
        seen.add(str(src))
        index = (src / INDEX).read_bytes()
        key = index_key(index)
        if nodes is not None and not blind_nodes(src / INDEX, nodes, digest=index_key(index, 64)):
            continue  # every node reads this very split where it lies (one machine, or a shared mount)
        keys[str(src)] = key
        dest = f"{root}/{STAGED}/{key}"
        try:
            with fs.open_input_stream(f"{dest}/{INDEX}") as f:
                if index_key(f.read()) == key:
                    continue  # staged whole before, by this or another run
        except (FileNotFoundError, OSError):
            pass
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name != INDEX and not p.name.endswith(".tmp"))
        size = sum(p.stat().st_size for p in files)
        log(f"staging {src} ({len(files)} shards, {size / 2**20:.0f} MiB) to {storage}/{STAGED}/{key} for the nodes")
        fs.create_dir(dest, recursive=True)
        for p in files:
            pafs.copy_files(str(p), f"{dest}/{p.name}", source_filesystem=local, destination_filesystem=fs)
        pafs.copy_files(str(src / INDEX), f"{dest}/{INDEX}.part", source_filesystem=local, destination_filesystem=fs)
        fs.move(f"{dest}/{INDEX}.part", f"{dest}/{INDEX}")
    return keys


def cache_root() -> Path:
    """This node's cache of staged splits (``<cache dir>/shards``, see :func:`tasks.modeling.hardware.cache_dir`)."""
    from tasks.modeling.hardware import cache_dir

    return cache_dir() / STAGED


def localize(datasets, keys: dict[str, str], storage: str) -> list[Path]:
    """In a worker: point every streamed view of ``datasets`` (a job: its datasets) at a copy of its split this
    node can read, the driver's folder where it is here with the same index, else this node's cached copy of the
    staged one (fetched now if missing; :func:`prefetch` has fetched it before training). Returns the splits
    fetched by this call."""
    fetched: list[Path] = []
    fs: list = []
    for images in streamed_images(datasets):
        key = keys.get(str(images.split_dir))
        if key is not None:
            images.split_dir, now = _node_copy(images.split_dir, key, storage, fs)
            fetched += [images.split_dir] if now else []
    return fetched


def prefetch(keys: dict[str, str], storage: str, nodes: list[str], log=print) -> None:
    """Before training: every node of ``nodes`` (those that may host a worker) that does not see a staged split
    (``keys``, from :func:`stage`) where the driver has it fetches the staged copy into its cache now, one task
    pinned to each node, all at once. Otherwise the workers would fetch inside the training function, after the
    process group is up, and the first collective would hold a node's other workers for the time a big split takes
    to copy, up to the group's timeout (30 minutes) and a failed run. A node that cannot fetch now (gone, disk
    full) is reported; its workers try again when they start (:func:`localize`), as does a node that joins later."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not keys or not nodes:
        return
    task = ray.remote(num_cpus=0)(_fetch_on_node)
    refs = {
        nid: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(keys, storage)
        for nid in nodes
    }
    log(f"fetching {len(keys)} staged split(s) onto the nodes that do not see them ({len(nodes)} node(s) asked)")
    for nid, ref in refs.items():
        try:
            for split in ray.get(ref):
                log(f"node {nid[:12]}: fetched {split}")
        except ray.exceptions.RayError as e:
            log(f"node {nid[:12]} could not fetch the staged splits now; its workers will try when they start: {e}")


def _fetch_on_node(keys: dict[str, str], storage: str) -> list[str]:
    """On one node: make sure each split of ``keys`` is readable here (:func:`_node_copy`); the ones fetched."""
    fs: list = []
    fetched = []
    for src, key in keys.items():
        where, now = _node_copy(Path(src), key, storage, fs)
        if now:
            fetched.append(str(where))
    return fetched


def _node_copy(src: Path, key: str, storage: str, fs: list) -> tuple[Path, bool]:
    """Where this node reads the split ``src`` of version ``key``: ``src`` itself where it holds that version here,
    else this node's cached copy of the staged split, fetched now if missing (then ``True``). ``fs``: the storage's
    filesystem, opened once for several calls (an empty list at first)."""
    import pyarrow.fs as pafs

    from tasks.services.ray_runs import storage_filesystem

    if _holds(src, key):
        return src, False
    cache = cache_root() / key
    if _holds(cache, key):
        return cache, False
    if not fs:
        fs.extend(storage_filesystem(storage))
    return cache, _fetch(fs[0], f"{fs[1]}/{STAGED}/{key}", cache, key, pafs)


def _holds(split_dir: Path, key: str) -> bool:
    try:
        return split_key(split_dir) == key
    except OSError:
        return False


def _whole(split_dir: Path) -> bool:
    """Every shard of the split holds the bytes its index places in it."""
    import numpy as np

    from tlcore.shards import SplitIndex

    ix = SplitIndex.load(split_dir)
    end = np.zeros(len(ix.shards), dtype=np.int64)
    np.maximum.at(end, np.asarray(ix.shard, dtype=np.int64), np.asarray(ix.offset) + np.asarray(ix.length))
    for name, need in zip(ix.shards, end.tolist()):
        f = split_dir / name
        if not f.is_file() or f.stat().st_size < need:
            return False
    return True


def _fetch(fs, src: str, cache: Path, key: str, pafs) -> bool:
    """Copy the staged split ``src`` into ``cache`` unless another process of this node did meanwhile."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other workers wait here, then find the copy made
        if _holds(cache, key):
            return False
        if fs.get_file_info(f"{src}/{INDEX}").type == pafs.FileType.NotFound:
            raise FileNotFoundError(
                f"the prepared split {key} is not in the run's storage ({src}): the driver stages it there before "
                f"training; run the stage again from the driver (`tl run` or `dvc repro`)."
            )
        tmp = cache.with_name(cache.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        infos, local = fs.get_file_info(pafs.FileSelector(src)), pafs.LocalFileSystem()
        for info in sorted(infos, key=lambda i: i.base_name == INDEX):  # the index last
            if info.base_name.endswith(".part"):
                continue
            pafs.copy_files(info.path, str(tmp / info.base_name), source_filesystem=fs, destination_filesystem=local)
        if split_key(tmp) != key or not _whole(tmp):
            raise OSError(
                f"the staged split {src} is not whole (another driver may be staging it now); run the stage again"
            )
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
        return True
