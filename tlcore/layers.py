"""Small layers used by domain-adaptation strategies."""

from __future__ import annotations

import math

import torch
from torch import nn


class GradientReverseFunction(torch.autograd.Function):
    """Identity forward, ``-coeff * grad`` backward (Ganin & Lempitsky, ICML 2015; Ganin et al., JMLR 2016)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Apply the gradient-reversal layer to ``x`` (any shape)."""
    return GradientReverseFunction.apply(x, coeff)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's schedule ``2 / (1 + exp(-gamma * p)) - 1`` for training progress ``p`` in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class DomainDiscriminator(nn.Sequential):
    """MLP mapping features ``(N, in_features)`` to one domain logit ``(N, 1)`` (source = 1)."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )
