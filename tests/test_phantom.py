"""Synthetic CT phantom: files, orientation, HU, masks, disease signatures, reports, CLI."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from fvlm.anatomy import load_anatomy_table, totalsegmentator_classes
from fvlm.cli import main as fvlm_main
from fvlm.phantom import generate_phantom, synthesize_study
from fvlm.phantom.cli import main as phantom_main
from fvlm.phantom.diseases import plan_findings, sample_disease_keys
from fvlm.phantom.frame import DEMO_PLAN
from fvlm.phantom.generate import assign_splits
from fvlm.phantom.geometries import ScanGeometry, cut_by_field_of_view
from fvlm.phantom.reports import NORMAL_IMPRESSIONS, KeywordIndex, write_report
from fvlm.phantom.storage import Storage
from fvlm.phantom.volume import nominal_span
from fvlm.preprocess.decomposition.rules import RuleDecomposer, split_sentences

SMALL = {"shape": (24, 32, 40), "spacing": (13.0, 10.0, 10.0)}
TABLE = load_anatomy_table("paper")
PHANTOM_KEYS = [d.key for d in TABLE.diseases("phantom")]
CLASS_ID = {name: cid for cid, name in totalsegmentator_classes("v2").items()}
LUNG = [n for n in CLASS_ID if n.startswith("lung_")]
SAR = ("S", "A", "R")


def _mask(study, *names: str) -> np.ndarray:
    return np.isin(study.labels, [CLASS_ID[n] for n in names])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Scaled data and affine of a NIfTI file reoriented to the canonical (S, A, R) axes."""
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(SAR))
    data = apply_orientation(image.get_fdata(), transform)
    affine = image.affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    return data, affine


# --- files, determinism, splits ------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "a"
    generate_phantom(out, n_studies=8, seed=3, progress=False, **SMALL)
    return out


def test_layout_and_manifest(dataset: Path) -> None:
    manifest = _read_csv(dataset / "manifest.csv")
    assert list(manifest[0]) == ["study_id", "image", "mask", "findings", "impression", "split"]
    assert [r["study_id"] for r in manifest] == [f"phantom_{i:05d}" for i in range(8)]
    for row in manifest:
        image, mask = nib.load(dataset / row["image"]), nib.load(dataset / row["mask"])
        assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert image.shape == mask.shape and np.allclose(image.affine, mask.affine)
        assert row["findings"] and row["impression"]
    assert sorted(r["split"] for r in manifest).count("train") == 6
    assert {r["split"] for r in manifest} == {"train", "val", "test"}
    labels = _read_csv(dataset / "labels.csv")
    assert list(labels[0]) == ["study_id", *PHANTOM_KEYS]
    assert all(v in "01" for row in labels for k, v in row.items() if k != "study_id")
    reports = _read_csv(dataset / "reports.csv")
    assert [list(r.values()) for r in reports] == [
        [r["study_id"], r["findings"], r["impression"]] for r in manifest
    ]
    info = json.loads((dataset / "phantom.json").read_text())
    assert info["seed"] == 3 and len(info["studies"]) == 8


def test_deterministic_per_seed_and_independent_of_count(dataset: Path, tmp_path: Path) -> None:
    again, fewer, other = tmp_path / "b", tmp_path / "c", tmp_path / "d"
    generate_phantom(again, n_studies=8, seed=3, progress=False, **SMALL)
    generate_phantom(fewer, n_studies=3, seed=3, progress=False, **SMALL)
    generate_phantom(other, n_studies=1, seed=4, progress=False, **SMALL)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert _digest(dataset / name) == _digest(again / name), name
    for i in range(3):
        for folder in ("images", "masks"):
            name = f"{folder}/phantom_{i:05d}.nii.gz"
            assert _digest(dataset / name) == _digest(fewer / name)
    name = "images/phantom_00000.nii.gz"
    assert _digest(dataset / name) != _digest(other / name)


def test_split_counts_are_exact() -> None:
    splits = assign_splits(20, (0.7, 0.15, 0.15), seed=0)
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (14, 3, 3)
    assert assign_splits(3, (0.7, 0.15, 0.15), seed=0).count("test") == 1
    assert assign_splits(20, (0.7, 0.15, 0.15), seed=1) != splits


