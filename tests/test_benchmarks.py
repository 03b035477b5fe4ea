"""The benchmarks' own arithmetic and inputs (nothing here is timed): page spans, fitted studies,
offline recipes; their ``--quick`` runs as a slow smoke test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from bench_loader import PAGE, span_pages  # noqa: E402
from real_size import fit_to_shape, recipe_config  # noqa: E402


def _pages_by_rows(array: np.memmap, start: np.ndarray, crop: tuple[int, ...]) -> int:
    """The pages a C-order crop's rows span, one row at a time."""
    shape = np.array(array.shape)
    lo, hi = np.clip(start, 0, shape), np.clip(start + np.array(crop), 0, shape)
    pages: set[int] = set()
    if np.all(hi > lo):
        for z in range(lo[0], hi[0]):
            for y in range(lo[1], hi[1]):
                first = array.offset + ((z * shape[1] + y) * shape[2] + lo[2]) * array.itemsize
                last = first + (hi[2] - lo[2]) * array.itemsize - 1
                pages.update(range(first // PAGE, last // PAGE + 1))
    return len(pages) * PAGE


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((6, 9, 3000), np.float16), ((5, 40, 700), np.uint8), ((4, 5, 7), np.float16)],
)
def test_span_pages_counts_the_pages_a_crop_reads(tmp_path, shape, dtype):
    np.save(tmp_path / "a.npy", np.zeros(shape, dtype))
    array = np.load(tmp_path / "a.npy", mmap_mode="r")
    rng = np.random.default_rng(0)
    for _ in range(25):
        start = rng.integers(-4, np.array(shape))
        crop = tuple(int(c) for c in rng.integers(1, np.array(shape) + 4))
        own, span = span_pages(array, start, crop)
        inside = np.clip(start + np.array(crop), 0, shape) - np.clip(start, 0, shape)
        assert own == int(np.prod(np.maximum(inside, 0))) * array.itemsize
        assert span == _pages_by_rows(array, start, crop)
        assert span >= own


def test_span_pages_of_whole_rows_is_the_contiguous_block(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 8, 1024), np.float16))  # 2 KiB rows
    array = np.load(tmp_path / "a.npy", mmap_mode="r")
    own, span = span_pages(array, np.array([2, 0, 0]), (3, 8, 1024))  # 48 KiB, from offset 128
    assert own == 3 * 8 * 2048
    assert span == own + PAGE  # the block straddles one extra page (the .npy header shifts it)


def test_fit_to_shape_keeps_the_field_of_view_and_labels(tmp_path):
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS storage, like many CT NIfTI files
    affine[:3, 3] = [100.0, 120.0, -50.0]
    hu = np.full((40, 36, 12), -1000, np.int16)
    labels = np.zeros(hu.shape, np.uint8)
    hu[10:30, 8:28, 2:10], labels[10:30, 8:28, 2:10] = 60, 5
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "seg.nii.gz")
    fit_to_shape(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", (20, 18, 30), tmp_path / "out")
    image = nib.load(tmp_path / "out" / "images" / "ct.nii.gz")
    mask = nib.load(tmp_path / "out" / "masks" / "seg.nii.gz")
    assert image.shape == mask.shape == (20, 18, 30)
    assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    zooms = np.array(image.header.get_zooms())
    np.testing.assert_allclose(zooms * image.shape, np.array([0.8, 0.8, 2.5]) * hu.shape)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    fitted = np.asarray(mask.dataobj)
    assert set(np.unique(fitted)) == {0, 5}
    # The organ keeps its size in mm (within a voxel of the coarser grid per axis).
    size_mm = np.array(
        [np.ptp(np.flatnonzero(fitted.any(axis=a))) + 1 for a in ((1, 2), (0, 2), (0, 1))]
    )
    np.testing.assert_allclose(size_mm * zooms, [16.0, 16.0, 20.0], atol=float(zooms.max()))


@pytest.mark.parametrize("recipe", ["abdomen", "chest"])
def test_recipe_config_keeps_the_recipe_and_runs_offline(tmp_path, recipe):
    shipped = yaml.safe_load(
        (BENCHMARKS.parent / "configs" / "preprocess" / f"{recipe}.yaml").read_text()
    )
    config = recipe_config(recipe, tmp_path / "manifest.csv", tmp_path / "cache")
    assert config.spacing == tuple(float(s) for s in shipped["spacing"])
    assert config.hu_window == tuple(float(v) for v in shipped["hu_window"])
    assert config.anatomy_table == shipped["anatomy_table"]
    assert (config.segmenter, config.decomposer, config.workers) == ("precomputed", "rules", 1)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_preprocess.py", "bench_loader.py"])
def test_quick_benchmark_runs(script):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--recipes", "abdomen"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "abdomen" in done.stdout and "total" in done.stdout
