from __future__ import annotations

import csv
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import pytest

from fvlm.anatomy import PRESETS, load_anatomy_table
from fvlm.phantom import generate_phantom
from fvlm.phantom.reports import KeywordIndex
from fvlm.preprocess.decomposition import (
    AnatomyDescription,
    KeywordMatcher,
    LLMConfig,
    LLMDecomposer,
    RuleDecomposer,
    SectionText,
    build_decomposer,
    merge_sections,
    split_sentences,
)


@pytest.fixture(scope="module")
def table(paper_table):
    return paper_table


@pytest.fixture(scope="module")
def matcher(table):
    return KeywordMatcher(table)


# -- string matching ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The pulmonary artery is dilated.", {"pulmonary_artery"}),
        ("Main PULMONARY ARTERIES enlarged.", {"pulmonary_artery"}),
        ("Pulmonary nodule in the lingula.", {"lung"}),
        ("Splenic vein is patent.", {"portal_vein"}),
        ("Splenic hilum unremarkable.", {"spleen"}),
        ("Gall bladder distended.", {"gallbladder"}),
        ("Urinary bladder distended.", {"urinary_bladder"}),
        ("Duodenal diverticulum.", {"small_bowel"}),
        ("Jejunum and ileum normal.", {"small_bowel"}),
        ("Small\nbowel loops are dilated.", {"small_bowel"}),
        ("Small-bowel obstruction.", {"small_bowel"}),
        ("Main bronchi are patent.", {"trachea"}),
        ("Left adrenal gland nodule.", {"adrenal_gland"}),
        ("Portal vein and splenic vein are patent.", {"portal_vein"}),
        ("The liver, spleen and pancreas are unremarkable.", {"liver", "spleen", "pancreas"}),
        # Whole words only: no liver in "delivered", no rib in "ribbon", no hip in "relationship".
        ("Contrast delivered via a ribbon catheter; relationship unclear.", set()),
        ("Degenerative change at L4-L5 and S1.", {"lumbar_vertebrae", "sacrum"}),
    ],
)
def test_keyword_matching_is_longest_first_whole_word_case_insensitive(matcher, text, expected):
    assert matcher.anatomies(text) == expected


def test_match_positions_and_keywords(matcher):
    text = "Dilated pulmonary trunk; clear lungs."
    found = [(m.start, m.end, m.keyword, m.anatomies) for m in matcher.matches(text)]
    assert found == [
        (8, 23, "pulmonary trunk", ("pulmonary_artery",)),
        (31, 36, "lungs", ("lung",)),
    ]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_keyword_and_label_finds_its_own_anatomy(preset):
    table = load_anatomy_table(preset)
    matcher = KeywordMatcher(table)
    for anatomy in table.anatomies:
        for keyword in (anatomy.label, *anatomy.keywords):
            assert anatomy.name in matcher.anatomies(f"Note: {keyword.upper()}."), keyword


@pytest.mark.parametrize("preset", PRESETS)
def test_phantom_disease_terms_name_their_own_anatomy(preset):
    # The phantom writes these terms into impressions; the normal flag relies on them matching.
    table = load_anatomy_table(preset)
    matcher = KeywordMatcher(table)
    for disease in table.diseases("phantom"):
        if disease.anatomy is None:
            continue
        for term in disease.terms:
            assert matcher.anatomies(term) == {disease.anatomy}, (disease.key, term)


@pytest.mark.parametrize("preset", PRESETS)
def test_phantom_wording_and_decomposition_find_the_same_anatomies(preset):
    # One keyword rule (fvlm.anatomy.keyword_pattern) for both: the phantom counts overlapping
    # matches too, so it finds at least what the leftmost-longest matcher finds.
    table = load_anatomy_table(preset)
    matcher, index = KeywordMatcher(table), KeywordIndex(table)
    keywords = [k for anatomy in table.anatomies for k in (anatomy.label, *anatomy.keywords)]
    # Each keyword as written and with its spaces and hyphens swapped ("ground glass").
    texts = [
        f"{variant} {rest}." for k in keywords
        for variant in (k, k.replace("-", " "), k.replace(" ", "-"))
        for rest in ("is unremarkable", "and small-bowel loops", "near the pulmonary artery")
    ]  # fmt: skip
    for text in texts:
        assert matcher.anatomies(text) <= index.anatomies(text), text


