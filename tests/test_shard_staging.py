"""A prepared split on a cluster of several nodes (tasks/modeling/shard_staging.py), with S3-compatible storage: a
real rclone S3 server, as `tl stack up` runs it. The driver stages a streamed split to the run's storage once; a
worker on a node that does not see the driver's data/ fetches it to its node's cache once and reads the same pixels;
Ray Train keeps its checkpoints in that storage (s3fs: rclone refuses pyarrow's own uploads)."""

from __future__ import annotations

import pickle
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, env, prepared_digits

from tasks.project.env import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """``(environment a client needs, server's folder)``; bucket ``runs``."""
    root = tmp_path_factory.mktemp("s3")
    (root / "runs").mkdir()
    key, secret = "tl" + secrets.token_hex(8), secrets.token_hex(16)
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "rclone"), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}"],
        env={**env(), "RCLONE_AUTH_KEY": f'"{key},{secret}"', "RCLONE_CONFIG": "/dev/null"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
        except urllib.error.HTTPError:  # refused without credentials: up
            break
        except OSError:
            time.sleep(0.2)
    client = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": url}
    client["AWS_REGION"] = "us-east-1"
    yield client, root
    proc.terminate()
    proc.wait(10)


def _split(tmp_path: Path, n: int = 8) -> Path:
    return prepared_digits(tmp_path, tmp_path / "data" / "target" / "train", n, seed=2, shard_bytes=20_000)


def test_a_node_without_the_data_reads_the_staged_copy(s3, tmp_path, monkeypatch):
    from s3fs import S3FileSystem

    from tasks.modeling import shard_staging
    from tasks.modeling.train import TrainJob
    from tasks.project.config import Optim
    from tlcore import data

    client, root = s3
    for k, v in client.items():
        monkeypatch.setenv(k, v)
    split = _split(tmp_path)
    ds = data.open_split(split, 32, 1, memory_bytes=0)
    assert ds.streamed and len(list(split.glob("shard-*.tar"))) > 1
    want = ds.images[list(range(len(ds)))]
    job = TrainJob(
        "smallcnn", 10, "scratch", Optim(epochs=1), 0, labeled=ds.subset(range(60)), val=ds.subset(range(60, 80))
    )
    said: list[str] = []
    keys = shard_staging.stage(job, "s3://runs/ray", log=said.append)
    key = shard_staging.split_key(split)
    assert keys == {str(split): key} and len(said) == 1  # two views of one split: staged once
    staged = root / "runs" / "ray" / "shards" / key
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in split.iterdir())
    assert shard_staging.stage(job, "s3://runs/ray", log=said.append) == keys and len(said) == 1  # already there
    s3fs = S3FileSystem()  # through the server: it keeps its own view of the files it serves
    remote = f"runs/ray/shards/{key}"
    s3fs.pipe(f"{remote}/index.json", (split / "index.json").read_bytes()[:50])  # a copy cut short: made again
    assert shard_staging.stage(job, "s3://runs/ray", log=said.append) == keys and len(said) == 2
    assert (staged / "index.json").read_bytes() == (split / "index.json").read_bytes()

    # another node: the job as a worker receives it, the driver's folder not there
    sent = pickle.dumps(job)
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "node-cache"))
    shutil.move(split, tmp_path / "elsewhere")
    worker_job = pickle.loads(sent)
    shard = f"{remote}/{sorted(staged.glob('shard-*.tar'))[0].name}"
    whole = s3fs.cat(shard)
    s3fs.pipe(shard, whole[: len(whole) // 2])  # a shard cut short in the storage: not taken
    with pytest.raises(OSError, match="is not whole"):
        shard_staging.localize(pickle.loads(sent), keys, "s3://runs/ray")
    s3fs.pipe(shard, whole)
    fetched = shard_staging.localize(worker_job, keys, "s3://runs/ray")
    assert fetched == [tmp_path / "node-cache" / "shards" / key]
    assert worker_job.labeled.images.split_dir == fetched[0] == worker_job.val.images.split_dir
    assert (worker_job.labeled.images[list(range(60))] == want[:60]).all()  # the same pixels
    assert (worker_job.val.images[list(range(20))] == want[60:80]).all()
    assert shard_staging.localize(pickle.loads(sent), keys, "s3://runs/ray") == []  # the node's copy, fetched once

    # the driver's node (or a shared mount) with the same split: nothing copied, the driver's folder read
    shutil.move(tmp_path / "elsewhere", split)
    here = pickle.loads(sent)
    assert shard_staging.localize(here, keys, "s3://runs/ray") == [] and here.labeled.images.split_dir == split


def test_ray_train_checkpoints_in_s3_compatible_storage(s3, tmp_path):
    """A Ray Train run (one worker, a streamed split) with ``ray.storage_path=s3://...`` on rclone: trains and
    keeps its checkpoints there. Local mode (``ray.num_workers: 0``) with that storage keeps its own checkpoints on
    this machine (before, its last checkpoint was a temporary folder, gone when the run returned it). A node that
    does not see a split fetches the staged copy before training, in a task pinned to it."""
    client, root = s3
    split = _split(tmp_path, n=4)
    script = f"""
import ray
from tasks.modeling.ray_train import run_job_ray
from tasks.modeling.train import TrainJob
from tasks.project.config import Params
from tlcore import data, models, transforms
ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
ds = data.open_split({str(split)!r}, 32, 1, memory_bytes=0)
ds.transform = transforms.build_transform(models.get_spec("smallcnn"), True)
p = Params.model_validate({{"finetune": {{"epochs": 2, "steps_per_epoch": 2, "batch_size": 16}},
                           "ray": {{"num_workers": 1, "storage_path": "s3://runs/ckpt"}}}})
job = TrainJob("smallcnn", 10, "scratch", p.finetune, 0, labeled=ds)
m = {{"source": {{"splits": {{}}}}, "target": {{"splits": {{}}}}}}
_, history, info = run_job_ray(job, p, "s3test", m)
print("EPOCHS", [h["epoch"] for h in history], info["ray_run"])
p = p.model_copy(update={{"ray": p.ray.model_copy(update={{"num_workers": 0}})}})  # local mode, the same storage
_, history, info = run_job_ray(TrainJob("smallcnn", 10, "scratch", p.finetune, 0, labeled=ds), p, "s3local", m)
print("LOCAL", [h["epoch"] for h in history])
# a node that does not see the driver's split (here: a path it has not) fetches the staged copy before training
from tasks.modeling import shard_staging
keys = shard_staging.stage(job, "s3://runs/ckpt")
blind = {{"/not/on/this/node/train": keys[{str(split)!r}]}}
node = ray.get_runtime_context().get_node_id()
said = []
shard_staging.prefetch(blind, "s3://runs/ckpt", [node], log=said.append)
shard_staging.prefetch(blind, "s3://runs/ckpt", [node], log=said.append)  # the node's copy: not fetched again
shard_staging.prefetch(keys, "s3://runs/ckpt", [node], log=said.append)  # the driver's split is here: nothing
print("PREFETCH", sum("fetched" in s for s in said), keys[{str(split)!r}])
"""
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        # this checkout's code (the script runs in tmp_path), its own cache for the node
        env={**env(), **client, "TL_CACHE_DIR": str(tmp_path / "node-cache"), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "EPOCHS [1, 2]" in r.stdout and "LOCAL [1, 2]" in r.stdout, r.stdout[-2000:]
    fetched, key = r.stdout.split("PREFETCH ")[1].split()[:2]
    assert fetched == "1"  # by a task on the node, once; not where the node sees the driver's split
    assert (tmp_path / "node-cache" / "shards" / key / "index.json").read_bytes() == (split / "index.json").read_bytes()
    run = r.stdout.split("EPOCHS [1, 2] ")[1].split()[0]
    ckpts = [c for c in (root / "runs" / "ckpt" / run).glob("checkpoint_*") if c.is_dir()]
    assert ckpts and all((c / "state.pt").is_file() for c in ckpts), list((root / "runs" / "ckpt").rglob("*"))[:20]
