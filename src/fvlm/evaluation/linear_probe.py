"""Linear probe on frozen embeddings: AUROC per disease and a few-shot curve.

Zero-shot scores depend on prompts; a linear probe asks what the embeddings themselves hold. Per
disease, a scikit-learn logistic regression is fitted on the frozen embedding the zero-shot
evaluation scores that disease on: the disease's anatomy embedding (fVLM), the renormalised mean
of the valid anatomy embeddings for whole-scan diseases (fVLM), the study embedding (CLIP). The
studies are those where the disease's anatomy is evaluable (present and not truncated by the
field of view), the same for every model, so two models' probes see the same studies, split and
subsets.

Protocol (fixed ``seed``):

* per disease, a stratified train/test split of its labelled evaluable studies
  (``test_size``); a disease with fewer than two positives or two negatives is skipped;
* the training part is permuted once; the few-shot subset of fraction ``f`` is its first
  ``ceil(f * n_train)`` studies (nested: 1 % within 5 % within 10 %), drawn ``repeats`` times
  with different permutations for ``f < 1``; a draw without a positive or a negative cannot be
  fitted and is skipped and counted;
* AUROC on the whole test part (torchmetrics), averaged over the fitted draws; ``macro`` is the
  mean over the diseases with at least one fitted draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torchmetrics.functional.classification import binary_auroc

from fvlm.anatomy import AnatomyTable, Disease
from fvlm.evaluation.embedding import StudyEmbeddings
from fvlm.evaluation.evaluability import AnatomyStatus
from fvlm.evaluation.plots import _save as save_figure
from fvlm.models.fine_grained_clip import whole_scan_embedding

__all__ = [
    "FEW_SHOT_FRACTIONS",
    "PROBE_DEFINITIONS",
    "few_shot_size",
    "format_probe",
    "linear_probe",
    "plot_few_shot_curve",
    "probe_auroc",
    "probe_features",
]

FEW_SHOT_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 1.0)
_EVALUABLE = (AnatomyStatus.WHOLE, AnatomyStatus.LARGER_THAN_CROP)

PROBE_DEFINITIONS: dict[str, str] = {
    "fraction": "share of the probe's training labels used (few-shot subset)",
    "n_train": "training studies of the subset (ceil(fraction * n_train_all))",
    "n_test": "test studies (stratified split of the disease's labelled evaluable studies)",
    "auroc": "test AUROC of a logistic regression on standardised frozen embeddings, mean over "
    "the fitted draws",
    "draws": "subsets drawn (1 for the full training set)",
    "skipped_draws": "draws without a positive or a negative: not fitted",
}


def probe_features(
    studies: StudyEmbeddings, table: AnatomyTable, anatomy: str | None
) -> np.ndarray:
    """``(S, E)`` frozen features of one anatomy (``None``: whole scan); NaN rows not evaluable.

    fVLM: the anatomy's embedding, or the mean of the valid anatomy embeddings for the whole
    scan. CLIP (``crop_rule == "tile"``): the study embedding. Both are unit vectors, and a study
    is evaluable where the anatomy's status is whole or larger than the crop (any anatomy, for
    the whole scan), whichever the model, so models are probed on the same studies.
    """
    status = np.isin(studies.status, _EVALUABLE)
    if anatomy is None:
        evaluable = status.any(axis=1)
    elif anatomy in table.names:
        evaluable = status[:, table.index(anatomy)]
    else:
        raise ValueError(f"anatomy {anatomy!r} is not in table {table.name!r}")
    emb = studies.embeddings.to(torch.float64)
    if studies.crop_rule == "tile":
        features = F.normalize(emb[:, 0], dim=-1)
    elif anatomy is None:
        features = whole_scan_embedding(emb, studies.valid)
    else:
        features = F.normalize(emb[:, table.index(anatomy)], dim=-1)
    features = features.numpy().copy()
    features[~evaluable] = np.nan
    return features


def few_shot_size(n_train: int, fraction: float) -> int:
    """Studies in a few-shot subset: ``ceil(fraction * n_train)``, at least 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"few-shot fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(round(fraction * n_train, 9)))


