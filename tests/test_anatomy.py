from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fvlm.anatomy import (
    AnatomyTable,
    AnatomyTableError,
    keyword_pattern,
    load_anatomy_table,
    normalize_keyword,
    totalsegmentator_classes,
)


def test_paper_preset_is_tab6_as_printed(paper_table: AnatomyTable):
    assert len(paper_table) == 35  # the printed Tab. 6 (the text says 36)
    assert paper_table.ids == list(range(1, 36))
    assert paper_table["small_bowel"].totalseg_v1 == ("small_bowel", "duodenum")
    assert {"jejunum", "ileum", "duodenum"} <= set(paper_table["small_bowel"].keywords)
    assert paper_table["heart"].totalseg_v2 == ("heart", "atrial_appendage_left")
    assert "kidney_cyst_left" in paper_table["kidney"].totalseg_v2
    assert "vertebrae_S1" in paper_table["sacrum"].totalseg_v2


def test_paper_preset_has_the_54_diseases(paper_table: AnatomyTable):
    table = paper_table
    paper = table.diseases("paper")
    assert len(paper) == 54
    per_anatomy = {}
    for disease in paper:
        per_anatomy[disease.anatomy] = per_anatomy.get(disease.anatomy, 0) + 1
    # Tab. 10: adrenal 2, bladder 2, colon 8, esophagus 2, gallbladder 3, heart 2, kidney 4,
    # liver 8, lung 5, pancreas 5, portal vein 2, small intestine 5, spleen 3, stomach 2, sacrum 1
    assert per_anatomy == {
        "adrenal_gland": 2, "urinary_bladder": 2, "colon": 8, "esophagus": 2, "gallbladder": 3,
        "heart": 2, "kidney": 4, "liver": 8, "lung": 5, "pancreas": 5, "portal_vein": 2,
        "small_bowel": 5, "spleen": 3, "stomach": 2, "sacrum": 1,
    }  # fmt: skip
    keys = [d.key for d in table.diseases()]
    assert len(keys) == len(set(keys))
    assert "liver/steatosis" in keys


def test_chest_preset_scores_all_18_ctrate_labels(chest_table: AnatomyTable):
    table = chest_table
    labels = {d.label for d in table.diseases("ctrate")}
    assert len(labels) == 18
    assert {"Medical material", "Lymphadenopathy"} <= {d.label for d in table.global_diseases}
    assert all(d.key.startswith("global/") for d in table.global_diseases)


def test_every_class_is_a_real_totalsegmentator_class(paper_table, chest_table):
    for table in (paper_table, chest_table):
        for version in ("v1", "v2"):
            known = set(totalsegmentator_classes(version).values())
            for anatomy in table.anatomies:
                assert set(getattr(anatomy, f"totalseg_{version}")) <= known
    assert len(totalsegmentator_classes("v1")) == 104
    assert len(totalsegmentator_classes("v2")) == 117


def _label_map(version: str, names: list[str], rng: np.random.Generator) -> np.ndarray:
    ids = {name: cid for cid, name in totalsegmentator_classes(version).items()}
    layout = rng.integers(0, len(names) + 1, size=(6, 7, 8))
    lut = np.array([0] + [ids[n] for n in names])
    return lut[layout], layout


