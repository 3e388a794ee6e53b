"""Engine behaviour that matters on a GPU, checked on the CPU: host-device syncs, fp16 loss scaling, RNG state."""

from __future__ import annotations

import collections
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlcore import models, strategies
from tlcore.engine import Loaders, TrainConfig, Trainer


def _loader(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, 32, 32, generator=g), torch.arange(16) % 10
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True, generator=g)


def _trainer(strategy="semi", steps=2, **cfg) -> Trainer:
    torch.manual_seed(0)
    strat = strategies.create_strategy(strategy)
    net = strat.setup(models.create("tinycnn", 10), 10)
    loaders = Loaders(target=_loader(1), source=_loader(2), unlabeled=_loader(3))
    cfg = TrainConfig(**{"epochs": 1, "steps_per_epoch": steps, "precision": "fp32", **cfg})
    return Trainer(net, strat, cfg, loaders, device="cpu", log=None)


def _syncs_in_tlcore(monkeypatch) -> list[str]:
    """Every tensor -> Python read (``.item()``, ``bool``, ``float``, ``.tolist()``...) made by tlcore code:
    each one waits for the GPU."""
    seen = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if "/tlcore/" in caller:
                seen.append(f"{_name} in {caller.rsplit('/', 1)[-1]}")
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return seen


@pytest.mark.parametrize("strategy", ["semi", "dann"])
def test_losses_are_read_once_per_epoch_not_per_step(monkeypatch, strategy):
    counts = []
    for steps in (2, 5):
        trainer = _trainer(strategy, steps=steps)
        seen = _syncs_in_tlcore(monkeypatch)
        hist = trainer.fit()
        monkeypatch.undo()
        counts.append(len(seen))
        assert "train_loss_source" in hist[0] and torch.isfinite(torch.tensor(hist[0]["train_loss"]))
    assert counts[0] == counts[1] <= 2, counts  # the same few reads at 2 and at 5 steps


def _host_device_traffic(monkeypatch) -> collections.Counter:
    """Counts, by call site in tlcore (``"Tensor.to in data.py:batch_to"``), of what waits for a GPU or feeds it
    from the host: reads of a tensor into Python (``.item()``, ``.tolist()``, ``float``...), copies off the device
    (``.cpu()``, ``.numpy()``) and tensors made or moved there (``torch.tensor``, ``torch.as_tensor``, ``.to``)."""
    seen: collections.Counter = collections.Counter()
    targets = [(torch.Tensor, n) for n in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "to")]
    for owner, name in [*targets, (torch, "tensor"), (torch, "as_tensor")]:
        orig = getattr(owner, name)
        label = f"{'Tensor' if owner is torch.Tensor else 'torch'}.{name}"

        def wrapped(*a, _orig=orig, _label=label, **kw):
            code = sys._getframe(1).f_code
            if "/tlcore/" in code.co_filename:
                seen[f"{_label} in {code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(owner, name, wrapped)
    return seen


@pytest.mark.parametrize("augment", ["digits", "photo"])
def test_a_training_step_moves_only_its_batches_between_host_and_device(monkeypatch, augment):
    """The real data path (uint8 batches, the train-time augmentation and normalisation on the training device,
    a validation loader): 6 steps and 3 validation batches do no more host-device traffic than 2 steps and 1
    validation batch, except copying the batches themselves. On a GPU any other call here would be a blocking
    copy or a sync per step (e.g. the normalisation constants copied to the device for every batch)."""
    from tlcore import data, transforms
    from tlcore.engine import seed_everything

    def run(steps: int, val_batches: int) -> collections.Counter:
        seed_everything(0)
        g = torch.Generator().manual_seed(5)
        tf = transforms.build_transform(models.get_spec("tinycnn"), train=True, augment=augment)

        def ds(n, transform=tf):
            x = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g)
            return data.ImageDataset(x, torch.arange(n) % 10, [str(i) for i in range(10)], transform)

        val = data.make_loader(
            ds(8 * val_batches, transforms.build_transform(models.get_spec("tinycnn"), False)), 8, False
        )
        loaders = Loaders(*(data.make_loader(ds(64), 8, True, seed=s) for s in (1, 2, 3)), val=val)
        strat = strategies.create_strategy("semi")
        cfg = TrainConfig(epochs=1, steps_per_epoch=steps, precision="fp32")
        trainer = Trainer(strat.setup(models.create("tinycnn", 10), 10), strat, cfg, loaders, device="cpu", log=None)
        seen = _host_device_traffic(monkeypatch)
        trainer.fit()
        monkeypatch.undo()
        assert trainer.history[0]["val_accuracy"] >= 0
        return seen

    few, many = run(2, 1), run(6, 3)
    grows = {site: (few[site], many[site]) for site in few.keys() | many.keys() if many[site] > few[site]}
    batches = 12 + 2  # 4 more steps x 3 training streams, 2 more validation batches
    assert grows == {
        "Tensor.to in data.py:batch_to": (
            few["Tensor.to in data.py:batch_to"],
            few["Tensor.to in data.py:batch_to"] + batches,
        ),
        "Tensor.to in engine.py:_to": (few["Tensor.to in engine.py:_to"], few["Tensor.to in engine.py:_to"] + batches),
        # the batch's indices, on the host, in the loader (a loader process on a GPU machine)
        "torch.as_tensor in data.py:__getitems__": (
            few["torch.as_tensor in data.py:__getitems__"],
            few["torch.as_tensor in data.py:__getitems__"] + batches,
        ),
    }, grows
    reads = [
        k for k in few.keys() | many.keys() if k.split(" ")[0] not in ("Tensor.to", "torch.tensor", "torch.as_tensor")
    ]
    assert {k: few[k] for k in reads} == {k: many[k] for k in reads} and sum(few[k] for k in reads) <= 3, few


