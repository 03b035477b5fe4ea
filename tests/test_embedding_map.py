"""t-SNE maps: colour groups, the small-N perplexity guard, clusters kept, a non-blank PNG."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from eval_fixtures import study_embeddings
from matplotlib.image import imread

from fvlm.evaluation.embedding_map import disease_groups, plot_embedding_maps, tsne_map
from fvlm.evaluation.evaluability import AnatomyStatus


def test_disease_groups(paper_table):
    kidney = [d for d in paper_table.diseases() if d.anatomy == "kidney"][:2]
    labels = pd.DataFrame(
        [[0, 0], [1, 0], [0, 1], [1, 1], [np.nan, np.nan], [np.nan, 0]],
        columns=[d.key for d in kidney],
    )
    groups = disease_groups(labels, kidney)
    assert groups == ["normal", kidney[0].label, kidney[1].label, "several", "unlabelled",
                      "normal"]  # fmt: skip


def test_tsne_keeps_separated_clusters_apart_and_guards_small_n():
    rng = np.random.default_rng(0)
    centres = np.repeat(np.eye(3, 8) * 10, 10, axis=0)
    xy = tsne_map(centres + rng.normal(size=(30, 8)), seed=0)
    group = np.repeat(np.arange(3), 10)
    within = np.mean([np.linalg.norm(xy[group == g] - xy[group == g].mean(0), axis=1).mean()
                      for g in range(3)])  # fmt: skip
    between = np.linalg.norm(xy[0:10].mean(0) - xy[10:20].mean(0))
    assert between > 3 * within
    np.testing.assert_allclose(tsne_map(centres, seed=1), tsne_map(centres, seed=1))  # seeded
    assert tsne_map(rng.normal(size=(4, 8))).shape == (4, 2)  # perplexity capped to 1
    with pytest.raises(ValueError, match="at least 4 points"):
        tsne_map(rng.normal(size=(3, 8)))


def test_side_by_side_png_is_not_blank(tmp_path, paper_table):
    n = 24
    diseases = [d for d in paper_table.diseases() if d.anatomy in ("liver", "spleen")]
    rng = np.random.default_rng(1)
    labels = pd.DataFrame(
        (rng.random((n, len(diseases))) < 0.4).astype(int),
        columns=[d.key for d in diseases],
        index=[f"s{i:03d}" for i in range(n)],
    )
    emb = torch.randn(n, len(paper_table), 8, generator=torch.Generator().manual_seed(0))
    status = np.zeros((n, len(paper_table)), dtype=np.int8)
    status[:21, paper_table.index("spleen")] = AnatomyStatus.ABSENT  # 3 left: "too few"
    models = {
        "fVLM": study_embeddings(emb, status),
        "CLIP": study_embeddings(emb[:, :1], status, crop_rule="tile"),
    }
    path = plot_embedding_maps(models, labels, paper_table, diseases, tmp_path / "tsne.png")
    image = imread(path)[..., :3]
    assert image.shape[0] > 400 and image.shape[1] > 400  # 2 rows x 2 columns of panels
    assert image.std() > 0.05  # not blank
    colours = {tuple(c) for c in (image.reshape(-1, 3) * 255).round().astype(int)[::7]}
    assert len(colours) > 20  # scatter colours, text, frames
    with pytest.raises(ValueError, match="no model or no disease"):
        plot_embedding_maps(models, labels.drop(columns=labels.columns), paper_table, diseases,
                            tmp_path / "none.png")  # fmt: skip
