"""Ray Train adapter: runs a :class:`TrainJob` as a ``TorchTrainer`` (Train V2 API).

The loop is the ordinary ``tlcore`` engine plus Ray's two lines (``prepare_model``,
``prepare_data_loader``); it reports metrics and a checkpoint every epoch through an engine
callback, and resumes from ``ray.train.get_checkpoint()``.

- ``ray.num_workers: 0`` runs Ray Train's local mode: the same loop in this process, no cluster.
- ``ray.num_workers: N`` starts N workers (gloo on CPU; NCCL, SyncBatchNorm and the GPU's precision
  rule on GPU, see :func:`tlcore.engine.choose_precision`).
- Device: ``ray.use_gpu`` decides where training runs (CPU when false, even where a GPU is visible);
  ``base.device`` must agree with it (checked in :mod:`tasks.config`).
- Seeds: the model starts from ``base.seed`` everywhere, augmentation on worker ``r`` from
  ``base.seed + r``, the shards' ``DistributedSampler`` from ``base.seed``.
- Batch size: ``batch_size`` in params is the *global* batch; each worker gets
  ``batch_size // num_workers``, so the optimisation (and the learning rate that suits it) does
  not change with the worker count. Steps per epoch are per worker over its shard.
- Resuming: a run's name is ``<stage>-<hash of params, data and code>``. Starting the same stage
  again after a crash or Ctrl-C reuses the name, and Ray hands the loop the last checkpoint.
  A finished run is marked done, so it is never resumed by accident.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .config import Params, ParamsError
from .hardware import worker_cpus
from .stage import say
from .training import TrainJob, build_trainer

DONE_MARKER = "_TL_DONE"
FAULT_ENV = "TL_FAULT_INJECT"  # test-only: "epoch=2,step=1,rank=1,marker=/path" makes that worker exit hard once
WORKER_LOG_ENV = "TL_WORKER_LOG_DIR"  # optional: each worker appends its epochs and shard to rank<r>.jsonl here


def code_hash(stage: str) -> str:
    """Hash of the stage's code, the same files ``dvc.yaml`` lists as its code deps
    (:func:`tasks.codedeps.stage_code_files`), so a code change never resumes an old run and a change
    DVC ignores does not start a new one."""
    from .codedeps import ROOT, stage_code_files

    try:
        files = stage_code_files(stage)
    except FileNotFoundError:  # a job that is not a stage (a benchmark, a test): all of the project's code
        files = sorted((ROOT / "tasks").glob("*.py")) + sorted((ROOT / "tlcore").rglob("*.py"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def run_name(stage: str, params: Params, manifest: dict) -> str:
    blob = json.dumps({"params": params.model_dump(exclude={"register", "evaluate", "compress"}),
                       "data": {r: manifest[r]["splits"] for r in ("source", "target")}, "code": code_hash(stage)},
                      sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def storage_path(params: Params) -> str:
    sp = params.ray.storage_path
    return sp if "://" in sp else str(Path(sp).expanduser().resolve())


def init_ray(params: Params) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    code_root = str(Path(__file__).resolve().parents[1])
    env = {"env_vars": {"PYTHONPATH": code_root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    ray.init(address=address, runtime_env=env, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level="WARNING")


class _RayReport:
    """Engine callback: ``ray.train.report`` metrics every epoch with a checkpoint from rank 0."""

    def __init__(self, rank: int, fault: dict | None, log_dir: str | None, shard: list[int], local_dir: str | None):
        self.rank, self.fault, self.log_dir, self.shard, self.local_dir = rank, fault, log_dir, shard, local_dir

    def on_step_end(self, state, epoch: int, step: int) -> None:
        f = self.fault
        if f and self.rank == f["rank"] and epoch + 1 == f["epoch"] and step == f["step"] and not Path(f["marker"]).exists():
            Path(f["marker"]).write_text(str(os.getpid()))
            say(f"[fault injection] worker rank {self.rank} exits hard in epoch {epoch + 1}")
            os._exit(1)

    def on_epoch_end(self, metrics: dict, state) -> None:
        import resource

        import ray.train
        import torch

        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kept in the history

        if self.log_dir:
            rec = {"epoch": metrics["epoch"], "pid": os.getpid(), "shard": self.shard[:64], "shard_size": len(self.shard),
                   "node": _node_id()}
            with open(Path(self.log_dir) / f"rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.rank != 0:
            ray.train.report(metrics)
        elif self.local_dir:  # local mode keeps no checkpoints of its own: persist them here
            d = Path(self.local_dir) / f"epoch_{metrics['epoch']:04d}"
            d.mkdir(parents=True, exist_ok=True)
            torch.save(state.state_dict(), d / "state.tmp")
            os.replace(d / "state.tmp", d / "state.pt")
            for old in sorted(Path(self.local_dir).glob("epoch_*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
        else:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state.state_dict(), Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # local mode has no Ray runtime
        return "local"


def latest_checkpoint_on_disk(run_dir: str | None) -> dict | None:
    """The newest readable ``state.pt`` under a local/shared run directory (Ray's or local mode's)."""
    import torch

    if not run_dir or not Path(run_dir).is_dir():
        return None
    files = sorted(Path(run_dir).glob("checkpoint_*/state.pt")) + sorted(Path(run_dir).glob("local/epoch_*/state.pt"))
    for f in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # a file cut short by the crash: fall back to the one before
            continue
    return None


def _parse_fault(raw: str | None) -> dict | None:
    if not raw:
        return None
    kv = dict(item.split("=", 1) for item in raw.split(","))
    return {"epoch": int(kv.get("epoch", 2)), "step": int(kv.get("step", 1)), "rank": int(kv.get("rank", 1)),
            "marker": kv["marker"]}


def train_loop_per_worker(config: dict) -> None:
    """The per-worker loop: the ``tlcore`` engine with Ray's data/model preparation."""
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
        raise RuntimeError(f"ray.use_gpu = true, but worker {rank} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run on GPU nodes or set ray.use_gpu: false.")
    precision, why = _agreed_precision(job, device, rank, world)
    job.optim = job.optim.model_copy(update={"precision": precision})
    shard: list[int] = []

    def hook(loader):
        prepared = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
        if not shard and hasattr(prepared.sampler, "num_replicas"):
            shard.extend(int(i) for i in iter(prepared.sampler))
        return prepared

    local_dir = config.get("local_dir")
    cb = _RayReport(rank, _parse_fault(config.get("fault")), config.get("worker_log_dir"), shard, local_dir)
    trainer = build_trainer(job, device, callbacks=[cb], wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
                            loader_hook=hook, replicas=world, rank=rank, sync_batchnorm=use_sync_batchnorm(device.type, world),
                            log=(lambda s: say(f"[{config.get('stage', 'train')} w{rank}] {s}")) if rank == 0 else None)
    if rank == 0:
        say(f"[{config.get('stage', 'train')}] training on {device}, {world} worker(s) x "
            f"{torch.get_num_threads()} thread(s), precision {why}")
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    disk = latest_checkpoint_on_disk(config.get("run_dir"))
    if disk is not None and (state is None or disk["epoch"] > state["epoch"]):
        # a checkpoint persisted just before a crash may not have reached Ray's controller yet
        state = disk
    if state is not None:
        trainer.load_state_dict(state)
        if rank == 0:
            say(f"[{config.get('stage', 'train')}] resumed from checkpoint after epoch {trainer.epoch}")
    trainer.fit()


