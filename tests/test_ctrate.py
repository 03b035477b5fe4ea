"""CT-RATE and Rad-ChestCT readers on small folders in the published layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fvlm.evaluation import (
    CTRATE_LABELS,
    ctrate_label_map,
    ctrate_manifest,
    ctrate_volume_path,
    load_radchestct_volume,
    merge_max_scores,
    parse_xy_spacing,
    radchestct_affine,
    radchestct_manifest,
)
from fvlm.evaluation.ctrate import NOT_GIVEN
from fvlm.evaluation.radchestct import RADCHESTCT_CALCIFICATION_MERGE
from fvlm.phantom import generate_phantom
from fvlm.phantom.ctrate_layout import CTRateTraps, write_ctrate_like
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.runner import RunSummary, run_preprocess

PHANTOM_KEYS = [
    "lung/emphysema",
    "lung/nodule",
    "lung/pleural_effusion",
    "heart/cardiomegaly",
    "heart/pericardial_effusion",
    "aorta/calcification",
    "liver/steatosis",  # not a CT-RATE label: ignored
]
# study -> split, labels (in PHANTOM_KEYS order)
PHANTOM = {
    "ph0": ("train", [1, 0, 0, 1, 0, 0, 1]),
    "ph1": ("val", [0, 1, 1, 0, 1, 1, 0]),
    "ph2": ("test", [1, 1, 0, 1, 0, 0, 0]),
    "ph3": ("test", [0, 0, 0, 0, 0, 1, 1]),
}
CHEST_KEYS = list(ctrate_label_map("chest").values())


def _fake_phantom(root: Path) -> Path:
    """A folder in the documented phantom layout; ph1 is stored with NIfTI scaling."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, labels = [], []
    rng = np.random.default_rng(0)
    for i, (study, (split, values)) in enumerate(PHANTOM.items()):
        hu = rng.integers(-1000, 1500, size=(6, 5, 4)).astype(np.int16)
        affine = np.diag([0.8, 0.7, 2.5, 1.0])
        if study == "ph1":  # stored = (hu + 1000) / 2 with scl_slope 2, scl_inter -1000
            stored = ((hu.astype(np.int32) + 1000) // 2).astype(np.int16)
            hu = (stored.astype(np.int32) * 2 - 1000).astype(np.int16)
            image = nib.Nifti1Image(stored, affine)
            image.header.set_slope_inter(2.0, -1000.0)
        else:
            image = nib.Nifti1Image(hu, affine)
        nib.save(image, root / "images" / f"{study}.nii.gz")
        nib.save(
            nib.Nifti1Image(np.full(hu.shape, i, np.uint8), affine),
            root / "masks" / f"{study}.nii.gz",
        )
        np.save(root / f"{study}_hu.npy", hu)
        rows.append(
            {
                "study_id": study,
                "image": f"images/{study}.nii.gz",
                "mask": f"masks/{study}.nii.gz",
                "findings": f"Findings of {study}.",
                "impression": f"Impression of {study}." if study != "ph3" else np.nan,
                "split": split,
            }
        )
        labels.append({"study_id": study, **dict(zip(PHANTOM_KEYS, values, strict=True))})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame(labels).to_csv(root / "labels.csv", index=False)
    pd.DataFrame(rows)[["study_id", "findings", "impression"]].to_csv(
        root / "reports.csv", index=False
    )
    return root


@pytest.fixture()
def ctrate_root(tmp_path: Path) -> Path:
    write_ctrate_like(_fake_phantom(tmp_path / "phantom"), tmp_path / "ctrate")
    return tmp_path / "ctrate"


def test_label_map_covers_all_18_ctrate_columns() -> None:
    mapping = ctrate_label_map("chest")
    assert set(mapping) == set(CTRATE_LABELS) and len(mapping) == 18
    assert mapping["Arterial wall calcification"] == "aorta/calcification"
    assert mapping["Medical material"] == "global/medical_material"
    assert mapping["Lymphadenopathy"] == "global/lymphadenopathy"


def test_volume_path_and_spacing_parsing() -> None:
    path = ctrate_volume_path("/d/valid", "valid_12_b_3.nii.gz")
    assert path == Path("/d/valid/valid_12/valid_12_b/valid_12_b_3.nii.gz")
    with pytest.raises(ValueError, match="not a CT-RATE volume name"):
        ctrate_volume_path("/d", "scan.nii.gz")
    assert parse_xy_spacing("[0.75, 0.75]") == (0.75, 0.75)
    assert parse_xy_spacing("[0.5859375, 0.5859375]") == (0.5859375, 0.5859375)
    with pytest.raises(ValueError, match="two numbers"):
        parse_xy_spacing("[1, 2, 3]")


def test_write_ctrate_like_layout_and_hu_trap(ctrate_root: Path) -> None:
    mapping = pd.read_csv(ctrate_root / "phantom_ids.csv")
    assert mapping.to_dict("list") == {
        "phantom_id": ["ph0", "ph1", "ph2", "ph3"],
        "study_id": ["train_1_a_1", "valid_1_a_1", "valid_2_a_1", "valid_3_a_1"],
        "split": ["train", "valid", "valid", "valid"],
    }
    base = ctrate_root / "dataset"
    for name in ("valid_1_a_1", "valid_2_a_1", "valid_3_a_1"):
        assert (base / "valid" / name[:7] / name[:9] / f"{name}.nii.gz").is_file()
    assert (base / "train/train_1/train_1_a/train_1_a_1.nii.gz").is_file()
    # already-HU int16 voxels, no NIfTI scaling, even for the phantom stored with slope 2, in
    # CT-RATE's LPS voxel order (the phantom's RAS voxels flipped along i and j)
    image = nib.load(base / "valid/valid_1/valid_1_a/valid_1_a_1.nii.gz")
    assert image.get_data_dtype() == np.int16
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    raw = np.asarray(image.dataobj.get_unscaled())
    hu = np.load(ctrate_root.parent / "phantom" / "ph1_hu.npy")
    assert np.array_equal(raw, hu[::-1, ::-1, :])
    assert np.array_equal(image.get_fdata(), raw)
    # ... while the metadata still carries the DICOM rescale: the double-rescale trap
    meta = pd.read_csv(base / "metadata/validation_metadata.csv")
    assert meta["RescaleSlope"].tolist() == [1.0] * 3
    assert meta["RescaleIntercept"].tolist() == [-1024.0] * 3
    assert meta["XYSpacing"].tolist() == ["[0.7, 0.8]"] * 3  # PixelSpacing: along j, along i
    assert meta["ZSpacing"].tolist() == [2.5] * 3
    assert meta["ImageOrientationPatient"].tolist() == ["[1, 0, 0, 0, 1, 0]"] * 3
    # voxel (0, 0, 0) of the LPS array is the phantom's last voxel along x and y: RAS position
    # ((6 - 1) * 0.8, (5 - 1) * 0.7, 0) mm, i.e. LPS (-4, -2.8, 0)
    assert meta["ImagePositionPatient"].tolist() == ["[-4, -2.8, 0]"] * 3
    reports = pd.read_csv(base / "radiology_text_reports/validation_reports.csv")
    assert list(reports.columns) == [
        "VolumeName",
        "ClinicalInformation_EN",
        "Technique_EN",
        "Findings_EN",
        "Impressions_EN",
    ]
    # missing sections are written as CT-RATE writes them
    assert reports["ClinicalInformation_EN"].tolist() == [NOT_GIVEN] * 3
    assert reports["Impressions_EN"].tolist()[2] == NOT_GIVEN  # ph3 has no impression


def test_ctrate_label_csv_has_18_columns_mapped_by_label(ctrate_root: Path) -> None:
    labels = pd.read_csv(
        ctrate_root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv"
    )
    assert list(labels.columns) == ["VolumeName", *CTRATE_LABELS]
    assert labels["VolumeName"].tolist() == [
        "valid_1_a_1.nii.gz",
        "valid_2_a_1.nii.gz",
        "valid_3_a_1.nii.gz",
    ]
    by_name = labels.set_index("VolumeName")
    # ph1: nodule, pleural effusion, pericardial effusion, aortic calcification
    assert by_name.loc["valid_1_a_1.nii.gz"].to_dict() == {
        **dict.fromkeys(CTRATE_LABELS, 0),
        "Lung nodule": 1,
        "Pleural effusion": 1,
        "Pericardial effusion": 1,
        "Arterial wall calcification": 1,
    }
    # ph2: emphysema, nodule, cardiomegaly
    assert by_name.loc["valid_2_a_1.nii.gz"][
        ["Emphysema", "Lung nodule", "Cardiomegaly"]
    ].tolist() == [
        1,
        1,
        1,
    ]
    assert by_name.loc["valid_2_a_1.nii.gz"].sum() == 3
    # ph3: only aortic calcification (steatosis has no CT-RATE column)
    assert by_name.loc["valid_3_a_1.nii.gz"].sum() == 1
    assert labels["Medical material"].sum() == labels["Hiatal hernia"].sum() == 0


def test_ctrate_manifest_and_labels(ctrate_root: Path) -> None:
    manifest, labels = ctrate_manifest(ctrate_root, "valid", mask_dir=ctrate_root / "totalseg")
    assert manifest["study_id"].tolist() == ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1"]
    for column in (
        "image",
        "findings",
        "impression",
        "split",
        "rescale_slope",
        "rescale_intercept",
    ):
        assert column in manifest.columns
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in manifest["image"])
    assert manifest["findings"].tolist() == [
        "Findings of ph1.",
        "Findings of ph2.",
        "Findings of ph3.",
    ]
    assert manifest.loc[2, "impression"] == ""  # missing impression -> empty text
    assert manifest["split"].unique().tolist() == ["valid"]
    assert manifest["rescale_intercept"].tolist() == [-1024.0] * 3
    # geometry columns the preprocessor reads: spacing along the stored axes i, j, k
    assert manifest["spacing"].tolist() == ["[0.8, 0.7, 2.5]"] * 3
    assert manifest["image_orientation"].tolist() == ["[1, 0, 0, 0, 1, 0]"] * 3
    assert manifest["image_position"].tolist() == ["[-4, -2.8, 0]"] * 3
    assert manifest["scan_id"].tolist() == ["valid_1_a", "valid_2_a", "valid_3_a"]
    assert all(Path(p).is_file() for p in manifest["mask"])
    assert list(labels.columns) == ["study_id", *CHEST_KEYS] and len(CHEST_KEYS) == 18
    assert labels["study_id"].tolist() == manifest["study_id"].tolist()
    assert labels["aorta/calcification"].tolist() == [1, 0, 1]
    assert labels["lung/nodule"].tolist() == [1, 1, 0]
    assert labels["heart/cardiomegaly"].tolist() == [0, 1, 0]
    assert labels["global/lymphadenopathy"].tolist() == [0, 0, 0]
    assert labels[CHEST_KEYS].to_numpy().sum() == 4 + 3 + 1
    train, train_labels = ctrate_manifest(ctrate_root / "dataset", "train")
    assert train["study_id"].tolist() == ["train_1_a_1"]
    assert train_labels.loc[0, "lung/emphysema"] == 1


