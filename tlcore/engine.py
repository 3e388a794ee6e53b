"""One framework-free training loop used by every stage.

Ray, Prefect and MLflow attach from outside through callbacks (``on_epoch_end(metrics, state)``)
and the ``wrap`` hook (e.g. Ray's ``prepare_model``); nothing here knows about them.
"""

from __future__ import annotations

import gc
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import batch_to
from .precision import precision_for_device
from .strategies import STREAMS, Batch, Strategy, TransferNet


@dataclass
class TrainConfig:
    """Optimisation settings (typed; callers build it from their own config)."""

    epochs: int = 10
    steps_per_epoch: int | None = None  # None: the longest stream this strategy uses
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 5.0
    # "auto": :func:`tlcore.precision.precision_for_device` (this device's rule, no measurement; callers that
    # measured pass their choice instead, see :func:`tlcore.precision.choose_precision`).
    # "fp16" adds a ``torch.amp.GradScaler`` (gradients unscaled before clipping). Weights, optimiser
    # state and BatchNorm stay fp32 either way.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU (oneDNN) and tensor cores
    seed: int = 0

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16', 'fp16' or 'fp32', got {self.precision!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Loaders:
    """Data streams; the engine cycles each one so streams of unequal length pair up."""

    target: DataLoader | None = None
    source: DataLoader | None = None
    unlabeled: DataLoader | None = None
    val: DataLoader | None = None


class Callback(Protocol):
    """``on_epoch_end`` is required; ``on_step_end(state, epoch, step)`` is called when defined."""

    def on_epoch_end(self, metrics: dict, state: Trainer) -> None: ...


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Stream:
    """An endless iterator over a training loader that knows where it is: the pass over the loader and the
    batches taken from it. :meth:`state` goes into checkpoints; after :meth:`load`, the next batch is the one
    an uninterrupted run would have drawn (the sampler skips the taken indices, see
    :class:`tlcore.data.ResumableSampler`; other samplers replay the pass and drop the batches, keeping the
    global RNG as it was)."""

    def __init__(self, loader: DataLoader):
        self.loader, self.passes, self.taken, self._it = loader, 0, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self._start_pass()
            try:
                item = next(self._it)
            except StopIteration:
                if self.taken == 0:
                    raise ValueError(
                        f"a training data loader yields no batches ({len(self.loader.dataset)} samples, "
                        f"batch_size {self.loader.batch_size}, drop_last); lower the batch size."
                    ) from None
                self._it, self.passes, self.taken = None, self.passes + 1, 0
                continue
            self.taken += 1
            return item

    def _start_pass(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.passes)
        if self.taken and hasattr(sampler, "skip"):
            sampler.skip(self.taken * self.loader.batch_size)
            self._it = iter(self.loader)
            return
        self._it = iter(self.loader)
        if self.taken:  # a sampler that cannot skip: replay the taken batches without touching the global RNG
            with torch.random.fork_rng(devices=[]):
                for _ in range(self.taken):
                    next(self._it)

    def state(self) -> dict:
        return {"passes": self.passes, "taken": self.taken}

    def load(self, state: dict) -> None:
        self.passes, self.taken, self._it = int(state["passes"]), int(state["taken"]), None


