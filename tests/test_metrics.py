"""Per-disease metrics, thresholds, bootstrap and reports, on hand-computed numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_f1_score

from fvlm.evaluation import (
    binary_metrics,
    bootstrap_auroc,
    choose_threshold,
    comparison_table,
    evaluate_scores,
    format_table,
    log_tensorboard,
    plot_auroc_comparison,
    plot_roc_curves,
    roc_curve,
    write_report,
)
from fvlm.evaluation.metrics import weighted_auroc

# Six studies, two positives. Sorted by score: P N P N N N.
# ROC points (fpr, tpr): inf (0, 0) | .9 (0, .5) | .8 (.25, .5) | .7 (.25, 1) | .6 (.5, 1) | ...
# Top-left distances: 1, .5, .559, .25, .5, ...  -> threshold .7 (Youden J = .75 there, too).
SCORES6 = [0.4, 0.9, 0.6, 0.8, 0.5, 0.7]
LABELS6 = [0, 1, 0, 0, 0, 1]


def test_roc_curve_in_score_units() -> None:
    fpr, tpr, thr = roc_curve(SCORES6, LABELS6)
    assert thr[0] == math.inf
    assert thr[1:].tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert fpr.tolist() == [0, 0, 0.25, 0.25, 0.5, 0.75, 1.0]
    assert tpr.tolist() == [0, 0.5, 0.5, 1, 1, 1, 1]


def test_roc_curve_keeps_large_scores_apart() -> None:
    # torchmetrics would sigmoid these and merge 40 and 50 into 1.0.
    fpr, tpr, thr = roc_curve([40.0, 50.0, -3.0], [0, 1, 0])
    assert thr.tolist() == [math.inf, 50.0, 40.0, -3.0]
    assert tpr.tolist() == [0, 1, 1, 1]
    assert fpr.tolist() == [0, 0, 0.5, 1]


def test_hand_computed_six_studies() -> None:
    table = evaluate_scores(np.array(SCORES6)[:, None], np.array(LABELS6)[:, None], ["lung/x"])
    row = table.loc["lung/x"]
    # threshold .7 -> called positive: .9 (P), .8 (N), .7 (P): TP 2, FP 1, TN 3, FN 0.
    tp, fp, tn, fn = 2, 1, 3, 0
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    f1_pos = 2 * tp / (2 * tp + fp + fn)  # 4/5
    f1_neg = 2 * tn / (2 * tn + fn + fp)  # 6/7
    expected = {
        "threshold(top-left)": 0.7,
        "auroc": 7 / 8,  # .9 beats 4 negatives, .7 beats 3 of 4
        "sensitivity": 1.0,
        "specificity": 0.75,
        "acc": 5 / 6,
        "balanced_acc": (sens + spec) / 2,  # .875
        "precision": 2 / 3,
        "f1_positive": 0.8,
        "f1_weighted": (2 * f1_pos + 4 * f1_neg) / 6,  # 0.838095...
    }
    for column, value in expected.items():
        assert row[column] == pytest.approx(value, abs=1e-12), column
    assert (row["n_pos"], row["n_neg"], row["n_excluded"]) == (2, 4, 0)
    assert bool(row["in_macro"])


def test_weighted_f1_matches_torchmetrics_multiclass() -> None:
    s = torch.tensor(SCORES6, dtype=torch.float64)
    y = torch.tensor(LABELS6)
    ours = binary_metrics(s, y, 0.7)["f1_weighted"]
    reference = multiclass_f1_score((s >= 0.7).long(), y, num_classes=2, average="weighted")
    assert ours == pytest.approx(float(reference), abs=1e-6)
    assert ours == pytest.approx((2 * 0.8 + 4 * 6 / 7) / 6)


def test_precision_is_zero_when_nothing_called_positive() -> None:
    metrics = binary_metrics([0.1, 0.2, 0.3], [0, 1, 0], threshold=0.5)
    assert metrics["precision"] == 0.0
    assert metrics["sensitivity"] == 0.0
    assert metrics["specificity"] == 1.0
    assert metrics["f1_positive"] == 0.0


def test_youden_and_top_left_pick_their_documented_points() -> None:
    # Sorted: P P P N P N N N P (5 positives, 4 negatives).
    # thr .7: (fpr 0, tpr .6)  -> J .60 (max),  distance .40
    # thr .5: (fpr .25, tpr .8) -> J .55,        distance sqrt(.0625 + .04) = .32 (min)
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    labels = [1, 1, 1, 0, 1, 0, 0, 0, 1]
    assert choose_threshold(scores, labels, "youden") == 0.7
    assert choose_threshold(scores, labels, "top-left") == 0.5
    table = evaluate_scores(
        np.array(scores)[:, None], np.array(labels)[:, None], ["d"], threshold_method="youden"
    )
    assert table.loc["d", "threshold(youden)"] == 0.7
    assert table.loc["d", "sensitivity"] == pytest.approx(0.6)
    assert table.loc["d", "specificity"] == pytest.approx(1.0)


def test_ties_go_to_the_higher_threshold() -> None:
    # Sorted .8P .65P .4N .35P .2N .1N: thresholds .65 (0, 2/3) and .35 (1/3, 1) are both 1/3 from
    # the corner; the stricter one wins (as in CT-CLIP's sweep).
    scores = [0.8, 0.65, 0.4, 0.35, 0.2, 0.1]
    labels = [1, 1, 0, 1, 0, 0]
    assert choose_threshold(scores, labels, "top-left") == 0.65


def test_perfect_inverted_and_random_scores() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    labels = rng.integers(0, 2, n)
    scores = np.stack(
        [labels + 0.1 * rng.random(n), -labels + 0.1 * rng.random(n), rng.random(n)], axis=1
    )
    table = evaluate_scores(scores, np.repeat(labels[:, None], 3, 1), ["perfect", "inv", "random"])
    assert table.loc["perfect", "auroc"] == 1.0
    assert table.loc["perfect", "balanced_acc"] == 1.0
    assert table.loc["perfect", "f1_weighted"] == 1.0
    assert table.loc["inv", "auroc"] == 0.0
    assert table.loc["random", "auroc"] == pytest.approx(0.5, abs=0.03)
    assert table.loc["macro", "auroc"] == pytest.approx(
        table.loc[["perfect", "inv", "random"], "auroc"].mean()
    )


def test_auroc_equals_torchmetrics_on_probabilities() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(0.3 * labels + rng.random(300) * 0.7, 0, 1).round(2)  # many ties
    table = evaluate_scores(scores[:, None], labels[:, None], ["d"])
    reference = binary_auroc(torch.tensor(scores), torch.tensor(labels))
    assert table.loc["d", "auroc"] == pytest.approx(float(reference), abs=1e-9)


def test_single_class_disease_is_listed_not_dropped() -> None:
    scores = np.array([[0.1, 0.2], [0.8, 0.3], [0.4, 0.9], [0.7, 0.5]])
    labels = np.array([[0, 0], [1, 0], [0, 0], [1, 0]])
    table = evaluate_scores(scores, labels, ["a/ok", "b/never"])
    assert list(table.index) == ["a/ok", "b/never", "macro"]
    assert math.isnan(table.loc["b/never", "auroc"])
    assert not table.loc["b/never", "in_macro"]
    assert table.attrs["single_class"] == ["b/never"]
    assert table.loc["macro", "auroc"] == table.loc["a/ok", "auroc"] == 1.0


def test_nan_labels_and_scores_are_excluded_per_disease() -> None:
    scores = pd.DataFrame({"d": [0.9, 0.2, np.nan, 0.6, 0.1], "study_id": list("abcde")})
    labels = pd.DataFrame({"study_id": list("edcba"), "d": [0, np.nan, 1, 0, 1]})
    table = evaluate_scores(scores, labels)
    # aligned by study id: a(.9, 1) b(.2, 0) c(NaN) d(.6, nan) e(.1, 0)
    assert table.loc["d", "n_excluded"] == 2
    assert (table.loc["d", "n_pos"], table.loc["d", "n_neg"]) == (1, 2)
    assert table.loc["d", "auroc"] == 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="threshold_method"):
        evaluate_scores(np.zeros((3, 1)), np.array([[0], [1], [0]]), threshold_method="best")
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        evaluate_scores(np.zeros((3, 1)), np.array([[0], [2], [0]]))
    with pytest.raises(ValueError, match="single class"):
        choose_threshold([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        evaluate_scores(np.zeros((3, 1)), np.zeros((4, 1)))


def test_weighted_auroc_with_unit_weights_is_the_auroc() -> None:
    rng = np.random.default_rng(2)
    y = torch.tensor(rng.integers(0, 2, 50))
    s = torch.tensor(rng.random(50).round(1), dtype=torch.float64)
    ours = weighted_auroc(s, y, torch.ones(1, 50))
    assert float(ours[0]) == pytest.approx(float(binary_auroc(s, y)), abs=1e-6)  # float32 there
    # doubling one study's weight equals duplicating it
    dup_s, dup_y = torch.cat([s, s[:1]]), torch.cat([y, y[:1]])
    w = torch.ones(1, 50)
    w[0, 0] = 2
    assert float(weighted_auroc(s, y, w)[0]) == pytest.approx(float(binary_auroc(dup_s, dup_y)))


def test_bootstrap_interval_contains_point_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (200, 2)).astype(float)
    scores = labels * 0.4 + rng.random((200, 2))
    table = evaluate_scores(scores, labels, ["a", "b"], n_boot=300, seed=7)
    for key in ("a", "b", "macro"):
        low, point, high = table.loc[key, ["auroc_ci_low", "auroc", "auroc_ci_high"]]
        assert low < point < high
        assert high - low < 0.25
    low, high, macro = bootstrap_auroc(scores, labels, n_boot=300, seed=7)
    assert np.allclose(low, table.loc[["a", "b"], "auroc_ci_low"])
    assert macro == pytest.approx(tuple(table.loc["macro", ["auroc_ci_low", "auroc_ci_high"]]))


def _two_methods() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    rng = np.random.default_rng(4)
    keys = ["lung/emphysema", "heart/cardiomegaly", "global/lymphadenopathy"]
    labels = pd.DataFrame(rng.integers(0, 2, (60, 3)), columns=keys)
    labels["global/lymphadenopathy"] = 0  # single class
    fine = pd.DataFrame(labels.to_numpy() * 0.6 + rng.random((60, 3)), columns=keys)
    clip = pd.DataFrame(labels.to_numpy() * 0.2 + rng.random((60, 3)), columns=keys)
    results = {"fVLM": evaluate_scores(fine, labels), "CLIP": evaluate_scores(clip, labels)}
    return fine, labels, results


def test_comparison_table_lists_every_disease_and_macro() -> None:
    _, _, results = _two_methods()
    text = comparison_table(results)
    lines = text.splitlines()
    assert "fVLM auroc" in lines[0] and "CLIP balanced_acc" in lines[0]
    for key in ["lung/emphysema", "heart/cardiomegaly", "global/lymphadenopathy", "macro"]:
        (line,) = [ln for ln in lines if ln.startswith(key + " ")]
        cells = line.split()[1:]
        if key == "global/lymphadenopathy":
            assert cells == ["nan"] * 4
            continue
        expected = [
            f"{results[m].loc[key, c]:.3f}"
            for m in ("fVLM", "CLIP")
            for c in ("auroc", "balanced_acc")
        ]
        assert cells == expected
    macro = results["fVLM"].loc[["lung/emphysema", "heart/cardiomegaly"], "auroc"].mean()
    assert f"{macro:.3f}" in [ln for ln in lines if ln.startswith("macro")][0]
    assert "nan" not in format_table(results["fVLM"]).splitlines()[-2]  # macro row is finite


def test_write_report_csv_json_tensorboard(tmp_path) -> None:
    _, _, results = _two_methods()
    paths = write_report(results["fVLM"], tmp_path, name="fvlm", extra={"fallbacks": {"x": 1}})
    csv = pd.read_csv(paths["csv"], index_col="disease")
    assert csv.loc["macro", "auroc"] == pytest.approx(results["fVLM"].loc["macro", "auroc"])
    summary = json.loads(paths["json"].read_text())
    assert summary["threshold_method"] == "top-left"
    assert summary["single_class_diseases"] == ["global/lymphadenopathy"]
    assert "weighted" in summary["definitions"]["f1_weighted"]
    assert summary["macro"]["auroc"] == pytest.approx(results["fVLM"].loc["macro", "auroc"])
    assert summary["extra"] == {"fallbacks": {"x": 1}}
    assert list((tmp_path / "tensorboard" / "fvlm").glob("events.out.tfevents.*"))


def test_log_tensorboard_tags() -> None:
    _, _, results = _two_methods()

    class Recorder:
        def __init__(self) -> None:
            self.tags: dict[str, float] = {}

        def add_scalar(self, tag: str, value: float, step: int | None = None) -> None:
            self.tags[tag] = value

    writer = Recorder()
    log_tensorboard(results["fVLM"], writer)
    assert writer.tags["zero_shot/macro/auroc"] == results["fVLM"].loc["macro", "auroc"]
    assert "zero_shot/lung/emphysema/auroc" in writer.tags
    assert "zero_shot/global/lymphadenopathy/auroc" not in writer.tags  # NaN skipped


def test_plots_write_png(tmp_path) -> None:
    scores, labels, results = _two_methods()
    roc = plot_roc_curves(scores, labels, tmp_path / "roc.png", results["fVLM"])
    bars = plot_auroc_comparison(results, tmp_path / "cmp" / "auroc.png")
    for path in (roc, bars):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