def test_ctrate_manifest_missing_files_no_chest_reconstructions(ctrate_root: Path) -> None:
    base = ctrate_root / "dataset"
    # a second reconstruction of valid_2_a, a listed volume that was not downloaded, a blank label
    for sub, file in (
        ("radiology_text_reports", "validation_reports.csv"),
        ("multi_abnormality_labels", "valid_predicted_labels.csv"),
        ("metadata", "validation_metadata.csv"),
    ):
        table = pd.read_csv(base / sub / file)
        extra = table.iloc[[1, 2]].copy()
        extra["VolumeName"] = ["valid_2_a_2.nii.gz", "valid_9_a_1.nii.gz"]
        pd.concat([table, extra]).to_csv(base / sub / file, index=False)
    labels_csv = base / "multi_abnormality_labels/valid_predicted_labels.csv"
    table = pd.read_csv(labels_csv)
    table.loc[0, "Emphysema"] = np.nan
    table.to_csv(labels_csv, index=False)
    source = base / "valid/valid_2/valid_2_a/valid_2_a_1.nii.gz"
    (source.parent / "valid_2_a_2.nii.gz").write_bytes(source.read_bytes())
    (base / "metadata/no_chest_valid.txt").write_text("valid_3_a_1.nii.gz\n")

    manifest, labels = ctrate_manifest(ctrate_root)
    assert manifest["study_id"].tolist() == ["valid_1_a_1", "valid_2_a_1", "valid_2_a_2"]
    assert manifest.attrs["missing_volumes"] == ["valid_9_a_1.nii.gz"]
    assert manifest.attrs["excluded_no_chest"] == ["valid_3_a_1.nii.gz"]
    assert np.isnan(labels.loc[0, "lung/emphysema"])
    assert labels.loc[1, "lung/emphysema"] == 1
    first, _ = ctrate_manifest(ctrate_root, reconstructions="first", exclude_no_chest=False)
    assert first["study_id"].tolist() == ["valid_1_a_1", "valid_2_a_1", "valid_3_a_1"]
    kept, _ = ctrate_manifest(ctrate_root, missing="keep")
    assert "valid_9_a_1" in kept["study_id"].tolist()
    with pytest.raises(FileNotFoundError, match="valid_9_a_1"):
        ctrate_manifest(ctrate_root, missing="error")
    empty = ctrate_root.parent / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="missing reports"):
        ctrate_manifest(empty)
    with pytest.raises(ValueError, match="split"):
        ctrate_manifest(ctrate_root, "test")  # type: ignore[arg-type]


