"""Report metrics: BLEU, ROUGE-L, METEOR, CIDEr, clinical accuracy, GREEN, the classifier."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from openai_stub_server import Reply, Request, StubOpenAIServer

from fvlm.clinical_classifier import classifier_scores
from fvlm.preprocess.decomposition.llm import LLMConfig
from fvlm.report_metrics import (
    clinical_accuracy,
    green_score,
    language_scores,
    normalize_report,
)

REPORTS = [
    "Moderate left hydronephrosis. The liver is normal.",
    "Enlarged cardiac silhouette; small pericardial effusion.",
]


def test_normalize_report_splits_punctuation_and_lowercases() -> None:
    assert normalize_report("Liver: Normal.  Spleen (enlarged).") == (
        "liver : normal . spleen ( enlarged ) ."
    )


def test_identical_reports_score_one() -> None:
    scores, _ = language_scores(REPORTS, REPORTS, meteor=False)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert scores[key] == pytest.approx(1.0), key


def test_bleu1_and_rouge_l_match_hand_computation() -> None:
    # Hypothesis "a b c d" vs reference "a b e f": unigram precision 2/4, same length (BP = 1);
    # LCS "a b" = 2 -> P = R = F = 0.5. Bigram precision 1/3 -> BLEU-2 = sqrt(0.5 * 1/3).
    scores, _ = language_scores(["a b c d"], ["a b e f"], meteor=False)
    assert scores["bleu1"] == pytest.approx(0.5)
    assert scores["bleu2"] == pytest.approx(math.sqrt(0.5 / 3))
    assert scores["rouge_l"] == pytest.approx(0.5)


def test_empty_generation_scores_zero_but_empty_reference_is_an_error() -> None:
    scores, _ = language_scores([""], ["the liver is normal."], meteor=False)
    assert scores["bleu1"] == 0.0 and scores["rouge_l"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        language_scores(["x"], [" "])
    with pytest.raises(ValueError, match="1 generated reports but 2 references"):
        language_scores(["x"], ["a", "b"])


@pytest.mark.slow  # starts METEOR's Java process (seconds idle, minutes on a loaded machine)
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs a Java runtime")
def test_meteor_and_cider_from_pycocoevalcap() -> None:
    pytest.importorskip("pycocoevalcap")
    same, notes = language_scores(REPORTS, REPORTS)
    assert notes == []
    assert same["meteor"] == pytest.approx(1.0)
    worse, _ = language_scores(["the spleen is normal.", "no effusion."], REPORTS)
    assert worse["meteor"] < 0.5 and worse["cider"] < same["cider"]


def test_cider_without_meteor() -> None:
    pytest.importorskip("pycocoevalcap")
    same, notes = language_scores(REPORTS, REPORTS, meteor=False)
    worse, _ = language_scores(["the spleen is normal.", "no effusion."], REPORTS, meteor=False)
    assert math.isnan(same["meteor"]) and notes == ["METEOR: not computed (meteor=False)"]
    assert worse["cider"] < same["cider"]


def test_clinical_accuracy_per_disease_and_macro() -> None:
    truth = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]])
    pred = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    out = clinical_accuracy(pred, truth, ["a", "b"])
    assert out["acc/a"] == pytest.approx(0.5)  # rows 0 and 3 right
    assert out["acc/b"] == pytest.approx(1.0)
    assert out["acc_macro"] == pytest.approx(0.75)
    # F1: a has TP 1, FP 1, FN 1 -> 0.5; b -> 1.0.
    assert out["f1_macro"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="must both be"):
        clinical_accuracy(pred[:, :1], truth, ["a", "b"])


def test_green_is_skipped_without_a_server() -> None:
    value, note = green_score(["a"], ["a"], None)
    assert math.isnan(value) and "skipped" in note


def test_green_through_an_openai_compatible_server() -> None:
    answers = iter(['{"matched": 3, "significant_errors": 1}', "no idea"])

    def responder(request: Request) -> Reply:
        assert "Reference report:" in request.prompt
        return Reply(content=next(answers))

    with StubOpenAIServer(responder) as server:
        config = LLMConfig(base_url=server.base_url, model="judge", max_attempts=1)
        value, note = green_score(["x", "y"], ["a", "b"], config)
    assert value == pytest.approx(0.75)
    assert "1 answers unreadable" in note


def test_classifier_scores_match_hand_computation() -> None:
    truth = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]])
    pred = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]])
    out = classifier_scores(pred, truth, ["a", "b"])
    # a: TP 1, FP 1, FN 1 -> P = R = F1 = 0.5; b: TP 1, FP 1, FN 0 -> P 0.5, R 1, F1 2/3.
    assert out["precision/a"] == pytest.approx(0.5) and out["recall/b"] == pytest.approx(1.0)
    assert out["f1/b"] == pytest.approx(2 / 3)
    assert out["f1_macro"] == pytest.approx((0.5 + 2 / 3) / 2)
