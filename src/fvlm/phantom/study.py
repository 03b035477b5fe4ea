"""One synthetic study: diseases, volume, label map, report and storage, from ``(seed, index)``.

Each study draws from its own random streams, seeded by ``(seed, index, stream)``, so a study is
the same whatever ``n_studies`` is, and changing the report wording does not change any volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from fvlm.anatomy import AnatomyTable, load_anatomy_table, totalsegmentator_classes

from .canvas import Canvas
from .diseases import plan_findings, sample_disease_keys
from .findings import Finding
from .frame import Frame
from .geometries import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    MIN_SHAPE,
    Geometry,
    ScanGeometry,
    images,
)
from .geometry import Grid
from .hounsfield import HU, HU_CLIP, sample_hu
from .lesions import paint_lesions
from .reports import Report, ReportStyle, write_report
from .storage import Storage, to_nifti
from .volume import paint_anatomy

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "MIN_SHAPE",
    "PhantomStudy",
    "study_id",
    "synthesize_study",
]

_STREAMS = {
    "diseases": 0,
    "anatomy": 1,
    "lesions": 2,
    "noise": 3,
    "report": 4,
    "storage": 5,
    "geometry": 6,
}


@dataclass(frozen=True)
class PhantomStudy:
    """A synthetic CT study in canonical orientation plus how it is stored on disk.

    Attributes:
        study_id: Identifier (file stem), ``phantom_00007`` for index 7.
        hu: Canonical ``(S, A, R)`` int16 volume in Hounsfield units.
        labels: Canonical uint8 TotalSegmentator v2 (``total``) label map, same grid.
        grid: Shape and spacing (mm) of the canonical arrays.
        findings: The drawn diseases (keys of the table's ``phantom`` set) with their parameters.
        report: Findings and impression text.
        storage: Orientation and rescaling of the files.
    """

    study_id: str
    hu: np.ndarray
    labels: np.ndarray
    grid: Grid
    findings: tuple[Finding, ...]
    report: Report
    storage: Storage

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> RAS+ (mm) affine of the canonical arrays."""
        return self.grid.affine

    @property
    def diseases(self) -> tuple[str, ...]:
        """Keys of the drawn diseases."""
        return tuple(f.key for f in self.findings)

    def image(self) -> nib.Nifti1Image:
        """The CT as stored (orientation, rescaling)."""
        return to_nifti(self.hu, self.affine, self.storage, is_image=True)

    def mask(self) -> nib.Nifti1Image:
        """The label map as stored (same orientation and affine as the image)."""
        return to_nifti(self.labels, self.affine, self.storage, is_image=False)


def study_id(index: int) -> str:
    """File stem of study ``index``."""
    return f"phantom_{index:05d}"


@lru_cache(maxsize=1)
def _class_ids() -> dict[str, int]:
    return {name: cid for cid, name in totalsegmentator_classes("v2").items()}


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, _STREAMS[stream]]))


def _disease_keys(
    table: AnatomyTable,
    frame: Frame | None,
    forced: Sequence[str] | None,
    rng: np.random.Generator,
) -> list[str]:
    """The study's diseases: ``forced`` ones (checked) or a draw among those the scan images.

    Args:
        table: The anatomy table; its ``phantom`` diseases are the candidates.
        frame: An adult geometry's frame (only anatomies its field of view images can be
            diseased: a chest scan shows no bladder stone), or None for the demo (all imaged).
        forced: Disease keys to use instead of a draw, or None.
        rng: The study's disease stream.
    """
    available = [d.key for d in table.diseases("phantom")]
    imaged = [k for k in available if frame is None or images(frame, k.split("/")[0])]
    if forced is None:
        return sample_disease_keys(rng, imaged)
    unknown = [key for key in forced if key not in available]
    if unknown:
        raise ValueError(
            f"disease(s) {unknown} are not phantom diseases of table {table.name!r}; "
            f"choose from {available}"
        )
    unseen = [key for key in forced if key not in imaged]
    if unseen:
        raise ValueError(
            f"disease(s) {unseen} lie outside this study's field of view; it images {imaged}"
        )
    return [key for key in available if key in set(forced)]


def synthesize_study(
    index: int,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    table: AnatomyTable | str | Path = "paper",
    diseases: Sequence[str] | None = None,
    geometry: Geometry = "demo",
    report_style: ReportStyle = "template",
) -> PhantomStudy:
    """Make study ``index`` of the phantom with seed ``seed`` (in memory; nothing is written).

    Args:
        index: Study number (>= 0); with ``seed`` it fixes everything about the study.
        seed: Phantom seed (>= 0).
        shape: The demo geometry's canonical grid ``(D, H, W)``: inferior->superior,
            posterior->anterior, left->right; at least :data:`MIN_SHAPE` (None:
            :data:`DEFAULT_SHAPE`). Other geometries derive it from their field of view.
        spacing: Voxel size (mm) along the same axes. Demo: the body fills ``shape * spacing``
            (None: :data:`DEFAULT_SPACING`). Other geometries: one voxel size for every study,
            same millimetre extents (None: scanner-like, drawn per study).
        table: Anatomy table (or preset name / YAML path); its ``phantom`` diseases are sampled
            and its keywords constrain the report wording.
        diseases: Force these disease keys (e.g. ``["liver/steatosis"]``, or ``[]`` for a
            healthy study) instead of sampling them - for tests and figures.
        geometry: What is scanned (:mod:`fvlm.phantom.geometries`): ``demo`` (the whole trunk
            squeezed into a small grid), or an adult with real extents: ``chest``, ``abdomen``,
            ``chest_abdomen_pelvis``.
        report_style: How the report is worded (:data:`fvlm.phantom.reports.ReportStyle`).

    Returns:
        The study.

    Raises:
        ValueError: On a bad index, seed, geometry, shape or spacing, or a forced disease the
            table's phantom set does not contain or the study's field of view does not image.
    """
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise ValueError(f"index must be an integer >= 0, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    scans = ScanGeometry.checked(geometry, shape, spacing)
    if not isinstance(table, AnatomyTable):
        table = load_anatomy_table(table)
    adult = scans.adult_frame(_rng(seed, index, "geometry"))  # None: the demo's, drawn below
    keys = _disease_keys(table, adult, diseases, _rng(seed, index, "diseases"))
    rng = _rng(seed, index, "anatomy")
    findings = plan_findings(keys, rng)
    hu = sample_hu(rng)
    frame = Frame.sample(scans.grid, rng) if adult is None else adult
    grid = frame.grid
    canvas = Canvas(grid, _class_ids(), HU["air"][0])
    layout = paint_anatomy(canvas, frame, hu, rng, findings)
    findings = paint_lesions(canvas, frame, layout, findings, hu, _rng(seed, index, "lesions"))
    noise = _rng(seed, index, "noise")
    sigma = noise.uniform(10.0, 18.0)
    volume = canvas.hu + sigma * noise.standard_normal(grid.shape, dtype=np.float32)
    volume = np.rint(np.clip(volume, *HU_CLIP)).astype(np.int16)
    drawn = tuple(findings[key] for key in keys)
    return PhantomStudy(
        study_id=study_id(int(index)),
        hu=volume,
        labels=canvas.labels,
        grid=grid,
        findings=drawn,
        report=write_report(drawn, table, _rng(seed, index, "report"), report_style),
        storage=Storage.sample(_rng(seed, index, "storage")),
    )
