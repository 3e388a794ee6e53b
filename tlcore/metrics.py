"""Classification metrics (scikit-learn where it has them), calibration, latency and size."""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from torch import nn


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al., 2017): sum over confidence bins of |accuracy - confidence| weighted by bin size."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_report(logits: torch.Tensor | np.ndarray, labels, classes: list[str], ece_bins: int = 15) -> dict:
    """Accuracy, macro-F1, ECE, per-class precision/recall/F1/support and the confusion matrix."""
    logits = torch.as_tensor(logits).float()
    y = np.asarray(labels)
    probs = torch.softmax(logits, dim=1).numpy()
    pred = probs.argmax(axis=1)
    k = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=k, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=k, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, y, ece_bins),
        "per_class": [
            {"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        ],
        "confusion_matrix": confusion_matrix(y, pred, labels=k).tolist(),
        "predictions": pred.tolist(),
    }


@torch.no_grad()
def correct(model: nn.Module, loader, device: torch.device | str = "cpu") -> np.ndarray:
    """Per-image top-1 correctness (bool, in ``loader`` order) of ``model``, moved to ``device`` first:
    what a paired comparison of two models on the same images needs."""
    from .engine import predict

    logits, y = predict(model.to(device), loader, device)
    return (logits.argmax(1) == y).numpy()


def accuracy(model: nn.Module, loader, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` over ``loader``; the model is moved to ``device`` first."""
    return float(correct(model, loader, device).mean())


def model_size_mb(model: nn.Module) -> float:
    """Serialized size of the model's state_dict in MB (what a deployment ships)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, warmup: int = 5, iters: int = 50) -> dict[str, float]:
    """Batch-1 latency on ``example``'s device: p50 and p95 over ``iters`` runs, in milliseconds."""
    model.eval()
    x = example[:1]
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return {"latency_ms_p50": float(np.percentile(times, 50)), "latency_ms_p95": float(np.percentile(times, 95))}


@torch.no_grad()
def throughput(model: nn.Module, example: torch.Tensor, batch_size: int = 256, iters: int = 5) -> float:
    """Images per second at ``batch_size`` (example is repeated to fill the batch)."""
    model.eval()
    reps = -(-batch_size // len(example))
    x = example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size]
    model(x)
    t = time.perf_counter()
    for _ in range(iters):
        model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - t)