def use_sync_batchnorm(device_type: str, world: int) -> bool:
    """SyncBatchNorm on CUDA with more than one worker: BatchNorm then normalises over the global batch,
    so the optimisation does not change with the worker count (as the global ``batch_size`` promises).
    Not on CPU, where PyTorch's SyncBatchNorm does not run; there each worker normalises its share."""
    return device_type == "cuda" and world > 1


def _agreed_precision(job: TrainJob, device, rank: int, world: int) -> tuple[str, str]:
    """Rank 0 resolves ``precision: auto`` (measured once per machine, cached); every rank uses its answer."""
    import torch.distributed as dist

    from .hardware import resolve_precision

    decision = [None]
    if rank == 0:
        decision[0] = resolve_precision(job.optim.precision, job.arch, job.num_classes, job.optim.batch_size, device)
    if world > 1:
        if not dist.is_initialized():
            raise RuntimeError("Ray Train started a multi-worker run without a torch process group")
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def _cluster_cpus() -> list[dict]:
    import ray

    return [{"CPU": n["Resources"]["CPU"]} for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]


def run_job_ray(job: TrainJob, params: Params, stage: str, manifest: dict):
    """Train ``job`` with Ray Train as configured in ``params.ray``; returns ``(model, history, info)``,
    ``info`` saying how it ran (workers, threads, precision)."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tlcore import models
    from tlcore.strategies import TransferNet

    logging.getLogger("ray").setLevel(logging.WARNING)
    rc = params.ray
    if rc.use_gpu and rc.num_workers == 0 and not torch.cuda.is_available():
        raise ParamsError("ray.use_gpu = true with ray.num_workers = 0 trains in this process, which sees no CUDA "
                          "device; run it on a GPU machine, set ray.num_workers >= 1 to train on a GPU cluster's "
                          "workers, or set ray.use_gpu: false.")
    if rc.num_workers > 0:
        init_ray(params)
    storage = storage_path(params)
    name = run_name(stage, params, manifest)
    local_run_dir = Path(storage) / name if "://" not in storage else None
    if local_run_dir is not None and (local_run_dir / DONE_MARKER).exists():
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"  # finished before: start fresh, never resume it
        local_run_dir = Path(storage) / name
    cpus = worker_cpus(rc.num_workers, rc.cpus_per_worker, _cluster_cpus() if rc.num_workers > 0 else None)
    threads = params.base.num_threads or max(1, int(cpus))
    resources = {"CPU": cpus, **({"GPU": int(rc.gpus_per_worker)} if rc.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "threads": threads, "stage": stage, "use_gpu": rc.use_gpu,
                           "fault": os.environ.get(FAULT_ENV), "worker_log_dir": os.environ.get(WORKER_LOG_ENV),
                           "run_dir": str(local_run_dir) if local_run_dir else None,
                           "local_dir": str(local_run_dir / "local") if rc.num_workers == 0 and local_run_dir else None},
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=rc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    say(f"{stage}: Ray Train run {name!r} ({rc.num_workers or 'local mode, 0'} worker(s), storage {storage})")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint; see the log above.")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    model = models.from_state(job.arch, TransferNet.model_state(state["net"]))
    if local_run_dir is not None and local_run_dir.is_dir():
        (local_run_dir / DONE_MARKER).write_text(json.dumps({"epochs": state["epoch"]}))
    info = {"workers": max(1, rc.num_workers), "threads_per_worker": threads,
            "precision": state.get("config", {}).get("precision", job.optim.precision), "ray_run": name}
    return model, state["history"], info