def test_ctrate_like_from_the_real_phantom(tmp_path: Path) -> None:
    generate_phantom(tmp_path / "phantom", n_studies=4, seed=0, shape=(24, 32, 32), progress=False)
    mapping = write_ctrate_like(tmp_path / "phantom", tmp_path / "ctrate", splits={})
    assert mapping["split"].tolist() == ["valid"] * 4
    manifest, labels = ctrate_manifest(tmp_path / "ctrate", "valid")
    assert len(manifest) == 4 and list(labels.columns) == ["study_id", *CHEST_KEYS]
    assert labels[CHEST_KEYS].to_numpy().sum() > 0  # seed 0 draws chest diseases
    phantom_labels = pd.read_csv(tmp_path / "phantom" / "labels.csv").set_index("study_id")
    ours = labels.set_index("study_id")
    for _, row in mapping.iterrows():
        for key in CHEST_KEYS:
            expected = phantom_labels.loc[row["phantom_id"], key] if key in phantom_labels else 0
            assert ours.loc[row["study_id"], key] == expected, (row["phantom_id"], key)
    image = nib.as_closest_canonical(nib.load(manifest.loc[0, "image"]))
    source = nib.as_closest_canonical(
        nib.load(
            tmp_path
            / "phantom"
            / pd.read_csv(tmp_path / "phantom" / "manifest.csv").loc[0, "image"]
        )
    )
    assert np.array_equal(np.asarray(image.dataobj), np.rint(source.get_fdata()))
    assert np.allclose(image.affine, source.affine)


