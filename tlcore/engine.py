"""One framework-free training loop used by every stage.

Ray, Prefect and MLflow attach from outside through callbacks (``on_epoch_end(metrics, state)``)
and the ``wrap`` hook (e.g. Ray's ``prepare_model``); nothing here knows about them.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .strategies import Batch, Strategy, TransferNet


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
    # "auto": :func:`resolve_precision` (callers pass a measured speed-up; see :func:`choose_precision`).
    # Weights, optimiser state and BatchNorm stay fp32 either way.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU (oneDNN) and tensor cores
    seed: int = 0

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
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

    def on_epoch_end(self, metrics: dict, state: "Trainer") -> None: ...


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


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Sapphire Rapids and later): bf16 matmuls in hardware."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16 or AMX); says nothing about speed."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(device_type: str, *, cuda_capability: tuple[int, int] | None = None,
                     cpu_bf16: bool = False, cpu_amx: bool = False,
                     bf16_speedup: float | None = None, min_speedup: float = 1.1) -> tuple[str, str]:
    """The ``auto`` rule, as a pure function: returns ``(precision, why)``.

    - CUDA: bf16 from compute capability 8.0 (Ampere) on, where it runs on tensor cores; older
      GPUs only emulate bf16 (``torch.cuda.is_bf16_supported()`` counts that too), so fp32.
    - CPU: fp32 without bf16 kernels. With them, a measured ``bf16_speedup`` (bf16 steps per fp32
      step on the real model) decides: bf16 only when it is at least ``min_speedup``. AVX512-BF16
      without AMX is faster on some CPUs and slower on others, so it is never assumed. Without a
      measurement, bf16 only with AMX.
    """
    if device_type == "cuda":
        if cuda_capability is not None and cuda_capability >= (8, 0):
            return "bf16", f"bf16: CUDA compute capability {cuda_capability[0]}.{cuda_capability[1]} >= 8.0"
        cap = "unknown" if cuda_capability is None else f"{cuda_capability[0]}.{cuda_capability[1]}"
        return "fp32", f"fp32: CUDA compute capability {cap} < 8.0 has no native bf16"
    if device_type != "cpu" or not cpu_bf16:
        return "fp32", f"fp32: no bf16 kernels on {device_type}"
    if bf16_speedup is not None:
        if bf16_speedup >= min_speedup:
            return "bf16", f"bf16: {bf16_speedup:.2f}x faster than fp32 here (measured)"
        return "fp32", f"fp32: bf16 is {bf16_speedup:.2f}x fp32 here (measured; needs >= {min_speedup}x)"
    if cpu_amx:
        return "bf16", "bf16: CPU has AMX"
    return "fp32", "fp32: CPU has bf16 kernels but no AMX, and no measurement was given"


def resolve_precision(precision: str, device: torch.device | str, bf16_speedup: float | None = None) -> str:
    """``"auto"`` -> ``"bf16"`` or ``"fp32"`` by :func:`choose_precision`; other values pass through."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return choose_precision(device.type, cuda_capability=cap, cpu_bf16=cpu_bf16_kernels(), cpu_amx=cpu_has_amx(),
                            bf16_speedup=bf16_speedup)[0]


def measure_bf16_speedup(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu",
                         steps: int = 6, warmup: int = 2) -> float:
    """Training steps per second in bf16 autocast divided by fp32, on ``model`` (a throwaway copy is
    fine: it is trained on random data). ``input_shape`` includes the batch dimension."""
    import copy

    device = torch.device(device)
    x = torch.randn(*input_shape, device=device).to(memory_format=torch.channels_last)
    rates = {}
    for bf16 in (False, True, False, True):  # interleaved: a warming or busy machine skews both alike
        m = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = m(x)
                out = out["logits"] if isinstance(out, dict) else out
            loss = out.float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.setdefault(bf16, []).append(steps / (time.perf_counter() - t))
    return max(rates[True]) / max(rates[False])


def _cycle(loader: DataLoader) -> Iterator:
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        n = 0
        for item in loader:
            n += 1
            yield item
        if n == 0:
            raise ValueError(f"a training data loader yields no batches ({len(loader.dataset)} samples, "
                             f"batch_size {loader.batch_size}, drop_last); lower the batch size.")
        epoch += 1


