import platform

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlcore import compress as C
from tlcore import models
from tlcore.engine import Loaders, TrainConfig, Trainer


def _model():
    torch.manual_seed(0)
    return models.create("smallcnn", 10).eval()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_hits_the_asked_sparsity_and_leaves_the_original(scope):
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = C.prune_unstructured(m, 0.5, scope=scope)
    assert C.sparsity(p) == pytest.approx(0.5, abs=0.01) and C.sparsity(m) == 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert set(p.state_dict()) == set(m.state_dict())  # masks folded in: loads into a plain model
    if scope == "layer":
        convs = [mod for mod in p.modules() if isinstance(mod, torch.nn.Conv2d)]
        assert all((c.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01) for c in convs)
    with pytest.raises(ValueError, match="scope"):
        C.prune_unstructured(m, 0.5, scope="random")


def test_recovery_training_keeps_pruned_weights_at_zero():
    teacher = _model()
    student = C.prune_unstructured(teacher, 0.6, permanent=False)
    zero_before = {n: (mod.weight == 0).clone() for n, mod in student.named_modules() if hasattr(mod, "weight_mask")}
    strat = C.Distill(teacher)
    net = strat.setup(student, 10)
    x, y = torch.randn(32, 1, 32, 32), torch.arange(32) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=True)
    w0 = student.head.weight_orig.detach().clone()
    Trainer(
        net, strat, TrainConfig(epochs=1, steps_per_epoch=3, lr=1e-2), Loaders(target=loader), device="cpu", log=None
    ).fit()
    assert not torch.equal(w0, student.head.weight_orig)  # it trained
    final = C.make_permanent(student)
    assert not any(hasattr(mod, "weight_mask") for mod in final.modules())
    for n, mod in final.named_modules():
        if n in zero_before:
            assert torch.all(mod.weight[zero_before[n]] == 0), n
    assert C.sparsity(final) >= 0.6 - 0.01
    assert all(p.requires_grad is False for p in strat.teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher was not frozen in place


def test_int8_agrees_with_fp32_and_leaves_the_global_engine_alone():
    m = _model()
    calib = torch.rand(64, 1, 32, 32) * 2 - 1
    engines = torch.backends.quantized.supported_engines
    other = next(
        e for e in ("qnnpack", "x86", "fbgemm") if e in engines and e != C.int8_engine(platform.machine(), engines)
    )
    before = torch.backends.quantized.engine
    q = C.quantize_int8(m, calib)
    assert torch.backends.quantized.engine == before
    x = torch.rand(32, 1, 32, 32) * 2 - 1
    torch.backends.quantized.engine = other  # whatever the process uses later, the model keeps its kernels
    try:
        with torch.no_grad():
            ref, out = m(x), q(x)
    finally:
        torch.backends.quantized.engine = before
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9


def test_distillation_without_target_labels_learns_from_the_teacher_alone():
    teacher = _model()
    student = models.create("tinycnn", 10)
    strat = C.Distill(teacher)
    net = strat.setup(student, 10)
    x = torch.randn(64, 1, 32, 32)
    pool = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=16, shuffle=True, drop_last=True)
    cfg = TrainConfig(epochs=3, steps_per_epoch=4, lr=1e-2, precision="fp32")
    trainer = Trainer(net, strat, cfg, Loaders(unlabeled=pool), device="cpu", log=None)
    assert trainer.streams == ("unlabeled",)  # the given loaders decide; the class keeps its declaration
    hist = trainer.fit()
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]  # the student moves towards the teacher
    assert C.Distill.streams.optional == {"target", "unlabeled"} and "streams" not in vars(strat)
    with pytest.raises(ValueError, match="at least one of the data streams"):
        Trainer(
            C.Distill(teacher).setup(models.create("tinycnn", 10), 10),
            C.Distill(teacher),
            cfg,
            Loaders(),
            device="cpu",
            log=None,
        )


@pytest.mark.parametrize(
    "machine,supported,want",
    [
        ("x86_64", ["qnnpack", "onednn", "x86", "fbgemm"], "x86"),
        ("AMD64", ["fbgemm", "qnnpack"], "fbgemm"),  # an older build without the x86 engine
        ("aarch64", ["qnnpack", "onednn", "x86", "fbgemm"], "qnnpack"),  # Arm servers: x86 kernels do not exist there
        ("arm64", ["qnnpack"], "qnnpack"),
    ],
)
def test_int8_engine_follows_the_cpu_architecture(machine, supported, want):
    assert C.int8_engine(machine, supported) == want


def test_int8_engine_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="riscv64"):
        C.int8_engine("riscv64", ["qnnpack"])
    with pytest.raises(ValueError, match=r"none of the int8 engines for aarch64 \(qnnpack\).*offers x86"):
        C.int8_engine("aarch64", ["x86"])
