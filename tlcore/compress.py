"""Compression: magnitude pruning, int8 post-training quantisation, knowledge distillation."""

from __future__ import annotations

import copy
import platform
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from . import losses
from .strategies import Batch, Strategy, Streams


def _prunable(model: nn.Module, kinds=(nn.Conv2d, nn.Linear)) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds)]


def prune_unstructured(model: nn.Module, amount: float, scope: str = "global", permanent: bool = True) -> nn.Module:
    """L1 magnitude pruning of conv/linear weights; returns a copy.

    ``scope="global"`` ranks all weights together (layers end up with different sparsities);
    ``"layer"`` prunes ``amount`` of every layer. ``permanent=False`` keeps ``torch.nn.utils.prune``'s masks attached,
    so
    fine-tuning the copy keeps the pruned weights at zero; call :func:`make_permanent` after.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    m = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    targets = _prunable(m)
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for mod, name in targets:
            prune.l1_unstructured(mod, name, amount=amount)
    return make_permanent(m) if permanent else m


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold pruning masks into the weights (drops the ``weight_orig``/``weight_mask`` reparametrisation)."""
    for mod in model.modules():
        if prune.is_pruned(mod) and hasattr(mod, "weight_mask"):
            prune.remove(mod, "weight")
    return model


def prune_structured(model: nn.Module, amount: float, permanent: bool = True) -> nn.Module:
    """L2 pruning of whole conv output channels (``ln_structured``, dim 0); returns a copy."""
    m = copy.deepcopy(model)
    for mod, name in _prunable(m, (nn.Conv2d,)):
        prune.ln_structured(mod, name, amount=amount, n=2, dim=0)
    return make_permanent(m) if permanent else m


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over conv/linear layers."""
    tot = zeros = 0
    for mod, _ in _prunable(model):
        tot += mod.weight.numel()
        zeros += int((mod.weight == 0).sum())
    return zeros / max(1, tot)


_INT8_ENGINES = {
    "x86_64": ("x86", "fbgemm"),
    "amd64": ("x86", "fbgemm"),
    "aarch64": ("qnnpack",),
    "arm64": ("qnnpack",),
}


def int8_engine(machine: str, supported: Sequence[str]) -> str:
    """The int8 kernel library for a CPU architecture (``platform.machine()``) among ``supported``
    (``torch.backends.quantized.supported_engines``): ``x86`` (fbgemm + oneDNN; ``fbgemm`` in older
    builds) on x86-64, ``qnnpack`` on 64-bit Arm (aarch64 / arm64)."""
    wanted = _INT8_ENGINES.get(machine.lower())
    if wanted is None:
        raise ValueError(
            f"no int8 quantisation engine is known for CPU architecture {machine!r} "
            f"(known: {', '.join(sorted(_INT8_ENGINES))}); pass backend= explicitly"
        )
    for name in wanted:
        if name in supported:
            return name
    raise ValueError(
        f"this torch build has none of the int8 engines for {machine} ({', '.join(wanted)}); "
        f"it offers {', '.join(supported) or 'none'}"
    )


def quantize_int8(model: nn.Module, calibration: torch.Tensor, backend: str | None = None) -> nn.Module:
    """Static int8 post-training quantisation of a conv net for CPU inference.

    Route: FX graph mode (``torch.ao.quantization.quantize_fx``) with the engine of this CPU
    (``backend=None``: :func:`int8_engine`, ``x86`` on x86-64, ``qnnpack`` on aarch64). It is
    the PyTorch-core route that quantises convolutions *and* linear layers statically and runs
    with that engine's int8 kernels on CPU; eager mode needs hand-inserted Quant/DeQuant
    stubs and fused modules, dynamic quantisation only covers Linear/RNN layers, and the PT2E
    export route now lives in the separate ``torchao`` package. ``calibration`` is a float batch
    ``(N, C, H, W)`` of representative inputs. Returns a new CPU model.

    The process-wide ``torch.backends.quantized.engine`` is ``backend`` while the weights are packed and
    restored after: packed weights carry their engine's kernels, so the model runs whatever it is later.
    """
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if backend is None:
        backend = int8_engine(platform.machine(), torch.backends.quantized.supported_engines)
    m = copy.deepcopy(model).cpu().eval()
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(m, get_default_qconfig_mapping(backend), example_inputs=(calibration[:1].cpu(),))
            with torch.no_grad():
                for chunk in calibration.cpu().split(64):
                    prepared(chunk)
            return convert_fx(prepared)
    finally:
        torch.backends.quantized.engine = before


class Distill(Strategy):
    """Knowledge distillation (Hinton et al., 2015) into a student, as a strategy for the engine.

    Trains on the labeled target batches (ground truth plus soft targets) and/or the unlabeled pool (soft
    targets only), whichever the loaders give: with no target labels the student learns from the teacher
    alone. Not in the strategy registry: it needs a teacher instance.
    """

    name = "distill"
    streams = Streams(required=frozenset(), optional={"target", "unlabeled"})

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        self.teacher = copy.deepcopy(teacher).eval()  # frozen copy: the caller's model is left as it was
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def setup(self, model, num_classes, same_label_space=True):
        if model.num_classes != num_classes:
            model.reset_head(num_classes)
        model.requires_grad_(True)  # e.g. a pruned copy of a frozen model
        return self.net_type(model)

    def loss(self, net, batch: Batch, progress):
        loss = None
        if batch.target is not None:
            x, y = batch.target
            self.teacher.to(x.device)
            with torch.no_grad():
                t_logits = self.teacher(x).float()
            loss = losses.distillation_loss(net(x)["logits"], t_logits, y, self.temperature, self.alpha)
        if batch.unlabeled is not None:
            self.teacher.to(batch.unlabeled.device)
            with torch.no_grad():
                tu = self.teacher(batch.unlabeled).float()
            soft = losses.distillation_loss(net(batch.unlabeled)["logits"], tu, None, self.temperature)
            loss = soft if loss is None else loss + soft
        return loss, {"loss_distill": loss.detach()}