# ----------------------------------------------------------------------------------------------
# Rad-ChestCT
# ----------------------------------------------------------------------------------------------


def _fake_radchest(root: Path) -> Path:
    root.mkdir(parents=True)
    columns = {
        "NoteAcc_DEID": ["tst001", "tst002", "tst003"],
        "nodule*left_lung": [1, 0, 0],
        "nodule*right_lung": [0, 0, 1],
        "nodulegr1cm*right_lung": [0, 1, 0],
        "cardiomegaly*heart": [0, 1, 0],
        "calcification*aorta": [1, 1, 0],
        "calcification*left_lung": [0, 0, 1],
        "pacemaker_or_defib*heart": [0, 0, 1],
        "septal_thickening*right_lung": [0, 1, 0],
        "emphysema*right_lung": [0, 0, 0],
        "pneumothorax*left_lung": [1, 0, 0],  # no CT-RATE counterpart: ignored
    }
    pd.DataFrame(columns).to_csv(root / "imgtest_Abnormality_and_Location_Labels.csv", index=False)
    (root / "volumes").mkdir()
    for i, study in enumerate(["tst001", "tst002"]):  # tst003's volume is missing
        np.savez_compressed(
            root / "volumes" / f"{study}.npz", ct=np.full((4, 3, 2), i - 1000, np.int16)
        )
    pd.DataFrame({"NoteAcc_DEID": ["tst001", "tst002"], "final_spacing": [0.8, 0.9]}).to_csv(
        root / "CT_Scan_Metadata_Complete_35747.csv", index=False
    )
    return root


