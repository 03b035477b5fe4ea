"""Real-size inputs for the benchmarks: phantom CT studies on a scanner's grid, and the recipes.

Performance at the demo's 40 x 64 x 80 voxels says little about a 512 x 512 x 300 int16 CT (150
MiB): gzip decoding, label-map passes and page-level reads only dominate at real size. The
studies here come from :func:`fvlm.phantom.generate_phantom` with an adult geometry on a
scanner-like grid (512 x 512 in-plane, real millimetre extents, organs cut by the field of view,
phantom noise, so gzip compresses them about as it does real CT), optionally fitted to an exact
voxel shape by resampling every axis to a new voxel size over the same field of view.

The preprocessing recipes are the shipped YAML files (``configs/preprocess/<recipe>.yaml``) with
the offline replacements a benchmark needs: precomputed masks, rule-based report decomposition,
one worker process.
"""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from fvlm.config_files import resolve_config
from fvlm.phantom import generate_phantom
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.volume import Volume, resample, voxel_sizes

__all__ = ["fit_to_shape", "phantom_studies", "real_size_study", "recipe_config", "volume_bytes"]

#: The issue's real CT size: 512 x 512 in-plane, 300 slices, int16 (stored axes x, y, z).
REAL_SHAPE = (512, 512, 300)
#: ``--quick`` smoke size: same field of view, coarse voxels.
QUICK_SHAPE = (128, 128, 75)


def phantom_studies(
    folder: Path, n: int, geometry: str = "chest", seed: int = 0, quick: bool = False
) -> Path:
    """``n`` phantom training studies of ``geometry`` (scanner grid, or 6 mm voxels if quick)."""
    return generate_phantom(
        folder,
        n_studies=n,
        seed=seed,
        geometry=geometry,  # type: ignore[arg-type]
        spacing=(6.0, 6.0, 6.0) if quick else None,
        splits=(1.0, 0.0, 0.0),
        progress=False,
    )


def fit_to_shape(image: Path, mask: Path, shape: tuple[int, int, int], out: Path) -> None:
    """Resample a study (image trilinear, mask nearest) to ``shape`` voxels, same field of view.

    Axes, orientation and dtypes stay as stored; only the voxel size changes, to ``extent /
    shape`` along each stored axis (:func:`fvlm.preprocess.volume.resample` then returns exactly
    ``shape``).
    """
    source = nib.load(image)
    data = np.asarray(source.dataobj)  # scaled by the header, if it has scl_slope/scl_inter
    spacing = voxel_sizes(source.affine)
    target = tuple(n * s / m for n, s, m in zip(data.shape, spacing, shape, strict=True))
    fitted = resample(Volume(data, source.affine), target, "linear")
    labels = resample(Volume(np.asarray(nib.load(mask).dataobj), source.affine), target, "nearest")
    assert fitted.data.shape == tuple(shape), (fitted.data.shape, shape)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    hu = np.clip(np.rint(fitted.data), -32768, 32767).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, fitted.affine), out / "images" / image.name)
    nib.save(
        nib.Nifti1Image(labels.data.astype(np.uint8), fitted.affine), out / "masks" / mask.name
    )


def real_size_study(folder: Path, quick: bool = False, seed: int = 0) -> Path:
    """One chest phantom study fitted to :data:`REAL_SHAPE` (or :data:`QUICK_SHAPE`): manifest."""
    manifest = phantom_studies(folder / "phantom", 1, "chest", seed, quick)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    shape = QUICK_SHAPE if quick else REAL_SHAPE
    for row in rows:
        fit_to_shape(
            manifest.parent / row["image"], manifest.parent / row["mask"], shape, folder / "study"
        )
    out = folder / "study" / "manifest.csv"
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def volume_bytes(manifest: Path) -> int:
    """Uncompressed bytes of the manifest's first image as stored (the memory target's unit)."""
    with manifest.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    image = nib.load(manifest.parent / row["image"])
    return int(np.prod(image.shape)) * image.get_data_dtype().itemsize


def recipe_config(
    recipe: str, manifest: Path, cache: Path, **overrides: object
) -> PreprocessConfig:
    """The shipped preprocessing recipe ``recipe`` (``abdomen``, ``chest``), runnable offline.

    Precomputed masks (the phantom's), rule-based report decomposition and one worker process
    replace TotalSegmentator, the LLM and the worker pool; the grid, HU window, anatomy table
    and every other setting are the recipe's.
    """
    path = resolve_config(recipe, "preprocess")
    settings = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(PreprocessConfig)}
    settings = {k: v for k, v in settings.items() if k in known}
    settings |= {
        "segmenter": "precomputed",
        "decomposer": "rules",
        "workers": 1,
        "progress": False,
        "manifest": manifest,
        "cache": cache,
    }
    return PreprocessConfig(**(settings | overrides))