def test_non_finite_loss_still_stops_training_with_the_step():
    trainer = _trainer("finetune", steps=3, lr=1e-2)
    orig = trainer.strategy.loss
    calls = []

    def loss(net, batch, progress):
        calls.append(1)
        value, logs = orig(net, batch, progress)
        return (value * float("nan") if len(calls) == 2 else value), logs

    trainer.strategy.loss = loss
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 2 .*lower the learning rate"):
        trainer.fit()


def test_fp16_scales_the_loss_and_clips_unscaled_gradients(monkeypatch):
    trainer = _trainer("finetune", precision="fp16", grad_clip=1.0, lr=1e-3)
    assert trainer.precision == "fp16" and trainer.scaler.is_enabled()
    with trainer._amp():
        assert trainer.net.model.backbone(torch.randn(2, 1, 32, 32)).dtype == torch.float16
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        norms.append(
            float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        )
        return clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    hist = trainer.fit()
    assert norms and max(norms) < 1e3  # the loss scale (65536) is divided out before clipping
    assert torch.isfinite(torch.tensor(hist[0]["train_loss"]))
    state = trainer.state_dict()
    assert state["config"]["precision"] == "fp16" and state["scaler"]["scale"] > 0
    resumed = _trainer("finetune", precision="fp16", grad_clip=1.0)
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale()


