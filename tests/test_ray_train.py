"""Ray Train adapter on a real local Ray (CPU): 1 and 2 workers, checkpoints, shards, fault tolerance."""

from __future__ import annotations

import json

import pytest
from faults import Fault, inject

from tasks.modeling.ray_train import run_job_ray
from tasks.modeling.train import TrainJob
from tasks.project.config import Params

pytestmark = pytest.mark.slow
MANIFEST = {"source": {"splits": {}}, "target": {"splits": {}}}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits():
    from tlcore import data, datasets, models, transforms

    x, y = datasets.render_synth_digits(16, seed=0)
    return data.ImageDataset.from_numpy(
        x, y, datasets.CLASSES, transforms.build_transform(models.get_spec("smallcnn"), True)
    )


def _params(tmp_path, workers, epochs=3, **ray_kw):
    return Params.model_validate(
        {
            "base": {"seed": 0},
            "finetune": {"epochs": epochs, "steps_per_epoch": 4, "batch_size": 32, "lr": 3e-3},
            "ray": {"num_workers": workers, "storage_path": str(tmp_path / "ray_results"), **ray_kw},
        }
    )


def _job(params, ds):
    return TrainJob(arch="smallcnn", num_classes=10, strategy="scratch", optim=params.finetune, seed=0, labeled=ds)


def _records(log_dir, rank):
    path = log_dir / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_train_report_and_checkpoint(ray_local, digits, tmp_path, workers):
    params = _params(tmp_path, workers)
    model, history, _ = run_job_ray(
        _job(params, digits), params, f"test{workers}", MANIFEST, worker_log_dir=str(tmp_path)
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    run_dirs = list((tmp_path / "ray_results").iterdir())
    assert len(run_dirs) == 1 and list(run_dirs[0].glob("checkpoint_*"))
    assert (run_dirs[0] / "_TL_DONE").exists()
    assert model.num_classes == 10
    shards = [_records(tmp_path, r) for r in range(workers)]
    assert all(len(s) == 3 for s in shards)
    if workers == 2:
        a, b = shards[0][0], shards[1][0]
        assert a["shard_size"] + b["shard_size"] >= len(digits) * 0.99
        assert set(a["shard"]).isdisjoint(b["shard"])  # data-parallel: each worker saw its own shard


def test_worker_crash_resumes_from_last_checkpoint(ray_local, digits, tmp_path):
    marker = tmp_path / "fault-fired"
    params = _params(tmp_path, 2, epochs=4, max_failures=1)
    _, history, _ = run_job_ray(
        _job(params, digits),
        params,
        "fault",
        MANIFEST,
        worker_log_dir=str(tmp_path),
        callbacks=[inject(Fault(str(marker), epoch=2, step=2, rank=1))],
    )
    assert marker.exists()  # the worker really died once
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    epochs_done = [r["epoch"] for r in _records(tmp_path, 0)]
    assert epochs_done == [1, 2, 3, 4]  # epoch 1 trained once, then resumed at 2: nothing repeated
    pids = {r["epoch"]: r["pid"] for r in _records(tmp_path, 1)}
    assert pids[1] == int(marker.read_text()) and pids[4] != pids[1]  # rank 1 was a new process after the crash


def test_finished_run_is_not_resumed(ray_local, digits, tmp_path):
    params = _params(tmp_path, 1, epochs=1)
    run_job_ray(_job(params, digits), params, "again", MANIFEST)
    _, history, _ = run_job_ray(_job(params, digits), params, "again", MANIFEST)
    assert [h["epoch"] for h in history] == [1]
    assert len(list((tmp_path / "ray_results").iterdir())) == 2  # a fresh run, not the finished one


def test_two_workers_stream_a_prepared_split_given_by_a_relative_path(ray_local, tmp_path, monkeypatch):
    """A split too big for memory reaches the workers as its index only, by a path relative to the stage's
    folder; Ray Train runs each worker in a folder of its own, and each still reads its own part."""
    from helpers import prepared_digits

    from tlcore import data, models, transforms

    prepared_digits(tmp_path, tmp_path / "prepared" / "train", 8, seed=1)
    monkeypatch.chdir(tmp_path)
    ds = data.open_split("prepared/train", 32, 1, memory_bytes=0)
    assert ds.streamed
    ds.transform = transforms.build_transform(models.get_spec("smallcnn"), True)
    params = _params(tmp_path, 2, epochs=2)
    log = tmp_path / "log"
    log.mkdir()
    _, history, _ = run_job_ray(_job(params, ds), params, "streamed", MANIFEST, worker_log_dir=str(log))
    assert [h["epoch"] for h in history] == [1, 2]
    a, b = _records(log, 0)[0], _records(log, 1)[0]
    assert set(a["shard"]).isdisjoint(b["shard"]) and a["shard_size"] + b["shard_size"] >= len(ds) * 0.99
