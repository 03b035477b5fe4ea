"""TotalSegmentator: fail fast and clearly without weights; with weights, the real API is called."""

from __future__ import annotations

import csv
import json
import socket
import time

import nibabel as nib
import numpy as np
import pytest

from fvlm.preprocess.cli import main
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.runner import run_preprocess
from fvlm.preprocess.segmentation import (
    TotalSegmentatorUnavailable,
    check_totalsegmentator,
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
