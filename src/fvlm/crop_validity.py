"""Crop validity: how often each anatomy is structurally complete in the training crops.

The paper aligns only anatomies that are "structurally complete" after RandomCrop (Sec. 3.2), and
its anatomy-aware crop (A.2) holds one uniformly chosen anatomy whole. Whether the *other*
anatomies survive depends on the crop size against their real extents: a 144 mm crop never holds
a 273 mm lung, and the lung's eleven CT-RATE labels then never enter the loss, silently. This
module measures that before training, from the cache's bounding boxes alone (no voxel is read):

* per anatomy: present %, complete % (not cut by the scan's field of view), valid in
  anatomy-aware crops % (simulated with :func:`fvlm.crop.anatomy_aware_crop_boxes`, the same
  distribution as the training loader's crop), abnormal % (the report's normal flags);
* for an anatomy that carries diseases and is valid in under ``threshold`` of the crops where it
  is complete, a one-line warning naming it and the smallest crop (voxels and mm) that would hold
  it in ``coverage`` of the studies; ``strict`` makes that an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.crop import anatomy_aware_crop_boxes, crops_valid
from fvlm.preprocess.cache import StudyCache

__all__ = [
    "CropValidityCheck",
    "CropValidityError",
    "CropValidityRow",
    "StudyBoxes",
    "check_crop_validity",
    "crop_report",
    "crop_validity_rows",
    "crop_validity_warnings",
    "format_crop_validity_table",
    "read_study_boxes",
    "simulate_crop_validity",
    "smallest_holding_crop",
]

#: Simulated crops per chunk (bounds memory: 16,384 x 35 anatomies x 6 ints = 27 MB).
_CHUNK = 16_384


class CropValidityError(ValueError):
    """``strict`` mode: a disease-carrying anatomy is rarely valid in the configured crop."""


@dataclass(frozen=True)
class StudyBoxes:
    """Geometry of ``N`` studies as the crop sees it, in voxels of each study's grid.

    Attributes:
        study_ids: ``(N,)`` study ids (for messages).
        names: ``(A,)`` anatomy names, the order of the anatomy axis.
        shapes: ``(N, 3)`` int volume shapes ``(D, H, W)``.
        spacing: ``(N, 3)`` float voxel sizes in mm.
        bboxes: ``(N, A, 3, 2)`` int half-open boxes (empty = absent).
        truncated: ``(N, A)`` bool, cut by the scan's field of view.
        abnormal: ``(N, A)`` bool, the report says the anatomy is not normal.
    """

    study_ids: tuple[str, ...]
    names: tuple[str, ...]
    shapes: np.ndarray
    spacing: np.ndarray
    bboxes: np.ndarray
    truncated: np.ndarray
    abnormal: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """``(N, A)`` bool: the box is non-empty."""
        return (self.bboxes[..., 1] > self.bboxes[..., 0]).all(axis=-1)

    @property
    def median_spacing(self) -> np.ndarray:
        """``(3,)`` median voxel size in mm (a cache's studies share one after resampling)."""
        return np.median(self.spacing, axis=0) if len(self.spacing) else np.ones(3)

    @property
    def complete(self) -> np.ndarray:
        """``(N, A)`` bool: present and not cut by the field of view (may be valid in a crop)."""
        return self.present & ~self.truncated

    @classmethod
    def from_mm(
        cls,
        boxes_mm: np.ndarray,
        field_of_view_mm: np.ndarray,
        spacing: Sequence[float],
        names: Sequence[str],
        truncated: np.ndarray | None = None,
        abnormal: np.ndarray | None = None,
    ) -> StudyBoxes:
        """Studies described in millimetres, resampled (as preprocessing would) to ``spacing``.

        Lets a recipe (spacing, crop) be measured on realistic anatomy extents before any scan is
        preprocessed: a box ``[lo, hi)`` mm becomes ``[floor(lo / s), ceil(hi / s))`` voxels of a
        ``round(fov / s)``-voxel grid, so an anatomy never shrinks by resampling.

        Args:
            boxes_mm: ``(N, A, 3, 2)`` boxes in mm from the scan's first voxel corner (NaN or an
                empty interval: absent).
            field_of_view_mm: ``(N, 3)`` scan extents in mm.
            spacing: Target voxel size ``(d, h, w)`` mm.
            names: Anatomy names of the anatomy axis.
            truncated: ``(N, A)`` cut by the field of view (default: none).
            abnormal: ``(N, A)`` abnormal flags (default: none).
        """
        s = np.asarray(spacing, dtype=float)
        if s.shape != (3,) or not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing!r}")
        fov = np.asarray(field_of_view_mm, dtype=float)
        shapes = np.maximum(1, np.round(fov / s)).astype(np.int64)
        lo = np.floor(np.nan_to_num(boxes_mm[..., 0], nan=0.0) / s)
        hi = np.ceil(np.nan_to_num(boxes_mm[..., 1], nan=0.0) / s)
        lo = np.clip(lo, 0, shapes[:, None, :]).astype(np.int64)
        hi = np.clip(hi, 0, shapes[:, None, :]).astype(np.int64)
        absent = ~(hi > lo).all(axis=-1)
        bboxes = np.stack([lo, hi], axis=-1)
        bboxes[absent] = 0
        n, a = bboxes.shape[:2]
        none = np.zeros((n, a), dtype=bool)
        return cls(
            study_ids=tuple(f"study{i}" for i in range(n)),
            names=tuple(names),
            shapes=shapes,
            spacing=np.broadcast_to(s, (n, 3)).copy(),
            bboxes=bboxes,
            truncated=none.copy() if truncated is None else np.asarray(truncated, dtype=bool),
            abnormal=none.copy() if abnormal is None else np.asarray(abnormal, dtype=bool),
        )

    def resampled(self, spacing: Sequence[float]) -> StudyBoxes:
        """The same studies as preprocessing at ``spacing`` (mm) would box them.

        So a recipe (spacing, crop) can be measured on a cache written at another spacing, e.g.
        a coarse one of the same millimetre extents, before preprocessing at the recipe's.
        """
        per_study = self.spacing[:, None, :, None]
        boxes_mm = np.where(self.present[..., None, None], self.bboxes * per_study, np.nan)
        resampled = StudyBoxes.from_mm(
            boxes_mm,
            self.shapes * self.spacing,
            spacing,
            self.names,
            self.truncated,
            self.abnormal,
        )
        return dataclasses.replace(resampled, study_ids=self.study_ids)