def test_matcher_without_keywords_is_rejected(table):
    with pytest.raises(ValueError, match="no keywords"):
        KeywordMatcher([])


# -- sentence splitting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Liver normal. Spleen normal.", ["Liver normal.", "Spleen normal."]),
        ("A 1.5 cm renal cyst. No stones!", ["A 1.5 cm renal cyst.", "No stones!"]),
        ("Liver enlarged; spleen normal", ["Liver enlarged.", "spleen normal."]),
        ("1. Hepatic steatosis. 2. Renal cyst.", ["Hepatic steatosis.", "Renal cyst."]),
        ("1) Gallstone\n2) Splenomegaly", ["Gallstone.", "Splenomegaly."]),
        ("- Ascites\n* Effusion,", ["Ascites.", "Effusion."]),
        (
            "Nodes, e.g. in the hilum, are small. Done.",
            ["Nodes, e.g. in the hilum, are small.", "Done."],
        ),
        ("", []),
        ("  \n 1. \n", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


# -- the rule-based decomposer on hand-written reports -----------------------------------------

FINDINGS = (
    "The liver is enlarged with a 2 cm hepatic cyst. The pulmonary artery is dilated. "
    "Duodenal wall thickening is seen; the spleen is normal in size. Lungs are clear."
)
IMPRESSION = "1. Hepatic cyst.\n2. Dilated pulmonary trunk.\n3. Small gallstone."


def test_rules_exact_texts_and_flags(table):
    result = RuleDecomposer(table).decompose(FINDINGS, IMPRESSION)
    mentioned = {k: v for k, v in result.anatomies.items() if v.source != "default"}
    assert mentioned == {
        "liver": AnatomyDescription(
            "The liver is enlarged with a 2 cm hepatic cyst. Hepatic cyst.", False, "rules"
        ),
        "pulmonary_artery": AnatomyDescription(
            "The pulmonary artery is dilated. Dilated pulmonary trunk.", False, "rules"
        ),
        # Sub-structure: the duodenum is the small bowel (paper's example).
        "small_bowel": AnatomyDescription("Duodenal wall thickening is seen. null", True, "rules"),
        "spleen": AnatomyDescription("the spleen is normal in size. null", True, "rules"),
        # "pulmonary artery" / "pulmonary trunk" sentences are not the lung's.
        "lung": AnatomyDescription("Lungs are clear. null", True, "rules"),
        "gallbladder": AnatomyDescription("null Small gallstone.", False, "rules"),
    }
    assert list(result.anatomies) == table.names
    assert result.anatomies["kidney"] == AnatomyDescription(
        "kidney shows no significant abnormalities.", True, "default"
    )
    assert result.anatomies["portal_vein"].text == (
        "portal vein and splenic vein shows no significant abnormalities."
    )
    assert {d.normal_source for d in mentioned.values()} == {"impression"}
    assert result.anatomies["kidney"].normal_source == "default"
    assert result.outcomes == {"rules": 8, "default": len(table) - 6, "normal_impression": 6}


def test_rules_empty_report_is_all_default(table):
    result = RuleDecomposer(table).decompose("", "  ")
    assert all(d.source == "default" and d.normal for d in result.anatomies.values())
    assert result.outcomes == {"default": len(table)}


def test_sentence_with_two_anatomies_goes_to_both(table):
    result = RuleDecomposer(table).decompose("", "Liver and spleen are enlarged.")
    assert result.anatomies["liver"].text == "null Liver and spleen are enlarged."
    assert result.anatomies["spleen"].text == "null Liver and spleen are enlarged."
    assert not result.anatomies["liver"].normal and not result.anatomies["spleen"].normal


# -- merge -------------------------------------------------------------------------------------


def test_merge_null_cases_and_sources(table):
    findings = {
        "liver": SectionText("Liver big.", "llm"),
        "spleen": SectionText("Spleen ok.", "llm"),
    }
    impression = {
        "liver": SectionText("Hepatomegaly.", "rules"),
        "kidney": SectionText("Cyst.", "llm"),
    }
    merged = merge_sections(table, findings, impression)
    assert merged["liver"] == AnatomyDescription("Liver big. Hepatomegaly.", False, "rules")
    assert merged["spleen"] == AnatomyDescription("Spleen ok. null", True, "llm")
    assert merged["kidney"] == AnatomyDescription("null Cyst.", False, "llm")
    assert merged["heart"] == AnatomyDescription(
        "heart shows no significant abnormalities.", True, "default"
    )
    assert len(merged) == len(table)


def test_merge_rejects_unknown_anatomy(table):
    with pytest.raises(KeyError, match="thyroid"):
        merge_sections(table, {"thyroid": SectionText("x", "rules")}, {})


# -- factory and pickling ----------------------------------------------------------------------


def test_build_decomposer(table, tmp_path):
    assert isinstance(build_decomposer("rules", table), RuleDecomposer)
    llm = build_decomposer("llm", table, LLMConfig(model="m", cache_dir=str(tmp_path)))
    assert isinstance(llm, LLMDecomposer)
    assert llm.config.cache_dir == tmp_path
    with pytest.raises(ValueError, match="needs an LLMConfig"):
        build_decomposer("llm", table)
    with pytest.raises(ValueError, match="unknown decomposer 'gpt'"):
        build_decomposer("gpt", table)  # type: ignore[arg-type]


def test_rule_decomposer_pickles(table):
    decomposer = RuleDecomposer(table)
    clone = pickle.loads(pickle.dumps(decomposer))
    assert clone.decompose(FINDINGS, IMPRESSION) == decomposer.decompose(FINDINGS, IMPRESSION)


# -- agreement with the synthetic phantom's ground truth ---------------------------------------


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["study_id"]: row for row in csv.DictReader(handle)}