def test_radchestct_labels_mapped_to_ctrate_keys(tmp_path: Path) -> None:
    root = _fake_radchest(tmp_path / "radchest")
    manifest, labels = radchestct_manifest(root, missing="keep")
    assert labels["study_id"].tolist() == ["tst001", "tst002", "tst003"]
    assert labels["lung/nodule"].tolist() == [1, 1, 1]  # nodule (either lung) or nodulegr1cm
    assert labels["heart/cardiomegaly"].tolist() == [0, 1, 0]
    assert labels["aorta/calcification"].tolist() == [1, 1, 1]  # calcification, any location
    assert labels["global/medical_material"].tolist() == [0, 0, 1]
    assert labels["lung/septal_thickening"].tolist() == [0, 1, 0]
    assert labels["lung/emphysema"].tolist() == [0, 0, 0]  # column present, never positive
    assert labels["lung/atelectasis"].isna().all()  # no such column in this file: unknown
    # no Rad-ChestCT counterpart: NaN (then reported as single-class, not dropped)
    assert labels["lung/mosaic_attenuation"].isna().all()
    assert labels["heart/coronary_calcification"].isna().all()
    assert {"lung/mosaic_attenuation", "heart/coronary_calcification"} <= set(
        labels.attrs["unmapped"]
    )
    assert manifest["image"].tolist()[2] == ""
    assert manifest["xy_spacing"].tolist()[:2] == [(0.8, 0.8), (0.9, 0.9)]
    assert manifest["rescale_intercept"].tolist() == [0.0] * 3
    dropped, dropped_labels = radchestct_manifest(root)
    assert dropped["study_id"].tolist() == ["tst001", "tst002"]
    assert dropped.attrs["missing_volumes"] == ["tst003"]
    assert dropped_labels["study_id"].tolist() == ["tst001", "tst002"]


def test_radchestct_volume_geometry(tmp_path: Path) -> None:
    root = _fake_radchest(tmp_path / "radchest")
    assert nib.aff2axcodes(radchestct_affine()) == ("I", "P", "L")
    image = load_radchestct_volume(root / "volumes" / "tst002.npz", spacing=0.9)
    assert image.shape == (4, 3, 2)
    assert np.allclose(image.header.get_zooms(), (0.9, 0.9, 0.9))
    assert np.all(np.asarray(image.dataobj) == -999)


def test_merge_max_scores_follows_ctclip_calcification_rule() -> None:
    scores = pd.DataFrame(
        {"aorta/calcification": [0.2, 0.7], "heart/coronary_calcification": [0.6, 0.1], "x": [0, 0]}
    )
    merged = merge_max_scores(scores, RADCHESTCT_CALCIFICATION_MERGE)
    assert merged["aorta/calcification"].tolist() == [0.6, 0.7]
    assert merged["heart/coronary_calcification"].tolist() == [0.6, 0.1]


# ----------------------------------------------------------------------------------------------
# CT-RATE's traps through the preprocessor
# ----------------------------------------------------------------------------------------------

TWIN_SPACING = (8.0, 9.0, 9.0)  # phantom and cache grid: coarse, keeps the test fast


