"""Figures and the markdown report (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(histories: dict[str, list[dict]], path: Path) -> int:
    """Training loss per epoch, and validation accuracy next to it when any history has one (no empty panel
    when there is no validation split). Returns the number of panels drawn."""
    plt = _plt()
    histories = {name: hist for name, hist in histories.items() if hist}
    with_val = any("val_accuracy" in hist[0] for hist in histories.values())
    fig, axes = plt.subplots(1, 2 if with_val else 1, figsize=(10 if with_val else 5.5, 3.6), squeeze=False)
    axes = axes[0]
    for name, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        axes[0].plot(ep, [h["train_loss"] for h in hist], marker="o", label=name)
        if with_val and "val_accuracy" in hist[0]:
            axes[1].plot(ep, [h["val_accuracy"] for h in hist], marker="o", label=name)
    axes[0].set(title="training loss", xlabel="epoch")
    if with_val:
        axes[1].set(title="validation accuracy (held-out target train)", xlabel="epoch")
    for ax in axes:
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(axes)


def confusion_matrix_png(cm: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=classes).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pct(v: float | None) -> str:
    """An accuracy for people: ``0.9761`` -> ``97.6 %``; ``None`` (a baseline that does not apply) -> ``n/a``."""
    return "n/a" if v is None else f"{v * 100:.1f} %"


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))  # None: does not apply

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)