def test_rules_agree_with_phantom_ground_truth(table, tmp_path):
    generate_phantom(tmp_path, n_studies=60, seed=0, progress=False)
    reports, labels = _read_csv(tmp_path / "reports.csv"), _read_csv(tmp_path / "labels.csv")
    assert len(reports) == 60 and reports.keys() == labels.keys()
    decomposer = RuleDecomposer(table)
    pairs, disagreements, misplaced = 0, [], []
    for study_id, report in reports.items():
        result = decomposer.decompose(report["findings"], report["impression"])
        texts = {name: d.text for name, d in result.anatomies.items()}
        positive = [k for k, v in labels[study_id].items() if k != "study_id" and v == "1"]
        abnormal = {key.split("/")[0] for key in positive}
        for name, description in result.anatomies.items():
            pairs += 1
            if description.normal != (name not in abnormal):
                disagreements.append((study_id, name, report["impression"]))
        # Every impression sentence lands in the text of an abnormal anatomy, and of none that is
        # normal; every abnormal anatomy gets an impression sentence; a sentence that names a
        # positive disease (by its table term) lands in that disease's anatomy.
        sentences = split_sentences(report["impression"])
        for sentence in sentences:
            owners = {name for name, text in texts.items() if sentence in text}
            if abnormal and (not owners or not owners <= abnormal):
                misplaced.append((study_id, sentence, sorted(owners), sorted(abnormal)))
        for name in abnormal:
            if not any(sentence in texts[name] for sentence in sentences):
                misplaced.append((study_id, name, "no impression sentence", texts[name]))
        for key in positive:
            anatomy, disease = key.split("/")
            terms = next(d.terms for d in table[anatomy].diseases if d.name == disease)
            for sentence in sentences:
                named = any(re.search(rf"\b{re.escape(t)}\b", sentence, re.I) for t in terms)
                if named and sentence not in texts[anatomy]:
                    misplaced.append((study_id, sentence, anatomy, texts[anatomy]))
    agreement = 1 - len(disagreements) / pairs
    print(f"phantom normal-flag agreement: {agreement:.4f} over {pairs} (study, anatomy) pairs")
    assert agreement >= 0.98, disagreements[:20]
    assert not misplaced, misplaced[:20]