def read_study_boxes(
    cache_dir: str | Path, table: AnatomyTable, split: str | None = None
) -> StudyBoxes:
    """Boxes, truncation and normal flags of the cache's ``ok`` studies (only the JSON files).

    A ``meta.json`` entry without ``truncated`` counts as not truncated (caches written before
    field-of-view truncation was recorded); an anatomy missing from ``report.json`` is normal.

    Raises:
        FileNotFoundError: No ``manifest.csv`` in the cache.
        ValueError: A study's JSON is unreadable, lacks its shape or spacing, or names
            anatomies outside ``table`` (the message names the study).
    """
    cache = StudyCache(cache_dir)
    ids = cache.ok_studies(split)
    n, a = len(ids), len(table)
    shapes, spacing = np.zeros((n, 3), np.int64), np.ones((n, 3))
    bboxes = np.zeros((n, a, 3, 2), np.int64)
    truncated, abnormal = np.zeros((n, a), bool), np.zeros((n, a), bool)
    for i, study_id in enumerate(ids):
        meta = cache.study_meta(study_id)
        try:
            shapes[i], spacing[i] = meta["shape"], meta["spacing"]
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"study {study_id!r}: meta.json lacks a 3D shape/spacing: {err}"
            ) from err
        bboxes[i] = cache.bboxes(meta, table, study_id)
        truncated[i] = cache.truncated(meta, table, study_id)
        texts = cache.study_report(study_id).get("anatomies") or {}
        abnormal[i] = [not (texts.get(name) or {}).get("normal", True) for name in table.names]
    return StudyBoxes(tuple(ids), tuple(table.names), shapes, spacing, bboxes, truncated, abnormal)


