"""Transferability scores on features and source predictions whose right ordering is known."""

from __future__ import annotations

import numpy as np
import pytest

from tlcore import transferability as T

K = 5


def _labels(n, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(n) % K)


def _logme_reference(f, y):
    """Algorithm 1 of You et al. (2021) as printed: eigendecomposition of the D x D matrix F^T F."""
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0, None)
    out = []
    for c in range(K):
        yc = (y == c).astype(float)
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            gamma = (s / (s + alpha / beta)).sum()
            m = v @ ((v.T @ (f.T @ yc)) * beta / (alpha + beta * s))
            alpha_de, beta_de = m @ m, ((yc - f @ m) ** 2).sum()
            lam = alpha / beta
            alpha, beta = gamma / alpha_de, (n - gamma) / beta_de
            if abs(alpha / beta - lam) / lam < 0.01:
                break
        out.append(
            (
                d / 2 * np.log(alpha)
                + n / 2 * np.log(beta)
                - 0.5 * np.log(alpha + beta * s).sum()
                - beta / 2 * beta_de
                - alpha / 2 * alpha_de
                - n / 2 * np.log(2 * np.pi)
            )
            / n
        )
    return np.mean(out)


@pytest.mark.parametrize("n,d", [(200, 16), (30, 64)])  # more samples than dimensions, and fewer
def test_logme_matches_the_papers_algorithm(n, d):
    rng = np.random.default_rng(1)
    y = _labels(n)
    f = rng.normal(size=(n, d)) + np.eye(K, d)[y] * 2
    assert T.logme(f, y) == pytest.approx(_logme_reference(f, y), rel=1e-6)


def test_logme_ranks_predictive_features_above_random_ones():
    rng = np.random.default_rng(0)
    y = _labels(100)
    perfect = np.eye(K, 32)[y] * 3 + rng.normal(scale=0.1, size=(100, 32))
    partial = np.eye(K, 32)[y] * 3 * (rng.random(100) < 0.5)[:, None] + rng.normal(scale=0.1, size=(100, 32))
    random = rng.normal(size=(100, 32))
    assert T.logme(perfect, y) > T.logme(partial, y) > T.logme(random, y)


def test_leep_and_nce_reward_a_source_classifier_that_predicts_the_target():
    rng = np.random.default_rng(0)
    y = _labels(200)
    z = (y * 3 + 1) % 7  # a relabelling into 7 source classes: perfectly informative
    informative = np.eye(7)[z] * 0.9 + 0.1 / 7
    noisy = np.where(rng.random(200)[:, None] < 0.5, informative, np.eye(7)[rng.integers(0, 7, 200)])
    uninformative = rng.dirichlet(np.ones(7), 200)
    for fn in (T.leep, T.nce):
        assert fn(informative, y) > fn(noisy, y) > fn(uninformative, y), fn.__name__
    assert T.nce(informative, y) == pytest.approx(0.0, abs=1e-12)
    assert T.nce(np.ones((200, 7)) / 7, y) == pytest.approx(-np.log(K), abs=1e-9)  # H(Y) of balanced labels
    assert T.leep(np.ones((200, 7)) / 7, y) == pytest.approx(-np.log(K), abs=1e-9)
    assert T.scores(informative, y) == {"logme": pytest.approx(T.logme(informative, y)), "leep": None, "nce": None}