def _preprocess_ctrate(root: Path, cache: Path, **settings) -> tuple[RunSummary, pd.DataFrame]:
    """``ctrate_manifest`` written as it is, then the preprocessor with the phantom's masks."""
    manifest, _ = ctrate_manifest(root, "valid", mask_dir=root / "totalseg")
    manifest.to_csv(root / "manifest.csv", index=False)
    config = PreprocessConfig(
        manifest=root / "manifest.csv", cache=cache, spacing=TWIN_SPACING, anatomy_table="chest",
        hu_window=(-1000.0, 1000.0), workers=1, progress=False, **settings,
    )  # fmt: skip
    return run_preprocess(config), manifest


def _meta(cache: Path, study: str) -> dict:
    return json.loads((cache / "studies" / study / "meta.json").read_text())


def _millilitres(meta: dict) -> dict[str, float]:
    voxel_ml = float(np.prod(meta["spacing"])) / 1000.0
    return {name: a["voxels"] * voxel_ml for name, a in meta["anatomies"].items() if a["voxels"]}


@pytest.fixture(scope="module")
def twin_phantom(tmp_path_factory) -> Path:
    phantom = tmp_path_factory.mktemp("twin") / "phantom"
    generate_phantom(phantom, n_studies=2, seed=5, shape=(24, 32, 32), spacing=TWIN_SPACING,
                     splits=(0.0, 0.0, 1.0), preset="chest", progress=False)  # fmt: skip
    return phantom


def test_identity_affine_twin_preprocesses_like_its_correct_affine_twin(twin_phantom, tmp_path):
    clean, trapped = tmp_path / "clean", tmp_path / "trapped"
    write_ctrate_like(twin_phantom, clean)
    traps = CTRateTraps(identity_every=1, raw_every=2, second_recon_every=2, not_given_every=2)
    mapping = write_ctrate_like(twin_phantom, trapped, traps=traps)
    assert mapping["study_id"].tolist() == ["valid_1_a_1", "valid_2_a_1", "valid_2_a_2"]
    image = nib.load(trapped / "dataset/valid/valid_2/valid_2_a/valid_2_a_1.nii.gz")
    assert np.array_equal(image.affine, np.eye(4))  # the trap: geometry only in the metadata
    summary_clean, _ = _preprocess_ctrate(clean, tmp_path / "cache_clean")
    summary, manifest = _preprocess_ctrate(trapped, tmp_path / "cache_trapped")
    assert summary_clean.exit_code == 0 and summary.exit_code == 0, summary.format()
    assert manifest["impression"].tolist()[1:] == ["", ""]  # 'Not given.' read as empty
    for study in ("valid_1_a_1", "valid_2_a_1"):
        twin, meta = (
            _meta(tmp_path / "cache_clean", study),
            _meta(tmp_path / "cache_trapped", study),
        )
        assert twin["geometry"]["source"] == "header"
        assert meta["geometry"]["source"] == "metadata", meta["geometry"]
        assert meta["geometry"]["header_problem"].startswith("identity affine")
        assert meta["spacing"] == list(TWIN_SPACING) and meta["shape"] == twin["shape"]
        assert meta["segmentation"]["totalseg_version"] == "v2"
        assert meta["segmentation"]["version_reason"] == twin["segmentation"]["version_reason"]
        ours, theirs = _millilitres(meta), _millilitres(twin)
        assert set(ours) == set(theirs) and {"lung", "heart", "aorta", "trachea"} <= set(ours)
        for name, ml in theirs.items():
            assert ours[name] == pytest.approx(ml, rel=0.05), name
    # v1 raw values under the same intercept as v2's HU: rescaled there, not here
    assert _meta(tmp_path / "cache_trapped", "valid_2_a_1")["rescale"]["applied"] is True
    assert _meta(tmp_path / "cache_trapped", "valid_1_a_1")["rescale"]["applied"] is False
    # the thicker second reconstruction: twice the ZSpacing, the same lung within 15 %
    recon = _meta(tmp_path / "cache_trapped", "valid_2_a_2")
    assert recon["geometry"]["metadata"]["spacing"][2] == 2 * TWIN_SPACING[0]
    lung = _millilitres(_meta(tmp_path / "cache_trapped", "valid_2_a_1"))["lung"]
    assert _millilitres(recon)["lung"] == pytest.approx(lung, rel=0.15)
    # what the trap costs a reader that trusts the header: 1 mm voxels, organs 1/648 the size
    header_only, _ = _preprocess_ctrate(trapped, tmp_path / "cache_header", geometry="header")
    assert header_only.exit_code == 0
    shrunk = _millilitres(_meta(tmp_path / "cache_header", "valid_1_a_1"))["lung"]
    assert shrunk < _millilitres(_meta(tmp_path / "cache_clean", "valid_1_a_1"))["lung"] / 300


