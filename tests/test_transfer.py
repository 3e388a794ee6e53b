"""A real, small transfer check: a source model pretrained briefly on synth_digits, fine-tuned
with 1 label per class on optdigits, beats both training from scratch on the same budget and the
source model applied unadapted."""

from tlcore import data, datasets, metrics, models, strategies
from tlcore.engine import Loaders, TrainConfig, Trainer, seed_everything


def test_finetune_beats_scratch_at_one_label_per_class():
    seed_everything(0)
    source, target, test = datasets.digits_task(models.get_spec("smallcnn"), 120, seed=0)
    budget = data.label_budget_split(target.targets.numpy(), 1, seed=0)
    labeled = target.subset(budget.labeled)
    test_loader = data.make_loader(test, 256, train=False)

    src_model = models.create("smallcnn", 10)
    pre = strategies.create_strategy("scratch")
    net = pre.setup(src_model, 10)
    Trainer(
        net,
        pre,
        TrainConfig(epochs=3, lr=3e-3),
        Loaders(target=data.make_loader(source, 64, True)),
        device="cpu",
        log=None,
    ).fit()
    source_state = {k: v.clone() for k, v in src_model.state_dict().items()}
    source_only = metrics.accuracy(net, test_loader)  # the source model on the target, unadapted

    accs = {}
    for name in ("finetune", "scratch"):
        seed_everything(1)
        model = models.create("smallcnn", 10)
        model.load_state_dict(source_state)
        strat = strategies.create_strategy(name)
        net = strat.setup(model, 10, same_label_space=True)
        Trainer(
            net,
            strat,
            TrainConfig(epochs=1, steps_per_epoch=40, lr=3e-3),
            Loaders(target=data.make_loader(labeled, 32, True)),
            device="cpu",
            log=None,
        ).fit()
        accs[name] = metrics.accuracy(net, test_loader)
    print(source_only, accs)
    assert source_only > 0.3, source_only  # the source model carries something over (chance is 0.1)
    assert accs["finetune"] > accs["scratch"] + 0.05, accs
    assert accs["finetune"] > source_only + 0.05, (source_only, accs)  # the label budget was used
