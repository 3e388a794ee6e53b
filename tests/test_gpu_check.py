"""`make gpu-check` (bench/gpu_check.py) on a machine without a GPU: it refuses, clearly, and what it prints from a
run's reports and output is checked with recorded ones. The run itself needs a GPU (see the README)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_cuda_device_it_refuses_in_one_paragraph_and_checks_nothing():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # no GPU, even on a GPU machine
    r = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    err = r.stderr.strip()
    assert err.startswith("make gpu-check (python -m bench.gpu_check) needs a CUDA GPU, but this process ")
    assert "nothing was checked" in err and "\n" not in err and "Traceback" not in err, err
    assert "sees no CUDA device (CUDA_VISIBLE_DEVICES='')" in err or "cannot use the GPU: NVIDIA driver" in err
    assert r.stdout == ""  # no test ran, no project was copied


OUTPUT = """\
Running stage 'pretrain':
> python -m tasks.stages.pretrain
[pretrain] training on cuda:0, 1 worker(s) x 15 thread(s), precision bf16: GPU compute capability 9.0 (>= 8.0)
pretrain: epoch 2/2 ...
Running stage 'finetune':
[finetune] training on cuda:0, 1 worker(s) x 15 thread(s), precision bf16: GPU compute capability 9.0 (>= 8.0)
"""
EPOCH = {"epoch": 2, "train_loss": 1.2, "lr": 1e-4, "epoch_time_s": 0.5, "train_images_per_s": 2560.4}


def test_the_summary_gives_images_per_s_precision_and_memory_peak():
    reports = {
        "pretrain": {"precision": "bf16", "history": [{**EPOCH, "epoch": 1}, EPOCH]},
        "finetune": {
            "precision": "bf16",
            "history": [{**EPOCH, "epoch": 1, "train_images_per_s": 7680.0, "epoch_time_s": 0.25}],
        },
    }
    lines = gpu_check.summary_lines(reports, OUTPUT, (5432, 3, 81559))
    assert lines == [
        "pretrain: 2560 images/s (epoch 2 of 2, 0.50 s), precision bf16: GPU compute capability 9.0 (>= 8.0)",
        "finetune: 7680 images/s (epoch 1 of 1, 0.25 s), precision bf16: GPU compute capability 9.0 (>= 8.0)",
        "GPU memory peak: 5,432 MiB of 81,559 MiB (nvidia-smi, whole device; 3 MiB in use before the run)",
    ]
    missing = gpu_check.summary_lines({"pretrain": reports["pretrain"]}, "", None)
    assert missing == [
        "pretrain: 2560 images/s (epoch 2 of 2, 0.50 s), precision bf16",  # no stage line: the report's precision
        "finetune: no training epochs recorded",
        "GPU memory peak: not measured (nvidia-smi not found)",
    ]


def test_a_traceback_or_training_on_the_cpu_fails_the_check():
    assert gpu_check.problems(OUTPUT) == []
    on_cpu = OUTPUT.replace("[finetune] training on cuda:0", "[finetune] training on cpu")
    assert gpu_check.problems(on_cpu) == ["finetune did not train on the GPU (no '[finetune] training on cuda' line)"]
    crashed = OUTPUT + "Traceback (most recent call last):\n  File ...\nRuntimeError: CUDA error\n"
    assert gpu_check.problems(crashed) == ["a traceback in the output"]
    assert gpu_check.problems("1 passed, 1 skipped", trained_on_gpu=False) == []


def test_the_run_overrides_are_valid_params():
    from tasks.project.config import load_params

    p = load_params(ROOT / "params.yaml", gpu_check.OVERRIDES)
    assert (p.ray.use_gpu, p.ray.gpus_per_worker, p.pretrain.backbone, p.data.image_size) == (True, 1, "resnet18", 224)
    assert p.pretrain.epochs * p.pretrain.steps_per_epoch <= 20 and p.finetune.epochs * p.finetune.steps_per_epoch <= 20