def _to(x, device):
    if isinstance(x, (list, tuple)):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` and labels ``(N,)`` of ``model`` over ``loader`` (eval mode, CPU tensors)."""
    device = torch.device(device) if device else next(model.parameters()).device
    was = model.training
    model.eval()
    outs, ys = [], []
    for x, y in loader:
        out = model(x.to(device))
        outs.append((out["logits"] if isinstance(out, dict) else out).float().cpu())
        ys.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(ys)


class Trainer:
    """Trains ``strategy``'s net on ``loaders``.

    ``state_dict()``/``load_state_dict()`` hold everything needed to resume exactly after the
    last finished epoch (weights, extras, optimiser, scheduler, epoch, history, RNG).
    """

    def __init__(self, net: TransferNet, strategy: Strategy, cfg: TrainConfig, loaders: Loaders,
                 device: torch.device | str | None = None, callbacks: list[Callback] | tuple = (),
                 wrap: Callable[[nn.Module], nn.Module] | None = None, log: Callable[[str], None] | None = print):
        self.cfg, self.strategy, self.loaders = cfg, strategy, loaders
        self.device = torch.device(device) if device else default_device()
        self.net = net.to(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.cfg = cfg = replace(cfg, precision=self.precision)  # checkpoints record what was used
        self._channels_last = cfg.channels_last and self.device.type in ("cpu", "cuda")
        if self._channels_last:  # before ``wrap``, so DDP's gradient buckets match the layout
            self.net.to(memory_format=torch.channels_last)
        self.callbacks = list(callbacks)
        self._step_callbacks = [cb for cb in self.callbacks if hasattr(cb, "on_step_end")]
        self.log = log or (lambda s: None)
        missing = [s for s in strategy.uses if getattr(loaders, s) is None]
        if missing and not (missing == ["target"] and strategy.uses >= {"source", "unlabeled"}):
            raise ValueError(f"strategy {strategy.name!r} needs data streams {sorted(strategy.uses)}; missing: {missing}")
        self.streams = [s for s in ("source", "target", "unlabeled") if s in strategy.uses and getattr(loaders, s) is not None]
        self.steps_per_epoch = cfg.steps_per_epoch or max(len(getattr(loaders, s)) for s in self.streams)
        self.groups = strategy.param_groups(self.net, cfg.lr)
        self.optimizer = self._make_optimizer()
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda(total))
        self.model = wrap(self.net) if wrap else self.net
        self.epoch = 0  # epochs finished
        self.history: list[dict] = []
        strategy.total_epochs = cfg.epochs

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in self.groups]
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay, nesterov=True)
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
        dev = self.device.type if self.device.type in ("cpu", "cuda") else "cpu"
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def fit(self) -> list[dict]:
        """Train from ``self.epoch`` to ``cfg.epochs``; returns the per-epoch metrics history."""
        iters = {s: _cycle(getattr(self.loaders, s)) for s in self.streams}
        total_steps = self.cfg.epochs * self.steps_per_epoch
        if self._channels_last:  # in place (same Parameter objects); a no-op for non-4-D tensors
            self.net.to(memory_format=torch.channels_last)
        try:
            self._fit(iters, total_steps)
        finally:  # hand back the usual NCHW layout (pruning, export and views expect it)
            if self._channels_last:
                self.net.to(memory_format=torch.contiguous_format)
        return self.history

    def _fit(self, iters: dict, total_steps: int) -> None:
        for epoch in range(self.epoch, self.cfg.epochs):
            self.strategy.on_epoch_start(self.net, epoch)
            self.strategy.train_mode(self.model)
            t0, sums, n_img = time.perf_counter(), {}, 0
            for step in range(self.steps_per_epoch):
                progress = (epoch * self.steps_per_epoch + step) / total_steps
                raw = {s: next(iters[s]) for s in self.streams}
                batch = Batch(
                    target=_to(raw["target"], self.device) if "target" in raw else None,
                    source=_to(raw["source"], self.device) if "source" in raw else None,
                    unlabeled=_to(raw["unlabeled"][0], self.device) if "unlabeled" in raw else None,
                )
                n_img += sum(len(v[0]) for v in raw.values())
                with self._amp():
                    loss, logs = self.strategy.loss(self.model, batch, progress)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; lower the learning "
                        f"rate (now {self.cfg.lr}) or enable gradient clipping (grad_clip)."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip:
                    nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], self.cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                for k, v in {"loss": loss.item(), **logs}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                for cb in self._step_callbacks:
                    cb.on_step_end(self, epoch, step)
            dt = time.perf_counter() - t0
            metrics = {"epoch": epoch + 1, **{f"train_{k}": v / self.steps_per_epoch for k, v in sums.items()},
                       "lr": self.optimizer.param_groups[-1]["lr"], "epoch_time_s": dt, "train_images_per_s": n_img / dt}
            if self.loaders.val is not None:
                logits, y = predict(self.model, self.loaders.val, self.device)
                metrics["val_loss"] = nn.functional.cross_entropy(logits, y).item()
                metrics["val_accuracy"] = (logits.argmax(1) == y).float().mean().item()
            self.epoch = epoch + 1
            self.history.append(metrics)
            self.log(_format(metrics, self.cfg.epochs))
            for cb in self.callbacks:
                cb.on_epoch_end(metrics, self)

    def state_dict(self) -> dict:
        return {
            "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "history": self.history,
            "config": asdict(self.cfg), "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])


def _format(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"loss {m['train_loss']:.4f}"]
    if "val_accuracy" in m:
        parts.append(f"val_acc {m['val_accuracy']:.4f}")
    parts.append(f"{m['train_images_per_s']:.0f} img/s")
    return " | ".join(parts)
