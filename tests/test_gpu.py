"""GPU smoke tests: run them on a machine with CUDA (``pytest -m gpu``, or ``make gpu-check``, which also runs the
pipeline on the GPU; the second test needs 2 GPUs).

Not part of the default run (``addopts = -m "not gpu"``). On a machine without a CUDA device they fail and say
why (a driver too old for this torch build included): asked for, they must not pass by skipping. On a machine
with a GPU, fewer than a test needs is a skip that says how many it found (the 2-GPU test on a 1-GPU machine).
What they cover runs on the CPU elsewhere (gloo ranks, monkeypatched capabilities); here the same paths meet
real CUDA: autocast in the GPU's precision, GradScaler, NCCL with SyncBatchNorm, one GPU per Ray worker, and a
resume from a checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.modeling.train import TrainJob, build_trainer
from tasks.project.config import Params
from tlcore.precision import choose_precision

pytestmark = pytest.mark.gpu
MANIFEST = {"source": {"splits": {}}, "target": {"splits": {}}}


def _need_gpus(n: int) -> None:
    """Fail without any CUDA device, skip with fewer than ``n``."""
    from tasks.modeling.hardware import no_cuda_message

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        pytest.fail(
            no_cuda_message(
                "this GPU smoke test (pytest -m gpu)",
                "; run it on a GPU machine (make test is the check without one).",
                "or run make test instead",
            ),
            pytrace=False,
        )
    if found < n:
        pytest.skip(f"needs {n} CUDA devices, this machine has {found}")


def _digits():
    from tlcore import data, datasets, models, transforms

    x, y = datasets.render_synth_digits(16, seed=0)
    return data.ImageDataset.from_numpy(
        x, y, datasets.CLASSES, transforms.build_transform(models.get_spec("smallcnn"), True)
    )


def _params(tmp_path, workers: int, epochs: int, **optim) -> Params:
    ray = {
        "num_workers": workers,
        "use_gpu": True,
        "gpus_per_worker": 1,
        "storage_path": str(tmp_path / "ray"),
        "max_failures": 1,
    }
    return Params.model_validate(
        {
            "base": {"seed": 0},
            "ray": ray,
            "finetune": {"epochs": epochs, "steps_per_epoch": 3, "batch_size": 32, "lr": 3e-3, **optim},
        }
    )


def _expected_auto() -> str:
    return choose_precision("cuda", cuda_capability=torch.cuda.get_device_capability(0))[0]


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_one_gpu_trains_in_its_precision_and_resumes(tmp_path, precision):
    _need_gpus(1)
    ds = _digits()
    params = _params(tmp_path, 0, 2, precision=precision)
    job = TrainJob(
        arch="smallcnn",
        num_classes=10,
        strategy="semi",
        optim=params.finetune,
        seed=0,
        source=ds,
        labeled=ds,
        unlabeled=ds,
        val=ds.subset(np.arange(40)),
    )
    want = _expected_auto() if precision == "auto" else "fp16"
    first = build_trainer(job, torch.device("cuda"), log=None)
    assert first.precision == want and first.scaler.is_enabled() == (want == "fp16")
    first.cfg.epochs = 1
    first.fit()
    state = first.state_dict()
    assert "cuda_rng" in state and ("scaler" in state) == (want == "fp16")
    resumed = build_trainer(job, torch.device("cuda"), log=None)
    resumed.load_state_dict(state)
    history = resumed.fit()
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in history)
    assert next(resumed.net.parameters()).dtype == torch.float32  # fp32 master weights


def test_two_gpu_workers_nccl_sync_batchnorm_and_resume(tmp_path):
    import ray
    from faults import Fault, inject

    from tasks.modeling.ray_train import run_job_ray

    _need_gpus(2)
    marker = tmp_path / "fault-fired"
    params = _params(tmp_path, 2, 3)
    job = TrainJob(
        arch="smallcnn",
        num_classes=10,
        strategy="gradual_unfreeze",
        optim=params.finetune,
        seed=0,
        strategy_params={"freeze_epochs": 1},
        labeled=_digits(),
        val=_digits().subset(np.arange(50)),
    )
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        model, history, info = run_job_ray(
            job, params, "gpu-smoke", MANIFEST, callbacks=[inject(Fault(str(marker), epoch=2, step=1, rank=1))]
        )
    finally:
        ray.shutdown()
    assert marker.exists()  # rank 1 died once in epoch 2 and the group resumed from the epoch-1 checkpoint
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert info["precision"] == _expected_auto() and info["workers"] == 2
    assert all(math.isfinite(h["train_loss"]) and 0 <= h["val_accuracy"] <= 1 for h in history)
    assert history[-1]["train_images_per_s"] * history[-1]["epoch_time_s"] == pytest.approx(2 * 3 * 16, rel=1e-6)
    assert model.num_classes == 10
