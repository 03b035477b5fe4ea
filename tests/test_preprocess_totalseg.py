"""TotalSegmentator: fail fast and clearly without weights; with weights, the real API is called."""

from __future__ import annotations

import csv
import json
import socket
import time

import nibabel as nib
import numpy as np
import pytest

from fvlm.anatomy import totalsegmentator_classes
from fvlm.preprocess.cli import main
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.runner import run_preprocess
from fvlm.preprocess.segmentation import (
    TotalSegmentatorUnavailable,
    UndecidableVersion,
    check_totalsegmentator,
    detect_totalseg_version,
    mask_class_names,
    totalsegmentator_weights,
)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty TotalSegmentator home, and a network that fails loudly if anyone touches it."""
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "totalseg_home"))

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "totalseg_home"


def _study(folder):
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.full((12, 10, 6), -1000, dtype=np.int16)
    hu[3:9, 2:8, 1:5] = 50
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 5.0, 1.0])), folder / "ct.nii.gz")
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["study_id", "image", "findings", "impression"],
             ["a", "ct.nii.gz", "The liver is enlarged.", "Hepatomegaly."]]
        )  # fmt: skip
    return manifest, hu


def test_check_fails_fast_with_instructions(no_weights):
    start = time.perf_counter()
    with pytest.raises(TotalSegmentatorUnavailable) as info:
        check_totalsegmentator(fast=False)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    for needle in (
        str(no_weights / "nnunet" / "results"),
        "Dataset291_TotalSegmentator_part1_organs_1559subj",
        "totalseg_download_weights -t total",
        "totalseg_import_weights",
        "TOTALSEG_WEIGHTS_PATH",
        "TOTALSEG_HOME_DIR",
        "segmenter: precomputed",
    ):
        assert needle in message
    with pytest.raises(TotalSegmentatorUnavailable, match="Dataset297.*total_fast"):
        check_totalsegmentator(fast=True)


def test_cli_fails_fast_before_any_study(no_weights, tmp_path, capsys):
    manifest, _ = _study(tmp_path / "data")
    start = time.perf_counter()
    code = main(["--manifest", str(manifest), "--cache", str(tmp_path / "cache"),
                 "--segmenter", "totalsegmentator", "--workers", "1"])  # fmt: skip
    elapsed = time.perf_counter() - start
    assert code == 2
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    err = capsys.readouterr().err
    assert "TotalSegmentator weights" in err and "totalseg_import_weights" in err
    assert not (tmp_path / "cache" / "studies").exists()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"TOTALSEG_HOME_DIR": "/opt/ts"},
        {"TOTALSEG_WEIGHTS_PATH": "/data/w", "TOTALSEG_HOME_DIR": "/x"},
    ],
    ids=["default", "home", "weights_path"],
)
def test_weights_folder_is_where_totalsegmentator_looks(env, monkeypatch):
    from totalsegmentator.config import get_weights_dir

    for name in ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert totalsegmentator_weights(fast=False)[0] == get_weights_dir()


def _fake_weights(root, fast):
    weights_dir, missing = totalsegmentator_weights(fast)
    for folder in missing:
        fold = weights_dir / folder / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
        fold.mkdir(parents=True)
        (fold / "checkpoint_final.pth").write_bytes(b"")
    return weights_dir


def test_with_weights_the_python_api_is_called_on_the_hu_image(no_weights, tmp_path, monkeypatch):
    _fake_weights(no_weights, fast=True)
    check_totalsegmentator(fast=True)  # no raise once the checkpoints are there
    manifest, hu = _study(tmp_path / "data")
    calls = []

    def fake_totalsegmentator(**kwargs):
        calls.append(kwargs)
        image = kwargs["input"]
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[np.asarray(image.dataobj) > 0] = 5  # v2 class 5 = liver
        return nib.Nifti1Image(labels, image.affine)

    import totalsegmentator.python_api

    monkeypatch.setattr(totalsegmentator.python_api, "totalsegmentator", fake_totalsegmentator)
    config = PreprocessConfig(
        manifest=manifest,
        cache=tmp_path / "cache",
        spacing=(5.0, 2.0, 2.0),
        segmenter="totalsegmentator",
        totalseg_fast=True,
        totalseg_device="cpu",
        workers=1,
        progress=False,
    )
    summary = run_preprocess(config)
    assert summary.exit_code == 0, summary.format()
    (call,) = calls
    assert isinstance(call["input"], nib.Nifti1Image)
    np.testing.assert_array_equal(np.asarray(call["input"].dataobj), hu)
    assert {k: call[k] for k in ("output", "task", "fast", "device", "quiet")} == {
        "output": None, "task": "total", "fast": True, "device": "cpu", "quiet": True,
    }  # fmt: skip
    meta = json.loads((tmp_path / "cache" / "studies" / "a" / "meta.json").read_text())
    assert meta["segmentation"]["totalseg_version"] == "v2"
    assert meta["anatomies"]["liver"]["voxels"] == 6 * 6 * 4 * (2 * 2 * 5) // (5 * 2 * 2)


# -- which TotalSegmentator version wrote a mask -------------------------------------------------


def _map(counts: dict[int, int], shape=(40, 40, 40)) -> np.ndarray:
    """A label map with ``counts[id]`` voxels of each class, in consecutive runs."""
    flat = np.zeros(int(np.prod(shape)), np.uint8)
    start = 0
    for cid, n in counts.items():
        flat[start : start + n] = cid
        start += n
    return flat.reshape(shape)


def _ids(version: str) -> dict[str, int]:
    return {name: cid for cid, name in totalsegmentator_classes(version).items()}


# a chest scan's classes and voxel counts (lobes large, esophagus/trachea small; no id > 104)
CHEST = {"lung_upper_lobe_left": 3000, "lung_lower_lobe_left": 3500, "lung_upper_lobe_right": 3000,
         "lung_middle_lobe_right": 1200, "lung_lower_lobe_right": 3800, "esophagus": 150,
         "trachea": 200, "liver": 2000, "vertebrae_T5": 120}  # fmt: skip


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_version_from_class_sizes_whatever_the_affine(version):
    ids = _ids(version)
    labels = _map({ids[name]: n for name, n in CHEST.items()})
    found, why = detect_totalseg_version(labels)
    assert found == version
    expected = 3000 + 3500 + 3000 if version == "v2" else 3000 + 1200 + 3800
    assert f"lung lobes: {expected} vs" in why
    # no affine enters: any flip or transpose of the voxels gives the same answer
    assert detect_totalseg_version(np.flip(labels, axis=0).transpose(2, 0, 1))[0] == version


def test_version_from_the_class_names_totalsegmentator_writes(tmp_path):
    from totalsegmentator.nifti_ext_header import add_label_map_to_nifti

    labels = _map({7: 500, 31: 400})  # v2: pancreas + L1, v1: aorta + T4; sizes tell nothing
    for version in ("v1", "v2"):
        path = tmp_path / f"{version}.nii.gz"
        image = nib.Nifti1Image(labels, np.diag([1.5, 1.5, 3.0, 1.0]))
        nib.save(add_label_map_to_nifti(image, totalsegmentator_classes(version)), path)
        assert mask_class_names(path)[31] == totalsegmentator_classes(version)[31]
        found, why = detect_totalseg_version(labels, path=path)
        assert found == version and "class names in the mask header" in why
    renamed = tmp_path / "renamed.nii.gz"
    nib.save(add_label_map_to_nifti(nib.Nifti1Image(labels, np.eye(4)), {7: "x", 31: "y"}), renamed)
    with pytest.raises(UndecidableVersion, match=r"renamed.nii.gz: the class names .* neither"):
        detect_totalseg_version(labels, path=renamed)


def test_undecidable_maps_are_errors_naming_the_file(tmp_path):
    assert detect_totalseg_version(_map({5: 900, 2: 100}))[1].endswith("same classes in v1 and v2")
    assert detect_totalseg_version(_map({5: 900, 117: 10}))[0] == "v2"  # an id only v2 has
    bare = _map({7: 500, 31: 400})
    path = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(bare, np.eye(4)), path)  # no names in its header
    with pytest.raises(UndecidableVersion, match=r"m.nii.gz: .* absent or too small .* v1 or v2$"):
        detect_totalseg_version(bare, path=path)
    # lungs say v2 (ids 10-12 large), bowel says v1 (ids 55-57 large): contradictory
    mixed = _map({10: 3000, 11: 3000, 15: 100, 55: 2000, 18: 100})
    with pytest.raises(UndecidableVersion, match="contradict each other"):
        detect_totalseg_version(mixed)
    assert detect_totalseg_version(bare, "v1") == ("v1", "set by config")


def test_class_counts_match_bincount_in_any_memory_order(monkeypatch):
    from fvlm.preprocess import segmentation

    monkeypatch.setattr(segmentation, "_COUNT_CHUNK", 7)  # many chunks, a ragged last one
    rng = np.random.default_rng(0)
    labels = np.asfortranarray(rng.integers(0, 118, size=(9, 8, 5)).astype(np.uint8))
    expected = np.bincount(labels.ravel())
    assert np.array_equal(segmentation.class_counts(labels), expected)
    assert np.array_equal(segmentation.class_counts(np.ascontiguousarray(labels)), expected)
    assert segmentation.class_counts(np.zeros((2, 2, 2), np.uint8)).tolist() == [8]


def test_grouping_an_unsigned_map_equals_the_int64_path(paper_table):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 118, size=(6, 7, 8)).astype(np.uint8)
    grouped = paper_table.group(labels, "v2")
    assert np.array_equal(grouped, paper_table.lookup("v2")[labels.astype(np.int64)])
    assert grouped.dtype == np.uint8


def test_grouping_in_place_equals_the_copy_for_any_layout(paper_table, monkeypatch):
    """``in_place`` overwrites a uint8 map chunk by chunk (C or Fortran order) with the same ids;
    other maps are grouped into a copy and left as they were."""
    from fvlm import anatomy

    monkeypatch.setattr(anatomy, "_GROUP_CHUNK", 37)  # chunks that do not divide the map
    rng = np.random.default_rng(2)
    source = rng.integers(0, 118, size=(6, 7, 8)).astype(np.uint8)
    expected = paper_table.group(source, "v2")
    for labels in (source.copy(), np.asfortranarray(source)):
        grouped = paper_table.group(labels, "v2", in_place=True)
        assert grouped is labels and np.array_equal(grouped, expected)
    wide = source.astype(np.int32)
    assert np.array_equal(paper_table.group(wide, "v2", in_place=True), expected)
    assert np.array_equal(wide, source)  # not overwritten: an int32 map is not a uint8 result
