import math

import pytest
import torch

from tlcore import layers, losses


@pytest.mark.parametrize("coeff", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_backward_is_minus_lambda_grad(coeff):
    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    y = layers.grad_reverse(x, coeff)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.allclose(x.grad, -coeff * g)


def test_dann_lambda_schedule():
    assert layers.dann_lambda(0.0) == 0.0
    assert layers.dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert 0.99 < layers.dann_lambda(1.0) < 1.0


def test_joint_loss_weights_target():
    assert losses.joint_loss(torch.tensor(1.0), torch.tensor(2.0), 0.5).item() == pytest.approx(2.0)


def test_domain_adversarial_loss_low_when_separable():
    good = losses.domain_adversarial_loss(torch.full((8, 1), 6.0), torch.full((8, 1), -6.0))
    bad = losses.domain_adversarial_loss(torch.full((8, 1), -6.0), torch.full((8, 1), 6.0))
    assert good < 0.01 < bad


def test_mcc_loss_low_for_confident_diverse_predictions():
    confident = torch.eye(4).repeat(4, 1) * 20
    confused = torch.zeros(16, 4)
    assert losses.mcc_loss(confident) < 0.05 < losses.mcc_loss(confused)


def test_distillation_loss_zero_when_student_matches_teacher():
    t = torch.randn(6, 5)
    assert losses.distillation_loss(t.clone(), t, None).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.distillation_loss(torch.randn(6, 5), t, None) > 0


def test_label_smoothing_raises_loss_on_confident_correct():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    y = torch.tensor([0])
    assert losses.cross_entropy(logits, y, 0.1) > losses.cross_entropy(logits, y)


def test_mcc_loss_computes_in_fp32_under_autocast():
    logits = torch.randn(32, 10, generator=torch.Generator().manual_seed(0)) * 3
    want = losses.mcc_loss(logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.mcc_loss(logits)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
