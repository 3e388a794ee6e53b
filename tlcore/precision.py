"""Which precision trains fastest on this hardware: CPU and GPU capability probes, the ``auto`` rule, and a
bf16-versus-fp32 timing of a model for CPUs where only a measurement can tell."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn


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


def choose_precision(
    device_type: str,
    *,
    cuda_capability: tuple[int, int] | None = None,
    cpu_bf16: bool = False,
    cpu_amx: bool = False,
    bf16_speedup: float | None = None,
    min_speedup: float = 1.1,
) -> tuple[str, str]:
    """The ``auto`` rule, as a pure function: returns ``(precision, why)``.

    - CUDA: bf16 from compute capability 8.0 (Ampere) on, where it runs on tensor cores. 7.x
      (Volta, Turing: V100, T4) only emulates bf16 (``torch.cuda.is_bf16_supported()`` counts that
      too) but has fp16 tensor cores: fp16 with loss scaling. Older or unknown: fp32.
    - CPU: fp32 without bf16 kernels. With them, a measured ``bf16_speedup`` (bf16 steps per fp32
      step on the real model) decides: bf16 only when it is at least ``min_speedup``. AVX512-BF16
      without AMX is faster on some CPUs and slower on others, so it is never assumed. Without a
      measurement, bf16 only with AMX.
    """
    if device_type == "cuda":
        if cuda_capability is not None and cuda_capability >= (8, 0):
            return "bf16", f"bf16: CUDA compute capability {cuda_capability[0]}.{cuda_capability[1]} >= 8.0"
        if cuda_capability is not None and cuda_capability >= (7, 0):
            return "fp16", (
                f"fp16 (loss-scaled): CUDA compute capability {cuda_capability[0]}.{cuda_capability[1]} "
                f"has fp16 tensor cores but no native bf16"
            )
        cap = "unknown" if cuda_capability is None else f"{cuda_capability[0]}.{cuda_capability[1]}"
        return "fp32", f"fp32: CUDA compute capability {cap} has no fast bf16 or fp16"
    if device_type != "cpu" or not cpu_bf16:
        return "fp32", f"fp32: no bf16 kernels on {device_type}"
    if bf16_speedup is not None:
        if bf16_speedup >= min_speedup:
            return "bf16", f"bf16: {bf16_speedup:.2f}x faster than fp32 here (measured)"
        return "fp32", f"fp32: bf16 is {bf16_speedup:.2f}x fp32 here (measured; needs >= {min_speedup}x)"
    if cpu_amx:
        return "bf16", "bf16: CPU has AMX"
    return "fp32", "fp32: CPU has bf16 kernels but no AMX, and no measurement was given"


def precision_for_device(precision: str, device: torch.device | str, bf16_speedup: float | None = None) -> str:
    """``"auto"`` -> ``"bf16"``, ``"fp16"`` or ``"fp32"`` by :func:`choose_precision`; other values pass through."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return choose_precision(
        device.type, cuda_capability=cap, cpu_bf16=cpu_bf16_kernels(), cpu_amx=cpu_has_amx(), bf16_speedup=bf16_speedup
    )[0]


def measure_bf16_speedup(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu", steps: int = 6, warmup: int = 2
) -> float:
    """Training steps per second in bf16 autocast divided by fp32, on ``model`` (a throwaway copy is
    fine: it is trained on random data). ``input_shape`` includes the batch dimension."""
    device = torch.device(device)
    x = torch.randn(*input_shape, device=device).to(memory_format=torch.channels_last)
    rates = {}
    for bf16 in (False, True, False, True):  # interleaved: a warming or busy machine skews both alike
        m = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt, bf16=bf16):  # this pass's model, optimiser and precision
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
