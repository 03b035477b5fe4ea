"""t-SNE maps of frozen embeddings coloured by disease, fVLM and CLIP side by side (paper Fig. 12).

The paper shows that fVLM's positive cases of an abnormality form more compact clusters than
CLIP's. One row per anatomy that has a disease among the evaluated ones (plus ``whole scan`` for
whole-scan diseases), one column per model: each panel maps the studies where the anatomy is
evaluable, from the embedding the zero-shot evaluation and the linear probe use
(:func:`~fvlm.evaluation.linear_probe.probe_features`), so panels of one row show the same
studies. A study is coloured by its positive diseases of that anatomy: ``normal`` (none), the
disease's label (one), ``several`` (more than one), ``unlabelled`` (no known label).

t-SNE (scikit-learn, PCA initialisation, fixed ``seed``) needs perplexity < studies; it is
``min(perplexity, (n - 1) / 3)``, and a panel with fewer than four studies is left empty with a
note.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from fvlm.anatomy import AnatomyTable, Disease
from fvlm.evaluation.embedding import StudyEmbeddings
from fvlm.evaluation.linear_probe import probe_features
from fvlm.evaluation.plots import _save as save_figure

__all__ = ["MIN_STUDIES", "disease_groups", "plot_embedding_maps", "tsne_map"]

MIN_STUDIES = 4
NORMAL, SEVERAL, UNLABELLED = "normal", "several", "unlabelled"
_GREYS = {NORMAL: "#bbbbbb", SEVERAL: "#000000", UNLABELLED: "#eeeeee"}
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def tsne_map(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``(N, 2)`` t-SNE coordinates of ``(N, E)`` features, perplexity capped for small N."""
    n = len(features)
    if n < MIN_STUDIES:
        raise ValueError(f"t-SNE needs at least {MIN_STUDIES} points, got {n}")
    tsne = TSNE(
        n_components=2,
        perplexity=min(perplexity, (n - 1) / 3),
        init="pca",
        random_state=seed,
    )
    with threadpool_limits(1):  # small N: threads only spin-wait on a busy machine
        return tsne.fit_transform(np.asarray(features, dtype=np.float64))


def disease_groups(labels: pd.DataFrame, diseases: Sequence[Disease]) -> list[str]:
    """Per study (row of ``labels``), its colour group among ``diseases`` (see module notes)."""
    values = labels[[d.key for d in diseases]].apply(pd.to_numeric, errors="coerce")
    groups = []
    for row in values.to_numpy(dtype=float):
        positive = [d.label for d, v in zip(diseases, row, strict=True) if v == 1]
        if len(positive) > 1:
            groups.append(SEVERAL)
        elif positive:
            groups.append(positive[0])
        else:
            groups.append(UNLABELLED if np.isnan(row).all() else NORMAL)
    return groups


def _scopes(table: AnatomyTable, diseases: Sequence[Disease]) -> dict[str | None, list[Disease]]:
    """Anatomy name (``None``: whole scan) -> its diseases, in table order."""
    scopes: dict[str | None, list[Disease]] = {}
    for name in [*table.names, None]:
        own = [d for d in diseases if d.anatomy == name]
        if own:
            scopes[name] = own
    return scopes


def plot_embedding_maps(
    models: Mapping[str, StudyEmbeddings],
    labels: pd.DataFrame,
    table: AnatomyTable,
    diseases: Sequence[Disease],
    path: str | Path,
    seed: int = 0,
    perplexity: float = 30.0,
) -> Path:
    """One t-SNE panel per (anatomy with diseases, model); returns the PNG written.

    Args:
        models: Display name -> the model's evaluation embeddings (same studies).
        labels: 0/1 labels indexed by study id, a column per disease key.
        table: The anatomy table.
        diseases: The evaluated diseases (they choose the rows and colours).
        path: PNG to write.
        seed: t-SNE seed.
        perplexity: t-SNE perplexity before the small-N cap.
    """
    scopes = _scopes(table, [d for d in diseases if d.key in labels.columns])
    if not scopes or not models:
        raise ValueError("t-SNE map: no model or no disease with a labels column")
    fig = Figure(figsize=(3.2 * len(models), 2.9 * len(scopes)))
    axes = fig.subplots(len(scopes), len(models), squeeze=False)
    for row, (anatomy, own) in enumerate(scopes.items()):
        palette = _GREYS | {d.label: _COLOURS[i % len(_COLOURS)] for i, d in enumerate(own)}
        for col, (name, studies) in enumerate(models.items()):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            where = "whole scan" if anatomy is None else table[anatomy].label
            ax.set_title(f"{name}: {where}", fontsize=9)
            features = probe_features(studies, table, anatomy)
            keep = ~np.isnan(features).any(axis=1)
            if keep.sum() < MIN_STUDIES:
                ax.text(0.5, 0.5, f"{int(keep.sum())} studies: too few", ha="center")
                continue
            xy = tsne_map(features[keep], seed, perplexity)
            ids = [s for s, k in zip(studies.study_ids, keep, strict=True) if k]
            groups = np.asarray(disease_groups(labels.reindex(ids), own))
            for group in dict.fromkeys([NORMAL, UNLABELLED, *sorted(set(groups))]):
                hit = groups == group
                if hit.any():
                    ax.scatter(*xy[hit].T, s=12, c=palette[group], label=group, linewidths=0)
            ax.legend(fontsize=6, loc="best", markerscale=0.8)
    fig.suptitle("t-SNE of frozen embeddings, coloured by disease", y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)