def test_checkpoint_keeps_the_cuda_rng_state_where_cuda_exists(monkeypatch):
    trainer = _trainer("finetune")
    assert "cuda_rng" not in trainer.state_dict()  # no CUDA here: nothing to save, nothing breaks
    fake = [torch.arange(8, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: fake)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = trainer.state_dict()
    assert state["cuda_rng"] is fake
    trainer.load_state_dict(state)
    assert restored == [fake]


def test_evaluation_moves_the_model_to_the_evaluation_device(monkeypatch):
    """After Ray training the driver rebuilds the model on the CPU; accuracy on a GPU must move it there
    itself. ``meta`` stands in for the GPU: the stub sees where the model and the device are."""
    from tlcore import engine, metrics

    seen = []

    def fake_predict(model, loader, device=None):
        seen.append((next(model.parameters()).device.type, torch.device(device).type))
        return torch.eye(4), torch.arange(4)

    monkeypatch.setattr(engine, "predict", fake_predict)
    model = models.create("tinycnn", 10)  # on the CPU, as rebuilt from a Ray checkpoint
    assert metrics.accuracy(model, [], "meta") == 1.0
    assert metrics.correct(models.create("tinycnn", 10), [], "meta").tolist() == [True] * 4
    assert seen == [("meta", "meta"), ("meta", "meta")]


class _StopAfter:
    def __init__(self, epochs: int):
        self.epochs, self.state = epochs, None

    def on_epoch_end(self, metrics, trainer):
        if trainer.epoch == self.epochs:
            import io

            buf = io.BytesIO()  # as a checkpoint on disk: serialised, loaded back with weights_only
            torch.save(trainer.state_dict(), buf)
            buf.seek(0)
            self.state = torch.load(buf, weights_only=True)
            raise KeyboardInterrupt("interrupted")


def _resumable_trainer(callbacks=(), loader_workers: int = 0) -> Trainer:
    """The real training data path: uint8 images, the backbone's train-time transform (a random affine per
    image), which the engine applies after the copy, drawing from the training process's generator."""
    from tlcore import data, transforms
    from tlcore.engine import seed_everything

    seed_everything(0)
    g = torch.Generator().manual_seed(5)
    tf = transforms.build_transform(models.get_spec("tinycnn"), train=True)

    def ds(n):
        return data.ImageDataset(
            torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g),
            torch.arange(n) % 10,
            [str(i) for i in range(10)],
            tf,
        )

    # 20, 28 and 36 images in batches of 8: passes end at other steps than epochs do (3 steps per epoch)
    loaders = Loaders(
        *(data.make_loader(ds(n), 8, True, seed=s, num_workers=loader_workers) for n, s in ((20, 1), (28, 2), (36, 3)))
    )  # target, source, unlabeled
    strat = strategies.create_strategy("semi")
    net = strat.setup(models.create("tinycnn", 10), 10)
    cfg = TrainConfig(epochs=4, steps_per_epoch=3, precision="fp32", lr=1e-2)
    return Trainer(net, strat, cfg, loaders, device="cpu", log=None, callbacks=list(callbacks))


def test_an_interrupted_and_resumed_run_gives_the_same_weights_as_an_uninterrupted_one():
    """Also with loader processes: the loaders yield uint8 and see no randomness (they seed themselves), so the
    interrupted and the resumed run, each with 1 loader process per stream, match the uninterrupted one with 0."""
    whole = _resumable_trainer()
    assert next(iter(whole.loaders.target))[0].dtype == torch.uint8  # the warp is not done in the loader
    whole.fit()
    stop = _StopAfter(2)
    with pytest.raises(KeyboardInterrupt):
        _resumable_trainer([stop], loader_workers=1).fit()
    # 6 batches taken: the 4-batch unlabeled stream is mid-pass, the 2-batch target stream at the end of a pass
    assert stop.state["streams"]["unlabeled"] == {"passes": 1, "taken": 2}
    assert stop.state["streams"]["target"] == {"passes": 2, "taken": 2}
    resumed = _resumable_trainer(loader_workers=1)
    assert resumed.loaders.unlabeled.num_workers == 1
    torch.manual_seed(123)  # whatever the new process did before: the checkpoint decides
    resumed.load_state_dict(stop.state)
    resumed.fit()
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"] for h in resumed.history]
    # the check can fail: resuming without the streams' positions (what the engine did before) diverges
    naive = _resumable_trainer()
    naive.load_state_dict({k: v for k, v in stop.state.items() if k != "streams"})
    naive.fit()
    c = naive.net.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_loaders_pin_memory_for_a_gpu_only():
    from tlcore import data

    ds = TensorDataset(torch.zeros(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))
    assert data.make_loader(ds, 8, True, pin_memory=True).pin_memory
    assert not data.make_loader(ds, 8, True).pin_memory
