"""What this machine is good at: the stage's device and threads, CPU threads per worker and the training
precision, by measurement.

``precision: auto`` asks :func:`tlcore.precision.choose_precision`. On a CPU with bf16 kernels it
needs a measurement, because AVX512-BF16 without AMX is faster on some CPUs (AMD Zen 4: ~2x) and
slower on others (Xeons without AMX: ~0.7x). :func:`resolve_precision` times a few training steps
of the actual model in fp32 and in bf16 once per machine, model, input size, batch and thread
count, and caches the answer in ``$TL_CACHE_DIR`` (default ``~/.cache/transfer-pipeline``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from tasks.project.config import Params, ParamsError
from tasks.project.files import write_json
from tasks.project.settings import settings


def set_torch_threads(params: Params) -> None:
    """Give this process's torch ``base.num_threads`` CPU threads (``null``: leave torch's default). A stage
    calls it once, first; Ray workers set their own (:mod:`tasks.modeling.ray_train`)."""
    import torch

    if params.base.num_threads:
        torch.set_num_threads(params.base.num_threads)


def device_for(params: Params, cuda_available: bool | None = None):
    """The device this stage process computes on (evaluation, compression), by ``base.device``.

    Training runs where ``ray.use_gpu`` says (:mod:`tasks.modeling.ray_train`); the config refuses the two
    disagreeing. ``cuda_available`` replaces ``torch.cuda.is_available()`` (tests)."""
    import torch

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if params.base.device == "cuda" and not cuda:
        raise ParamsError(
            no_cuda_message(
                "base.device = 'cuda' but this process",
                " (on a Ray cluster: the node the stage runs on, often a GPU-less head node). Set base.device: auto; "
                "with ray.use_gpu: true training still runs on the GPU workers.",
                "or set base.device: auto and ray.use_gpu: false to run on the CPU",
            )
        )
    if params.base.device == "auto":
        return torch.device("cuda" if cuda else "cpu")
    return torch.device(params.base.device)


#: what the NVIDIA kernel module says about itself, on a machine with an NVIDIA driver (Linux)
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")
#: the oldest Linux driver (major version) each CUDA major release runs on (NVIDIA's CUDA release notes)
CUDA_MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def driver_too_old(version_text: str | None, torch_version: str, cuda_version: str | None) -> str | None:
    """Why a torch built for CUDA ``cuda_version`` (``torch.version.cuda``, e.g. ``"13.0"``; ``None`` for a CPU
    build) cannot use this machine's GPU, judged from ``version_text`` (the contents of :data:`NVIDIA_DRIVER_FILE`,
    ``None`` when there is none): a sentence naming the driver and the version needed, or ``None`` when the driver is
    recent enough, absent or unreadable (then nothing is known to be wrong with it)."""
    found = re.search(r"NVRM version:.*?\s(\d+)\.(\d+(?:\.\d+)?)(?=\s|$)", version_text or "")
    cuda_major = int(cuda_version.split(".")[0]) if cuda_version and cuda_version.split(".")[0].isdigit() else None
    needed = CUDA_MIN_DRIVER.get(cuda_major)
    if not found or needed is None or int(found.group(1)) >= needed:
        return None
    return (
        f"NVIDIA driver {found.group(1)}.{found.group(2)} < {needed}, which the CUDA {cuda_major} build of torch "
        f"{torch_version.split('+')[0]} needs: upgrade the driver (nvidia-smi shows it) to {needed} or newer"
    )


def no_cuda_message(who: str, otherwise: str, cpu_fix: str, driver_file: Path = NVIDIA_DRIVER_FILE) -> str:
    """The error when ``who`` (``"ray.use_gpu = true, but worker 0"``) finds no CUDA device: ``who`` + ``" sees no
    CUDA device"`` + ``otherwise``; or, on a machine whose NVIDIA driver is too old for this torch build (where torch
    sees no device either), that driver, the version needed and ``cpu_fix`` (``"or set ray.use_gpu: false"``)."""
    import torch

    try:
        text = driver_file.read_text()
    except OSError:  # no NVIDIA driver loaded (or not Linux)
        text = None
    problem = driver_too_old(text, torch.__version__, torch.version.cuda)
    if problem:
        return f"{who} cannot use the GPU: {problem}, {cpu_fix}."
    return f"{who} sees no CUDA device{otherwise}"


def cache_dir() -> Path:
    if (chosen := settings().cache_dir) is not None:
        return chosen.expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transfer-pipeline"


def local_cpus() -> int:
    """CPUs this process may use: its CPU set (taskset, cgroup cpusets) capped by a cgroup v2 CPU quota
    (``docker --cpus``, a Kubernetes CPU limit), unlike ``os.cpu_count``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def worker_cpus(num_workers: int, requested: float | str, cluster_nodes: list[dict] | None = None) -> float:
    """CPUs per Ray worker: ``requested``, or for ``"auto"`` the CPUs of the smallest node divided by
    the workers that land on it (all local CPUs in local mode, ``num_workers`` 0)."""
    if requested != "auto":
        return float(requested)
    if num_workers == 0 or not cluster_nodes:
        return float(max(1, local_cpus() // max(1, num_workers)))
    per_node = min(n["CPU"] for n in cluster_nodes)
    per_worker = per_node // math.ceil(num_workers / len(cluster_nodes))
    return float(max(1, per_worker))


def trial_resources(nodes: list[dict], concurrent: int, use_gpu: bool) -> dict[str, float]:
    """What one ``tl tune`` trial asks Ray for, sized to a node: the most whole CPUs per trial with which
    ``concurrent`` trials fit on the nodes at once (each trial on one node: a trial's CPUs summed over the cluster
    would fit no node, and its trials would wait forever). With ``use_gpu``, one GPU per trial, and only the GPUs'
    nodes count, each holding at most one trial per GPU; with no GPU node alive yet (an autoscaling cluster at zero
    GPU workers), one GPU and one CPU, which the autoscaler can start a node for. ``nodes``: ``{"CPU": n, "GPU": g}``
    per live node."""
    if use_gpu:
        nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
        if not nodes:  # none alive yet: an autoscaling cluster (min_workers 0) starts one for the first trial
            return {"CPU": 1.0, "GPU": 1.0}
        concurrent = min(concurrent, int(sum(n["GPU"] for n in nodes)))

    def fits(c: int) -> int:
        return sum(min(int(n["CPU"] // c), int(n["GPU"])) if use_gpu else int(n["CPU"] // c) for n in nodes)

    largest = int(max((n["CPU"] for n in nodes), default=1))
    cpus = max((c for c in range(1, largest + 1) if fits(c) >= concurrent), default=1)
    return {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}


def loader_workers(requested: int | str, device_type: str, cpus: float, streamed: bool = False) -> int:
    """Data-loader processes per training stream: ``requested``, or for ``"auto"`` 0 on a CPU and on a GPU
    ``min(2, cpus - 1)`` (``min(4, cpus - 1)`` when the job streams a split, ``streamed``), ``cpus`` being the CPUs
    the training worker has.

    Images held in memory were decoded once, and the training transform runs on the training device after the
    copy (:func:`tlcore.data.make_loader`), so a loader's own work per batch is indexing a uint8 tensor and
    collating it (and pinning it for a GPU). A streamed split's loader also decodes each image.

    - CPU: the worker's torch threads already use every CPU it has (``ray.cpus_per_worker``), so a loader
      process can only compete with them. Held in memory: measured on 2 cores (``smallcnn``, 32x32, batch 64,
      2 threads, fp32), the loader's ``next()`` takes 0.2 ms per batch in the training process, the training
      step (with the warp, 0.7 ms) about 84 ms (761 img/s), so a loader process could hide at most 0.3% of a
      step; end-to-end runs with 0, 1 and 2 loader processes differed only by the machine's noise. Streamed:
      decoding in the training process costs the decoding time alone, while one loader process beside torch's
      threads cost more than that (``bench/data_scale.py``'s streaming rows, docs/benchmarks.md). So 0.
    - GPU: the thread that feeds the GPU should only launch kernels; processes collate, decode and pin the
      next batches meanwhile: one or two per stream for data in memory (more buy nothing, and each holds a
      forked copy of the worker), up to four to decode a streamed split. One CPU stays with that thread.

    The choice changes speed only: the batches are the same with any number of loader processes.
    """
    if requested != "auto":
        return int(requested)
    if device_type != "cuda":
        return 0
    return max(0, min(4 if streamed else 2, int(cpus) - 1))


def _key(arch: str, input_shape: tuple[int, ...], threads: int, device: str) -> str:
    import torch

    return "|".join(
        [cpu_model(), f"torch {torch.__version__}", device, arch, "x".join(map(str, input_shape)), f"{threads} threads"]
    )


def _cached(key: str) -> float | None:
    f = cache_dir() / "precision.json"
    try:
        return float(json.loads(f.read_text())[key]["bf16_speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(key: str, speedup: float) -> None:
    f = cache_dir() / "precision.json"
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = {"bf16_speedup": round(speedup, 3), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        write_json(f, data)
    except OSError:  # a read-only home: measure again next time
        pass


def resolve_precision(
    requested: str,
    arch: str,
    num_classes: int,
    batch_size: int,
    device,
    measure: Callable[..., float] | None = None,
    image_shape: tuple[int, int, int] | None = None,
) -> tuple[str, str]:
    """``(precision, why)`` for training ``arch`` on ``device``; ``requested`` other than auto passes through.
    ``image_shape``: ``(C, H, W)`` of the images it trains on (default: the backbone's registered size).

    ``measure`` replaces :func:`tlcore.precision.measure_bf16_speedup` (tests pass both answers)."""
    import torch

    from tlcore import models, precision

    if requested != "auto":
        return requested, f"{requested}: set in params"
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
        return precision.choose_precision("cuda", cuda_capability=cap)
    if device.type != "cpu" or not precision.cpu_bf16_kernels():
        return precision.choose_precision(device.type, cpu_bf16=False)
    spec = models.get_spec(arch)
    shape = (min(batch_size, 32), *(image_shape or (spec.default_in_channels, spec.input_size, spec.input_size)))
    key = _key(arch, shape, torch.get_num_threads(), device.type)
    speedup = _cached(key)
    source = "cached"
    if speedup is None:
        try:
            with torch.random.fork_rng(devices=[]):  # the run's own random stream is left as it was
                model = models.create(arch, num_classes, in_channels=shape[1])
                speedup = (measure or precision.measure_bf16_speedup)(model, shape, device)
        except Exception as e:  # noqa: BLE001 - a failed measurement must not stop training
            return "fp32", f"fp32: measuring bf16 failed here ({type(e).__name__}: {e})"
        _store(key, speedup)
        source = "measured now"
    prec, why = precision.choose_precision("cpu", cpu_bf16=True, cpu_amx=precision.cpu_has_amx(), bf16_speedup=speedup)
    return prec, f"{why}, {source}"
