"""Per-disease binary metrics of zero-shot scores, with the definitions written next to the numbers.

The paper (Sec. 4.1) follows CT-CLIP: AUROC, and at one operating point per disease chosen on the
ROC curve: balanced accuracy (the paper's "ACC"), specificity, sensitivity, precision, weighted F1.
CT-CLIP's code leaves several of these implicit (its accuracy column is plain accuracy, its F1 is
sklearn's support-weighted F1, its threshold is the ROC point closest to the top-left corner on a
100-point grid), which is why published numbers are hard to compare. Here every column states its
definition (:func:`column_definitions`) and the threshold is taken on the exact ROC points.

Conventions, fixed once:

* A study is called positive when ``score >= threshold`` (sklearn's and torchmetrics' ROC
  convention; CT-CLIP used ``>`` on a grid, which differs only when a score equals the threshold).
* The operating point is a point of the empirical ROC curve. ``"top-left"`` minimises
  ``sqrt((1 - tpr)^2 + fpr^2)``; ``"youden"`` maximises ``tpr - fpr``. Ties go to the higher
  threshold (fewer positive calls), which is also what CT-CLIP's ``<=`` sweep does.
* Precision is ``tp / (tp + fp)`` and taken as 0 when nothing is called positive (sklearn's
  ``zero_division=0``, CT-CLIP's default); F1 of a class with no support and no calls is 0 as well.
* A disease whose labels hold a single class has no ROC curve: every metric is NaN, the row stays
  in the table and ``in_macro`` is False, so it is visible rather than silently dropped.
* Studies with a NaN score or a NaN label are left out of that disease only (``n_excluded``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc, binary_stat_scores

__all__ = [
    "METRIC_COLUMNS",
    "THRESHOLD_METHODS",
    "ThresholdMethod",
    "binary_metrics",
    "bootstrap_auroc",
    "choose_threshold",
    "column_definitions",
    "evaluate_scores",
    "roc_curve",
    "threshold_column",
    "weighted_auroc",
]

ThresholdMethod = Literal["top-left", "youden"]
THRESHOLD_METHODS: tuple[str, ...] = ("top-left", "youden")

# Metric columns of :func:`evaluate_scores`, in print order (the threshold column is added by name).
METRIC_COLUMNS: tuple[str, ...] = (
    "auroc",
    "balanced_acc",
    "acc",
    "sensitivity",
    "specificity",
    "precision",
    "f1_weighted",
    "f1_positive",
)
_TIE_TOL = 1e-12


def threshold_column(method: ThresholdMethod) -> str:
    """Name of the threshold column, which carries the method, e.g. ``threshold(top-left)``."""
    _check_method(method)
    return f"threshold({method})"


def column_definitions(
    threshold_method: ThresholdMethod = "top-left", n_boot: int = 0, ci: float = 0.95
) -> dict[str, str]:
    """Plain-language definition of every column :func:`evaluate_scores` writes.

    Written into the JSON summary so a reader of the numbers never has to guess (the reference
    code's users ask exactly this about F1, precision and "ACC").
    """
    rule = (
        "ROC point closest to the top-left corner, min sqrt((1-TPR)^2 + FPR^2)"
        if threshold_method == "top-left"
        else "ROC point of maximal Youden index, max(TPR - FPR)"
    )
    defs = {
        "auroc": "area under the ROC curve (torchmetrics binary_auroc; ties count one half)",
        "balanced_acc": "balanced accuracy (sensitivity + specificity) / 2 at the threshold; the "
        "paper's 'ACC'",
        "acc": "plain accuracy (TP + TN) / N at the threshold (CT-CLIP's accuracy column)",
        "sensitivity": "TP / (TP + FN) at the threshold (recall, true-positive rate)",
        "specificity": "TN / (TN + FP) at the threshold (true-negative rate)",
        "precision": "TP / (TP + FP) at the threshold; 0 when nothing is called positive",
        "f1_weighted": "support-weighted mean of the F1 of the positive and the negative class, "
        "(n_pos * F1_pos + n_neg * F1_neg) / N (sklearn average='weighted'); the paper's 'F1'",
        "f1_positive": "F1 of the positive class, 2TP / (2TP + FP + FN)",
        threshold_column(threshold_method): f"score threshold, called positive when "
        f"score >= threshold; {rule}; ties go to the higher threshold",
        "n_pos": "studies labelled positive (after exclusions)",
        "n_neg": "studies labelled negative (after exclusions)",
        "n_excluded": "studies left out for this disease because score or label is NaN",
        "in_macro": "both classes present, so the disease enters the macro average",
        "macro": "row: unweighted mean over diseases with in_macro = True",
    }
    if n_boot > 0:
        level = f"{100 * ci:g}%"
        defs["auroc_ci_low"] = (
            f"lower end of the {level} percentile bootstrap interval of the AUROC "
            f"({n_boot} resamples of studies with replacement, shared across diseases)"
        )
        defs["auroc_ci_high"] = f"upper end of the same {level} interval"
    return defs


def _check_method(method: str) -> None:
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold_method must be one of {THRESHOLD_METHODS}, got {method!r}")


def _as_1d(values: object, name: str) -> torch.Tensor:
    if torch.is_tensor(values):
        tensor = values.detach().to(torch.float64).reshape(-1)
    else:
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty")
    return tensor


def _check_pair(scores: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    s = _as_1d(scores, "scores").cpu()
    y = _as_1d(labels, "labels").cpu()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.numel()} vs {y.numel()}")
    if not torch.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values; drop those studies first")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, y.long()


def roc_curve(scores: object, labels: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empirical ROC curve with thresholds in the units of ``scores``.

    torchmetrics treats scores outside [0, 1] as logits and applies a sigmoid, which merges large
    scores that saturate to 1.0 and returns thresholds in sigmoid units. We pass it the dense rank
    of each score scaled to [0, 1] instead: every rank-based quantity (the curve, the AUROC) is
    unchanged, and each ROC point maps back to an exact score value.

    Returns:
        ``(fpr, tpr, thresholds)``, float64, from the strictest point: ``thresholds[0]`` is
        ``+inf`` (nothing called positive, the point (0, 0)), then the distinct scores in
        descending order; point ``i`` calls ``score >= thresholds[i]`` positive.
    """
    s, y = _check_pair(scores, labels)
    distinct, inverse = torch.unique(s, sorted=True, return_inverse=True)
    ranks = inverse.to(torch.float64) / max(distinct.numel() - 1, 1)
    fpr, tpr, _ = binary_roc(ranks, y)
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), distinct.flip(0)])
    if fpr.numel() != thresholds.numel():  # guards the mapping against a torchmetrics change
        raise RuntimeError("unexpected ROC length from torchmetrics.binary_roc")
    return fpr.to(torch.float64), tpr.to(torch.float64), thresholds