# -- reports as radiologists write them (negation, subjects, clauses, morphology, fallback) -----
# Hand-written sentences, none taken from the report corpus, so they check the rules out of sample.


@pytest.mark.parametrize(
    ("clause", "expected"),
    [
        ("No pleural effusion.", "negated"),
        ("There is no evidence of free air.", "negated"),
        ("Pneumothorax was not detected.", "negated"),
        ("The spleen is not enlarged.", "negated"),
        ("Both kidneys show no calculi or hydronephrosis.", "negated"),
        ("Heart size is normal.", "normal"),
        ("Mediastinal structures are natural.", "normal"),
        ("The pancreas is within normal limits.", "normal"),
        ("Gallbladder normal in appearance, no stones.", "negated"),
        ("Small left pleural effusion.", "affirmed"),
        ("Moderate splenomegaly without focal lesion.", "affirmed"),
        ("A 6 mm nodule with smooth margins.", "affirmed"),
        ("No change in the known 6 mm nodule.", "affirmed"),  # pseudo-negation
        ("The right kidney is atrophic.", "affirmed"),  # no lexicon word: not normal wording
        ("Possible small hiatal hernia.", "uncertain"),
        ("Early pneumonia cannot be excluded.", "uncertain"),
        ("Consolidation in the left lower lobe?", "uncertain"),
        ("No suspicious nodule.", "negated"),  # the cue is inside the negation's scope
    ],
)
def test_negation_uncertainty_and_normal_wording(clause, expected):
    from fvlm.preprocess.decomposition.negation import assertion

    assert assertion(clause) == expected


def test_impression_negations_do_not_flag(table):
    findings = "A 5 mm nodule in the left lower lobe."
    result = RuleDecomposer(table).decompose(
        findings, "Small pulmonary nodule. Heart size is normal."
    )
    assert not result.anatomies["lung"].normal and result.anatomies["heart"].normal
    assert result.anatomies["heart"].text == "null Heart size is normal."
    result = RuleDecomposer(table).decompose("", "No pleural effusion. Heart size is normal.")
    # Nothing abnormal in the impression or the findings: every anatomy is normal.
    assert all(d.normal for d in result.anatomies.values())


@pytest.mark.parametrize(
    ("sentence", "about"),
    [
        ("Lymph nodes in the paraesophageal region measure 11 mm.", set()),
        ("Enlarged lymph nodes adjacent to the esophagus.", set()),
        ("The central venous catheter tip lies in the right atrium.", set()),
        ("Right atrial catheter in good position.", set()),
        ("Hypodense liver lesion at the level of the lung bases.", {"liver"}),
        ("Bilateral pleural effusions, possibly due to cardiac failure.", {"lung"}),
        ("Pleural effusion secondary to pancreatitis.", {"lung"}),
        ("The liver edge extends below the costal margin.", {"liver"}),
        ("Findings consistent with emphysema.", {"lung"}),  # only the diagnosis names one
        ("Simple cyst of the left kidney, consistent with a renal cyst.", {"kidney"}),
        ("The liver and spleen are enlarged.", {"liver", "spleen"}),
        ("The heart is enlarged, but there is no pericardial effusion.", {"heart"}),
        ("In the mediastinal window; the aortic arch shows calcified plaques.", {"aorta"}),
    ],
)
def test_sentence_goes_to_its_subject(table, sentence, about):
    result = RuleDecomposer(table).decompose(sentence, "")
    placed = {name for name, d in result.anatomies.items() if d.source != "default"}
    assert placed == about


