from __future__ import annotations

import csv
import pickle
import re

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
    assert result.outcomes == {"rules": 8, "default": len(table) - 6}


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
