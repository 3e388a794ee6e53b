"""Data-parallel training without Ray or a GPU: 2 ranks over torch.distributed (gloo) in 2 processes.

One short run (tinycnn, gradual_unfreeze, 2 epochs x 2 steps) is shared by the tests that read it:
replicas stay identical after the unfreeze, validation covers the whole set, metrics are global.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD, STEPS, BATCH, N_VAL = 2, 2, 8, 11


def _datasets():
    from tlcore import data, models, transforms

    rng = np.random.default_rng(0)
    spec = models.get_spec("tinycnn")
    x = rng.integers(0, 256, size=(40 + N_VAL, 32, 32), dtype=np.uint8)
    y = np.arange(len(x)) % 10
    ds = data.ImageDataset.from_numpy(x, y, [str(i) for i in range(10)])
    train, val = ds.subset(np.arange(40)), ds.subset(np.arange(40, 40 + N_VAL))
    train.transform, val.transform = transforms.build_transform(spec, True), transforms.build_transform(spec, False)
    return train, val


def _job(train, val, **optim):
    from tasks.modeling.train import TrainJob
    from tasks.project.config import Optim

    o = Optim(epochs=2, steps_per_epoch=STEPS, batch_size=BATCH, lr=3e-2, precision="fp32", **optim)
    return TrainJob(
        arch="tinycnn",
        num_classes=10,
        strategy="gradual_unfreeze",
        optim=o,
        seed=0,
        strategy_params={"freeze_epochs": 1},
        labeled=train,
        val=val,
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tasks.modeling.train import build_trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        trainer = build_trainer(_job(*_datasets()), "cpu", wrap=DDP, replicas=WORLD, rank=rank, log=None)
        history = trainer.fit()
        backbone = [float(p.double().sum()) for p in trainer.net.model.backbone.parameters()]
        out = {"history": history, "backbone": backbone, "wrapped": type(trainer.model).__name__}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
        if rank == 0:
            torch.save(trainer.net.state_dict(), Path(out_dir) / "net.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(d / "pg"), str(d)), nprocs=WORLD, start_method="fork", join=True)
    return d, [json.loads((d / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_gradual_unfreeze_keeps_replicas_identical_after_the_unfreeze(two_ranks):
    from tlcore import models
    from tlcore.engine import seed_everything

    _, ranks = two_ranks
    assert all(r["wrapped"] == "DistributedDataParallel" for r in ranks)
    seed_everything(0)
    initial = [float(p.detach().double().sum()) for p in models.create("tinycnn", 10).backbone.parameters()]
    assert ranks[0]["backbone"] != pytest.approx(initial, rel=1e-6)  # the backbone trained in epoch 2
    assert ranks[0]["backbone"] == pytest.approx(ranks[1]["backbone"], rel=0, abs=1e-9)  # and is one model


def test_validation_covers_the_whole_set_and_metrics_are_global(two_ranks):
    from tlcore import models

    d, ranks = two_ranks
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    for key in ("train_loss", "val_loss", "val_accuracy"):  # one answer for the group, not rank 0's share
        assert [h[key] for h in h0] == pytest.approx([h[key] for h in h1], rel=1e-6)
    # the reported validation numbers are those of rank 0's (the saved) weights over all N_VAL images
    from tlcore.strategies import TransferNet

    net = TransferNet(models.create("tinycnn", 10))
    net.load_state_dict(torch.load(d / "net.pt", weights_only=True))
    net.eval()
    _, val = _datasets()
    x, y = val.transform(val.images), val.targets
    with torch.no_grad():
        logits = net(x)["logits"]
    assert h0[-1]["val_accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-12)
    assert h0[-1]["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    # throughput counts every rank's images: WORLD x STEPS x BATCH per epoch
    assert h0[-1]["train_images_per_s"] * h0[-1]["epoch_time_s"] == pytest.approx(WORLD * STEPS * BATCH, rel=1e-6)


def test_each_rank_augments_with_its_own_seed_and_shards_with_the_run_seed():
    from tasks.modeling.train import build_trainer

    train, val = _datasets()
    draws, states = [], []
    for rank in range(WORLD):
        t = build_trainer(_job(train, val), "cpu", replicas=WORLD, rank=rank, log=None)
        sampler = t.loaders.target.sampler
        assert (sampler.seed, sampler.rank, sampler.num_replicas) == (0, rank, WORLD)
        assert len(t.loaders.val.dataset) == len(range(rank, N_VAL, WORLD))  # disjoint slices, no padding
        states.append(t.net.state_dict())
        draws.append(torch.rand(4))  # the stream the augmentation draws from
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # one initial model
    assert not torch.equal(draws[0], draws[1])  # seed + rank: the ranks warp their images differently
    single = build_trainer(_job(train, val), "cpu", log=None)
    s1 = single.loaders.target.sampler  # one process: the same resumable sampler, the whole set
    assert (s1.__class__.__name__, s1.num_replicas, s1.num_samples) == ("ResumableSampler", 1, len(train))


def test_sync_batchnorm_on_cuda_with_several_workers_only():
    from tasks.modeling.ray_train import use_sync_batchnorm
    from tasks.modeling.train import build_trainer

    assert use_sync_batchnorm("cuda", 2) and not use_sync_batchnorm("cuda", 1) and not use_sync_batchnorm("cpu", 4)
    train, val = _datasets()
    t = build_trainer(_job(train, val), "cpu", sync_batchnorm=True, log=None)
    kinds = {type(m).__name__ for m in t.net.modules() if "BatchNorm" in type(m).__name__}
    assert kinds == {"SyncBatchNorm"}
    params = {id(p) for p in t.net.parameters()}
    assert params == {id(p) for g in t.optimizer.param_groups for p in g["params"]}  # the optimiser trains them


def _mcc_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tlcore import losses

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 6)  # the same fixed batch on every rank; rank 0 holds 5 rows, rank 1 the other 3
        head = torch.nn.Linear(6, 4)
        mine = x[:5] if rank == 0 else x[5:]
        model = DDP(head)
        loss = losses.mcc_loss(losses.global_batch(model(mine)))
        loss.backward()
        out = {"loss": float(loss), "grad": head.weight.grad.flatten().tolist()}
        (Path(out_dir) / f"mcc{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_mcc_is_the_same_objective_at_any_worker_count(tmp_path):
    """MCC's class-confusion matrix is a statistic of the batch: two ranks holding parts of one batch (5 and 3
    rows) compute the one-process loss on the whole batch, and after DDP the gradient is the one-process gradient."""
    import torch.multiprocessing as mp

    from tlcore import losses

    mp.start_processes(_mcc_rank, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [json.loads((tmp_path / f"mcc{r}.json").read_text()) for r in range(WORLD)]
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    head = torch.nn.Linear(6, 4)
    one = losses.mcc_loss(head(x))
    one.backward()
    local = float(losses.mcc_loss(head(x[:5])))  # what rank 0 computed before: its own slice
    for r in ranks:
        assert r["loss"] == pytest.approx(float(one), abs=1e-6) and abs(local - float(one)) > 1e-3
        assert np.allclose(r["grad"], head.weight.grad.flatten().numpy(), atol=1e-6)


class _SaveAfterFirstEpoch:
    def __init__(self, path: Path):
        self.path = path

    def on_epoch_end(self, metrics: dict, state) -> None:
        if metrics["epoch"] == 1:
            torch.save(state.state_dict(), self.path)


def _resume_rank(rank: int, init_file: str, out_dir: str, resume: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tasks.modeling.train import build_trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ckpt = Path(out_dir) / "epoch1.pt"
        saver = [_SaveAfterFirstEpoch(ckpt)] if rank == 0 and not resume else []
        trainer = build_trainer(
            _job(*_datasets()), "cpu", wrap=DDP, replicas=WORLD, rank=rank, log=None, callbacks=saver
        )
        if resume:  # a new group of processes, as after a kill: every rank from rank 0's checkpoint
            trainer.load_state_dict(torch.load(ckpt, weights_only=True))
        trainer.fit()
        torch.save(trainer.net.state_dict(), Path(out_dir) / f"{'resumed' if resume else 'straight'}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_resume_exactly(tmp_path):
    """2 ranks, each with its own augmentation draws: stopped after epoch 1 and resumed in new processes, they end
    with the weights of the run that never stopped, bit for bit (the checkpoint holds every rank's generators)."""
    import torch.multiprocessing as mp

    for resume in (False, True):
        args = (str(tmp_path / f"pg{resume}"), str(tmp_path), resume)
        mp.start_processes(_resume_rank, args=args, nprocs=WORLD, start_method="fork")
    assert len(torch.load(tmp_path / "epoch1.pt", weights_only=True)["rank_rngs"]) == WORLD
    for rank in range(WORLD):
        a = torch.load(tmp_path / f"straight{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / f"resumed{rank}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), rank
