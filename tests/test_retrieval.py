"""Retrieval Recall@k: hand-made embeddings with known answers, ties, chance; `fvlm evaluate`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from eval_fixtures import study_embeddings, tiny_checkpoint

from fvlm import cli
from fvlm.evaluation.evaluability import AnatomyStatus
from fvlm.evaluation.retrieval import retrieval_hits, retrieval_rows, retrieval_table
from fvlm.phantom import generate_phantom

TINY = {"shape": [24, 32, 32], "spacing": [12.0, 9.0, 9.0], "progress": False}


def one_hot_texts(n: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    texts = [f"text {i}" for i in range(n)]
    return texts, dict(zip(texts, torch.eye(n, dtype=torch.float64), strict=True))


def by_direction(rows: list[dict]) -> dict[str, dict]:
    return {r["direction"]: r for r in rows}


def test_identity_embeddings_retrieve_their_own_text():
    texts, encoded = one_hot_texts(12)
    rows = by_direction(retrieval_rows(torch.eye(12), texts, encoded))
    for row in rows.values():
        assert row["recall@1"] == row["recall@5"] == row["recall@10"] == 1.0
        assert row["n_queries"] == row["n_gallery"] == 12
        assert row["chance@1"] == pytest.approx(1 / 12) and row["chance@10"] == pytest.approx(
            10 / 12
        )


def test_a_known_permutation_gives_the_share_of_fixed_points():
    # Images 0-9 look like the next text, 10-19 like their own: half the pairs are found. The
    # own text of a shifted image scores 0 like 18 others (ties count against): rank 20 > 10.
    texts, encoded = one_hot_texts(20)
    shift = [(i + 1) % 10 for i in range(10)] + list(range(10, 20))
    rows = by_direction(retrieval_rows(torch.eye(20)[shift], texts, encoded))
    for row in rows.values():
        assert row["recall@1"] == row["recall@5"] == row["recall@10"] == 0.5


def test_ties_count_against_the_query():
    similarity = torch.zeros(3, 4)
    relevant = torch.eye(3, 4, dtype=torch.bool)
    hits = retrieval_hits(similarity, relevant, (1, 3, 4))
    assert not hits[1].any() and not hits[3].any() and hits[4].all()  # rank = 1 + 3 ties
    similarity[0, 0] = 1e-9
    assert retrieval_hits(similarity, relevant, (1,))[1].tolist() == [True, False, False]


def test_repeated_texts_are_one_item_and_chance_counts_every_relevant_study():
    encoded = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    images = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    rows = by_direction(retrieval_rows(images, ["a", "a", "b", "b"], encoded, top_k=(1, 2, 5)))
    i2t, t2i = rows["image_to_text"], rows["text_to_image"]
    assert (i2t["n_queries"], i2t["n_gallery"], t2i["n_queries"], t2i["n_gallery"]) == (4, 2, 2, 4)
    assert i2t["recall@1"] == t2i["recall@1"] == 1.0
    assert i2t["chance@1"] == pytest.approx(0.5)  # one relevant of 2 distinct texts
    # Two relevant of 4 studies: 1 - C(2,1)/C(4,1) = 0.5; 1 - C(2,2)/C(4,2) = 5/6; k >= 4: 1.
    assert t2i["chance@1"] == pytest.approx(0.5) and t2i["chance@2"] == pytest.approx(5 / 6)
    assert t2i["chance@5"] == 1.0


def test_random_embeddings_score_near_chance():
    generator = torch.Generator().manual_seed(0)
    n, width = 300, 32
    texts = [f"t{i}" for i in range(n)]
    encoded = dict(zip(texts, torch.randn(n, width, generator=generator), strict=True))
    rows = by_direction(retrieval_rows(torch.randn(n, width, generator=generator), texts, encoded))
    for row in rows.values():
        assert row["chance@10"] == pytest.approx(10 / n)
        # Binomial(300, 1/30): standard deviation 0.010.
        assert abs(row["recall@10"] - row["chance@10"]) < 0.035
        assert abs(row["recall@1"] - 1 / n) < 0.015


def test_bad_input_is_refused():
    texts, encoded = one_hot_texts(3)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        retrieval_rows(torch.eye(3), texts[:2], encoded)
    with pytest.raises(ValueError, match="two distinct texts"):
        retrieval_rows(torch.eye(2), ["text 0", "text 0"], encoded)
    with pytest.raises(ValueError, match="at least one relevant"):
        retrieval_hits(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))


def encoder_of(texts: dict[str, torch.Tensor]):
    def encode(batch: list[str]) -> torch.Tensor:
        return torch.stack([texts[t] for t in batch])

    return encode


def test_table_per_anatomy_whole_scan_and_clip(paper_table):
    # 6 studies, liver and spleen valid (others absent); liver texts: 3 distinct, spleen texts
    # all the default (one text: skipped); each liver embedding points at its own text.
    n, a, width = 6, len(paper_table), 8
    liver, spleen = paper_table.index("liver"), paper_table.index("spleen")
    status = np.full((n, a), AnatomyStatus.ABSENT, dtype=np.int8)
    status[:, [liver, spleen]] = AnatomyStatus.WHOLE
    status[5, liver] = AnatomyStatus.TRUNCATED  # study 5 has no liver embedding
    liver_texts = ["steatosis", "cyst", "normal liver", "normal liver", "cyst", "steatosis"]
    basis = torch.eye(width)
    encoded = {"steatosis": basis[0], "cyst": basis[1], "normal liver": basis[2],
               "normal spleen": basis[3]}  # fmt: skip
    reports = [f"report {i}" for i in range(n)]
    encoded |= {r: basis[4] + 0.1 * i * basis[5] for i, r in enumerate(reports)}
    emb = torch.zeros(n, a, width)
    emb[:, liver] = torch.stack([encoded[t] for t in liver_texts])
    emb[:, spleen] = basis[3]
    texts = [[None] * a for _ in range(n)]
    for s in range(n):
        texts[s][liver], texts[s][spleen] = liver_texts[s], "normal spleen"
    frame = retrieval_table(
        study_embeddings(emb, status), texts, reports, encoder_of(encoded), paper_table
    )
    # Spleen: one text; the other anatomies: no valid study.
    assert set(frame.attrs["skipped"]) == set(paper_table.names) - {"liver"}
    rows = frame.set_index(["scope", "direction"])
    assert list(dict.fromkeys(frame["scope"])) == ["liver", "mean_over_anatomies", "whole_scan"]
    i2t = rows.loc[("liver", "image_to_text")]
    assert (i2t["n_queries"], i2t["n_gallery"], i2t["recall@1"]) == (5, 3, 1.0)
    assert i2t["chance@1"] == pytest.approx(1 / 3)
    t2i = rows.loc[("liver", "text_to_image")]
    # "steatosis" is relevant to 1 of 5 studies (study 5 is truncated), the others to 2.
    assert t2i["chance@1"] == pytest.approx((1 / 5 + 2 / 5 + 2 / 5) / 3)
    assert rows.loc[("whole_scan", "image_to_text"), "n_queries"] == 6
    # CLIP: the study embedding against the reports only.
    clip = study_embeddings(emb[:, [liver]], status, crop_rule="tile")
    clip_frame = retrieval_table(clip, texts, reports, encoder_of(encoded), paper_table)
    assert set(clip_frame["scope"]) == {"whole_scan"} and len(clip_frame) == 2
    assert math.isclose(clip_frame["chance@1"].iloc[0], 1 / 6)


def test_evaluate_writes_retrieval_probe_and_tsne(capsys, tmp_path, paper_table, tiny_bert):
    data = tmp_path / "phantom"
    manifest = generate_phantom(data, n_studies=8, splits=(0.0, 0.0, 1.0), **TINY)
    assert cli.main(["preprocess", "--config", "phantom", "--manifest", str(manifest), "--cache",
                     str(tmp_path / "cache"), "--spacing", "[12, 9, 9]", "--progress", "false",
                     "--workers", "1"]) == 0  # fmt: skip
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt", len(paper_table), tiny_bert())
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--ckpt", f"[{ckpt},{ckpt}]", "--name", "[A,B]", "--cache",
                     str(tmp_path / "cache"), "--labels", str(data / "labels.csv"),
                     "--benchmark", "phantom", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Retrieval Recall@1/5/10" in printed and "Linear probe macro AUROC" in printed
    for name in ("A", "B"):
        retrieval = pd.read_csv(out / name / "retrieval.csv")
        whole = retrieval[retrieval["scope"] == "whole_scan"].set_index("direction")
        assert whole.loc["image_to_text", "n_queries"] == 8  # every study has a report
        assert (
            (retrieval["recall@10"] >= retrieval["recall@1"]) & (retrieval["chance@1"] > 0)
        ).all()
        probe = pd.read_csv(out / name / "linear_probe.csv")
        assert set(probe["fraction"]) == {0.01, 0.05, 0.1, 1.0}
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "A" / "retrieval.csv"), pd.read_csv(out / "B" / "retrieval.csv")
    )
    for png in ("linear_probe_fewshot.png", "tsne.png"):
        assert (out / png).stat().st_size > 10_000, png
    # On by default (the demo gets them); each has its own switch.
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--ckpt", "a.ckpt", "--cache", "c", "--labels", "l.csv",
                  "--tsne", "false", "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["retrieval"] and printed["linear_probe"] and printed["tsne"] is False