def simulate_crop_validity(
    studies: StudyBoxes, crop_size: Sequence[int], draws: int = 4000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``draws`` anatomy-aware training crops and count, per anatomy, valid / complete.

    Studies are visited as an epoch would (a shuffled pass over them, repeated or cut to
    ``draws``); each crop is the training loader's anatomy-aware crop, which never chooses an
    anatomy cut by the field of view.

    Returns:
        ``(valid, complete)``: ``(A,)`` counts of crops where the anatomy is valid and of crops
        drawn from studies where it is complete; their ratio is the anatomy's validity rate.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    a = len(studies.names)
    valid, complete = np.zeros(a, np.int64), np.zeros(a, np.int64)
    n = len(studies.study_ids)
    if n == 0:
        return valid, complete
    rng = np.random.default_rng(seed)
    order = np.resize(rng.permutation(n), draws)
    flags = studies.complete
    for begin in range(0, draws, _CHUNK):
        pick = order[begin : begin + _CHUNK]
        boxes, ok = studies.bboxes[pick], flags[pick]
        starts, _ = anatomy_aware_crop_boxes(studies.shapes[pick], crop_size, boxes, rng, ok)
        valid += crops_valid(boxes, starts, crop_size, ok).sum(axis=0)
        complete += ok.sum(axis=0)
    return valid, complete


def smallest_holding_crop(extents: np.ndarray, coverage: float = 0.95) -> np.ndarray | None:
    """A small crop ``(3,)`` (same unit as ``extents``) that holds ``coverage`` of the extents.

    ``extents`` is ``(M, 3)``: one anatomy's box size in each of ``M`` studies. Per-axis
    quantiles would hold fewer than ``coverage`` of the boxes on all axes at once, so the crop is
    found by peeling: up to ``(1 - coverage) * M`` times, drop the study, among those setting the
    current maximum on some axis, whose removal shrinks the crop's volume most (ties: the study
    ranking highest on any axis, i.e. the most unusual one); the crop is the remaining maximum.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    extents = np.asarray(extents)
    if extents.ndim != 2 or extents.shape[1] != 3:
        raise ValueError(f"extents must have shape (M, 3), got {extents.shape}")
    m = len(extents)
    if m == 0:
        return None
    order = np.argsort(-extents, axis=0, kind="stable")
    outlier = (rankdata(extents, axis=0) / m).max(axis=1)
    removed = np.zeros(m, dtype=bool)
    first = [0, 0, 0]  # per axis: position in ``order`` of the largest study not removed

    def top(axis: int, skip: int = -1) -> float:
        k = first[axis]
        while removed[order[k, axis]] or order[k, axis] == skip:
            k += 1
        return extents[order[k, axis], axis]

    for _ in range(int(np.floor((1.0 - coverage) * m + 1e-9))):
        for axis in range(3):
            while removed[order[first[axis], axis]]:
                first[axis] += 1
        tops = [int(order[first[axis], axis]) for axis in range(3)]
        best = min(tops, key=lambda i: (np.prod([top(a, i) for a in range(3)]), -outlier[i]))
        removed[best] = True
    return np.array([top(axis) for axis in range(3)])


@dataclass(frozen=True)
class CropValidityRow:
    """One anatomy's line of the crop validity report (shares are fractions in [0, 1]).

    ``valid`` is the share of simulated crops, drawn from studies where the anatomy is complete,
    in which it is valid (NaN when it is complete in no study). ``holding_crop`` is the smallest
    crop (voxels; ``holding_crop_mm`` in mm at the median spacing) that holds it in ``coverage``
    of the studies where it is complete.
    """

    anatomy: str
    studies: int
    present: float
    complete: float
    valid: float
    abnormal: float
    carries_diseases: bool
    holding_crop: tuple[int, int, int] | None
    holding_crop_mm: tuple[float, float, float] | None


def crop_validity_rows(
    studies: StudyBoxes,
    crop_size: Sequence[int],
    table: AnatomyTable | None = None,
    draws: int = 4000,
    seed: int = 0,
    coverage: float = 0.95,
) -> list[CropValidityRow]:
    """The report's rows, in anatomy order.

    An anatomy *carries diseases* when ``table`` lists diseases for it or any report of the
    cache calls it abnormal.
    """
    valid, crops = simulate_crop_validity(studies, crop_size, draws, seed)
    n = max(1, len(studies.study_ids))
    present, complete = studies.present, studies.complete
    extents = studies.bboxes[..., 1] - studies.bboxes[..., 0]
    spacing = studies.median_spacing
    rows = []
    for j, name in enumerate(studies.names):
        holding = smallest_holding_crop(extents[complete[:, j], j], coverage)
        listed = table is not None and name in table.names and bool(table[name].diseases)
        rows.append(
            CropValidityRow(
                anatomy=name,
                studies=len(studies.study_ids),
                present=float(present[:, j].sum() / n),
                complete=float(complete[:, j].sum() / n),
                valid=float(valid[j] / crops[j]) if crops[j] else math.nan,
                abnormal=float(studies.abnormal[:, j].sum() / n),
                carries_diseases=listed or bool(studies.abnormal[:, j].any()),
                holding_crop=None if holding is None else tuple(int(v) for v in holding),
                holding_crop_mm=None
                if holding is None
                else tuple(round(float(v), 1) for v in holding * spacing),
            )
        )
    return rows


def _size(values: Sequence[float], unit: str = "") -> str:
    return " x ".join(f"{v:g}" for v in values) + unit


def crop_validity_warnings(
    rows: Sequence[CropValidityRow],
    crop_size: Sequence[int],
    spacing_mm: Sequence[float],
    threshold: float = 0.2,
    coverage: float = 0.95,
) -> tuple[list[str], list[str]]:
    """One-line warnings: ``(crop, field_of_view)``.

    ``crop`` lists each disease-carrying anatomy valid in under ``threshold`` of the crops where
    it is complete (a larger crop would fix it); ``field_of_view`` each disease-carrying anatomy
    present but complete in no study (only other scans would fix it).
    """
    crop_mm = [c * s for c, s in zip(crop_size, spacing_mm, strict=True)]
    crop, fov = [], []
    for row in rows:
        if not row.carries_diseases or row.present == 0:
            continue
        if row.complete == 0:
            fov.append(
                f"anatomy {row.anatomy!r} is cut by the scan's field of view in every study where "
                "it is present: it is never valid in the loss"
            )
        elif row.valid < threshold:
            crop.append(
                f"anatomy {row.anatomy!r} carries diseases but is valid in only "
                f"{100 * row.valid:.1f} % of the anatomy-aware crops of {_size(crop_size)} voxels "
                f"({_size(crop_mm, ' mm')}) where it is complete (under {100 * threshold:g} %); "
                f"a crop of at least {_size(row.holding_crop)} voxels "
                f"({_size(row.holding_crop_mm, ' mm')}) holds it in {100 * coverage:g} % of "
                "the studies"
            )
    return crop, fov


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> list[str]:
    """Left-align the first cell (a name) and right-align the numbers."""
    return [
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ]


def format_crop_validity_table(rows: Sequence[CropValidityRow]) -> str:
    """A plain-text table of the rows (percentages; ``*``: carries diseases)."""
    header = (
        "anatomy",
        "present %",
        "complete %",
        "valid in crops %",
        "abnormal %",
        "crop holding 95 % (vox)",
        "(mm)",
    )
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.anatomy + (" *" if row.carries_diseases else ""),
                f"{100 * row.present:.1f}",
                f"{100 * row.complete:.1f}",
                "-" if math.isnan(row.valid) else f"{100 * row.valid:.1f}",
                f"{100 * row.abnormal:.1f}",
                "-" if row.holding_crop is None else _size(row.holding_crop),
                "-" if row.holding_crop_mm is None else _size(row.holding_crop_mm),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(_aligned(line, widths)) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text) + "\n(* carries diseases)"


@dataclass(frozen=True)
class CropValidityCheck:
    """What a crop validity check measured: its rows, its warnings and what it was run on.

    Attributes:
        source: What was measured (a cache and split), for the report's first line.
        studies: Number of studies measured.
        crop_size: Training crop ``(d, h, w)`` in voxels.
        spacing_mm: Median voxel size of the studies (mm).
        draws: Simulated crops.
        rows: One row per anatomy, in table order.
        warnings: One-line warnings (see :func:`crop_validity_warnings`).
    """

    source: str
    studies: int
    crop_size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    draws: int
    rows: list[CropValidityRow]
    warnings: list[str]

    def format(self) -> str:
        """A title line (crop in voxels and mm) and the table; warnings are printed apart."""
        crop_mm = [c * s for c, s in zip(self.crop_size, self.spacing_mm, strict=True)]
        title = (
            f"crop validity of {self.source} ({self.studies} studies) at crop "
            f"{_size(self.crop_size)} voxels ({_size(crop_mm, ' mm')} at "
            f"{_size(self.spacing_mm, ' mm')}; {self.draws} simulated crops)"
        )
        return title + "\n" + format_crop_validity_table(self.rows)


def check_crop_validity(
    cache_dir: str | Path,
    crop_size: Sequence[int],
    table: AnatomyTable,
    split: str | None = "train",
    draws: int = 4000,
    seed: int = 0,
    threshold: float = 0.2,
    coverage: float = 0.95,
    strict: bool = False,
    spacing: Sequence[float] | None = None,
) -> CropValidityCheck:
    """The check a training run makes at setup: rows and one-line warnings.

    Args:
        cache_dir: The preprocessing cache.
        crop_size: Training crop ``(d, h, w)`` in voxels of the cache grid.
        table: The anatomy table the cache was written with.
        split: Manifest split to measure (``None``: all).
        draws: Simulated crops (4,000 take well under a second).
        seed: Seed of the simulation (the report is reproducible).
        threshold: Validity share under which a disease-carrying anatomy is warned about.
        coverage: Share of studies the suggested crop must hold the anatomy in.
        strict: Raise :class:`CropValidityError` instead of returning crop warnings.
        spacing: Measure the studies as if preprocessed at this voxel size (mm), ``crop_size``
            then being in its voxels (:meth:`StudyBoxes.resampled`); ``None``: the cache's.

    Raises:
        CropValidityError: ``strict`` and some disease-carrying anatomy is valid in under
            ``threshold`` of the crops where it is complete.
    """
    crop_size = tuple(int(c) for c in crop_size)
    studies = read_study_boxes(cache_dir, table, split)
    if spacing is not None:
        studies = studies.resampled(spacing)
    spacing = studies.median_spacing
    rows = crop_validity_rows(studies, crop_size, table, draws, seed, coverage)
    crop, fov = crop_validity_warnings(rows, crop_size, spacing, threshold, coverage)
    if strict and crop:
        raise CropValidityError(f"{cache_dir}: " + "; ".join(crop))
    where = f"{cache_dir}" + ("" if split is None else f" split {split!r}")
    return CropValidityCheck(
        source=where,
        studies=len(studies.study_ids),
        crop_size=crop_size,  # type: ignore[arg-type]
        spacing_mm=tuple(round(float(v), 4) for v in spacing),  # type: ignore[arg-type]
        draws=draws,
        rows=rows,
        warnings=crop + fov,
    )


def crop_report(
    cache: Path,
    crop_size: tuple[int, int, int],
    anatomy_table: str = "paper",
    split: str | None = None,
    draws: int = 4000,
    seed: int = 0,
    threshold: float = 0.2,
    coverage: float = 0.95,
    strict: bool = False,
    spacing: tuple[float, float, float] | None = None,
) -> None:
    """Print, per anatomy, how often it is present, complete, valid in training crops, abnormal.

    Reads only the cache's ``meta.json`` and ``report.json`` files, so it runs in seconds on a
    full cache, before a training run spends hours on crops that never hold an organ. ``fvlm fit``
    logs the same table for its training split (``data.crop_check``).

    Args:
        cache: The preprocessing cache (``fvlm preprocess --cache``).
        crop_size: Training crop ``D H W`` in voxels of the cache grid (``data.crop_size``).
        anatomy_table: Preset name (``paper``, ``chest``) or YAML file the cache was written with.
        split: Manifest split to measure (default: every split).
        draws: Simulated anatomy-aware crops.
        seed: Seed of the simulation.
        threshold: Warn about a disease-carrying anatomy valid in under this share of the crops
            where it is complete.
        coverage: Share of studies the suggested crop must hold the anatomy in.
        strict: Fail (exit with an error) instead of warning.
        spacing: Measure a recipe before preprocessing at it: the cache's boxes as if resampled
            to this voxel size ``D H W`` (mm), ``crop_size`` in its voxels (default: the cache's).
    """
    table = load_anatomy_table(anatomy_table)
    check = check_crop_validity(
        cache, crop_size, table, split, draws, seed, threshold, coverage, strict, spacing
    )
    print(check.format())
    for line in check.warnings:
        print(f"warning: {line}")