def _operating_index(fpr: torch.Tensor, tpr: torch.Tensor, method: ThresholdMethod) -> int:
    if method == "top-left":
        cost = torch.sqrt((1 - tpr) ** 2 + fpr**2)
    else:
        cost = -(tpr - fpr)
    # First point within a rounding error of the optimum: the highest threshold among ties.
    return int(torch.nonzero(cost <= cost.min() + _TIE_TOL)[0, 0])


def choose_threshold(scores: object, labels: object, method: ThresholdMethod = "top-left") -> float:
    """Score threshold of the chosen ROC operating point (see the module notes for the rule).

    Raises:
        ValueError: if the labels hold a single class (no ROC curve) or ``method`` is unknown.
    """
    _check_method(method)
    s, y = _check_pair(scores, labels)
    if y.min() == y.max():
        raise ValueError("labels hold a single class; no ROC operating point exists")
    fpr, tpr, thresholds = roc_curve(s, y)
    return float(thresholds[_operating_index(fpr, tpr, method)])


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def binary_metrics(scores: object, labels: object, threshold: float) -> dict[str, float]:
    """Confusion counts and threshold metrics when ``score >= threshold`` is called positive.

    Counts come from torchmetrics' ``binary_stat_scores``; the ratios are written out here so the
    zero-division conventions are explicit.
    """
    s, y = _check_pair(scores, labels)
    preds = (s >= threshold).long()
    tp, fp, tn, fn, _ = (float(v) for v in binary_stat_scores(preds, y))
    n_pos, n_neg = tp + fn, tn + fp
    sensitivity, specificity = _ratio(tp, n_pos), _ratio(tn, n_neg)
    f1_pos = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_neg = _ratio(2 * tn, 2 * tn + fn + fp)
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "acc": (tp + tn) / (n_pos + n_neg),
        "balanced_acc": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
        "f1_positive": f1_pos,
        "f1_weighted": (n_pos * f1_pos + n_neg * f1_neg) / (n_pos + n_neg),
    }


