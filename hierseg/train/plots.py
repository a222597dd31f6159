"""Evaluation figures logged as MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from hierseg.labels import FINE_CLASSES, Hierarchy
from hierseg.metrics import EvalMetrics
from hierseg.serve.evaluate import EvalSample

# 12 class colours, then a 13th for uncertain (shown, never scored).
_COLORS = [
    "#1f1f1f", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#bcbd22",
    "#ff7f0e", "#ffbb78", "#d62728", "#e377c2", "#17becf", "#8c564b",
]  # fmt: skip
UNCERTAIN_COLOR = "#ffffff"
CLASS_CMAP = ListedColormap([*_COLORS, UNCERTAIN_COLOR])


def confusion_figure(metrics: EvalMetrics):
    m = metrics.fine.matrix.cpu().numpy().astype(float)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(12), FINE_CLASSES, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(12), [f"{c} (n={int(r)})" for c, r in zip(FINE_CLASSES, rows[:, 0])], fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("target (valid pixels; row-normalised)")
    for i in range(12):
        for j in range(12):
            if norm[i, j] >= 0.01:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.tight_layout()
    return fig


def iou_figure(metrics: EvalMetrics, hierarchy: Hierarchy):
    fine = metrics.fine.iou().numpy()
    coarse = metrics.coarse[0].iou().numpy()
    groups = hierarchy.levels[0].group_names
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [12, len(groups)]})
    for ax, values, names, title in (
        (axes[0], fine, FINE_CLASSES, "fine IoU"),
        (axes[1], coarse, groups, "coarse IoU"),
    ):
        ax.bar(
            range(len(names)), np.nan_to_num(values), color=["#cccccc" if np.isnan(v) else "#1f77b4" for v in values]
        )
        for i, v in enumerate(values):
            ax.text(
                i, (0 if np.isnan(v) else v) + 0.02, "no data" if np.isnan(v) else f"{v:.2f}", ha="center", fontsize=7
            )
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(title)
    fig.tight_layout()
    return fig


def samples_figure(sample: EvalSample, hierarchy: Hierarchy, fallback_threshold: float = 0.5):
    """Image / truth (uncertain in white) / prediction / coarse group (argmax of group probability)."""
    n = sample.image_BHW.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    truth = sample.label_BHW.clone()
    truth[truth < 0] = 12
    group = sample.coarse_prob_BKHW.argmax(1)
    confident = sample.coarse_prob_BKHW.max(1).values > fallback_threshold
    for i in range(n):
        panels = [
            (sample.image_BHW[i], "gray", "image"),
            (truth[i], CLASS_CMAP, "truth (white = uncertain)"),
            (sample.pred_BHW[i], CLASS_CMAP, "fine prediction"),
            (np.where(confident[i], group[i], np.nan), "tab10", "coarse group"),
        ]
        for ax, (img, cmap, title) in zip(axes[i], panels):
            vmax = 12 if cmap is CLASS_CMAP else None
            ax.imshow(np.asarray(img), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    return fig
