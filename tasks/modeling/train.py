"""Turns params + datasets into a ``tlcore`` training run; the one code path every training stage uses.

``TrainJob`` is plain data; :func:`build_trainer` builds the model, strategy, loaders and engine.
The Ray Train adapter calls it inside each worker; :func:`run_job` trains in this process (benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.project.config import Optim, Params, ParamsError


@dataclass
class TrainJob:
    arch: str
    num_classes: int
    strategy: str
    optim: Optim
    seed: int
    init_state: dict | None = None  # weights to start from (the source model); None = random
    strategy_params: dict[str, Any] = field(default_factory=dict)
    same_label_space: bool = True
    source: Any = None  # ImageDataset (labeled source)
    labeled: Any = None  # ImageDataset (labeled target)
    unlabeled: Any = None  # ImageDataset (target pool, labels unused)
    val: Any = None  # ImageDataset for per-epoch validation
    in_channels: int | None = None  # the model's input channels; None: those of the job's images

    def channels(self) -> int | None:
        if self.in_channels is not None:
            return self.in_channels
        shape = self.image_shape()
        return shape[0] if shape else None

    def image_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of the images the job trains on (``None`` for datasets that do not say)."""
        ds = next((d for d in (self.labeled, self.source, self.unlabeled, self.val) if d is not None), None)
        if not hasattr(ds, "images"):
            return None
        c, h, w = (int(n) for n in ds.images.shape[1:])
        size = getattr(ds.transform, "size", None)  # what the model sees: a training canvas is cropped to it
        return (c, size, size) if size else (c, h, w)

    def streams_a_split(self) -> bool:
        """Whether a training stream reads a split image by image (:attr:`tlcore.data.ImageDataset.streamed`): its
        loaders then decode, which :func:`tasks.modeling.hardware.loader_workers` sizes for."""
        return any(getattr(ds, "streamed", False) for ds in (self.source, self.labeled, self.unlabeled))

    loader_workers: int = 0  # data-loader processes per training stream (tasks.modeling.hardware.loader_workers)


def build_trainer(
    job: TrainJob,
    device,
    callbacks=(),
    wrap=None,
    loader_hook=None,
    log=print,
    replicas: int = 1,
    rank: int = 0,
    sync_batchnorm: bool = False,
):
    """Model + strategy + loaders + :class:`tlcore.engine.Trainer` for ``job`` (nothing trained yet).

    As data-parallel worker ``rank`` of ``replicas``: the model starts from ``job.seed`` on every worker,
    augmentation draws from ``job.seed + rank`` (no two workers warp alike; it runs on ``device``, after the
    copy), the training loaders shard with a sampler seeded by ``job.seed`` (``job.loader_workers`` processes
    each, pinned memory on CUDA) and the validation loader takes a disjoint slice (the engine sums over the
    slices). ``loader_hook`` sees the training loaders only.
    ``sync_batchnorm`` turns BatchNorm into ``SyncBatchNorm`` (CUDA, more than one worker)."""
    import torch
    from torch import nn

    from tlcore import data, models, strategies
    from tlcore.engine import Loaders, TrainConfig, Trainer, seed_everything
    from tlcore.strategies import STREAMS, StreamsError

    seed_everything(job.seed)
    model = (
        models.create(job.arch, job.num_classes, in_channels=job.channels())
        if job.init_state is None
        else models.from_state(job.arch, job.init_state, in_channels=job.channels())
    )
    try:
        strat = strategies.create_strategy(
            job.strategy, **{"label_smoothing": job.optim.label_smoothing, **job.strategy_params}
        )
    except TypeError as e:
        raise ParamsError(f"finetune.strategy_params for {job.strategy!r} are invalid: {e}") from None
    net = strat.setup(model, job.num_classes, job.same_label_space)
    if sync_batchnorm:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if replicas > 1:
        seed_everything(job.seed + rank)
    hook = loader_hook or (lambda dl: dl)
    bs = job.optim.batch_size

    def loader(ds, train=True, size=bs):
        if ds is None or len(ds) == 0:
            return None
        # training: the job's (tasks.modeling.hardware.loader_workers); validation: make_loader's default
        workers = job.loader_workers if train else None
        dl = data.make_loader(
            ds,
            size,
            train=train,
            seed=job.seed,
            replicas=replicas,
            rank=rank,
            num_workers=workers,
            pin_memory=torch.device(device).type == "cuda",
        )  # async host-to-GPU copies
        return hook(dl) if train else dl

    loaders = Loaders(
        target=loader(job.labeled),
        source=loader(job.source),
        unlabeled=loader(job.unlabeled),
        val=loader(job.val, train=False, size=256),
    )
    try:
        strat.streams.check([s for s in STREAMS if getattr(loaders, s) is not None], f"strategy {job.strategy!r}")
    except StreamsError as e:
        if "target" not in e.missing:
            raise
        raise ParamsError(
            f"strategy {job.strategy!r} trains on labeled target images but data.labels_per_class = 0. "
            f"Use an unsupervised adaptation strategy (dann, mcc, semi) or give a label budget >= 1."
        ) from None
    cfg = TrainConfig(
        epochs=job.optim.epochs,
        steps_per_epoch=job.optim.steps_per_epoch,
        lr=job.optim.lr,
        optimizer=job.optim.optimizer,
        weight_decay=job.optim.weight_decay,
        scheduler=job.optim.scheduler,
        grad_clip=job.optim.grad_clip,
        seed=job.seed,
        precision=job.optim.precision,
    )
    return Trainer(net, strat, cfg, loaders, device=device, callbacks=callbacks, wrap=wrap, log=log)