# --- orientation and rescaling ---------------------------------------------------------------


@pytest.mark.parametrize(
    "storage",
    [
        Storage(("R", "A", "S")),
        Storage(("L", "P", "S")),
        Storage(("L", "A", "S"), rescaled=True),
        Storage(("S", "A", "R")),
        Storage(("I", "P", "L"), rescaled=True),
    ],
    ids=lambda s: s.name,
)
def test_files_decode_to_the_canonical_array(storage: Storage, tmp_path: Path) -> None:
    study = dataclasses.replace(synthesize_study(1, **SMALL), storage=storage)
    nib.save(study.image(), tmp_path / "ct.nii.gz")
    nib.save(study.mask(), tmp_path / "seg.nii.gz")
    image, mask = nib.load(tmp_path / "ct.nii.gz"), nib.load(tmp_path / "seg.nii.gz")
    assert nib.aff2axcodes(image.affine) == storage.axcodes
    assert np.allclose(image.affine, mask.affine)
    assert image.dataobj.inter == (-1024.0 if storage.rescaled else 0.0)
    raw = np.asarray(image.dataobj.get_unscaled())
    assert (raw.min() >= 0) == storage.rescaled  # stored HU + 1024 is never negative
    hu, affine = _canonical(image)
    labels, _ = _canonical(mask)
    assert np.array_equal(hu, study.hu) and np.array_equal(labels, study.labels)
    assert np.allclose(affine, study.affine)
    assert np.allclose(nib.affines.voxel_sizes(image.affine)[[0, 1, 2]], image.header.get_zooms())
    closest = nib.as_closest_canonical(image)  # RAS: the canonical array transposed
    assert np.array_equal(closest.get_fdata().transpose(2, 1, 0), study.hu)


def test_storage_mix() -> None:
    rng = np.random.default_rng(0)
    draws = [Storage.sample(rng) for _ in range(2000)]
    other = np.mean([d.axcodes != ("R", "A", "S") for d in draws])
    rescaled = np.mean([d.rescaled for d in draws])
    assert 0.2 < other < 0.3 and 0.2 < rescaled < 0.3


# --- anatomy: HU and masks -------------------------------------------------------------------

HU_BANDS = {
    "liver": (90, 135),
    "spleen": (95, 150),
    "kidney_left": (140, 210),
    "kidney_right": (140, 210),
    "pancreas": (70, 125),
    "gallbladder": (-15, 35),
    "urinary_bladder": (-15, 25),
    "heart": (95, 160),
    "aorta": (120, 240),
    "inferior_vena_cava": (95, 170),
    "esophagus": (25, 70),
    "trachea": (-1000, -500),
    "stomach": (-60, 60),
    "small_bowel": (10, 60),
    "duodenum": (-30, 60),
    "colon": (-300, 60),
    "autochthon_left": (35, 80),
    "iliopsoas_right": (35, 80),
    "spinal_cord": (15, 55),
    "sternum": (300, 600),
    "sacrum": (250, 500),
    "hip_left": (150, 800),
    **{lobe: (-920, -780) for lobe in LUNG},
    **{f"vertebrae_{v}": (250, 650) for v in ("T1", "T6", "T12", "L1", "L5")},
    **{f"rib_{s}_{k}": (350, 700) for s in ("left", "right") for k in (1, 6, 12)},
}


@pytest.fixture(scope="module")
def healthy() -> list:
    return [synthesize_study(i, seed=7, diseases=[]) for i in range(4)]


def test_organ_hu_is_realistic(healthy: list) -> None:
    for study in healthy[:2]:
        for name, (low, high) in HU_BANDS.items():
            median = float(np.median(study.hu[_mask(study, name)]))
            assert low <= median <= high, (name, median)