def test_cross_anatomy_sentence_keeps_the_flag_on_its_subject(table):
    result = RuleDecomposer(table).decompose(
        "", "Pleural effusion, possibly due to cardiac failure. Catheter tip in the right atrium."
    )
    assert not result.anatomies["lung"].normal
    assert result.anatomies["heart"].normal and result.anatomies["heart"].source == "default"


def test_window_introduction_stays_with_its_clause(table):
    findings = (
        "When examined in the lung parenchyma window; a 4 mm nodule in the right upper lobe; "
        "the heart is normal. Bone window;"
    )
    assert split_sentences(findings) == [
        "When examined in the lung parenchyma window: a 4 mm nodule in the right upper lobe.",
        "the heart is normal.",
        "Bone window.",
    ]
    result = RuleDecomposer(table).decompose(findings, "Not given.")
    assert result.anatomies["lung"].text == (
        "When examined in the lung parenchyma window: a 4 mm nodule in the right upper lobe. null"
    )
    # The introduction alone is no finding, and "lung parenchyma window" is not about the lung.
    only_intro = RuleDecomposer(table).decompose("In the lung parenchyma window; heart normal.", "")
    assert only_intro.anatomies["lung"].source == "default"
    assert only_intro.anatomies["heart"].text == "In the lung parenchyma window: heart normal. null"


@pytest.mark.parametrize(
    ("text", "anatomy"),
    [
        ("Atelectasis in the lingular segment.", "lung"),
        ("Ground-glass opacity in both upper lobes.", "lung"),
        ("Left atrial enlargement.", "heart"),
        ("Myocardial calcification.", "heart"),
        ("Appendiceal wall thickening.", "colon"),
        ("Cecal wall thickening.", "colon"),
    ],
)
def test_inflected_keywords_find_their_anatomy(matcher, text, anatomy):
    assert matcher.anatomies(text) == {anatomy}


def test_inflections_skip_short_words_and_other_anatomies_keywords(table):
    from fvlm.preprocess.decomposition.string_matching import inflections

    assert inflections("lingula") == {"lingular", "lingulae"}
    assert inflections("upper lobe") == {"upper lobes"}
    assert inflections("ivc") == set() and inflections("l1") == set()
    plain = KeywordMatcher(table, morphology=False)
    assert plain.anatomies("Lingular segment.") == set()
    # "splenic" stays the spleen's and never becomes an inflection of another keyword.
    assert KeywordMatcher(table).keywords["splenic"] == ("spleen",)


@pytest.mark.parametrize(
    ("impression", "source"),
    [
        ("Not given.", "findings"),
        ("", "findings"),
        ("The examination is within normal limits.", "findings"),
        ("No pleural effusion. Heart size is normal.", "findings"),
        ("Hepatic steatosis.", "impression"),
    ],
)
def test_normal_flag_falls_back_to_findings(table, impression, source):
    findings = (
        "Liver density has decreased, in keeping with steatosis. A 4 mm nodule was observed "
        "in the lingular segment. The spleen is natural. No hydronephrosis."
    )
    result = RuleDecomposer(table).decompose(findings, impression)
    flags = {n: (d.normal, d.normal_source) for n, d in result.anatomies.items()}
    assert flags["liver"] == (False, source)
    # With the impression deciding, the lung finding it does not summarise is normal (paper).
    assert flags["lung"] == (source == "impression", source)
    assert flags["spleen"] == (True, source) and flags["kidney"] == (True, source)
    assert flags["heart"][1] in (source, "default")
    assert flags["pancreas"] == (True, "default")
    assert result.outcomes[f"normal_{source}"] == sum(
        d.source != "default" for d in result.anatomies.values()
    )


def test_phantom_default_reports_are_byte_identical(tmp_path):
    # The demo trains on these reports: the template style must not change by a byte.
    import hashlib

    generate_phantom(tmp_path, n_studies=8, seed=0, progress=False)
    digest = hashlib.sha256((tmp_path / "reports.csv").read_bytes()).hexdigest()
    assert digest == "c39821c9004763137a534adab486d064945296f679697af1185697c764166cde"