def probe_auroc(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float
) -> float:
    """Test AUROC of a logistic regression (standardised features, inverse strength ``c``)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    model.fit(x_train, y_train)
    scores = torch.as_tensor(model.predict_proba(x_test)[:, 1])
    return float(binary_auroc(scores, torch.as_tensor(y_test, dtype=torch.long)))


def _probe_disease(
    x: np.ndarray,
    y: np.ndarray,
    fractions: Sequence[float],
    test_size: float,
    seed: int,
    repeats: int,
    c: float,
) -> list[dict[str, float | int]]:
    """Rows ``fraction, n_train, n_test, auroc, draws, skipped_draws`` of one disease."""
    train, test = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=y, random_state=seed
    )
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(train) for _ in range(repeats)]
    rows = []
    for fraction in fractions:
        size = few_shot_size(len(train), fraction)
        aurocs, skipped = [], 0
        for order in orders[: 1 if size == len(train) else repeats]:
            subset = order[:size]
            if len(np.unique(y[subset])) < 2:
                skipped += 1
                continue
            aurocs.append(probe_auroc(x[subset], y[subset], x[test], y[test], c))
        rows.append({
            "fraction": fraction, "n_train": size, "n_test": len(test),
            "auroc": float(np.mean(aurocs)) if aurocs else math.nan,
            "draws": len(aurocs) + skipped, "skipped_draws": skipped,
        })  # fmt: skip
    return rows


def linear_probe(
    studies: StudyEmbeddings,
    labels: pd.DataFrame,
    table: AnatomyTable,
    diseases: Sequence[Disease],
    fractions: Sequence[float] = FEW_SHOT_FRACTIONS,
    test_size: float = 0.5,
    seed: int = 0,
    repeats: int = 5,
    c: float = 1.0,
) -> pd.DataFrame:
    """AUROC per disease and few-shot fraction, plus a ``macro`` row per fraction.

    Args:
        studies: The evaluation's embeddings.
        labels: 0/1 labels (NaN: unknown), indexed by study id, a column per disease key.
        table: The anatomy table of the embeddings.
        diseases: The diseases to probe.
        fractions: Few-shot fractions of the training labels (1.0: all of them).
        test_size: Share of each disease's studies held out for the AUROC.
        seed: Seed of the split and of the few-shot draws.
        repeats: Draws per few-shot fraction below 1.
        c: Inverse regularisation strength of the logistic regression.

    Returns:
        Rows ``disease, fraction, n_train, n_test, n_pos, auroc, draws, skipped_draws``;
        ``attrs["skipped_diseases"]`` maps each disease not probed to why, and ``macro`` rows
        carry in ``skipped_draws`` the number of diseases without any fitted draw.
    """
    if not 0 < test_size < 1 or repeats < 1:
        raise ValueError(f"need 0 < test_size < 1 and repeats >= 1, got {test_size}, {repeats}")
    for fraction in fractions:
        few_shot_size(1, fraction)  # checks the range
    truth = labels.reindex(studies.study_ids)
    rows, skipped = [], {}
    # Thousands of tiny fits: BLAS threads only add spin-waiting (0.75 s -> 0.03 s per fit on a
    # busy 2-core machine), so the probe runs single-threaded.
    with threadpool_limits(1):
        for disease in diseases:
            if disease.key not in truth.columns:
                skipped[disease.key] = "no labels column"
                continue
            x = probe_features(studies, table, disease.anatomy)
            y = pd.to_numeric(truth[disease.key], errors="coerce").to_numpy(dtype=float)
            keep = ~np.isnan(x).any(axis=1) & ~np.isnan(y)
            x, y = x[keep], y[keep].astype(int)
            n_pos = int(y.sum())
            if min(n_pos, len(y) - n_pos) < 2:
                skipped[disease.key] = (
                    f"{n_pos} positives, {len(y) - n_pos} negatives (need 2 each)"
                )
                continue
            for row in _probe_disease(x, y, fractions, test_size, seed, repeats, c):
                rows.append({"disease": disease.key, "n_pos": n_pos} | row)

    columns = ["disease", "fraction", "n_train", "n_test", "n_pos", "auroc", "draws"]
    frame = pd.DataFrame(rows, columns=[*columns, "skipped_draws"])
    macro = [
        {"disease": "macro", "fraction": f,
         "auroc": float(part["auroc"].mean()) if part["auroc"].notna().any() else math.nan,
         "draws": int(part["auroc"].notna().sum()),
         "skipped_draws": int(part["auroc"].isna().sum())}
        for f, part in frame.groupby("fraction", sort=True)
    ]  # fmt: skip
    frame = pd.concat([frame, pd.DataFrame(macro, columns=frame.columns)], ignore_index=True)
    frame = frame.astype({c: "Int64" for c in ("n_train", "n_test", "n_pos")})
    frame.attrs["skipped_diseases"] = skipped
    frame.attrs["definitions"] = PROBE_DEFINITIONS | {
        "macro": "mean AUROC over the diseases with a fitted draw (draws: how many diseases; "
        "skipped_draws: how many without one)"
    }
    return frame


def plot_few_shot_curve(results: Mapping[str, pd.DataFrame], path: str | Path) -> Path:
    """Macro AUROC against the share of training labels, one line per model."""
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.add_subplot()
    percents: set[float] = set()
    for name, frame in results.items():
        macro = frame[frame["disease"] == "macro"].sort_values("fraction")
        percents |= set(100 * macro["fraction"])
        ax.plot(100 * macro["fraction"], macro["auroc"], marker="o", label=name)
        unfitted = macro[macro["auroc"].isna()]  # no disease had a draw with both classes
        ax.plot(100 * unfitted["fraction"], [0.32] * len(unfitted), "x", color="grey")
    ax.set_xscale("log")
    ax.set_xticks(sorted(percents), [f"{p:g}" for p in sorted(percents)])
    ax.text(0.03, 0.95, "x: no subset with both classes", transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("training labels used (%)")
    ax.set_ylabel("macro AUROC (linear probe)")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0.3, 1.02)
    ax.set_title("Linear probe on frozen embeddings: few-shot curve")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def format_probe(name: str, frame: pd.DataFrame) -> str:
    """Printed line: macro AUROC per few-shot fraction (``-`` where no disease could be fitted)."""
    macro = frame[frame["disease"] == "macro"].sort_values("fraction")
    cells = [
        f"{100 * f:g}%: " + ("-" if pd.isna(a) else f"{a:.3f}")
        for f, a in zip(macro["fraction"], macro["auroc"], strict=True)
    ]
    return f"  {name:<8} " + "  ".join(cells)