def test_masks_cover_exactly_the_drawn_organs(healthy: list) -> None:
    drawn = (
        ["trachea", "esophagus", "heart", "aorta", "inferior_vena_cava", "liver", "spleen"]
        + ["stomach", "pancreas", "gallbladder", "small_bowel", "duodenum", "colon"]
        + ["kidney_left", "kidney_right", "urinary_bladder", "spinal_cord", "sternum", "sacrum"]
        + [f"{m}_{s}" for m in ("autochthon", "iliopsoas", "hip") for s in ("left", "right")]
        + [f"vertebrae_T{k}" for k in range(1, 13)]
        + [f"vertebrae_L{k}" for k in range(1, 6)]
        + [f"rib_{s}_{k}" for s in ("left", "right") for k in range(1, 13)]
        + LUNG
    )
    small = synthesize_study(0, seed=7, diseases=[], shape=(24, 24, 24), spacing=(13, 13, 16))
    for study in [*healthy, small]:
        present = set(np.unique(study.labels).tolist()) - {0}
        assert present == {CLASS_ID[n] for n in drawn}
        hu = study.hu.astype(float)
        body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -500])
        assert np.median(hu[~body]) < -980  # air around the patient
        unlabelled = body & (study.labels == 0)
        # No air (lung, bowel gas) and no bone is left outside the masks ...
        assert (hu[unlabelled] < -400).sum() == 0 and (hu[unlabelled] > 300).sum() == 0
        # ... what is left is fat and soft tissue (skin, body wall, discs, renal sinus fat).
        assert -130 < np.median(hu[unlabelled]) < 60
        assert not _mask(study, "kidney_cyst_left", "kidney_cyst_right").any()


# --- disease signatures ----------------------------------------------------------------------


def _lung_interior(study) -> np.ndarray:
    return ndimage.binary_erosion(_mask(study, *LUNG))


def _volume_ml(study, mask: np.ndarray) -> float:
    return float(mask.sum() * np.prod(study.grid.spacing) / 1000)


def _emphysema(s) -> float:
    return float(np.median(s.hu[_lung_interior(s)]))


def _effusion(s) -> float:
    sides = [[n for n in LUNG if n.endswith(side)] for side in ("left", "right")]
    return max(float((s.hu[_mask(s, *lobes)] > -300).mean()) for lobes in sides)


def _nodule(s) -> float:
    return float((_lung_interior(s) & (s.hu > -300) & (s.hu < 200)).sum())


def _heart_muscle(s) -> float:
    return _volume_ml(s, _mask(s, "heart") & (s.hu > 60))


def _pericardial_fluid(s) -> float:
    return float((s.hu[_mask(s, "heart")] < 60).mean())


def _renal_cyst(s) -> float:
    return _volume_ml(s, _mask(s, "kidney_cyst_left", "kidney_cyst_right"))


def _hydronephrosis(s) -> float:
    return float((s.hu[_mask(s, "kidney_left", "kidney_right")] < 60).mean())


def _kidney_max(s) -> float:
    return float(s.hu[_mask(s, "kidney_left", "kidney_right")].max())


def _liver_median(s) -> float:
    return float(np.median(s.hu[_mask(s, "liver")]))


def _liver_fluid(s) -> float:
    return float((_mask(s, "liver") & (s.hu < 40)).sum())


def _organ_max(name: str):
    return lambda s: float(s.hu[_mask(s, name)].max())


def _organ_volume(name: str):
    return lambda s: _volume_ml(s, _mask(s, name))


def _aortic_calcium(s) -> float:
    return float((_mask(s, "aorta") & (s.hu > 450)).sum())


# disease -> (statistic, test that positives pass given the healthy values, healthy bound)
SIGNATURES = {
    "lung/emphysema": (_emphysema, lambda p, h: p < min(h) - 50),
    "lung/pleural_effusion": (_effusion, lambda p, h: p > 0.05 > 10 * max(h)),
    "lung/nodule": (_nodule, lambda p, h: p >= 1 and max(h) == 0),
    "heart/cardiomegaly": (_heart_muscle, lambda p, h: p > 1.5 * np.median(h)),
    "heart/pericardial_effusion": (_pericardial_fluid, lambda p, h: p > 0.2 > 10 * max(h)),
    "kidney/cyst": (_renal_cyst, lambda p, h: p >= 4 / 3 * np.pi * 0.75**3 and max(h) == 0),
    "kidney/hydronephrosis": (_hydronephrosis, lambda p, h: p > 0.05 > 5 * max(h)),
    "kidney/calculi": (_kidney_max, lambda p, h: p > 400 > max(h) + 100),
    "liver/steatosis": (_liver_median, lambda p, h: p < min(h) - 30),
    "liver/cyst": (_liver_fluid, lambda p, h: p >= 5 and max(h) == 0),
    "gallbladder/gallstone": (_organ_max("gallbladder"), lambda p, h: p > 400 > max(h) + 200),
    "pancreas/pancreatitis": (_organ_volume("pancreas"), lambda p, h: p > 2 * np.median(h)),
    "spleen/splenomegaly": (_organ_volume("spleen"), lambda p, h: p > 1.5 * np.median(h)),
    "urinary_bladder/stones": (_organ_max("urinary_bladder"), lambda p, h: p > 400 > max(h) + 200),
    "aorta/calcification": (_aortic_calcium, lambda p, h: p >= 3 and max(h) == 0),
}


