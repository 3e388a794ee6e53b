"""Transferability scores: rank candidate source models on a few labeled target images, before training.

All three are higher-is-better, computed from one forward pass of each candidate (no fine-tuning):

- :func:`logme` needs only penultimate features, so it scores any backbone (with or without a head);
- :func:`leep` and :func:`nce` need the candidate's own classifier output over its *source* classes.

Shapes: ``features`` ``(N, D)``, ``source_probs`` ``(N, Z)`` softmax over source classes, ``labels``
``(N,)`` target class indices.
"""

from __future__ import annotations

import numpy as np


def _evidence(
    s: np.ndarray,
    vtfy: np.ndarray,
    y: np.ndarray,
    f: np.ndarray,
    v: np.ndarray,
    n: int,
    d: int,
    max_iter: int = 11,
    tol: float = 1e-2,
) -> float:
    """Maximised log evidence / N of Bayesian linear regression ``y ~ N(f m, 1/beta)``, ``m ~ N(0, 1/alpha)``."""
    alpha, beta = 1.0, 1.0
    lam = alpha / beta
    for _ in range(max_iter):
        gamma = (s / (s + lam)).sum()  # effective number of well-determined parameters
        m = v @ (vtfy * beta / (alpha + beta * s))  # posterior mean
        alpha_de = m @ m
        res = y - f @ m
        beta_de = res @ res
        alpha = gamma / max(alpha_de, 1e-300)
        beta = (n - gamma) / max(beta_de, 1e-300)
        new_lam = alpha / beta
        done = abs(new_lam - lam) / lam < tol
        lam = new_lam
        if done:
            break
    # eigenvalues beyond rank(F) are 0: their log(alpha + beta * 0) terms are (d - r) log(alpha)
    return float(
        (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.log(alpha + beta * s).sum()
            - (d - len(s)) / 2 * np.log(alpha)
            - beta / 2 * beta_de
            - alpha / 2 * alpha_de
            - n / 2 * np.log(2 * np.pi)
        )
        / n
    )


def logme(features, labels, num_classes: int | None = None) -> float:
    """LogME: the mean over classes of the maximised log marginal likelihood (evidence) per sample of a
    Bayesian linear model from ``features`` to the one-hot label.

    You, Liu, Wang & Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021,
    Algorithm 1: for each class ``k`` a fixed-point iteration ``gamma = sum_i s_i / (s_i + alpha / beta)``,
    ``alpha = gamma / m^T m``, ``beta = (N - gamma) / ||F m - y_k||^2`` over the eigenvalues ``s_i`` of
    ``F^T F``, then the evidence at the fixed point. One SVD of ``F`` serves every class (its squared
    singular values are those eigenvalues, so ``N < D`` costs no more than ``N > D``). Features are used
    as given (the paper does not standardise them).
    """
    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    _, sv, vt = np.linalg.svd(f, full_matrices=False)
    s, v = sv**2, vt.T
    k = int(num_classes if num_classes is not None else y.max() + 1)
    ev = []
    for c in range(k):
        yc = (y == c).astype(np.float64)
        ev.append(_evidence(s, v.T @ (f.T @ yc), yc, f, v, n, d))
    return float(np.mean(ev))


def _joint(source_probs, labels, num_classes: int | None):
    p = np.asarray(source_probs, np.float64)
    y = np.asarray(labels)
    k = int(num_classes if num_classes is not None else y.max() + 1)
    onehot = np.eye(k)[y]
    return p, y, onehot.T @ p / len(y)  # P(y, z): (K, Z)


def leep(source_probs, labels, num_classes: int | None = None) -> float:
    """LEEP: log expected empirical prediction, ``mean_i log sum_z P(y_i | z) theta(x_i)_z`` (<= 0).

    Nguyen, Hassner, Seeger & Archambeau, "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations", ICML 2020. ``theta(x)`` is the source model's softmax over its source classes ``z``;
    ``P(y | z)`` the empirical conditional from the joint ``P(y, z) = mean_i theta(x_i)_z [y_i = y]``.
    """
    p, y, joint = _joint(source_probs, labels, num_classes)
    cond = joint / np.clip(joint.sum(0, keepdims=True), 1e-12, None)  # P(y | z)
    eep = (p @ cond.T)[np.arange(len(y)), y]
    return float(np.log(np.clip(eep, 1e-12, None)).mean())


def nce(source_probs, labels, num_classes: int | None = None) -> float:
    """NCE: negative conditional entropy ``-H(Y | Z)`` of target labels given the source model's hard
    predictions ``Z = argmax theta(x)`` (<= 0).

    Tran, Nguyen & Hassner, "Transferability and Hardness of Supervised Classification Tasks", ICCV 2019.
    """
    p, y, _ = _joint(source_probs, labels, num_classes)
    z = p.argmax(1)
    k = int(num_classes if num_classes is not None else y.max() + 1)
    joint = np.zeros((k, p.shape[1]))
    np.add.at(joint, (y, z), 1.0 / len(y))
    pz = joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / np.broadcast_to(pz, joint.shape)[nz])).sum())


def scores(features, labels, source_probs=None, num_classes: int | None = None) -> dict[str, float | None]:
    """``{"logme", "leep", "nce"}`` of one candidate; LEEP and NCE are ``None`` without ``source_probs``
    (a backbone with no source classifier)."""
    out = {"logme": logme(features, labels, num_classes), "leep": None, "nce": None}
    if source_probs is not None:
        out["leep"] = leep(source_probs, labels, num_classes)
        out["nce"] = nce(source_probs, labels, num_classes)
    return out
