"""Precision and thread decisions: the `auto` rules with both answers, the per-machine cache, CPUs per worker."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tlcore.precision import choose_precision


@pytest.mark.parametrize(
    "kwargs,want",
    [
        ({"device_type": "cuda", "cuda_capability": (7, 5)}, "fp16"),  # T4: bf16 only emulated, fp16 tensor cores
        ({"device_type": "cuda", "cuda_capability": (7, 0)}, "fp16"),  # V100
        ({"device_type": "cuda", "cuda_capability": (6, 1)}, "fp32"),  # Pascal: neither
        ({"device_type": "cuda", "cuda_capability": None}, "fp32"),  # unknown
        ({"device_type": "cuda", "cuda_capability": (8, 0)}, "bf16"),  # A100
        ({"device_type": "cuda", "cuda_capability": (9, 0)}, "bf16"),  # H100/H200
        ({"device_type": "cpu", "cpu_bf16": False, "bf16_speedup": 3.0}, "fp32"),  # no kernels: never
        ({"device_type": "cpu", "cpu_bf16": True, "bf16_speedup": 1.6}, "bf16"),  # e.g. AMD Zen 4
        ({"device_type": "cpu", "cpu_bf16": True, "bf16_speedup": 0.7}, "fp32"),  # Xeon with AVX512-BF16, no AMX
        ({"device_type": "cpu", "cpu_bf16": True, "bf16_speedup": 1.05}, "fp32"),  # within noise: keep fp32
        ({"device_type": "cpu", "cpu_bf16": True, "cpu_amx": True}, "bf16"),  # AMX, unmeasured
        ({"device_type": "cpu", "cpu_bf16": True, "cpu_amx": False}, "fp32"),  # unmeasured, no AMX: don't guess
    ],
)
def test_auto_precision_rule(kwargs, want):
    device_type = kwargs.pop("device_type")
    got, why = choose_precision(device_type, **kwargs)
    assert got == want and why.startswith(want)


@pytest.mark.parametrize("capability,want", [((7, 5), "fp16"), ((8, 0), "bf16"), (None, "fp32")])
def test_auto_precision_on_cuda_asks_the_capability_not_is_bf16_supported(monkeypatch, capability, want):
    import torch

    from tasks.modeling import hardware
    from tlcore import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation too: never asked
    prec, why = hardware.resolve_precision("auto", "smallcnn", 10, 64, "cuda")
    assert prec == want and why.startswith(want)
    assert precision.precision_for_device("auto", "cuda") == want
    assert hardware.resolve_precision("fp16", "smallcnn", 10, 64, "cuda")[0] == "fp16"  # explicit passes through


@pytest.mark.parametrize("speedup,want", [(1.6, "bf16"), (0.7, "fp32")])
def test_auto_precision_measures_once_per_machine_and_model(tmp_path, monkeypatch, speedup, want):
    from tasks.modeling import hardware
    from tlcore import precision

    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_bf16_kernels", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    calls = []

    def measure(model, shape, device):
        calls.append(shape)
        return speedup

    prec, why = hardware.resolve_precision("auto", "smallcnn", 10, 64, "cpu", measure=measure)
    assert prec == want and "measured now" in why and f"{speedup:.2f}x" in why
    prec2, why2 = hardware.resolve_precision("auto", "smallcnn", 10, 64, "cpu", measure=measure)
    assert prec2 == want and "cached" in why2 and len(calls) == 1  # the second run reads the cache
    hardware.resolve_precision("auto", "tinycnn", 10, 64, "cpu", measure=measure)
    assert len(calls) == 2  # another model is measured on its own
    assert calls[0][0] == 32 and calls[0][1:] == (1, 32, 32)  # a capped batch of the model's real input size
    assert hardware.resolve_precision("fp32", "smallcnn", 10, 64, "cpu", measure=measure)[0] == "fp32"
    assert len(calls) == 2  # an explicit precision is never measured


def test_measured_speedup_is_the_ratio_of_bf16_to_fp32_steps_per_second():
    import torch
    from torch import nn

    from tlcore import precision

    class SlowInBf16(nn.Module):
        """A model whose step takes ~10 ms longer under bf16 autocast than in fp32: a speed-up well below 1."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if torch.is_autocast_enabled("cpu"):
                time.sleep(0.01)
            return self.fc(x.flatten(1)[:, :4])

    r = precision.measure_bf16_speedup(SlowInBf16(), (2, 1, 2, 2), "cpu", steps=3, warmup=1)
    assert 0 < r < 0.5  # fp32 steps take well under 1 ms here: bf16 is measured several times slower


def test_cpus_per_worker_auto(monkeypatch):
    from tasks.modeling import hardware

    monkeypatch.setattr(hardware, "local_cpus", lambda: 8)
    assert hardware.worker_cpus(0, "auto") == 8  # local mode: the whole machine
    assert hardware.worker_cpus(2, "auto", [{"CPU": 8}]) == 4
    assert hardware.worker_cpus(4, "auto", [{"CPU": 16}, {"CPU": 8}]) == 4  # 2 workers on the smaller node
    assert hardware.worker_cpus(3, "auto", [{"CPU": 2}]) == 1  # never below one
    assert hardware.worker_cpus(2, 1.5, [{"CPU": 8}]) == 1.5  # explicit wins