def test_every_phantom_disease_has_a_signature() -> None:
    assert sorted(SIGNATURES) == sorted(PHANTOM_KEYS)


@pytest.mark.parametrize("key", sorted(SIGNATURES))
def test_disease_signature_is_measurable(key: str, healthy: list) -> None:
    statistic, separates = SIGNATURES[key]
    negatives = [statistic(s) for s in healthy]
    for index in (20, 21):
        study = synthesize_study(index, seed=7, diseases=[key])
        assert study.diseases == (key,)
        value = statistic(study)
        assert separates(value, negatives), (key, value, negatives)


def test_lesion_sizes_survive_coarse_grids() -> None:
    keys = ["kidney/calculi", "lung/nodule", "kidney/cyst", "urinary_bladder/stones"]
    study = synthesize_study(3, seed=7, diseases=keys)
    sizes = {f.key: f.size_mm for f in study.findings}
    assert sizes["kidney/calculi"] >= 8 and sizes["lung/nodule"] >= 10
    assert sizes["kidney/cyst"] >= 15 and sizes["urinary_bladder/stones"] >= 10
    coarse = synthesize_study(3, seed=7, diseases=keys, **SMALL)
    assert _kidney_max(coarse) > 400 and _nodule(coarse) >= 1 and _renal_cyst(coarse) > 0


def test_disease_prevalence() -> None:
    rng = np.random.default_rng(0)
    draws = [sample_disease_keys(rng, PHANTOM_KEYS) for _ in range(4000)]
    assert max(map(len, draws)) == 4 and min(map(len, draws)) == 0
    prevalence = {k: np.mean([k in d for d in draws]) for k in PHANTOM_KEYS}
    assert all(0.12 < p < 0.2 for p in prevalence.values()), prevalence


# --- reports ---------------------------------------------------------------------------------


def _random_reports(table, n: int) -> list:
    keys = [d.key for d in table.diseases("phantom")]
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        findings = plan_findings(sample_disease_keys(rng, keys), rng)
        findings = [dataclasses.replace(f, size_mm=f.size_mm or 12.0) for f in findings.values()]
        out.append((findings, write_report(findings, table, rng)))
    return out


@pytest.mark.parametrize("preset", ["paper", "chest"])
def test_report_sentences_concern_one_anatomy(preset: str) -> None:
    table = load_anatomy_table(preset)
    index = KeywordIndex(table)
    for findings, report in _random_reports(table, 300):
        diseased = {f.anatomy for f in findings}
        for section, anatomy, text in report.sentences:
            assert text in (report.findings if section == "findings" else report.impression)
            found = index.anatomies(text)
            if anatomy is None or anatomy not in table.names:
                assert not found, text
            else:
                assert found == {anatomy}, text
        assert index.anatomies(report.impression) == diseased, report.impression
        impressions = [s for s in report.sentences if s[0] == "impression"]
        if diseased:
            assert len(impressions) == len(diseased)
        else:
            assert [s[2] for s in impressions][0] in NORMAL_IMPRESSIONS
        for finding in findings:  # every disease is described in the findings too
            assert any(s[1] == finding.anatomy for s in report.sentences if s[0] == "findings")


def test_reports_vary_and_use_sub_structures() -> None:
    reports = [r for _, r in _random_reports(TABLE, 200)]
    sentences = {s[2] for r in reports for s in r.sentences if s[0] == "findings"}
    assert len(sentences) > 150
    assert len({r.findings.split(". ")[0] for r in reports}) > 30  # shuffled order
    text = " ".join(r.findings for r in reports).lower()
    for word in ("duodenum", "jejunal", "renal pelvis", "appendix", "gastric", "pericardium"):
        assert word in text, word
    assert np.mean([len(r.findings.split(". ")) for r in reports]) > 8  # many anatomies