def _to(item, device, loader):
    """A training batch ``(images, labels)`` on ``device``, the loader's transform (augmentation) applied there."""
    x, y = item
    return batch_to(x, device, loader), y.to(device, non_blocking=True)


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` and labels ``(N,)`` of ``model`` over ``loader`` (eval mode, CPU tensors)."""
    device = torch.device(device) if device else next(model.parameters()).device
    was = model.training
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        out = model(batch_to(x, device, loader))
        outs.append((out["logits"] if isinstance(out, dict) else out).float().cpu())
        ys.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(ys)


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, world: int, op: str = "sum") -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


class Trainer:
    """Trains ``strategy``'s net on ``loaders``.

    ``state_dict()``/``load_state_dict()`` hold everything needed to resume exactly after the
    last finished epoch (weights, extras, optimiser, scheduler, loss scaler, epoch, history, RNG).

    Data parallel: when ``torch.distributed`` is initialised with more than one rank, ``wrap``
    (e.g. DDP) is applied again whenever the strategy changes which parameters train (DDP only
    synchronises the parameters that required gradients when it was built), the epoch metrics are
    sums over all ranks (losses averaged, ``train_images_per_s`` of the whole group), and each rank
    validates its own ``loaders.val`` (give each a disjoint shard) with the sums all-reduced.
    Losses are read from the device once per epoch, not per step.

    Augmentation: a training loader that leaves its transform to its consumer (uint8 batches, see
    :func:`tlcore.data.make_loader`) is transformed here, batched on ``device`` after the copy, stream by
    stream in a fixed order; its random draws come from that device's default generator, whose state
    ``state_dict`` saves (``torch_rng``, ``cuda_rng``), so a resume replays them exactly.
    """

    def __init__(
        self,
        net: TransferNet,
        strategy: Strategy,
        cfg: TrainConfig,
        loaders: Loaders,
        device: torch.device | str | None = None,
        callbacks: list[Callback] | tuple = (),
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        log: Callable[[str], None] | None = print,
    ):
        self.cfg, self.strategy, self.loaders = cfg, strategy, loaders
        self.device = torch.device(device) if device else default_device()
        self.rank, self.world = dist_rank_world()
        self.net = net.to(self.device)
        self.precision = precision_for_device(cfg.precision, self.device)
        self.cfg = cfg = replace(cfg, precision=self.precision)  # checkpoints record what was used
        self._amp_device = self.device.type if self.device.type in ("cpu", "cuda") else "cpu"
        self.scaler = torch.amp.GradScaler(self._amp_device, enabled=self.precision == "fp16")
        self._channels_last = cfg.channels_last and self.device.type in ("cpu", "cuda")
        if self._channels_last:  # before ``wrap``, so DDP's gradient buckets match the layout
            self.net.to(memory_format=torch.channels_last)
        self.callbacks = list(callbacks)
        self._step_callbacks = [cb for cb in self.callbacks if hasattr(cb, "on_step_end")]
        self.log = log or (lambda s: None)
        given = [s for s in STREAMS if getattr(loaders, s) is not None]
        self.streams = strategy.streams.check(given, f"strategy {strategy.name!r}")
        self.steps_per_epoch = cfg.steps_per_epoch or max(len(getattr(loaders, s)) for s in self.streams)
        self.groups = strategy.param_groups(self.net, cfg.lr)
        self.optimizer = self._make_optimizer()
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda(total))
        self._wrap = wrap
        self._wrapped_for = self._trainable()
        self.model = wrap(self.net) if wrap else self.net
        self.epoch = 0  # epochs finished
        self._iters: dict = {}  # the running data streams (fit)
        self._stream_state: dict | None = None  # where each stream was when a loaded checkpoint was taken
        self._rank_rngs: list[dict] | None = None  # every rank's generators at the last epoch's end (data parallel)
        self.history: list[dict] = []

    def _trainable(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.net.parameters())

    def _rewrap_if_trainable_changed(self) -> None:
        """Wrap again when the trainable set changed (an unfreeze): a DDP built while the backbone was
        frozen would never all-reduce its gradients, and the replicas would drift apart."""
        now = self._trainable()
        if self._wrap is None or now == self._wrapped_for:
            return
        self.model = None  # the old wrapper (and its gradient hooks) goes before the new one is built
        gc.collect()
        self.model = self._wrap(self.net)
        self._wrapped_for = now

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in self.groups]
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(
                groups, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay, nesterov=True
            )
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _lr_lambda(self, total: int):
        warm, kind = self.cfg.warmup_steps, self.cfg.scheduler

        def f(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            if kind == "constant":
                return 1.0
            p = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

        return f

    def _amp(self):
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self._amp_device, dtype=dtype, enabled=self.precision in ("bf16", "fp16"))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fit(self) -> list[dict]:
        """Train from ``self.epoch`` to ``cfg.epochs``; returns the per-epoch metrics history."""
        iters = {s: _Stream(getattr(self.loaders, s)) for s in self.streams}
        for s, st in (self._stream_state or {}).items():  # resuming: each stream where the checkpoint left it
            if s in iters:
                iters[s].load(st)
        self._iters = iters
        total_steps = self.cfg.epochs * self.steps_per_epoch
        if self._channels_last:  # in place (same Parameter objects); a no-op for non-4-D tensors
            self.net.to(memory_format=torch.channels_last)
        try:
            self._fit(iters, total_steps)
        finally:  # hand back the usual NCHW layout (pruning, export and views expect it)
            if self._channels_last:
                self.net.to(memory_format=torch.contiguous_format)
        return self.history

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
            nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _fit(self, iters: dict, total_steps: int) -> None:
        dev = self.device
        for epoch in range(self.epoch, self.cfg.epochs):
            self.strategy.on_epoch_start(self.net, epoch)
            self._rewrap_if_trainable_changed()
            self.strategy.train_mode(self.model)
            self._sync()
            t0, n_img = time.perf_counter(), 0
            sums: dict[str, torch.Tensor | float] = {}
            n_bad = torch.zeros((), device=dev)
            first_bad = torch.full((), -1.0, device=dev)
            for step in range(self.steps_per_epoch):
                progress = (epoch * self.steps_per_epoch + step) / total_steps
                raw = {s: next(iters[s]) for s in self.streams}
                on_dev = {s: _to(b, dev, iters[s].loader) for s, b in raw.items()}  # augmented here, in stream order
                batch = Batch(
                    target=on_dev.get("target"),
                    source=on_dev.get("source"),
                    unlabeled=on_dev["unlabeled"][0] if "unlabeled" in on_dev else None,
                )
                n_img += sum(len(v[0]) for v in raw.values())
                with self._amp():
                    loss, logs = self.strategy.loss(self.model, batch, progress)
                bad = ~torch.isfinite(loss.detach())  # read once per epoch: no host-device sync per step
                first_bad = torch.where(bad & (first_bad < 0), float(step), first_bad)
                n_bad = n_bad + bad
                self._step(loss)
                for k, v in {"loss": loss.detach(), **logs}.items():
                    sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
                for cb in self._step_callbacks:
                    cb.on_step_end(self, epoch, step)
            metrics = self._epoch_metrics(epoch, t0, sums, n_img, n_bad, first_bad)
            if self.loaders.val is not None:
                metrics.update(self._validate())
            self.epoch = epoch + 1
            self._rank_rngs = self._gather_rngs()  # before the callbacks: rank 0's checkpoint holds every rank's
            self.history.append(metrics)
            self.log(_format(metrics, self.cfg.epochs))
            for cb in self.callbacks:
                cb.on_epoch_end(metrics, self)

    def _epoch_metrics(self, epoch: int, t0: float, sums: dict, n_img: int, n_bad, first_bad) -> dict:
        """Losses averaged over steps and ranks, images/s of the whole group (its slowest rank's time)."""
        dev = self.device
        self._sync()
        dt = torch.tensor(time.perf_counter() - t0, device=dev, dtype=torch.float64)
        keys = list(sums)
        vec = torch.stack(
            [torch.as_tensor(sums[k], device=dev, dtype=torch.float64) for k in keys]
            + [torch.tensor(float(n_img), device=dev, dtype=torch.float64), n_bad.double()]
        )
        _all_reduce(vec, self.world)
        _all_reduce(dt, self.world, "max")
        *vals, total_img, total_bad, bad_step, secs = torch.cat([vec, first_bad.double()[None], dt[None]]).tolist()
        if total_bad:
            where = f"step {int(bad_step) + 1}" if bad_step >= 0 else "a step on another worker"
            raise FloatingPointError(
                f"loss became non-finite at epoch {epoch + 1}, {where} ({int(total_bad)} step(s) in all); lower "
                f"the learning rate (now {self.cfg.lr}) or enable gradient clipping (grad_clip)."
            )
        n = self.steps_per_epoch * self.world
        return {
            "epoch": epoch + 1,
            **{f"train_{k}": v / n for k, v in zip(keys, vals)},
            "lr": self.optimizer.param_groups[-1]["lr"],
            "epoch_time_s": secs,
            "train_images_per_s": total_img / secs,
        }

    @torch.no_grad()
    def _validate(self) -> dict:
        """``val_loss`` / ``val_accuracy`` over the union of the ranks' validation loaders, on rank 0's weights."""
        import torch.distributed as dist

        dev, net = self.device, self.net  # unwrapped: ranks may hold different numbers of batches
        if self.world > 1:  # BatchNorm statistics drift per rank between DDP's broadcasts; use the saved ones
            for b in net.buffers():
                dist.broadcast(b, 0)
        was = net.training
        net.eval()
        s, count = torch.zeros(2, device=dev, dtype=torch.float64), 0  # summed on the device, read once
        for item in self.loaders.val:
            x, y = _to(item, dev, self.loaders.val)
            logits = net(x)["logits"].float()
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            s += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double()])
            count += len(y)
        net.train(was)
        s = torch.cat([s, torch.tensor([float(count)], device=dev, dtype=torch.float64)])
        loss, correct, n = _all_reduce(s, self.world).tolist()
        return {"val_loss": loss / n, "val_accuracy": correct / n} if n else {}

    def _own_rngs(self) -> dict:
        rngs = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":  # this rank's own GPU: another rank may resume on another local index
            rngs["device_rng"] = torch.cuda.get_rng_state(self.device)
        return rngs

    def _gather_rngs(self) -> list[dict] | None:
        """Every rank's random-number generators, in rank order (``None`` with one rank): a resume then gives each
        rank its own stream of augmentation draws back, and a multi-worker run resumes exactly."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, self._own_rngs())
        return out

    def _set_rngs(self, rngs: dict) -> None:
        torch.set_rng_state(rngs["torch_rng"])
        if "device_rng" in rngs and self.device.type == "cuda":
            torch.cuda.set_rng_state(rngs["device_rng"], self.device)
        if "cuda_rng" in rngs and torch.cuda.is_available() and len(rngs["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rngs["cuda_rng"])

    def state_dict(self) -> dict:
        state = {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "config": asdict(self.cfg),
            "torch_rng": torch.get_rng_state(),
            "streams": {s: it.state() for s, it in self._iters.items()} if self._iters else (self._stream_state or {}),
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self._rank_rngs:
            state["rank_rngs"] = self._rank_rngs
        return state

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self._stream_state = state.get("streams") or None
        ranks = state.get("rank_rngs") or []
        if len(ranks) == self.world > 1:  # every rank's own generators, as they were at the end of that epoch
            self._set_rngs(ranks[self.rank])
            return
        if "torch_rng" in state:
            self._set_rngs(state)
        if self.rank:  # another worker count than the checkpoint's: each rank derives its own from rank 0's
            torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + self.rank)


def _format(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.4f}"]
    if "val_accuracy" in m:
        parts.append(f"val_acc {m['val_accuracy']:.4f}")
    parts.append(f"{m['train_images_per_s']:.0f} img/s")
    return " | ".join(parts)
