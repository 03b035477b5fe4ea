"""Linear probe: separable and random embeddings, exact few-shot sizes, skips, same split."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from eval_fixtures import study_embeddings

from fvlm.anatomy import Disease
from fvlm.evaluation.evaluability import AnatomyStatus
from fvlm.evaluation.linear_probe import (
    few_shot_size,
    format_probe,
    linear_probe,
    plot_few_shot_curve,
    probe_features,
)

WIDTH = 16


@pytest.fixture(scope="module")
def liver_diseases(paper_table) -> list[Disease]:
    return [d for d in paper_table.diseases() if d.anatomy == "liver"][:2]


def synthetic(paper_table, labels: np.ndarray, signal: float, seed: int = 0):
    """fVLM embeddings whose liver row carries ``signal`` times each label along one axis."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    emb = torch.randn(n, len(paper_table), WIDTH, generator=generator)
    liver = paper_table.index("liver")
    for k in range(labels.shape[1]):
        emb[:, liver, k] += signal * torch.as_tensor(labels[:, k], dtype=torch.float32)
    return study_embeddings(emb)


def label_frame(studies, diseases, labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(labels, index=studies.study_ids, columns=[d.key for d in diseases])


def test_separable_embeddings_probe_near_one_and_random_ones_near_half(paper_table, liver_diseases):
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 2)) < 0.3).astype(int)
    studies = synthetic(paper_table, labels, signal=6.0)
    truth = label_frame(studies, liver_diseases, labels)
    full = linear_probe(studies, truth, paper_table, liver_diseases, fractions=(1.0,))
    per_disease = full[full["disease"] != "macro"]
    assert (per_disease["auroc"] > 0.95).all(), per_disease
    assert (per_disease["n_test"] == 100).all() and (per_disease["n_train"] == 100).all()
    noise = synthetic(paper_table, labels, signal=0.0, seed=1)
    chance = linear_probe(noise, truth, paper_table, liver_diseases, fractions=(1.0,))
    macro = chance.set_index("disease").loc["macro", "auroc"]
    assert 0.35 < macro < 0.65, chance


def test_few_shot_sizes_are_exact_and_nested_draws_are_counted(paper_table, liver_diseases):
    assert [few_shot_size(100, f) for f in (0.01, 0.05, 0.1, 1.0)] == [1, 5, 10, 100]
    assert [few_shot_size(60, f) for f in (0.01, 0.05, 0.1, 1.0)] == [1, 3, 6, 60]
    assert few_shot_size(7, 0.01) == 1  # never empty
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        few_shot_size(10, 0.0)
    rng = np.random.default_rng(1)
    labels = (rng.random((200, 2)) < 0.5).astype(int)
    studies = synthetic(paper_table, labels, signal=6.0)
    frame = linear_probe(
        studies, label_frame(studies, liver_diseases, labels), paper_table, liver_diseases,
        repeats=4,
    )  # fmt: skip
    one = frame[frame["disease"] == liver_diseases[0].key].set_index("fraction")
    assert one["n_train"].tolist() == [1, 5, 10, 100] and (one["n_test"] == 100).all()
    # One study has one class: never fitted, all four draws skipped and counted.
    assert math.isnan(one.loc[0.01, "auroc"]) and one.loc[0.01, "skipped_draws"] == 4
    assert one.loc[1.0, "draws"] == 1  # the whole training set is drawn once
    assert one.loc[0.1, "draws"] == 4 and one.loc[1.0, "auroc"] > 0.95
    macro = frame[frame["disease"] == "macro"].set_index("fraction")
    assert macro.loc[0.01, "skipped_draws"] == 2 and math.isnan(macro.loc[0.01, "auroc"])
    assert macro.loc[1.0, "draws"] == 2
    assert "1%: -" in format_probe("fVLM", frame) and "100%: 0.9" in format_probe("fVLM", frame)


def test_not_evaluable_studies_and_rare_diseases_are_left_out(paper_table, liver_diseases):
    rng = np.random.default_rng(2)
    labels = (rng.random((40, 2)) < 0.5).astype(float)
    labels[:, 1] = 0
    labels[20, 1] = 1  # one positive: cannot be split
    labels[13, 0] = np.nan  # unknown label: left out
    studies = synthetic(paper_table, np.nan_to_num(labels), signal=6.0)
    status = studies.status.copy()
    status[:10, paper_table.index("liver")] = AnatomyStatus.TRUNCATED
    studies = study_embeddings(studies.embeddings, status)
    frame = linear_probe(
        studies, label_frame(studies, liver_diseases, labels), paper_table, liver_diseases,
        fractions=(1.0,),
    )  # fmt: skip
    row = frame[frame["disease"] == liver_diseases[0].key].iloc[0]
    assert row["n_train"] + row["n_test"] == 40 - 10 - 1
    assert "1 positives" in frame.attrs["skipped_diseases"][liver_diseases[1].key]


def test_fvlm_and_clip_features_use_the_same_studies(paper_table):
    n = 8
    status = np.zeros((n, len(paper_table)), dtype=np.int8)
    status[:3, paper_table.index("spleen")] = AnatomyStatus.ABSENT
    emb = torch.randn(n, len(paper_table), 4, generator=torch.Generator().manual_seed(0))
    fvlm = probe_features(study_embeddings(emb, status), paper_table, "spleen")
    clip = probe_features(
        study_embeddings(emb[:, :1], status, crop_rule="tile"), paper_table, "spleen"
    )
    for features in (fvlm, clip):
        assert np.isnan(features[:3]).all() and not np.isnan(features[3:]).any()
        np.testing.assert_allclose(np.linalg.norm(features[3:], axis=1), 1.0)
    np.testing.assert_allclose(
        fvlm[3:],
        torch.nn.functional.normalize(emb[3:, paper_table.index("spleen")], dim=-1),
        rtol=1e-6,  # float32 input, float64 features
    )
    whole = probe_features(study_embeddings(emb, status), paper_table, None)
    assert not np.isnan(whole).any()  # every study has some evaluable anatomy
    with pytest.raises(ValueError, match="not in table"):
        probe_features(study_embeddings(emb, status), paper_table, "wing")


def test_few_shot_curve_png(tmp_path, paper_table, liver_diseases):
    rng = np.random.default_rng(3)
    labels = (rng.random((60, 2)) < 0.5).astype(int)
    studies = synthetic(paper_table, labels, signal=3.0)
    frame = linear_probe(
        studies, label_frame(studies, liver_diseases, labels), paper_table, liver_diseases
    )
    path = plot_few_shot_curve({"fVLM": frame, "CLIP": frame}, tmp_path / "curve.png")
    assert path.stat().st_size > 10_000