def test_rule_decomposition_recovers_the_labels(dataset: Path) -> None:
    decomposer = RuleDecomposer(TABLE)
    manifest = _read_csv(dataset / "manifest.csv")
    labels = {row["study_id"]: row for row in _read_csv(dataset / "labels.csv")}
    for row in manifest:
        diseased = {k.split("/")[0] for k in PHANTOM_KEYS if labels[row["study_id"]][k] == "1"}
        assert set(decomposer.extract(row["impression"])) == diseased
        for sentence in split_sentences(row["findings"]):
            assert len(decomposer.matcher.anatomies(sentence)) <= 1, sentence


def test_impression_names_exactly_the_labelled_anatomies(dataset: Path) -> None:
    index = KeywordIndex(TABLE)
    labels = {row["study_id"]: row for row in _read_csv(dataset / "labels.csv")}
    for row in _read_csv(dataset / "reports.csv"):
        diseased = {k.split("/")[0] for k in PHANTOM_KEYS if labels[row["study_id"]][k] == "1"}
        assert index.anatomies(row["impression"]) == diseased


# --- arguments and CLI -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_studies": 0}, "n_studies"),
        ({"n_studies": 2.5}, "n_studies"),
        ({"seed": -1}, "seed"),
        ({"splits": (0.5, 0.5, 0.5)}, "sum to 1"),
        ({"splits": (1.0, 0.0)}, "three"),
        ({"splits": (1.2, -0.1, -0.1)}, "non-negative"),
        ({"shape": (10, 64, 80)}, "too small"),
        ({"shape": (40, 64)}, "three integers"),
        ({"spacing": (8.0, 0.0, 5.0)}, "positive"),
        ({"preset": "no-such-table"}, "neither a preset"),
        ({"geometry": "knee"}, "geometry must be one of"),
        ({"geometry": "chest", "shape": (40, 64, 80)}, "shape applies to the demo"),
        ({"geometry": "chest", "spacing": (13.0, 10.0, 10.0)}, "too coarse"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        generate_phantom(tmp_path / "x", progress=False, **{"n_studies": 1, **kwargs})
    assert not (tmp_path / "x").exists()


def test_forcing_an_unknown_disease_raises() -> None:
    with pytest.raises(ValueError, match="not phantom diseases"):
        synthesize_study(0, diseases=["liver/cirrhosis"], **SMALL)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["--out_dir", str(out), "--n_studies", "2", "--seed", "1", "--progress", "false"]
    args += ["--shape", "[24, 32, 40]", "--spacing", "[13, 10, 10]"]
    fvlm_main(["phantom", *args])
    assert len(_read_csv(out / "manifest.csv")) == 2
    assert nib.load(out / "images/phantom_00001.nii.gz").shape in {(40, 32, 24), (24, 32, 40)}
    assert phantom_main(["--out_dir", str(out), "--n_studies", "0", "--progress", "false"]) == 2
    assert "n_studies" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        fvlm_main(["phantom", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--out_dir", "--n_studies", "--seed", "--shape", "--spacing", "--splits"):
        assert option in help_text


# --- scan geometries: real millimetre extents, organs cut by the field of view -----------------

ADULT = ("chest", "abdomen", "chest_abdomen_pelvis")
COARSE = (6.0, 6.0, 6.0)  # same millimetre extents as the scanner-like grids, ~0.2 s a study
TOLERANCE = COARSE[0]  # a measured extent is off by at most one voxel


@dataclasses.dataclass
class Scan:
    """A coarse adult study as the tests measure it: grouped anatomy map and cut faces."""

    study: object
    anatomy: np.ndarray
    cut: dict[str, list[str]]

    def present(self, name: str) -> bool:
        return bool((self.anatomy == TABLE[name].id).any())

    def extent(self, name: str, axis: int = 0) -> float:
        """Extent (mm) of anatomy ``name`` along ``axis`` (0: cranio-caudal, 2: left-right)."""
        others = tuple(a for a in range(3) if a != axis)
        index = np.flatnonzero((self.anatomy == TABLE[name].id).any(others))
        return float((index[-1] - index[0] + 1) * self.study.grid.spacing[axis])

    def whole(self, name: str) -> bool:
        return self.present(name) and name not in self.cut


@pytest.fixture(scope="module")
def adult_scans() -> dict[str, list[Scan]]:
    scans = {}
    for geometry in ADULT:
        scans[geometry] = []
        for index in range(10):
            study = synthesize_study(index, seed=0, geometry=geometry, spacing=COARSE)
            anatomy = TABLE.group(study.labels, "v2")
            scans[geometry].append(Scan(study, anatomy, cut_by_field_of_view(anatomy, TABLE)))
    return scans


def _within(value: float, low: float, high: float) -> bool:
    return low - TOLERANCE <= value <= high + TOLERANCE


@pytest.mark.parametrize("geometry", ADULT)
def test_adult_anatomy_has_real_extents(geometry: str, adult_scans: dict) -> None:
    for scan in adult_scans[geometry]:
        diseases = scan.study.diseases
        if scan.whole("lung"):
            assert _within(scan.extent("lung"), 220, 300), scan.extent("lung")
        assert _within(scan.extent("lung", axis=2), 250, 350), scan.extent("lung", axis=2)
        if scan.whole("heart") and "heart/pericardial_effusion" not in diseases:
            if "heart/cardiomegaly" in diseases:
                assert scan.extent("heart") >= 150 - TOLERANCE, scan.extent("heart")
            else:
                assert _within(scan.extent("heart"), 110, 130), scan.extent("heart")
        if scan.present("trachea"):  # from the neck (cut at the top) to the carina
            assert scan.cut["trachea"] == ["superior"]
            assert _within(scan.extent("trachea"), 120, 180), scan.extent("trachea")
        for name in ("kidney", "liver", "spleen"):
            if scan.whole(name):
                assert _within(scan.extent(name), 70, 150), (name, scan.extent(name))
    if geometry != "abdomen":  # the lungs are whole: the heart grows upwards, never below them
        assert all(s.whole("lung") and s.whole("heart") for s in adult_scans[geometry])


def test_chest_scans_cut_the_upper_abdomen(adult_scans: dict) -> None:
    scans = adult_scans["chest"]
    for scan in scans:
        height, width, _ = scan.study.grid.extent
        assert 250 <= height <= 420 + TOLERANCE and 300 - TOLERANCE <= width <= 450 + TOLERANCE
        assert not scan.present("urinary_bladder") and not scan.present("hip")
        # The esophagus leaves through the top, the aorta through the bottom: together they run
        # through the whole scan, as in CT-RATE.
        assert "superior" in scan.cut["esophagus"] and "inferior" in scan.cut["aorta"]
        tubes = np.isin(scan.anatomy, [TABLE["aorta"].id, TABLE["esophagus"].id]).any((1, 2))
        assert tubes.all()
        assert not any(key.startswith("urinary_bladder") for key in scan.study.diseases)
    share = {
        name: np.mean([name in s.cut and "inferior" in s.cut[name] for s in scans])
        for name in ("liver", "spleen", "kidney")
    }
    assert share["liver"] >= 0.8 and share["kidney"] >= 0.8 and share["spleen"] >= 0.4, share


def test_abdomen_scans_cut_the_lung_bases(adult_scans: dict) -> None:
    scans = adult_scans["abdomen"]
    for scan in scans:
        assert scan.cut["lung"] == ["superior"] and scan.cut["heart"] == ["superior"]
        assert not scan.present("trachea")
        assert scan.whole("kidney") and scan.whole("urinary_bladder") and scan.whole("pancreas")
        assert 20 <= scan.extent("lung") <= 120  # only the bases
    liver_dome_cut = np.mean(["liver" in s.cut for s in scans])
    assert 0.0 < liver_dome_cut <= 0.3  # sometimes, as when a scan starts a little low


def test_chest_abdomen_pelvis_holds_the_trunk(adult_scans: dict) -> None:
    for scan in adult_scans["chest_abdomen_pelvis"]:
        assert 500 <= scan.study.grid.extent[0] <= 700
        for name in ("lung", "heart", "aorta", "liver", "spleen", "kidney", "urinary_bladder"):
            assert scan.whole(name), name
        assert _within(scan.extent("aorta"), 330, 420)  # arch to the iliac bifurcation


def test_scanner_like_grids() -> None:
    rng = np.random.default_rng(0)
    for name, (low, high) in {"chest": (250, 420), "abdomen": (250, 450)}.items():
        scans = ScanGeometry.checked(name)
        grids = [scans.adult_frame(rng).grid for _ in range(200)]
        spacing = np.array([g.spacing for g in grids])
        assert {g.shape[1:] for g in grids} == {(512, 512)}
        assert spacing[:, 1:].min() >= 300 / 512 and spacing[:, 1:].max() <= 450 / 512
        assert set(spacing[:, 0]) <= {1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0}
        assert len(set(spacing[:, 0])) >= 4
        heights = np.array([g.extent[0] for g in grids])
        assert low - 5 <= heights.min() and heights.max() <= high + 5, (name, heights)
        assert spacing[:, 1].max() / spacing[:, 1].min() > 1.2  # body sizes vary


def test_coarse_spacing_keeps_the_millimetre_extents() -> None:
    coarse = synthesize_study(2, seed=0, geometry="chest", spacing=COARSE)
    finer = synthesize_study(2, seed=0, geometry="chest", spacing=(4.0, 4.0, 4.0))
    assert np.allclose(coarse.grid.extent, finer.grid.extent, atol=4.0)
    assert coarse.diseases == finer.diseases
    volumes = [_volume_ml(s, _mask(s, *LUNG)) for s in (coarse, finer)]
    assert abs(volumes[0] / volumes[1] - 1) < 0.05


def test_nominal_spans_follow_the_painters(healthy: list) -> None:
    """The spans that decide which diseases a field of view shows match the drawn organs."""
    for study in healthy:
        anatomy, depth = TABLE.group(study.labels, "v2"), study.grid.shape[0]
        for name in ("kidney", "liver", "gallbladder", "pancreas", "spleen", "aorta", "heart"):
            rows = np.flatnonzero((anatomy == TABLE[name].id).any((1, 2)))
            low, high = nominal_span(name, DEMO_PLAN)
            assert abs(rows[0] / depth - low) < 0.05 and abs((rows[-1] + 1) / depth - high) < 0.05


def test_diseases_lie_inside_the_field_of_view() -> None:
    with pytest.raises(ValueError, match="outside this study's field of view"):
        synthesize_study(0, geometry="chest", spacing=COARSE, diseases=["urinary_bladder/stones"])
    study = synthesize_study(0, geometry="abdomen", spacing=COARSE, diseases=["kidney/calculi"])
    assert _kidney_max(study) > 400


#: sha256 (first 16 hex) of the hu and label arrays of demo studies 0-3 with seed 11, computed
#: with the generator before the adult geometries existed: the demo must not change.
DEMO_DIGESTS = {
    "default": ["f6d6ebcd1be15aea", "bc2eeba69a9cee18", "a8947003aa5d6eb6", "8af41fc2fd8815e7"],
    "small": ["fd70b863a2c1b7d5", "928760b33cb38a16", "829f32f8194d25cb", "49dd58e680216f60"],
}


@pytest.mark.parametrize("grid", sorted(DEMO_DIGESTS))
def test_demo_geometry_is_unchanged(grid: str) -> None:
    kwargs = SMALL if grid == "small" else {}
    for index, expected in enumerate(DEMO_DIGESTS[grid]):
        study = synthesize_study(index, seed=11, **kwargs)
        digest = hashlib.sha256(study.hu.tobytes())
        digest.update(study.labels.tobytes())
        assert digest.hexdigest()[:16] == expected, index


def test_generate_adult_geometry_records_grids_and_cuts(tmp_path: Path) -> None:
    generate_phantom(
        tmp_path, n_studies=2, seed=0, geometry="chest", spacing=COARSE, progress=False
    )
    info = json.loads((tmp_path / "phantom.json").read_text())
    assert info["geometry"] == "chest" and info["shape"] is None and info["spacing"] == [6.0] * 3
    for record in info["studies"]:
        image = nib.load(tmp_path / f"images/{record['study_id']}.nii.gz")
        assert sorted(image.shape) == sorted(record["shape"])
        assert np.allclose(sorted(image.header.get_zooms()), COARSE)
        assert "inferior" in record["cut_by_field_of_view"]["liver"]
        assert "lung" not in record["cut_by_field_of_view"]