def weighted_auroc(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """AUROC of weighted studies, for many weight vectors at once (Mann-Whitney form).

    ``AUROC = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 0.5 [s_i = s_j]) / (W_pos W_neg)``.
    A bootstrap resample is the original studies weighted by how often each was drawn, so this
    evaluates all resamples with one matrix product instead of a Python loop.

    Args:
        scores: ``(S,)`` scores.
        labels: ``(S,)`` 0/1 labels.
        weights: ``(B, S)`` non-negative weights (bootstrap counts).

    Returns:
        ``(B,)`` AUROC per weight vector; NaN where one class has zero total weight.
    """
    pos, neg = labels == 1, labels == 0
    sp, sn = scores[pos], scores[neg]
    wins = (sp[:, None] > sn[None, :]).to(torch.float64)
    wins += 0.5 * (sp[:, None] == sn[None, :]).to(torch.float64)
    wp, wn = weights[:, pos].to(torch.float64), weights[:, neg].to(torch.float64)
    num = ((wp @ wins) * wn).sum(dim=1)
    den = wp.sum(dim=1) * wn.sum(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


def bootstrap_auroc(
    scores: np.ndarray,
    labels: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Percentile bootstrap interval of each disease's AUROC and of the macro AUROC.

    Studies are resampled with replacement, the same resample for all diseases, so the macro
    interval reflects correlated errors across diseases. A resample in which a disease lacks one
    class gives no value for it (it is skipped for that disease; the macro of that resample
    averages the diseases it has).

    Args:
        scores: ``(S, K)`` scores; NaN entries are left out of that disease.
        labels: ``(S, K)`` 0/1 labels; NaN entries are left out of that disease.
        n_boot: number of resamples.
        seed: seed of the resampling (a private ``torch.Generator``; global RNG untouched).
        ci: coverage of the interval, e.g. 0.95.

    Returns:
        ``(low, high, (macro_low, macro_high))``; ``low``/``high`` have shape ``(K,)`` and are NaN
        for diseases with a single class.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    s_all = torch.tensor(np.array(scores, dtype=np.float64))
    y_all = torch.tensor(np.array(labels, dtype=np.float64))
    n_studies, n_diseases = s_all.shape
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_studies, (n_boot, n_studies), generator=gen)
    counts = torch.zeros(n_boot, n_studies, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    per_disease = torch.full((n_boot, n_diseases), math.nan, dtype=torch.float64)
    for k in range(n_diseases):
        keep = ~(torch.isnan(s_all[:, k]) | torch.isnan(y_all[:, k]))
        y = y_all[keep, k]
        if y.numel() == 0 or y.min() == y.max():
            continue
        for start in range(0, n_boot, 256):  # bounds memory at 256 x S
            chunk = counts[start : start + 256, keep]
            per_disease[start : start + 256, k] = weighted_auroc(s_all[keep, k], y, chunk)
    q = [100 * (1 - ci) / 2, 100 * (1 + ci) / 2]
    values = per_disease.numpy()
    low, high = np.full(n_diseases, np.nan), np.full(n_diseases, np.nan)
    for k in range(n_diseases):
        col = values[:, k][~np.isnan(values[:, k])]
        if col.size:
            low[k], high[k] = np.percentile(col, q)
    macro = np.full(n_boot, np.nan)
    rows_with_any = ~np.isnan(values).all(axis=1)
    macro[rows_with_any] = np.nanmean(values[rows_with_any], axis=1)
    macro = macro[~np.isnan(macro)]
    macro_ci = tuple(float(v) for v in np.percentile(macro, q)) if macro.size else (np.nan, np.nan)
    return low, high, macro_ci  # type: ignore[return-value]


def _as_frame(values: object, keys: Sequence[str] | None, name: str) -> pd.DataFrame:
    if isinstance(values, pd.DataFrame):
        frame = values.set_index("study_id") if "study_id" in values.columns else values
        if keys is not None:
            missing = [k for k in keys if k not in frame.columns]
            if missing:
                raise ValueError(f"{name} lacks disease columns {missing}")
            frame = frame[list(keys)]
        return frame.astype(np.float64)
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (studies, diseases), got shape {array.shape}")
    if keys is None:
        keys = [f"disease_{i}" for i in range(array.shape[1])]
    if len(keys) != array.shape[1]:
        raise ValueError(f"{name} has {array.shape[1]} columns but {len(keys)} disease keys")
    return pd.DataFrame(array.astype(np.float64), columns=list(keys))


def _align(scores: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Labels in the row order of the scores (by study id when both carry one)."""
    named = not isinstance(scores.index, pd.RangeIndex) and not isinstance(
        labels.index, pd.RangeIndex
    )
    if named:
        missing = scores.index.difference(labels.index)
        if len(missing):
            raise ValueError(
                f"no labels for {len(missing)} scored studies, e.g. {list(missing[:3])}"
            )
        return labels.loc[scores.index]
    if len(scores) != len(labels):
        raise ValueError(f"scores have {len(scores)} studies but labels have {len(labels)}")
    return labels.set_axis(scores.index)


def _disease_row(
    key: str, s: np.ndarray, y: np.ndarray, threshold_method: ThresholdMethod
) -> dict[str, object]:
    """One disease's metrics; NaN (and out of the macro) unless both classes occur."""
    thr_col = threshold_column(threshold_method)
    keep = ~(np.isnan(s) | np.isnan(y))
    s, y = s[keep], y[keep]
    row: dict[str, object] = {"disease": key}
    row.update({c: math.nan for c in (*METRIC_COLUMNS, thr_col)})
    row.update(
        n_pos=int((y == 1).sum()), n_neg=int((y == 0).sum()), n_excluded=int((~keep).sum()),
        in_macro=False,
    )  # fmt: skip
    if y.size and np.unique(y).size == 2:
        threshold = choose_threshold(s, y, threshold_method)
        at = binary_metrics(s, y, threshold)
        row.update({c: at[c] for c in METRIC_COLUMNS if c in at})
        row["auroc"] = float(binary_auroc(torch.as_tensor(_ranks(s)), torch.as_tensor(y).long()))
        row[thr_col] = threshold
        row["in_macro"] = True
    return row


def _with_macro_row(
    table: pd.DataFrame, thr_col: str, macro_ci: tuple[float, float] | None
) -> pd.DataFrame:
    """``table`` plus the ``macro`` row (mean over diseases in the macro), columns ordered."""
    macro = table.loc[table["in_macro"].astype(bool)].drop(
        columns=["n_pos", "n_neg", "n_excluded", "in_macro", thr_col]
    )
    macro_row = macro.mean(axis=0, skipna=False) if len(macro) else macro.iloc[:0].mean()
    if macro_ci is not None:
        macro_row["auroc_ci_low"], macro_row["auroc_ci_high"] = macro_ci
    table.loc["macro"] = macro_row
    for col in ("n_pos", "n_neg", "n_excluded"):
        table[col] = table[col].astype("Int64")
    table.loc["macro", "in_macro"] = False
    table["in_macro"] = table["in_macro"].astype(bool)
    table.index.name = "disease"
    order = ["auroc", "auroc_ci_low", "auroc_ci_high"] if macro_ci is not None else ["auroc"]
    return table[order + [c for c in table.columns if c not in order]]


def evaluate_scores(
    scores: pd.DataFrame | np.ndarray | torch.Tensor,
    labels: pd.DataFrame | np.ndarray | torch.Tensor,
    disease_keys: Sequence[str] | None = None,
    threshold_method: ThresholdMethod = "top-left",
    n_boot: int = 0,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Per-disease metrics plus a ``macro`` row; see :func:`column_definitions` for each column.

    Args:
        scores: ``(S, K)`` P(disease) or any monotone score. A DataFrame's columns are disease
            keys; a ``study_id`` column (or a named index) aligns it with ``labels``.
        labels: ``(S, K)`` 0/1 ground truth, NaN for unknown, same conventions.
        disease_keys: which columns to evaluate (default: all columns of ``scores``).
        threshold_method: ``"top-left"`` (CT-CLIP/fVLM protocol) or ``"youden"``.
        n_boot: bootstrap resamples for AUROC intervals (0 = none).
        seed: bootstrap seed.
        ci: bootstrap interval coverage.

    Returns:
        DataFrame indexed by disease key (index name ``disease``) with the metric columns,
        ``threshold(<method>)``, ``n_pos``, ``n_neg``, ``n_excluded``, ``in_macro`` and, with
        ``n_boot > 0``, ``auroc_ci_low``/``auroc_ci_high``. ``attrs`` holds the threshold method,
        the single-class diseases and the column definitions.
    """
    _check_method(threshold_method)
    score_frame = _as_frame(scores, disease_keys, "scores")
    keys = list(score_frame.columns)
    label_frame = _align(score_frame, _as_frame(labels, keys, "labels"))
    bad = ~(np.isnan(label_frame.to_numpy()) | np.isin(label_frame.to_numpy(), (0.0, 1.0)))
    if bad.any():
        col = label_frame.columns[np.nonzero(bad.any(axis=0))[0][0]]
        raise ValueError(f"labels must be 0, 1 or NaN; column {col!r} holds other values")
    rows = [
        _disease_row(key, score_frame[key].to_numpy(), label_frame[key].to_numpy(),
                     threshold_method)
        for key in keys
    ]  # fmt: skip
    table = pd.DataFrame(rows).set_index("disease")
    macro_ci = None
    if n_boot > 0:
        low, high, macro_ci = bootstrap_auroc(
            score_frame.to_numpy(), label_frame.to_numpy(), n_boot=n_boot, seed=seed, ci=ci
        )
        table["auroc_ci_low"], table["auroc_ci_high"] = low, high
    table = _with_macro_row(table, threshold_column(threshold_method), macro_ci)
    table.attrs.update(
        threshold_method=threshold_method,
        single_class=[k for k in keys if not bool(table.loc[k, "in_macro"])],
        n_macro=int(table["in_macro"].sum()),
        n_boot=n_boot,
        ci=ci,
        definitions=column_definitions(threshold_method, n_boot, ci),
    )
    return table


def _ranks(values: np.ndarray) -> np.ndarray:
    """Dense ranks scaled to [0, 1]: AUROC-preserving input torchmetrics will not sigmoid."""
    _, inverse = np.unique(values, return_inverse=True)
    top = inverse.max() if inverse.size else 0
    return inverse.astype(np.float64) / max(int(top), 1)