def run_job(job: TrainJob, device, callbacks=(), log=print):
    """Train ``job`` in this process; returns ``(model, history)``."""
    from tasks.modeling.hardware import resolve_precision

    precision, why = resolve_precision(
        job.optim.precision, job.arch, job.num_classes, job.optim.batch_size, device, image_shape=job.image_shape()
    )
    job.optim = job.optim.model_copy(update={"precision": precision})
    if log:
        log(f"precision {why}")
    trainer = build_trainer(job, device, callbacks, log=log)
    history = trainer.fit()
    return trainer.net.model, history


def target_job(params: Params, strategy: str, strategy_params: dict | None = None) -> tuple[TrainJob, dict]:
    """The target-side training job for ``strategy`` on the configured label budget, and the data manifest."""
    jobs, manifest = target_jobs(params, [(strategy, strategy_params or {})])
    return jobs[0], manifest


def target_jobs(params: Params, trials: list[tuple[str, dict]]) -> tuple[list[TrainJob], dict]:
    """:func:`target_job` for each ``(strategy, strategy_params)``, the data and the source model loaded once and
    shared by the jobs (``tl tune`` sends them all to its trials at once)."""
    from tasks.modeling.checkpoints import load_checkpoint
    from tasks.modeling.domains import load_domain
    from tasks.modeling.model_input import input_spec
    from tasks.project.files import read_json
    from tlcore import strategies

    manifest = read_json(params.path("data", "manifest.json"))
    source_model, meta = load_checkpoint(params.path("models", "source.pt"))
    classes = manifest["target"]["classes"]
    channels = input_spec(params, meta["arch"], manifest).default_in_channels
    if meta["in_channels"] != channels:
        raise ParamsError(
            f"the source model {params.path('models', 'source.pt')} takes {meta['in_channels']}-channel images, but "
            f"this run feeds {channels}-channel ones (data.channels = {params.data.channels!r}"
            + (
                f"; the target {manifest['target']['name']!r} is {'grey' if channels == 1 else 'in colour'}"
                if params.data.channels == "auto"
                else ""
            )
            + "). Rerun pretrain (dvc repro) so the source model "
            f"is trained on the same channels, or set data.channels: {meta['in_channels']}."
        )
    from tasks.modeling.hardware import loader_workers, local_cpus

    train_ds, test_ds = load_domain(params, "target", meta["arch"], manifest)
    labeled, unlabeled, val = target_splits(params, train_ds, val_transform=test_ds.transform)
    weights, source, jobs = source_model.state_dict(), None, []
    for strategy, strategy_params in trials:
        cls = strategies.strategy_class(strategy)
        if "source" in cls.streams.used and source is None:
            source = load_domain(params, "source", meta["arch"], manifest)[0]
        jobs.append(
            TrainJob(
                arch=meta["arch"],
                num_classes=len(classes),
                strategy=strategy,
                optim=params.finetune,
                seed=params.base.seed,
                init_state=weights if cls.transfers else None,
                strategy_params=strategy_params or {},
                same_label_space=manifest["same_label_space"],
                **job_streams(cls, source=source, labeled=labeled, unlabeled=unlabeled),
                val=val,
                in_channels=channels,
            )
        )
        # run here (the strategy measurement); a Ray Train run or a Tune trial sets its worker's own
        device = "cuda" if params.ray.use_gpu else "cpu"
        jobs[-1].loader_workers = loader_workers(
            params.data.loader_workers, device, local_cpus(), jobs[-1].streams_a_split()
        )
    return jobs, manifest


def job_streams(strategy_cls, source=None, labeled=None, unlabeled=None) -> dict:
    """The datasets of a :class:`TrainJob` that ``strategy_cls`` trains on (its ``streams``); the others ``None``."""
    used = strategy_cls.streams.used
    return {
        "source": source if "source" in used else None,
        "labeled": labeled if "target" in used else None,
        "unlabeled": unlabeled if "unlabeled" in used else None,
    }


def target_splits(params: Params, train_ds, val_transform="same"):
    """Labeled / unlabeled-pool / validation subsets of the target training split (never test), as
    :func:`tlcore.data.label_budget_split` defines them (``data.val_per_class`` resolved by
    :func:`tasks.modeling.plan.val_per_class`); the validation subset is ``None`` when empty. ``val_transform``:
    the validation images' (the evaluation transform: no augmentation, so a validation accuracy is measured on
    the images as they are, the same at every epoch); ``"same"`` keeps the training split's."""
    import numpy as np

    from tasks.modeling.plan import labels_per_class, val_per_class
    from tlcore import data

    y = train_ds.targets.numpy()
    counts = np.bincount(y, minlength=len(train_ds.classes)).tolist()
    b = data.label_budget_split(y, labels_per_class(params), params.base.seed, val_per_class(params, counts))
    val = train_ds.subset(b.val, transform=val_transform) if len(b.val) else None
    return train_ds.subset(b.labeled), train_ds.subset(b.unlabeled), val
