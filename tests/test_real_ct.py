"""Preprocessing on a real CT and its real TotalSegmentator v2 map (TotalSegmentator's test case).

The two files are not part of the repository: ``FVLM_TOTALSEG_EXAMPLE`` names their folder; without
them every test here is skipped with that reason.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fvlm.anatomy import load_anatomy_table, totalsegmentator_classes
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.runner import run_preprocess
from fvlm.preprocess.segmentation import detect_totalseg_version, load_mask
from fvlm.preprocess.volume import Volume, canonicalise, load_nifti, resample

EXAMPLE = Path(
    os.environ.get(
        "FVLM_TOTALSEG_EXAMPLE",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg-example",
    )
)
CT, SEG = EXAMPLE / "example_ct_sm.nii.gz", EXAMPLE / "example_seg.nii.gz"
pytestmark = pytest.mark.skipif(
    not (CT.is_file() and SEG.is_file()),
    reason=f"real CT example not found in {EXAMPLE} (set FVLM_TOTALSEG_EXAMPLE)",
)
# Below this volume a single 5 mm slab of boundary voxels is a large share of the structure, so
# nearest-neighbour resampling from 3 mm cannot keep its volume to a few percent. In this scan
# that skips the adrenal glands (9.1 cm^3); every other anatomy present is >= 17 cm^3.
MIN_VOLUME_MM3 = 10_000.0
VOLUME_TOLERANCE = 0.035


@pytest.fixture(scope="module")
def ct():
    return load_nifti(CT)


@pytest.fixture(scope="module")
def labels(ct):
    return load_mask(SEG, ct.volume)


def test_source_scan_as_expected(ct, labels):
    assert ct.volume.axcodes == ("R", "A", "S")
    assert ct.volume.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert ct.volume.data.dtype == np.int16
    assert int(ct.volume.data.min()) == -1100 and int(ct.volume.data.max()) == 1207
    assert labels.shape == ct.volume.data.shape == (122, 101, 30)
    assert detect_totalseg_version(labels)[0] == "v2"


@pytest.mark.parametrize("preset", ["paper", "chest"])
def test_grouping_covers_exactly_the_source_classes(labels, preset):
    table = load_anatomy_table(preset)
    grouped = table.group(labels, "v2")
    assert grouped.dtype == np.uint8 and grouped.shape == labels.shape
    ids = {name: cid for cid, name in totalsegmentator_classes("v2").items()}
    covered = np.zeros(labels.shape, dtype=bool)
    for anatomy in table.anatomies:
        sources = [ids[name] for name in anatomy.totalseg_v2]
        expected = np.isin(labels, sources)
        np.testing.assert_array_equal(grouped == anatomy.id, expected, err_msg=anatomy.name)
        covered |= expected
    assert not grouped[~covered].any()  # classes outside the table (spinal cord...) -> 0
    if preset == "paper":
        for name in ("liver", "spleen", "kidney", "lung", "colon", "rib", "lumbar_vertebrae"):
            assert (grouped == table[name].id).any(), name


def test_canonical_axes_and_hu_of_the_real_scan(ct, labels, paper_table):
    canonical, record = canonicalise(ct.volume)
    assert canonical.axcodes == ("S", "A", "R")
    assert canonical.data.shape == (30, 101, 122) and record["source_axcodes"] == "RAS"
    anatomy, _ = canonicalise(Volume(paper_table.group(labels, "v2"), ct.volume.affine))
    # anatomy in the expected places: the liver on the patient's right (high axis 2) of the
    # spleen, the lungs above (high axis 0) the kidneys, the vertebrae behind (low axis 1) the
    # liver
    centre = {
        name: np.argwhere(anatomy.data == paper_table[name].id).mean(axis=0)
        for name in ("liver", "spleen", "lung", "kidney", "lumbar_vertebrae")
    }
    assert centre["liver"][2] > centre["spleen"][2] + 20
    assert centre["lung"][0] > centre["kidney"][0] + 5
    assert centre["lumbar_vertebrae"][1] < centre["liver"][1] - 5
    liver_hu = canonical.data[anatomy.data == paper_table["liver"].id].mean()
    assert 0 < liver_hu < 200  # soft tissue
    lung_hu = canonical.data[anatomy.data == paper_table["lung"].id].mean()
    assert -1000 < lung_hu < -500  # aerated lung


@pytest.mark.parametrize("spacing", [(5.0, 1.0, 1.0), (1.5, 0.75, 0.75)], ids=["paper", "ctclip"])
def test_anatomy_volumes_survive_resampling(ct, labels, spacing, paper_table):
    canonical, _ = canonicalise(Volume(paper_table.group(labels, "v2"), ct.volume.affine))
    resampled = resample(canonical, spacing, "nearest")
    assert resampled.spacing == pytest.approx(spacing)
    source_voxel, target_voxel = float(np.prod(ct.volume.spacing)), float(np.prod(spacing))
    checked = []
    for anatomy in paper_table.anatomies:
        before = (canonical.data == anatomy.id).sum() * source_voxel
        if before < MIN_VOLUME_MM3:
            continue
        after = (resampled.data == anatomy.id).sum() * target_voxel
        assert after == pytest.approx(before, rel=VOLUME_TOLERANCE), anatomy.name
        checked.append(anatomy.name)
    assert len(checked) >= 15


def test_version_detection_without_the_v2_only_ids(labels, ct, paper_table):
    # A v1 map of the same scan (ids renumbered by class name) must read as v1, and the v2 map cut
    # to ids <= 104 must not be mistaken for v1.
    v1 = {name: cid for cid, name in totalsegmentator_classes("v1").items()}
    v2 = totalsegmentator_classes("v2")
    lut = np.zeros(max(v2) + 1, dtype=np.uint8)
    for cid, name in v2.items():
        lut[cid] = v1.get(name, 0)
    as_v1 = lut[labels]
    assert as_v1.max() <= 104
    version, why = detect_totalseg_version(as_v1)
    assert version == "v1" and "bowel: 15123 vs 0 voxels" in why
    cut = np.where(labels > 104, 0, labels)
    version, why = detect_totalseg_version(cut)
    assert version == "v2" and "lung lobes: 1571 vs 0 voxels" in why
    # grouping the v1 map with the v1 classes gives the same anatomy map as v2 for the classes
    # both versions share (the paper table maps both)
    shared = np.isin(labels, [cid for cid, name in v2.items() if name in v1])
    np.testing.assert_array_equal(
        paper_table.group(as_v1, "v1")[shared], paper_table.group(labels, "v2")[shared]
    )


def test_pipeline_on_the_real_scan(tmp_path):
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["study_id", "image", "mask", "findings", "impression", "split", "RescaleSlope",
              "RescaleIntercept"],
             ["example", str(CT), str(SEG), "Hepatic steatosis. Normal spleen.",
              "Fatty liver.", "test", "1", "-1024"]]
        )  # fmt: skip
    config = PreprocessConfig(
        manifest=manifest, cache=tmp_path / "cache", workers=1, progress=False
    )
    summary = run_preprocess(config)
    assert summary.exit_code == 0, summary.format()
    folder = tmp_path / "cache" / "studies" / "example"
    meta = json.loads((folder / "meta.json").read_text())
    image = np.load(folder / "image.npy")
    anatomy = np.load(folder / "anatomy.npy")
    assert meta["orientation"]["source_axcodes"] == "RAS"
    assert nib.aff2axcodes(np.array(meta["affine"])) == ("S", "A", "R")
    assert meta["spacing"] == [5.0, 1.0, 1.0]
    assert image.shape == anatomy.shape == (18, 303, 366)  # 90 mm / 5, 303 mm / 1, 366 mm / 1
    # the metadata claim a -1024 intercept, but the file is HU already: not applied
    assert meta["rescale"]["applied"] is False
    assert meta["rescale"]["air_as_stored"] == pytest.approx(-1000, abs=50)
    assert image.dtype == np.float16 and image.min() == 0.0 and image.max() == 1.0
    liver = anatomy == meta["anatomies"]["liver"]["id"]
    # liver ~ 50-150 HU -> (HU + 300) / 700 in the window
    assert 0.45 < float(image[liver].mean()) < 0.65
    assert meta["anatomies"]["liver"]["voxels"] == int(liver.sum())
