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
    assert set(strategies.list_strategies()) >= {
        "scratch",
        "linear_probe",
        "finetune",
        "gradual_unfreeze",
        "joint",
        "dann",
        "mcc",
        "semi",
    }
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
    from tlcore.precision import precision_for_device

    assert precision_for_device("fp32", "cpu") == "fp32" and precision_for_device("bf16", "cpu") == "bf16"
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


@pytest.mark.parametrize(
    "bf16,amx,speedup,want",
    [
        (False, False, None, "fp32"),
        (False, True, 2.0, "fp32"),  # no bf16 kernels: never bf16
        (True, True, None, "bf16"),
        (True, False, None, "fp32"),  # unmeasured: bf16 only with AMX
        (True, False, 1.5, "bf16"),
        (True, True, 0.9, "fp32"),  # a measurement decides
    ],
)
def test_auto_precision_on_cpu_follows_the_cpu_features(monkeypatch, bf16, amx, speedup, want):
    from tlcore import precision

    monkeypatch.setattr(precision, "cpu_bf16_kernels", lambda: bf16)
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)
    assert precision.precision_for_device("auto", "cpu", bf16_speedup=speedup) == want


# --------------------------------------------------------------------------- the stream contract
def test_streams_declaration_is_validated():
    with pytest.raises(ValueError, match="unknown data streams"):
        strategies.Streams(required={"labels"})
    with pytest.raises(ValueError, match="both required and optional"):
        strategies.Streams(required={"target"}, optional={"target"})
    with pytest.raises(ValueError, match="at least one"):
        strategies.Streams(required=set())
    s = strategies.Streams(required=["source"], optional=["unlabeled"])
    assert s.required == {"source"} and isinstance(s.required, frozenset) and s.used == {"source", "unlabeled"}


def test_streams_check_names_what_is_missing_and_keeps_the_engine_order():
    s = strategies.Streams(required={"unlabeled", "source"}, optional={"target"})
    assert s.check(["unlabeled", "target", "source"]) == ("source", "target", "unlabeled")
    assert s.check({"unlabeled", "source"}) == ("source", "unlabeled")
    with pytest.raises(strategies.StreamsError, match=r"'x' needs data streams \['source', 'unlabeled'\]") as e:
        s.check({"target", "unlabeled"}, "'x'")
    assert e.value.missing == ("source",)
    either = strategies.Streams(required=set(), optional={"target", "unlabeled"})
    assert either.check({"target", "source"}) == ("target",)  # a stream it does not use is left out
    with pytest.raises(strategies.StreamsError, match="at least one of"):
        either.check({"source"})


@pytest.mark.parametrize("name", strategies.list_strategies())
def test_every_strategy_trains_on_exactly_its_declared_streams(name):
    """The engine, the stages' budget checks and the job builder all follow the one declaration."""
    from tasks.modeling.train import job_streams
    from tasks.project.config import needs_target_labels

    cls = strategies.strategy_class(name)
    net = cls().setup(models.create("tinycnn", 10), 10)
    cfg = TrainConfig(epochs=1, steps_per_epoch=1)
    trainer = Trainer(net, cls(), cfg, _loaders(), device="cpu", log=None)
    assert trainer.streams == tuple(s for s in strategies.STREAMS if s in cls.streams.used)
    no_labels = _loaders()
    no_labels.target = None
    needs = "target" in cls.streams.required
    assert needs_target_labels(name) == needs
    if needs:
        with pytest.raises(strategies.StreamsError, match="missing: \\['target'\\]"):
            Trainer(net, cls(), cfg, no_labels, device="cpu", log=None)
    else:
        assert "target" not in Trainer(net, cls(), cfg, no_labels, device="cpu", log=None).streams
    picked = job_streams(cls, source="S", labeled="L", unlabeled="U")
    assert {k for k, v in picked.items() if v} == {{"target": "labeled"}.get(s, s) for s in cls.streams.used}


class _AuxNet(strategies.TransferNet):
    def extra_outputs(self, features, aux: bool = False):
        return {"aux": self.extras["aux"](features)} if aux else {}


class _Aux(strategies.Strategy):
    """A new method written in one place: its streams, its net (one forward) and its loss."""

    name = "aux_test"
    streams = strategies.Streams(required={"unlabeled"})
    net_type = _AuxNet

    def extras(self, model):
        return {"aux": torch.nn.Linear(model.out_features, 4)}

    def loss(self, net, batch, progress):
        out = net(batch.unlabeled, aux=True)
        loss = out["aux"].square().mean() + out["logits"].square().mean()
        return loss, {"loss_aux": loss.detach()}


def test_a_new_strategy_brings_its_own_forward_and_streams():
    torch.manual_seed(0)
    strat = _Aux()
    net = strat.setup(models.create("tinycnn", 10), 10)
    assert type(net) is _AuxNet and set(net(torch.randn(2, 1, 32, 32))) == {"features", "logits"}
    trainer = Trainer(net, strat, TrainConfig(epochs=1, steps_per_epoch=2), _loaders(), device="cpu", log=None)
    assert trainer.streams == ("unlabeled",)
    before = _snapshot(net)
    hist = trainer.fit()
    assert "train_loss_aux" in hist[0] and {"extras.aux.weight", "model.head.weight"} <= _changed(before, net)


def test_model_state_comes_out_of_a_trained_net_without_the_strategy_extras():
    """What the Ray adapter does with a worker's checkpoint: the model's weights, head size read from them."""
    net = strategies.create_strategy("dann").setup(models.create("tinycnn", 7), 7)
    state = strategies.TransferNet.model_state(net.state_dict())
    assert not any(k.startswith(("extras.", "model.")) for k in state)
    model = models.from_state("tinycnn", state)
    assert model.num_classes == 7
    x = torch.randn(2, 1, 32, 32)
    net.eval(), model.eval()
    assert torch.equal(model(x), net(x)["logits"])
    with pytest.raises(ValueError, match="do not fit a smallcnn"):
        models.from_state("smallcnn", state)