def test_v1_and_v2_label_maps_group_to_the_same_anatomy_ids(paper_table: AnatomyTable):
    table = paper_table
    shared = [
        "liver", "spleen", "kidney_left", "lung_upper_lobe_right", "duodenum", "small_bowel",
        "vertebrae_L3", "rib_left_7", "aorta", "urinary_bladder", "gluteus_medius_right",
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    v1, layout = _label_map("v1", shared, rng)
    v2, layout2 = _label_map("v2", shared, np.random.default_rng(0))
    assert np.array_equal(layout, layout2)
    g1, g2 = table.group(v1, "v1"), table.group(v2, "v2")
    assert g1.dtype == np.uint8
    assert np.array_equal(g1, g2)
    assert set(np.unique(g1)) == {0} | {table[n].id for n in
                                        ["liver", "spleen", "kidney", "lung", "small_bowel",
                                         "lumbar_vertebrae", "rib", "aorta", "urinary_bladder",
                                         "gluteus"]}  # fmt: skip
    # Heart chambers (v1) and v2's single heart class land in the same group.
    ids_v1 = {n: c for c, n in totalsegmentator_classes("v1").items()}
    ids_v2 = {n: c for c, n in totalsegmentator_classes("v2").items()}
    heart = table["heart"].id
    assert table.group(np.array([ids_v1["heart_ventricle_left"]]), "v1")[0] == heart
    assert table.group(np.array([ids_v2["heart"]]), "v2")[0] == heart
    assert table.group(np.array([ids_v2["skull"]]), "v2")[0] == 0


def test_group_rejects_foreign_class_ids(paper_table: AnatomyTable):
    table = paper_table
    with pytest.raises(ValueError, match="outside TotalSegmentator v1"):
        table.group(np.array([[200]]), "v1")
    with pytest.raises(ValueError, match="'v1' or 'v2'"):
        table.lookup("v3")


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _entry(**overrides: object) -> dict:
    entry = {
        "id": 1, "name": "liver", "label": "liver", "totalseg_v1": ["liver"],
        "totalseg_v2": ["liver"], "keywords": ["liver", "hepatic"],
    }  # fmt: skip
    entry.update(overrides)
    return entry


def test_user_file_loads(tmp_path):
    table = load_anatomy_table(_write(tmp_path, {"name": "mine", "anatomies": [_entry()]}))
    assert table.names == ["liver"] and table["liver"].default_text.startswith("liver shows no")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"anatomies": [{k: v for k, v in _entry().items() if k != "keywords"}]},
         r"anatomies\[0\] \(liver\): missing key 'keywords'"),
        ({"anatomies": [_entry(id="one")]}, r"key 'id' must be int"),
        ({"anatomies": [_entry(totalseg_v2=["livre"])]}, r"unknown TotalSegmentator class 'livre'"),
        ({"anatomies": [_entry(), _entry(name="liver2")]}, r"duplicate id or name"),
        ({"anatomies": [_entry(), _entry(id=2, name="b", keywords=["x"])]}, r"in both 'liver'"),
        ({"anatomies": [_entry(diseases=[{"name": "x", "terms": "fatty", "sets": []}])]},
         r"diseases\[0\] \(x\): key 'terms' must be list"),
        ({"anatomies": []}, r"'anatomies' is empty"),
        ({"name": "x"}, r"missing key 'anatomies'"),
    ],
)  # fmt: skip
def test_malformed_file_names_the_key(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(AnatomyTableError, match=message) as err:
        load_anatomy_table(path)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(AnatomyTableError, match="neither a preset"):
        load_anatomy_table(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("anatomies: [\n")
    with pytest.raises(AnatomyTableError, match="not valid YAML"):
        load_anatomy_table(bad)


# -- keywords ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Small bowel loops.", ["Small bowel"]),
        ("SMALL-BOWEL obstruction.", ["SMALL-BOWEL"]),
        ("Small\n   bowel loops.", ["Small\n   bowel"]),  # a line break inside the keyword
        ("Small bowels.", []),  # whole words only
        ("smallbowel", []),
        ("The pulmonary artery and a pulmonary nodule.", ["pulmonary artery", "pulmonary"]),
        ("Contrast delivered via a ribbon catheter.", []),  # no "liver" in "delivered"
        ("Changes at L4-L5, not at L45.", ["L4"]),  # a hyphen ends a word, a digit does not
    ],
)
def test_keyword_pattern_is_whole_word_gap_tolerant_and_longest_first(text, found):
    pattern = keyword_pattern(["small bowel", "pulmonary", "pulmonary artery", "liver", "L4"])
    assert [m.group(0) for m in pattern.finditer(text)] == found


def test_keyword_normalisation_and_blank_keywords():
    assert normalize_keyword("  Small -\n Bowel ") == "small bowel"
    # Duplicates after normalisation compile to one alternative.
    assert keyword_pattern(["Small-bowel", "small bowel"]).pattern.count("small") == 1
    with pytest.raises(ValueError, match="non-blank keyword"):
        keyword_pattern(["", "  "])
