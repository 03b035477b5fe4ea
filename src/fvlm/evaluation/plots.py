"""Figures of a zero-shot evaluation: ROC curves per disease and an AUROC comparison of methods.

Matplotlib runs on the Agg backend with explicit figures (no pyplot state machine), so plotting
works on headless training nodes and inside test runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fvlm.evaluation.metrics import evaluate_scores, roc_curve, threshold_column

__all__ = ["plot_auroc_comparison", "plot_roc_curves"]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_roc_curves(
    scores: pd.DataFrame,
    labels: pd.DataFrame,
    path: str | Path,
    results: pd.DataFrame | None = None,
    title: str = "Zero-shot ROC",
    n_cols: int = 6,
) -> Path:
    """One ROC panel per disease, the chosen operating point marked, macro AUROC in the title.

    Args:
        scores: ``(S, K)`` scores, disease keys as columns (as :func:`zero_shot_scores` returns).
        labels: ``(S, K)`` 0/1 labels aligned with ``scores`` (a ``study_id`` column or index
            aligns them).
        path: PNG file to write.
        results: the :func:`evaluate_scores` table of these scores (computed when omitted); gives
            AUROC, threshold method and operating point.
        title: figure title; the macro AUROC is appended.
        n_cols: panels per row.

    Returns:
        The path written.
    """
    if results is None:
        results = evaluate_scores(scores, labels)
    keys = [k for k in results.index if k != "macro"]
    score_frame = scores.set_index("study_id") if "study_id" in scores.columns else scores
    label_frame = labels.set_index("study_id") if "study_id" in labels.columns else labels
    if not isinstance(score_frame.index, pd.RangeIndex) and not isinstance(
        label_frame.index, pd.RangeIndex
    ):
        label_frame = label_frame.loc[score_frame.index]
    method = results.attrs.get("threshold_method", "top-left")
    thr_col = threshold_column(method)
    n_cols = max(1, min(n_cols, len(keys)))
    n_rows = max(1, math.ceil(len(keys) / n_cols))
    fig = Figure(figsize=(2.6 * n_cols, 2.6 * n_rows + 0.6))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        s = score_frame[key].to_numpy(dtype=np.float64)
        y = label_frame[key].to_numpy(dtype=np.float64)
        keep = ~(np.isnan(s) | np.isnan(y))
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
        row = results.loc[key]
        if bool(row["in_macro"]):
            fpr, tpr, thresholds = roc_curve(s[keep], y[keep])
            ax.plot(fpr.numpy(), tpr.numpy(), lw=1.5, color="C0")
            point = int(np.argmin(np.abs(thresholds.numpy() - row[thr_col])))
            ax.plot(fpr[point], tpr[point], "o", color="C3", ms=4, label=method)
            ax.set_title(f"{key}\nAUROC {row['auroc']:.3f}", fontsize=8)
        else:
            ax.set_title(f"{key}\nsingle class (n={int(keep.sum())})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
        ax.set_xlabel("1 - specificity", fontsize=7)
        ax.set_ylabel("sensitivity", fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    macro = results.loc["macro", "auroc"] if "macro" in results.index else float("nan")
    fig.suptitle(f"{title} - macro AUROC {macro:.3f} ({method} threshold)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_auroc_comparison(
    results: Mapping[str, pd.DataFrame],
    path: str | Path,
    metric: str = "auroc",
    title: str | None = None,
) -> Path:
    """Grouped bars of one metric per disease (and macro) for several methods, e.g. fVLM vs CLIP.

    Args:
        results: ``{method name: evaluate_scores table}``; diseases are the union, in order of
            first appearance, with ``macro`` last.
        path: PNG file to write.
        metric: column to compare.
        title: figure title (default: the metric and the methods' macro values).

    Returns:
        The path written.
    """
    if not results:
        raise ValueError("results is empty: nothing to compare")
    keys: list[str] = []
    for table in results.values():
        if metric not in table.columns:
            raise ValueError(f"metric {metric!r} is not a column of the results")
        keys += [k for k in table.index if k != "macro" and k not in keys]
    keys.append("macro")
    n_methods = len(results)
    width = 0.8 / n_methods
    x = np.arange(len(keys))
    fig = Figure(figsize=(max(6.0, 0.45 * len(keys) * max(n_methods, 2) / 2 + 2), 4.2))
    ax = fig.subplots()
    for i, (name, table) in enumerate(results.items()):
        values = [table.loc[k, metric] if k in table.index else np.nan for k in keys]
        ax.bar(x + (i - (n_methods - 1) / 2) * width, values, width, label=name, color=f"C{i}")
    if metric == "auroc":
        ax.axhline(0.5, ls="--", lw=0.8, color="0.5")
    ax.set_xticks(x)
    ax.set_xticklabels(keys, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    if title is None:
        macros = ", ".join(f"{n} {t.loc['macro', metric]:.3f}" for n, t in results.items())
        title = f"{metric} per disease (macro: {macros})"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