def test_normal_flags_alone_match_decompose(table):
    decomposer = RuleDecomposer(table)
    findings, impression = "Hepatic cyst. Lungs are clear.", "Not given."
    flags = decomposer.normal_flags(findings, impression)
    result = decomposer.decompose(findings, impression)
    assert {n: (f.normal, f.source) for n, f in flags.items()} == {
        n: (d.normal, d.normal_source) for n, d in result.anatomies.items()
    }
    assert flags["liver"].normal is False and flags["liver"].source == "findings"


# -- bad reports: a clear, counted outcome per study, nothing else lost ------------------------

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "preprocess"
HUGE = " ".join(["The liver is enlarged; the spleen is normal."] * 2300)  # ~101 KB

BAD_REPORTS = {
    # study: (findings, impression, outcomes)
    "german": (
        "Die Leber ist vergrößert. Die Milz ist unauffällig. Keine freie Flüssigkeit.",
        "Hepatomegalie.",
        {"default": 35, "no_anatomy_found": 1},
    ),
    "turkish": (
        "Karaciğer boyutu artmıştır. Dalak normaldir. Batında serbest sıvı izlenmedi.",
        "Hepatomegali.",
        {"default": 35, "no_anatomy_found": 1},
    ),
    "empty_findings": ("", "Enlarged liver.", {"rules": 1, "default": 34, "normal_impression": 1}),
    "not_given_findings": (
        "Not given.",
        "Enlarged liver. Small renal cyst.",
        {"rules": 2, "default": 33, "normal_impression": 2},
    ),
    "global_impression_only": (
        "",
        "The examination is within normal limits.",
        {"default": 35, "no_anatomy_found": 1},
    ),
    "report_100kb": (
        HUGE,
        "Not given.",
        {"rules": 2, "default": 33, "normal_findings": 2},
    ),
}


@pytest.mark.parametrize("study", sorted(BAD_REPORTS))
def test_bad_reports_have_a_counted_outcome(table, study):
    findings, impression, outcomes = BAD_REPORTS[study]
    result = RuleDecomposer(table).decompose(findings, impression)
    assert len(table.names) == 35
    assert result.outcomes == outcomes
    if study == "report_100kb":
        assert len(HUGE) > 100_000
        assert result.anatomies["liver"].normal is False  # the missing impression: findings
        assert result.anatomies["spleen"].normal is True
    if "no_anatomy_found" in outcomes:
        assert all(d.normal and d.source == "default" for d in result.anatomies.values())


def test_preprocess_keeps_every_bad_report_and_counts_it(tmp_path, capsys):
    from fvlm.preprocess.cli import main

    manifest = generate_phantom(
        tmp_path / "phantom", n_studies=2, seed=3, shape=(24, 32, 32), spacing=(8.0, 5.0, 5.0),
        progress=False,
    )  # fmt: skip
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    fields = list(rows[0])
    bad = [
        {**rows[0], "study_id": study, "findings": findings, "impression": impression}
        for study, (findings, impression, _) in sorted(BAD_REPORTS.items())
    ]
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows + bad)
    cache = tmp_path / "cache"
    config = PRESETS_DIR / "phantom.yaml"
    args = ["--config", str(config), "--manifest", str(manifest), "--cache", str(cache),
            "--workers", "1", "--progress", "false"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{2 + len(BAD_REPORTS)} processed ok" in out
    # 3 studies with text but no anatomy of the table, counted in the run's summary.
    assert re.search(r"no_anatomy_found[ =:]+3\b", out), out
    for study, (findings, impression, outcomes) in BAD_REPORTS.items():
        report = json.loads((cache / "studies" / study / "report.json").read_text())
        assert (report["findings"], report["impression"]) == (findings.strip(), impression.strip())
        sources = Counter(a["source"] for a in report["anatomies"].values())
        expected = Counter(rules=outcomes.get("rules", 0), default=outcomes["default"])
        assert sources == +expected, study
