from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest

from fvlm.anatomy import load_anatomy_table
from fvlm.phantom import generate_phantom
from fvlm.phantom.findings import Finding
from fvlm.phantom.report_corpus import (
    FAILURE_CLASSES,
    CorpusReport,
    CorpusSentence,
    report_corpus,
    score_decomposition,
    write_ctrate_report,
)
from fvlm.phantom.reports import write_report
from fvlm.preprocess.decomposition import KeywordMatcher, RuleDecomposer

REGIONS = ("chest", "abdomen")


@pytest.fixture(scope="module", params=REGIONS)
def corpus(request):
    return report_corpus(150, request.param, seed=0)


def test_corpus_is_deterministic_per_report():
    _, short = report_corpus(5, "chest", seed=3)
    _, long = report_corpus(12, "chest", seed=3)
    assert short == long[:5]
    assert report_corpus(5, "chest", seed=4)[1] != short


def test_corpus_exercises_every_failure_class(corpus):
    _, reports = corpus
    seen = {f for r in reports for f in r.failures}
    assert seen == set(FAILURE_CLASSES)
    impressions = [r.impression for r in reports]
    assert sum(i in ("Not given.", "") for i in impressions) >= 10
    # Ground truth: an anatomy is abnormal exactly when an abnormal sentence is about it.
    for report in reports:
        abnormal = {a for s in report.sentences if s.abnormal for a in s.anatomies}
        assert {n for n, normal in report.normal.items() if not normal} == abnormal


def test_rules_meet_the_target_per_anatomy(corpus):
    table, reports = corpus
    decomposer = RuleDecomposer(table)
    agreement = score_decomposition(reports, lambda f, i: decomposer.decompose(f, i).anatomies)
    described = [n for n in table.names if agreement.placement_total[n]]
    assert len(described) >= 8
    for name in described:
        assert agreement.rate("normal", name) >= 0.98, (name, agreement.errors[:5])
        assert agreement.rate("placement", name) >= 0.99, (name, agreement.errors[:5])


def test_the_papers_plain_rule_fails_on_the_corpus(corpus):
    # "normal = not mentioned in the impression" with plain keyword matching: the corpus is
    # built to break it (missing/global impressions, negations), so it must score well below.
    table, reports = corpus
    matcher = KeywordMatcher(table, morphology=False)

    def paper(findings, impression):
        named = matcher.anatomies(impression)
        return {n: SimpleNamespace(text=findings, normal=n not in named) for n in table.names}

    agreement = score_decomposition(reports, paper)
    lung = agreement.rate("normal", "lung")
    assert lung < 0.9, lung


def test_score_counts_by_hand():
    sentences = (
        CorpusSentence("findings", "Liver big.", "Liver big.", ("liver",), True),
        CorpusSentence("findings", "Spleen ok.", "Spleen ok.", ("spleen",), False),
        CorpusSentence("findings", "Nodes near liver.", "Nodes near liver.", (), True),
    )
    report = CorpusReport("r", "", "", sentences, {"liver": False, "spleen": True})
    described = {
        # right: "Liver big."; wrong: "Nodes near liver." placed in the liver.
        "liver": SimpleNamespace(text="Liver big. Nodes near liver.", normal=False),
        # "Spleen ok." missing, flag wrong.
        "spleen": SimpleNamespace(text="null", normal=False),
    }
    agreement = score_decomposition([report], lambda f, i: described)
    assert agreement.rate("normal") == 0.5
    assert (agreement.placement["liver"], agreement.placement_total["liver"]) == (1, 2)
    assert (agreement.placement["spleen"], agreement.placement_total["spleen"]) == (0, 1)
    assert agreement.rate("placement") == pytest.approx(1 / 3)
    assert {e[2].split(":")[0] for e in agreement.errors} == {
        "misplaced", "missing", "normal should be True"
    }  # fmt: skip


def test_corpus_rejects_bad_arguments():
    with pytest.raises(ValueError, match="region must be"):
        report_corpus(3, "pelvis")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_reports"):
        report_corpus(-1)


def test_ctrate_style_words_the_drawn_findings_only(paper_table):
    findings = [Finding("lung/pleural_effusion", side="left", size_mm=12.0)]
    rng = np.random.default_rng(0)
    report = write_report(findings, paper_table, rng, style="ctrate")
    sentences = [s for s in report.sentences if s[1] == "lung"]
    assert any("effusion" in s[2].lower() for s in sentences)
    written = write_ctrate_report(
        findings, paper_table, np.random.default_rng(1), "abdomen", incidental=False
    )
    assert {n for n, normal in written.normal.items() if not normal} == {"lung"}
    with pytest.raises(ValueError, match="report style"):
        write_report(findings, paper_table, rng, style="prose")  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", ["paper", "chest"])
def test_ctrate_phantom_decomposes_to_its_labels(tmp_path, preset):
    generate_phantom(tmp_path, n_studies=6, seed=1, preset=preset, progress=False,
                     report_style="ctrate")  # fmt: skip
    table = load_anatomy_table(preset)
    decomposer = RuleDecomposer(table)
    with open(tmp_path / "reports.csv", newline="", encoding="utf-8") as handle:
        reports = {row["study_id"]: row for row in csv.DictReader(handle)}
    with open(tmp_path / "labels.csv", newline="", encoding="utf-8") as handle:
        labels = {row["study_id"]: row for row in csv.DictReader(handle)}
    right = total = 0
    for study_id, row in reports.items():
        abnormal = {k.split("/")[0] for k, v in labels[study_id].items() if v == "1"}
        result = decomposer.decompose(row["findings"], row["impression"])
        for name, description in result.anatomies.items():
            total += 1
            right += description.normal == (name not in abnormal)
    assert right / total >= 0.98
    with pytest.raises(ValueError, match="report_style"):
        generate_phantom(tmp_path / "x", n_studies=1, report_style="prose", progress=False)  # type: ignore[arg-type]
