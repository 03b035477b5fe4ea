"""Write a phantom dataset: NIfTI volumes and masks, reports, labels and a manifest.

Layout (paths in the CSVs are relative to the output folder)::

    images/<study_id>.nii.gz   int16 HU (some in other orientations, some with scl_slope/scl_inter)
    masks/<study_id>.nii.gz    uint8 TotalSegmentator v2 (``total``) class ids, same grid and affine
    reports.csv                study_id, findings, impression
    labels.csv                 study_id, one 0/1 column per phantom disease key of the table
    manifest.csv               study_id, image, mask, findings, impression, split
    phantom.json               generation parameters; each study's diseases, storage, grid and
                               the anatomies the field of view cuts (faces they touch)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from fvlm import __version__
from fvlm.anatomy import AnatomyTable, load_anatomy_table

from .diseases import DRAWABLE
from .geometries import Geometry, ScanGeometry, cut_by_field_of_view
from .reports import REPORT_STYLES, ReportStyle
from .study import PhantomStudy, synthesize_study

__all__ = ["SPLITS", "assign_splits", "generate_phantom"]

#: Split names, in the order of the ``splits`` fractions.
SPLITS = ("train", "val", "test")


def assign_splits(n_studies: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Split name per study: exact counts (largest remainder), shuffled with ``seed``.

    Every split with a non-zero fraction gets at least one study when there are enough studies,
    so even a tiny phantom has a validation and a test study.
    """
    fractions = _check_splits(fractions)
    raw = [n_studies * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n_studies - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n_studies >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[max(range(len(counts)), key=counts.__getitem__)] -= 1
                counts[i] = 1
    names = [name for name, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
    order = np.random.default_rng(np.random.SeedSequence([seed, n_studies, 0x5917])).permutation(
        n_studies
    )
    return [names[int(i)] for i in np.argsort(order)]


def _check_splits(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(
            f"splits must be three numbers (train, val, test), got {fractions!r}"
        ) from None
    if len(values) != 3 or not all(math.isfinite(f) and f >= 0 for f in values):
        raise ValueError(
            f"splits must be three non-negative fractions (train, val, test), got {fractions!r}"
        )
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"splits must sum to 1, got {values} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def _phantom_table(preset: str | Path | AnatomyTable) -> AnatomyTable:
    table = preset if isinstance(preset, AnatomyTable) else load_anatomy_table(preset)
    keys = [d.key for d in table.diseases("phantom")]
    if not keys:
        raise ValueError(f"anatomy table {table.name!r} lists no diseases with set 'phantom'")
    unknown = [key for key in keys if key not in DRAWABLE]
    if unknown:
        raise ValueError(
            f"anatomy table {table.name!r} marks {unknown} as phantom diseases, but the phantom "
            f"draws only {sorted(DRAWABLE)}"
        )
    return table


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _check_count_and_seed(n_studies: int, seed: int) -> None:
    if isinstance(n_studies, bool) or not isinstance(n_studies, int | np.integer):
        raise ValueError(f"n_studies must be an integer >= 1, got {n_studies!r}")
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _study_record(study: PhantomStudy, split: str, table: AnatomyTable) -> dict:
    """What ``phantom.json`` says about one study: diseases, storage, grid, cut anatomies."""
    return {
        "study_id": study.study_id,
        "split": split,
        "diseases": list(study.diseases),
        "storage": study.storage.name,
        "shape": list(study.grid.shape),
        "spacing": list(study.grid.spacing),
        "cut_by_field_of_view": cut_by_field_of_view(table.group(study.labels, "v2"), table),
    }


def generate_phantom(
    out_dir: str | Path,
    n_studies: int = 32,
    seed: int = 0,
    geometry: Geometry = "demo",
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    splits: Sequence[float] = (0.7, 0.15, 0.15),
    preset: str | Path | AnatomyTable = "paper",
    progress: bool = True,
    report_style: ReportStyle = "template",
) -> Path:
    """Generate ``n_studies`` synthetic CT studies with reports and disease labels.

    Studies are deterministic per ``(seed, index)``: study 5 is the same whether 10 or 1,000
    studies are generated (only the split assignment depends on ``n_studies``). Files of an earlier
    run in ``out_dir`` are overwritten; the manifest lists exactly this run's studies.

    Args:
        out_dir: Output folder (created).
        n_studies: Number of studies (>= 1).
        seed: Seed (>= 0) of everything: anatomy, diseases, noise, reports, storage, splits.
        geometry: What is scanned (:mod:`fvlm.phantom.geometries`): ``demo``, the whole trunk
            squeezed into one small grid; or an adult with real millimetre extents and organs cut
            by the field of view: ``chest`` (CT-RATE-like), ``abdomen`` (abdomen-pelvis),
            ``chest_abdomen_pelvis``.
        shape: The demo's canonical grid ``(D, H, W)`` (inferior->superior, posterior->anterior,
            left->right), at least ``(24, 24, 24)``; None: ``(40, 64, 80)``. Other geometries
            take it from their field of view.
        spacing: Voxel size (mm) along the same axes. Demo: the body is scaled to fill
            ``shape * spacing`` (None: ``(8, 5, 5)``, an adult trunk squeezed into 320 mm).
            Other geometries: one voxel size for every study with the same millimetre extents,
            e.g. ``(6, 6, 6)`` for fast tests (None: scanner-like, 512 x 512 in-plane and 1-5 mm
            slices, drawn per study).
        splits: Fractions of train, val and test studies (non-negative, summing to 1).
        preset: Anatomy table (preset name, YAML path or table). Its ``phantom`` diseases are
            the ``labels.csv`` columns and its keywords constrain the report wording.
        progress: Show a tqdm progress bar.
        report_style: ``template`` (decomposable, the demo's) or ``ctrate`` (CT-RATE's
            translated English, :mod:`fvlm.phantom.report_corpus`).

    Returns:
        Path of ``manifest.csv``.

    Raises:
        ValueError: On bad arguments (count, seed, geometry, shape, spacing, splits, unknown
            preset, a table whose phantom diseases the phantom cannot draw).
    """
    _check_count_and_seed(n_studies, seed)
    if report_style not in REPORT_STYLES:
        raise ValueError(f"report_style must be one of {REPORT_STYLES}, got {report_style!r}")
    split_names = assign_splits(int(n_studies), splits, int(seed))
    table = _phantom_table(preset)
    keys = [d.key for d in table.diseases("phantom")]
    scans = ScanGeometry.checked(geometry, shape, spacing)  # before any folder is created
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    manifest, labels, studies = [], [], []
    for index in tqdm(range(n_studies), desc="phantom", unit="study", disable=not progress):
        study = synthesize_study(
            index,
            int(seed),
            scans.shape,
            scans.spacing,
            table,
            geometry=scans.name,
            report_style=report_style,
        )
        image, mask = f"images/{study.study_id}.nii.gz", f"masks/{study.study_id}.nii.gz"
        nib.save(study.image(), out / image)
        nib.save(study.mask(), out / mask)
        text, split = study.report, split_names[index]
        manifest.append([study.study_id, image, mask, text.findings, text.impression, split])
        labels.append([study.study_id, *(int(key in study.diseases) for key in keys)])
        studies.append(_study_record(study, split, table))
    _write_csv(
        out / "reports.csv",
        ["study_id", "findings", "impression"],
        [[row[0], row[3], row[4]] for row in manifest],
    )
    _write_csv(out / "labels.csv", ["study_id", *keys], labels)
    header = ["study_id", "image", "mask", "findings", "impression", "split"]
    _write_csv(out / "manifest.csv", header, manifest)
    info = {
        "generator": "fvlm.phantom",
        "version": __version__,
        "seed": int(seed),
        "n_studies": int(n_studies),
        "geometry": scans.name,
        "shape": None if scans.shape is None else list(scans.shape),
        "spacing": None if scans.spacing is None else list(scans.spacing),
        "splits": dict(zip(SPLITS, _check_splits(splits), strict=True)),
        "table": table.name,
        "contrast_phase": "portal venous",
        "label_classes": "TotalSegmentator v2 (total)",
        "studies": studies,
    }
    (out / "phantom.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out / "manifest.csv"