def test_loader_workers_auto_is_none_on_cpu_and_a_few_on_a_gpu():
    from tasks.modeling import hardware

    assert [hardware.loader_workers("auto", "cpu", c) for c in (1, 2, 16)] == [0, 0, 0]  # threads use every CPU
    assert [hardware.loader_workers("auto", "cpu", c, streamed=True) for c in (2, 16)] == [0, 0]  # decoded inline
    assert [hardware.loader_workers("auto", "cuda", c) for c in (1, 2, 3, 16)] == [0, 1, 2, 2]  # one CPU feeds the GPU
    assert [hardware.loader_workers("auto", "cuda", c, streamed=True) for c in (2, 4, 16)] == [1, 3, 4]  # to decode
    assert hardware.loader_workers(3, "cpu", 2) == 3 and hardware.loader_workers(0, "cuda", 8) == 0  # explicit wins


def test_stage_under_a_python_without_the_packages_says_to_activate_the_venv():
    from helpers import ROOT

    r = subprocess.run([sys.executable, "-S", "-m", "tasks.stages.data"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "source .venv/bin/activate" in r.stderr and "torch" in r.stderr


def test_a_failed_measurement_falls_back_to_fp32_and_says_why(tmp_path, monkeypatch):
    from tasks.modeling import hardware
    from tlcore import precision

    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_bf16_kernels", lambda: True)

    def broken(*_):
        raise RuntimeError("oneDNN said no")

    prec, why = hardware.resolve_precision("auto", "smallcnn", 10, 64, "cpu", measure=broken)
    assert prec == "fp32" and "oneDNN said no" in why
    assert not (tmp_path / "precision.json").exists()  # nothing cached: the next run measures again


def test_a_tune_trial_fits_on_one_node():
    """The old rule (the cluster's CPUs / concurrent trials) asked 16 CPUs of two 8-CPU nodes: no node could run
    a trial. A trial is sized to a node, as many as asked fit at once, and with GPUs one per trial."""
    from tasks.modeling.hardware import trial_resources

    two = [{"CPU": 8, "GPU": 0}, {"CPU": 8, "GPU": 0}]
    assert trial_resources(two, 1, False) == {"CPU": 8.0}
    assert trial_resources(two, 2, False) == {"CPU": 8.0}
    assert trial_resources(two, 4, False) == {"CPU": 4.0}
    assert trial_resources([{"CPU": 8}, {"CPU": 2}], 2, False) == {"CPU": 4.0}  # 2 on the big node
    assert trial_resources([{"CPU": 2}], 5, False) == {"CPU": 1.0}  # more trials than CPUs: they queue
    gpus = [{"CPU": 0, "GPU": 0}, {"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 1}]  # a CPU-only head
    assert trial_resources(gpus, 4, True) == {"CPU": 8.0, "GPU": 1.0}  # 3 GPUs: 3 at once, 8 CPUs each
    assert trial_resources(two, 2, True) == {"CPU": 1.0, "GPU": 1.0}  # no GPU node up yet: the autoscaler's turn


OLD_DRIVER = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 11.4.0 (Ubuntu 11.4.0-1ubuntu1~22.04)\n"
)
NEW_OPEN_DRIVER = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:45 UTC 2025\nGCC version:  gcc version 12.2.0 (GCC)\n"
)


@pytest.mark.parametrize(
    "text,cuda,want",
    [
        (OLD_DRIVER, "13.0", "NVIDIA driver 535.104.05 < 580, which the CUDA 13 build of torch 2.14.1 needs"),
        (OLD_DRIVER, "12.8", None),  # 535 runs CUDA 12
        (NEW_OPEN_DRIVER, "13.0", None),
        (NEW_OPEN_DRIVER.replace("580.65.06", "570.86.10"), "13.0", "NVIDIA driver 570.86.10 < 580"),
        (OLD_DRIVER, None, None),  # a CPU build of torch needs no driver
        (None, "13.0", None),  # no NVIDIA driver: nothing to say about it
        ("something else", "13.0", None),
    ],
)
def test_a_driver_too_old_for_the_cuda_build_is_named(text, cuda, want):
    from tasks.modeling.hardware import driver_too_old

    got = driver_too_old(text, "2.14.1+cu130", cuda)
    assert (got is None) if want is None else (want in got and "upgrade the driver (nvidia-smi shows it)" in got)


def test_no_cuda_device_names_an_old_driver_instead(tmp_path):
    """With the pinned torch (a CUDA 13.0 build, requirements.lock)."""
    from tasks.modeling.hardware import no_cuda_message

    version = tmp_path / "version"
    version.write_text(OLD_DRIVER)
    args = (
        "ray.use_gpu = true, but worker 0",
        " (CUDA_VISIBLE_DEVICES=None); run on GPU nodes.",
        "or set ray.use_gpu: false",
    )
    msg = no_cuda_message(*args, driver_file=version)
    assert msg.startswith("ray.use_gpu = true, but worker 0 cannot use the GPU: NVIDIA driver 535.104.05 < 580, ")
    assert msg.endswith("to 580 or newer, or set ray.use_gpu: false.") and "sees no CUDA device" not in msg
    missing = no_cuda_message(*args, driver_file=tmp_path / "absent")  # no NVIDIA driver: the message as it was
    assert (
        missing == "ray.use_gpu = true, but worker 0 sees no CUDA device (CUDA_VISIBLE_DEVICES=None); run on GPU nodes."
    )
    version.write_text(NEW_OPEN_DRIVER)
    assert no_cuda_message(*args, driver_file=version) == missing
