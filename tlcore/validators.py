"""Label-free validators: scores of a trained model on the *unlabeled* target pool.

Unsupervised domain adaptation has no target labels to choose a method, a learning rate or a checkpoint
with; these scores stand in for target accuracy. Each is a pure function of logits / features (DEV also
of labeled source data) and each states which direction is better (:data:`HIGHER_IS_BETTER`). None is
reliable everywhere: the literature reports negative rank correlation with accuracy for each of them on
some task (Musgrave et al., "Benchmarking Validation Methods for Unsupervised Domain Adaptation", 2022).

Shapes: ``logits`` ``(N, C)``, ``features`` ``(N, D)``, ``labels`` ``(N,)`` integer class indices.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_to

# True: a larger score predicts a more accurate model; False: a smaller one does
HIGHER_IS_BETTER = {"entropy": False, "im": True, "snd": True, "bnm": True, "dev": False}


# The 0-label adaptation check (:func:`agreement`): the adapted model and a witness adapted by another family of
# method (DANN, a domain discriminator, beside MCC/semi's batch statistics) from the same source model. Below
# this they disagree on most of the target pool: "probably failed". Fixed in advance ("most" = half), not fitted;
# bench/failure_signal.py measures how it separates runs that worked from runs that did not.
WITNESS = "dann"
AGREEMENT_FAILED_BELOW = 0.5


def agreement(logits_a, logits_b) -> float:
    """The fraction of images on which two models predict the same class (``(N, C)`` logits of the same images).

    Two adaptations of different kinds that both worked agree on most target images (both are mostly right);
    when adaptation failed, each finds its own confident, class-balanced but wrong grouping of the pool, and they
    agree little (accuracy and agreement between models under a shift go together: Baek et al., "Agreement-on-the-
    line", NeurIPS 2022). A label-free score such as IM cannot see that: it rates a confident, diverse, wrong
    model well."""
    a, b = torch.as_tensor(logits_a).argmax(1), torch.as_tensor(logits_b).argmax(1)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"agreement needs logits of the same images; got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a == b).double().mean())


def _probs(logits) -> torch.Tensor:
    return torch.as_tensor(logits).double().softmax(1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def entropy(logits) -> float:
    """Mean Shannon entropy of the predictions (nats); **lower is better** (confident predictions).

    Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization", NeurIPS 2004; used as a
    validator by Morerio et al., "Minimal-Entropy Correlation Alignment for Unsupervised Deep Domain
    Adaptation", ICLR 2018. Blind to collapse: a model predicting one class for everything scores best.
    """
    return float(_entropy(_probs(logits)).mean())


def information_maximization(logits) -> float:
    """Mutual information between inputs and predictions, ``H(mean p) - mean H(p)``; **higher is better**.

    Confident (low conditional entropy) *and* diverse (high marginal entropy) predictions. Gomes, Krause &
    Perona, "Discriminative Clustering by Regularized Information Maximization", NeurIPS 2010; the IM loss
    of Liang et al., "Do We Really Need to Access the Source Data? (SHOT)", ICML 2020. Range ``[0, log C]``.
    """
    p = _probs(logits)
    return float(_entropy(p.mean(0)) - _entropy(p).mean())


def snd(logits, temperature: float = 0.05) -> float:
    """Soft neighbourhood density; **higher is better**.

    Saito, Kim, Teterwak, Sclaroff, Darrell & Saenko, "Tune it the Right Way: Unsupervised Validation of
    Domain Adaptation via Soft Neighborhood Density", ICCV 2021: L2-normalised softmax outputs, pairwise
    cosine similarities (self excluded) scaled by ``1 / temperature`` and softmax-normalised per row; the
    score is the mean entropy of those neighbour distributions. High when each point has many close
    neighbours (dense, consistent clusters), low when predictions scatter.
    """
    z = F.normalize(_probs(logits), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    return float(_entropy(sim.softmax(1)).mean())


def bnm(logits) -> float:
    """Batch nuclear norm of the prediction matrix, ``||softmax(logits)||_* / N``; **higher is better**.

    Cui, Wang, Zhuo, Li, Huang & Tian, "Towards Discriminability and Diversity: Batch Nuclear-norm
    Maximization under Label Insufficient Situations", CVPR 2020 (as a validator: Musgrave et al. 2022).
    Large for confident predictions spread over many classes; rank-1 (collapsed) predictions score low.
    """
    p = _probs(logits)
    return float(torch.linalg.matrix_norm(p, ord="nuc") / len(p))


def _domain_data(source_features, target_features):
    xs, xt = np.asarray(source_features, np.float64), np.asarray(target_features, np.float64)
    return np.concatenate([xs, xt]), np.r_[np.ones(len(xs)), np.zeros(len(xt))]


def domain_classifier_c(
    source_features, target_features, seed: int = 0, cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
) -> float:
    """The inverse regularisation ``C`` of the logistic-regression domain classifier (source 1, target 0) with
    the best accuracy on a stratified 20 % hold-out of standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, d = _domain_data(source_features, target_features)
    x = StandardScaler().fit_transform(x)
    tr, ho = train_test_split(np.arange(len(x)), test_size=0.2, stratify=d, random_state=seed)
    return max(cs, key=lambda c: LogisticRegression(C=c, max_iter=500).fit(x[tr], d[tr]).score(x[ho], d[ho]))


def density_ratio(
    source_features, target_features, query_features, c: float | None = None, seed: int = 0
) -> np.ndarray:
    """``p_target(x) / p_source(x)`` at ``query_features``, from a logistic-regression domain classifier.

    The classifier separates ``source_features`` (label 1) from ``target_features`` (label 0) on
    standardised features, with ``C = c`` (default: :func:`domain_classifier_c`);
    ``w = P(target|x) / P(source|x) * N_s / N_t`` (Bayes' rule with the class priors).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    c = domain_classifier_c(source_features, target_features, seed) if c is None else c
    x, d = _domain_data(source_features, target_features)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=500).fit(scaler.transform(x), d)
    p = clf.predict_proba(scaler.transform(np.asarray(query_features, np.float64)))
    n_s = int(d.sum())
    return p[:, 0] / np.clip(p[:, 1], 1e-12, None) * n_s / (len(d) - n_s)  # classes_ = [0 (target), 1 (source)]


def dev(source_features, source_logits, source_labels, target_features, folds: int = 2, seed: int = 0) -> float:
    """Deep embedded validation: importance-weighted source validation risk with a control variate;
    **lower is better** (it estimates the target cross-entropy).

    You, Wang, Long & Jordan, "Towards Accurate Model Selection in Deep Unsupervised Domain Adaptation",
    ICML 2019. Each held-out source image's loss ``l_i`` is weighted by the density ratio ``w_i =
    p_t(x_i) / p_s(x_i)`` of a logistic-regression domain classifier on the features; the risk is
    ``mean(w l) + eta mean(w) - eta`` with ``eta = -Cov(w l, w) / Var(w)`` (``E[w] = 1`` makes the
    control variate unbiased and lowers the variance). The ``folds``-fold cross-fit gives every source
    image a weight from a classifier that did not see it, so one labeled source sample (held out from
    training) serves as both the discriminator's data and the validation set; the classifier's ``C`` is
    chosen once, on all of it.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    fs = np.asarray(source_features, np.float64)
    y = np.asarray(source_labels)
    loss = F.cross_entropy(torch.as_tensor(source_logits).double(), torch.as_tensor(y).long(), reduction="none").numpy()
    c = domain_classifier_c(fs, target_features, seed)
    w = np.empty(len(fs))
    kfold = StratifiedKFold if np.unique(y, return_counts=True)[1].min() >= folds else KFold
    for fit_idx, val_idx in kfold(folds, shuffle=True, random_state=seed).split(fs, y):
        w[val_idx] = density_ratio(fs[fit_idx], target_features, fs[val_idx], c)
    wl = w * loss
    var = w.var(ddof=1)
    eta = -np.cov(wl, w)[0, 1] / var if var > 0 else 0.0
    return float(wl.mean() + eta * w.mean() - eta)


def scores(target_logits, source: tuple | None = None, target_features=None) -> dict[str, float | None]:
    """Every validator on one model: ``{"entropy", "im", "snd", "bnm", "dev"}``.

    ``source`` is ``(features, logits, labels)`` of a labeled source sample held out from training, and
    ``target_features`` the target pool's features; both are needed for ``dev`` (``None`` without them,
    or when the model's classes are not the source's).
    """
    out = {
        "entropy": entropy(target_logits),
        "im": information_maximization(target_logits),
        "snd": snd(target_logits),
        "bnm": bnm(target_logits),
        "dev": None,
    }
    if source is not None and target_features is not None:
        out["dev"] = dev(source[0], source[1], source[2], target_features)
    return out


@torch.no_grad()
def features_and_logits(model: nn.Module, loader, device: torch.device | str = "cpu", limit: int | None = None):
    """Penultimate features ``(N, D)``, logits ``(N, C)`` and labels ``(N,)`` of a ``TransferModel``
    (``model.backbone`` then ``model.head``) over ``loader``, in eval mode, as CPU float tensors; stops
    after ``limit`` images."""
    was = model.training
    model.eval()
    feats, logits, ys, n = [], [], [], 0
    for x, y in loader:
        f = model.backbone(batch_to(x, device, loader))
        feats.append(f.float().cpu())
        logits.append(model.head(f).float().cpu())
        ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    model.train(was)
    cut = slice(0, limit)
    return torch.cat(feats)[cut], torch.cat(logits)[cut], torch.cat(ys)[cut]
