"""Ray Train adapter: runs a :class:`TrainJob` as a ``TorchTrainer`` (Train V2 API).

The loop is the ordinary ``tlcore`` engine plus Ray's two lines (``prepare_model``,
``prepare_data_loader``); it reports metrics and a checkpoint every epoch through an engine
callback, and resumes from ``ray.train.get_checkpoint()``.

- ``ray.num_workers: 0`` runs Ray Train's local mode: the same loop in this process, no cluster.
- ``ray.num_workers: N`` starts N workers (gloo on CPU; NCCL, SyncBatchNorm and the GPU's precision
  rule on GPU, see :func:`tlcore.precision.choose_precision`).
- Device: ``ray.use_gpu`` decides where training runs (CPU when false, even where a GPU is visible);
  ``base.device`` must agree with it (checked in :mod:`tasks.project.config`).
- Seeds: the model starts from ``base.seed`` everywhere, augmentation on worker ``r`` from
  ``base.seed + r``, the shards' ``DistributedSampler`` from ``base.seed``.
- Batch size: ``batch_size`` in params is the *global* batch; each worker gets
  ``batch_size // num_workers``, so the optimisation (and the learning rate that suits it) does
  not change with the worker count. Steps per epoch are per worker over its shard.
- Resuming: a run's name comes from its params, data and code (:mod:`tasks.services.ray_runs`); starting the
  same stage again after a crash or Ctrl-C resumes from the last checkpoint (:mod:`tasks.services.ray_checkpoints`).
- Console: without ``--verbose`` Ray streams nothing from the workers (``log_to_driver=False``); what the
  training function prints (rank 0's epoch lines, "resumed from checkpoint", warnings) is forwarded to the driver
  and printed there (:func:`tasks.project.console.forward_output`, :class:`tasks.project.console.WorkerOutput`).
- Cluster: :mod:`tasks.services.ray_cluster`. Diagnostics (:mod:`tasks.modeling.worker_log`) and any other engine
  callbacks (tests inject faults) are passed in by the caller; nothing here exists for tests only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence

from tasks.modeling import shard_staging
from tasks.modeling.hardware import cache_dir, loader_workers, no_cuda_message, worker_cpus
from tasks.modeling.train import TrainJob, build_trainer
from tasks.modeling.worker_log import WorkerLog
from tasks.project.config import Params, ParamsError
from tasks.project.console import EpochLine, WorkerOutput, forward_output, ray_env, train_logging_config, verbose
from tasks.project.settings import settings
from tasks.project.stage import say
from tasks.services.ray_checkpoints import RayReport, load_state, resume_state
from tasks.services.ray_cluster import cluster_cpus, init_ray
from tasks.services.ray_runs import (
    live_nodes,
    mark_done,
    prove_shared_storage,
    resolve_run,
    storage_filesystem,
    worker_nodes,
)


def train_loop_per_worker(config: dict) -> None:
    """The per-worker loop: the ``tlcore`` engine with Ray's data/model preparation; what it prints goes to the
    driver's ``config["output"]`` queue too, when there is one (:func:`tasks.project.console.forward_output`)."""
    import ray.train

    with forward_output(config.get("output"), ray.train.get_context().get_world_rank()):
        _train_loop(config)


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    job: TrainJob = config["job"]
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world > 1:
        job.optim = job.optim.model_copy(update={"batch_size": max(1, job.optim.batch_size // world)})
    # ray.use_gpu decides, not what the process happens to see: local mode would take a visible GPU
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    if config.get("use_gpu") and device.type != "cuda":
        raise RuntimeError(
            no_cuda_message(
                f"ray.use_gpu = true, but worker {rank}",
                f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run on GPU nodes or set "
                "ray.use_gpu: false.",
                "or set ray.use_gpu: false",
            )
        )
    precision, why = _agreed_precision(job, device, rank, world)
    job.optim = job.optim.model_copy(update={"precision": precision})
    stage = config.get("stage", "train")
    if config.get("staged"):  # a node that does not see the driver's data/ reads the staged copy
        for split in shard_staging.localize(job, config["staged"], config["storage"]):
            say(f"[{stage}] worker {rank}: fetched the prepared split to this node ({split})")
    shard: list[int] = []

    def hook(loader):
        prepared = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
        if not shard and hasattr(prepared.sampler, "num_replicas"):
            shard.extend(int(i) for i in iter(prepared.sampler))
        return prepared

    callbacks = [WorkerLog(config["worker_log_dir"], rank, shard)] if config.get("worker_log_dir") else []
    callbacks += [make(rank) for make in config.get("callbacks") or ()]
    callbacks += [EpochLine(stage, job.optim.epochs, say)] if rank == 0 else []  # one line per epoch, from rank 0
    callbacks.append(RayReport(rank, config.get("local_dir")))
    trainer = build_trainer(
        job,
        device,
        callbacks=callbacks,
        wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
        loader_hook=hook,
        replicas=world,
        rank=rank,
        sync_batchnorm=use_sync_batchnorm(device.type, world),
        log=None,
    )
    if rank == 0:
        say(f"[{stage}] training on {device}, {world} worker(s) x {torch.get_num_threads()} thread(s), precision {why}")
    state = _agreed_resume(config.get("run_dir"), rank, world)
    if state is not None:
        trainer.load_state_dict(state)
        if rank == 0:
            say(f"[{stage}] resumed from checkpoint after epoch {trainer.epoch}")
    trainer.fit()


def _agreed_resume(run_dir: str | None, rank: int, world: int) -> dict | None:
    """The state every rank resumes from: the one rank 0 finds (Ray's checkpoint, or a newer one rank 0 persisted
    before a crash), sent to the others, so that all ranks agree even where a shared filesystem's cache would
    show them different "newest" files; ``None`` to start fresh."""
    import ray.train
    import torch.distributed as dist

    chosen = [resume_state(ray.train.get_checkpoint(), run_dir) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def use_sync_batchnorm(device_type: str, world: int) -> bool:
    """SyncBatchNorm on CUDA with more than one worker: BatchNorm then normalises over the global batch,
    so the optimisation does not change with the worker count (as the global ``batch_size`` promises).
    Not on CPU, where PyTorch's SyncBatchNorm does not run; there each worker normalises its share."""
    return device_type == "cuda" and world > 1


def _agreed_precision(job: TrainJob, device, rank: int, world: int) -> tuple[str, str]:
    """Rank 0 resolves ``precision: auto`` (measured once per machine, cached); every rank uses its answer."""
    import torch.distributed as dist

    from tasks.modeling.hardware import resolve_precision

    decision = [None]
    if rank == 0:
        decision[0] = resolve_precision(
            job.optim.precision, job.arch, job.num_classes, job.optim.batch_size, device, image_shape=job.image_shape()
        )
    if world > 1:
        if not dist.is_initialized():
            raise RuntimeError("Ray Train started a multi-worker run without a torch process group")
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def run_job_ray(
    job: TrainJob,
    params: Params,
    stage: str,
    manifest: dict,
    *,
    callbacks: Sequence[Callable[[int], object]] = (),
    worker_log_dir: str | None = None,
):
    """Train ``job`` with Ray Train as configured in ``params.ray``; returns ``(model, history, info)``,
    ``info`` saying how it ran (workers, threads, precision).

    ``callbacks``: more engine callbacks for every worker, each made there by calling a factory with the
    worker's rank (picklable: they travel to the workers; tests inject faults this way). ``worker_log_dir``:
    each worker logs its epochs and shard there (:class:`tasks.modeling.worker_log.WorkerLog`); default
    ``$TL_WORKER_LOG_DIR``, so a stage process can be asked for it."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tlcore import models
    from tlcore.strategies import TransferNet

    logging.getLogger("ray").setLevel(logging.WARNING)
    rc = params.ray
    if rc.use_gpu and rc.num_workers == 0 and not torch.cuda.is_available():
        raise ParamsError(
            no_cuda_message(
                "ray.use_gpu = true with ray.num_workers = 0 trains in this process, which",
                "; run it on a GPU machine, set ray.num_workers >= 1 to train on a GPU cluster's workers, or set "
                "ray.use_gpu: false.",
                "or set ray.use_gpu: false",
            )
        )
    ray_env()
    # local mode prints here; a cluster's workers reach this console through Ray (--verbose) or a WorkerOutput
    shown = init_ray(params) if rc.num_workers > 0 else True
    name, storage, local_run_dir = resolve_run(stage, params, manifest, job.strategy)
    if rc.num_workers > 0 and (checked := prove_shared_storage(storage)):
        say(f"{stage}: checkpoint storage {storage} is seen by all {len(checked)} nodes")
    # several nodes: the streamed splits go to the shared storage, for workers that do not see this node's data/
    nodes = live_nodes() if rc.num_workers > 0 else []
    staged = shard_staging.stage(job, storage, nodes=nodes, log=say) if len(nodes) > 1 else {}
    cpus = worker_cpus(rc.num_workers, rc.cpus_per_worker, cluster_cpus() if rc.num_workers > 0 else None)
    threads = params.base.num_threads or max(1, int(cpus))
    device = "cuda" if rc.use_gpu else "cpu"
    job.loader_workers = loader_workers(params.data.loader_workers, device, cpus, job.streams_a_split())
    resources = {"CPU": cpus, **({"GPU": int(rc.gpus_per_worker)} if rc.use_gpu else {})}
    if staged:  # each node that may host a worker fetches now, before the process group waits on it
        shard_staging.prefetch(staged, storage, worker_nodes(resources), log=say)
    if verbose():
        say(f"{stage}: Ray Train run {name!r} ({rc.num_workers or 'local mode, 0'} worker(s), storage {storage})")
    scratch_dir = rc.num_workers == 0 and local_run_dir is None
    if scratch_dir:
        # local mode keeps its checkpoints itself, in this process: on this machine's disk even when the storage is
        # a URI (the checkpoint of a temporary folder would be gone when the run ends); for resuming a crashed run
        # only, removed when the run has finished
        local_run_dir = cache_dir() / "ray-local" / name
    local_dir = str(local_run_dir / "local") if rc.num_workers == 0 else None
    fs, fs_path = storage_filesystem(storage)
    with contextlib.nullcontext() if shown else WorkerOutput() as output:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": job,
                "threads": threads,
                "stage": stage,
                "use_gpu": rc.use_gpu,
                "callbacks": list(callbacks),
                "worker_log_dir": worker_log_dir or settings().worker_log_dir,
                "run_dir": str(local_run_dir) if local_run_dir else None,
                "local_dir": local_dir,
                "output": output.queue if output else None,
                "staged": staged,
                "storage": storage,
            },
            scaling_config=ScalingConfig(
                num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=name,
                storage_path=fs_path,
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=rc.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=train_logging_config(),
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint; see the log above.")
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    model = models.from_state(job.arch, TransferNet.model_state(state["net"]), in_channels=job.channels())
    if scratch_dir:
        shutil.rmtree(local_run_dir, ignore_errors=True)  # finished: the next run of this name starts afresh
    else:
        mark_done(local_run_dir, state["epoch"])
    info = {
        "workers": max(1, rc.num_workers),
        "threads_per_worker": threads,
        "precision": state.get("config", {}).get("precision", job.optim.precision),
        "ray_run": name,
    }
    return model, state["history"], info
