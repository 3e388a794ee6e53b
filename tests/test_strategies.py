import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlcore import models, strategies
from tlcore.engine import Loaders, TrainConfig, Trainer


def _loader(n=16, labeled=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, generator=g)
    y = torch.arange(n) % 10
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True)


def _loaders():
    return Loaders(target=_loader(seed=1), source=_loader(seed=2), unlabeled=_loader(seed=3))


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before, net):
    return {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}


def _run(name, epochs=1, **hp):
    torch.manual_seed(0)
    model = models.create("smallcnn", 10)
    strat = strategies.create_strategy(name, **hp)
    net = strat.setup(model, 10, same_label_space=True)
    cfg = TrainConfig(epochs=epochs, steps_per_epoch=2, lr=1e-2, weight_decay=0.0, scheduler="constant", grad_clip=None)
    trainer = Trainer(net, strat, cfg, _loaders(), device="cpu", log=None)
    return trainer, net


def test_registry_complete():
    assert set(strategies.list_strategies()) >= {"scratch", "linear_probe", "finetune", "gradual_unfreeze",
                                                 "joint", "dann", "mcc", "semi"}
    with pytest.raises(KeyError, match="finetune"):
        strategies.create_strategy("fine_tune")


@pytest.mark.parametrize("name", ["scratch", "finetune", "joint", "dann", "mcc", "semi"])
def test_full_strategies_train_every_parameter(name):
    trainer, net = _run(name)
    before = _snapshot(net)
    trainer.fit()
    params = {n for n, _ in net.named_parameters()}
    changed = _changed(before, net)
    assert params <= changed, params - changed
    n_trainable = sum(p.numel() for g in trainer.groups for p in g["params"])
    assert n_trainable == sum(p.numel() for p in net.parameters())
    if name == "dann":
        assert any(n.startswith("extras.discriminator") for n in params)
    assert "train_loss_target" in trainer.history[0]  # every one of them uses the labeled target batches


def test_linear_probe_trains_only_head_and_keeps_bn_stats():
    trainer, net = _run("linear_probe")
    before = _snapshot(net)
    trainer.fit()
    changed = _changed(before, net)
    assert changed == {"model.head.weight", "model.head.bias"}
    assert sum(p.numel() for g in trainer.groups for p in g["params"]) == 10 * net.model.out_features + 10


def test_finetune_backbone_lr_multiplier():
    trainer, _ = _run("finetune", backbone_lr_mult=0.1)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"backbone": pytest.approx(1e-3), "head": pytest.approx(1e-2)}


def test_gradual_unfreeze_head_first_then_discriminative():
    trainer, net = _run("gradual_unfreeze", epochs=2, freeze_epochs=1, lr_decay=0.5)
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs[-1] == pytest.approx(1e-2) and all(a < b for a, b in zip(lrs, lrs[1:]))
    trainer.cfg.epochs = 1
    before = _snapshot(net)
    trainer.fit()
    assert _changed(before, net) == {"model.head.weight", "model.head.bias"}
    trainer.cfg.epochs = 2
    before = _snapshot(net)
    trainer.fit()
    assert {n for n, _ in net.named_parameters()} <= _changed(before, net)


def test_joint_separate_heads_when_label_sets_differ():
    model = models.create("smallcnn", 10)
    strat = strategies.create_strategy("joint", lam=0.5)
    net = strat.setup(model, 4, same_label_space=False)
    assert net.extras["source_head"].out_features == 10 and net.model.num_classes == 4
    xs, ys = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    xt, yt = torch.randn(8, 1, 32, 32), torch.randint(0, 4, (8,))
    loss, logs = strat.loss(net, strategies.Batch(source=(xs, ys), target=(xt, yt)), 0.0)
    assert loss.item() == pytest.approx(float(logs["loss_source"]) + 0.5 * float(logs["loss_target"]), rel=1e-5)


def test_adaptation_strategies_refuse_different_label_sets():
    with pytest.raises(ValueError, match="share one label set"):
        strategies.create_strategy("dann").setup(models.create("smallcnn", 10), 4, same_label_space=False)


def test_unsupervised_strategies_run_without_labeled_target():
    torch.manual_seed(0)
    strat = strategies.create_strategy("semi")
    net = strat.setup(models.create("smallcnn", 10), 10)
    ld = _loaders()
    ld.target = None
    hist = Trainer(net, strat, TrainConfig(epochs=1, steps_per_epoch=2), ld, device="cpu", log=None).fit()
    assert "train_loss_target" not in hist[0] and "train_loss_mcc" in hist[0]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_and_channels_last(precision):
    from tlcore.engine import resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    torch.manual_seed(0)
    strat = strategies.create_strategy("dann")
    net = strat.setup(models.create("smallcnn", 10), 10)
    cfg = TrainConfig(epochs=1, steps_per_epoch=2, precision=precision, channels_last=True)
    trainer = Trainer(net, strat, cfg, _loaders(), device="cpu", log=None)
    assert trainer.precision == precision
    out = net(torch.randn(4, 1, 32, 32), domain_coeff=1.0)
    # the losses always see fp32, whatever the autocast dtype inside the network
    assert {v.dtype for v in out.values()} == {torch.float32}
    with trainer._amp():
        inner = net.model.backbone(torch.randn(4, 1, 32, 32))
    assert inner.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    seen = []

    class Layout:
        def on_epoch_end(self, metrics, state):
            w = net.model.backbone[0][0].weight
            seen.append((w.dtype, w.is_contiguous(memory_format=torch.channels_last)))

    trainer.callbacks.append(Layout())
    before = _snapshot(net)
    hist = trainer.fit()
    assert torch.isfinite(torch.tensor(hist[0]["train_loss"])) and _changed(before, net)
    assert seen == [(torch.float32, True)]  # fp32 master weights, NHWC while training
    assert net.model.backbone[0][0].weight.is_contiguous()  # the usual layout once fit() returns