def test_bad_geometry_and_undecidable_masks_fail_their_study_only(twin_phantom, tmp_path):
    root = tmp_path / "ctrate"
    write_ctrate_like(twin_phantom, root, traps=CTRateTraps(identity_every=1))
    base = root / "dataset"
    volumes = base / "valid/valid_1/valid_1_a"
    # valid_1_a_2: metadata row without spacing; valid_1_a_3: header spacing in metres
    # (8000 x 9000 x 9000 mm), no metadata; valid_1_a_4: an undecidable mask
    for recon in (2, 3, 4):
        shutil.copyfile(volumes / "valid_1_a_1.nii.gz", volumes / f"valid_1_a_{recon}.nii.gz")
        shutil.copyfile(
            root / "totalseg/valid_1_a_1.nii.gz", root / f"totalseg/valid_1_a_{recon}.nii.gz"
        )
    metres = nib.load(volumes / "valid_1_a_3.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(metres.dataobj), np.diag([8000.0, 9000, 9000, 1])),
             volumes / "valid_1_a_3.nii.gz")  # fmt: skip
    labels = np.zeros(metres.shape, np.uint8)
    labels[2:6, 2:6, 2:6], labels[8:10, 8:10, 2:4] = 31, 7  # v2 L1 + pancreas / v1 T4 + aorta
    nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "totalseg/valid_1_a_4.nii.gz")
    for sub, file in (("radiology_text_reports", "validation_reports.csv"),
                      ("multi_abnormality_labels", "valid_predicted_labels.csv"),
                      ("metadata", "validation_metadata.csv")):  # fmt: skip
        table = pd.read_csv(base / sub / file)
        extra = pd.concat([table.iloc[[0]]] * 3)
        extra["VolumeName"] = [f"valid_1_a_{r}.nii.gz" for r in (2, 3, 4)]
        table = pd.concat([table, extra], ignore_index=True)
        if sub == "metadata":
            table = table[table["VolumeName"] != "valid_1_a_3.nii.gz"]
            table.loc[table["VolumeName"] == "valid_1_a_2.nii.gz", "ZSpacing"] = np.nan
        table.to_csv(base / sub / file, index=False)
    summary, _ = _preprocess_ctrate(root, tmp_path / "cache")
    reasons = {r.study_id: r.reason for r in summary.results if r.status == "failed"}
    assert set(reasons) == {"valid_1_a_2", "valid_1_a_3", "valid_1_a_4"}, summary.format()
    assert summary.counts["ok"] == 2  # valid_1_a_1 and valid_2_a_1: the run went on
    assert "valid_1_a_2.nii.gz: GeometryError: identity affine" in reasons["valid_1_a_2"]
    assert "no spacing for this study" in reasons["valid_1_a_2"]
    assert (
        "valid_1_a_3.nii.gz: GeometryError: voxel size 8000x9000x9000 mm"
        in (reasons["valid_1_a_3"])
    )
    assert "valid_1_a_4.nii.gz: UndecidableVersion" in reasons["valid_1_a_4"]
    assert "set totalseg_version to v1 or v2" in reasons["valid_1_a_4"]
    report = summary.format()
    for study, reason in reasons.items():
        assert "\n" not in reason and f"failed {study}: {reason}" in report
