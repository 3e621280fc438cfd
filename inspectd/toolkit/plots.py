"""Plots people would rather look at than read: training curves, ROC/PR curves."""

from __future__ import annotations

__all__ = ["plot_ok_only", "plot_training", "plot_roc_pr"]

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; a line PC has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_PANELS = (
    ("loss", "loss"),
    ("cam_loss", "pixel loss (mask supervision)"),
    ("accuracy", "accuracy"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("auc", "ROC-AUC"),
)


def plot_training(epochs: list[dict], best_epoch: int, out: Path) -> Path:
    """Train/validation curves per metric with the kept (best) epoch marked, as the reference plotted; the pixel
    loss's panel only when the run had mask supervision."""
    x = [e["epoch"] for e in epochs]
    panels = [(key, title) for key, title in _PANELS if key in epochs[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in epochs[0]:
                ax.plot(x, [e[prefix + key] for e in epochs], style, label="validation" if prefix else "train")
        ax.axvline(best_epoch, color="tab:red", lw=1, alpha=0.7, label=f"best epoch {best_epoch}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


Curve = tuple[np.ndarray, np.ndarray, float]  # x, y, area


def plot_roc_pr(curves: dict[str, Curve], pr: Curve, out: Path) -> Path:
    """ROC curves (image level, and pixel level when given) and the image-level PR curve."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for label, (fpr, tpr, auc) in curves.items():
        ax_roc.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    ax_roc.set(title="ROC", xlabel="false positive rate", ylabel="true positive rate")
    recall, precision, ap = pr
    ax_pr.plot(recall, precision, label=f"image (AP {ap:.3f})")
    ax_pr.set(title="precision-recall (image level)", xlabel="recall", ylabel="precision", ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def plot_ok_only(held_back: np.ndarray, defects: np.ndarray, far: float, out: Path) -> Path:
    """An ok-only model's threshold: histograms of the image logits (max of cam_logits) of the held-back ok images
    and, when the dataset had some, of the defect images, with the threshold (logit 0) marked."""
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    values = np.concatenate([held_back, defects]) if len(defects) else held_back
    bins = np.linspace(float(values.min()) - 0.5, float(values.max()) + 0.5, 40).tolist()
    ax.hist(held_back, bins, alpha=0.6, label=f"held-back ok images ({len(held_back)})", color="tab:green")
    if len(defects):
        ax.hist(defects, bins, alpha=0.6, label=f"defect images ({len(defects)}; not used to fit)", color="tab:red")
    ax.axvline(0.0, color="black", lw=1, label=f"threshold (aimed at {100 * far:g} % false alarms)")
    ax.set(title="ok-only model: image logit = max of cam_logits", xlabel="logit", ylabel="images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
