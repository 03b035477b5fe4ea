"""Scan geometry: the NIfTI header's affine, or the dataset's metadata where the header is silent.

Some public CT sets store volumes whose NIfTI affine is the identity (CT-RATE among them): the
spacing lives only in ``metadata/*_metadata.csv``. Read as it stands, such a volume becomes 1 mm
voxels and every organ shrinks (a lung to 1/27 of its volume at 0.75 x 0.75 x 1.5 mm). So before
a voxel is read, the header's affine is judged, and where it is *uninformative* the geometry comes
from the metadata (DICOM terms, as CT-RATE lists them):

* an identity affine (3 x 3 identity, zero origin: what a converter that knew nothing writes),
* no spatial transform at all (NIfTI ``qform_code`` and ``sform_code`` both 0),
* a zero-length or non-finite column (no voxel size along that axis),
* columns that are not orthogonal (more than :data:`ORTHOGONALITY_TOLERANCE_DEG`; converters
  resample tilted acquisitions, so a shear means a broken header),
* a voxel size outside the plausible range (default 0.1-20 mm; e.g. metres written as mm).

Metadata geometry (:class:`MetadataGeometry`): ``spacing`` in mm along the stored array's axes
``i, j, k``; ``orientation`` = DICOM ImageOrientationPatient (direction cosines, in the patient's
LPS frame, of increasing ``i`` then increasing ``j``; default ``[1, 0, 0, 0, 1, 0]``, axial); and
``position`` = ImagePositionPatient (LPS mm of voxel ``(0, 0, 0)``; default 0). Slices are assumed
to be stored along ``i x j`` (for an axial scan: foot to head, CT-RATE's "LPS index order"); one
ImagePositionPatient cannot tell the slice direction, so a dataset stored head to foot needs its
real affines.

The decision (header or metadata, and why) is the ``geometry`` record of ``meta.json``. Whatever
the source, a voxel size outside the plausible range, or an output grid above a voxel budget, is
an error raised before the volume is read or resampled (a header spacing off by 1000x would
otherwise allocate gigabytes first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from nibabel import orientations

__all__ = [
    "MAX_OUTPUT_VOXELS",
    "ORTHOGONALITY_TOLERANCE_DEG",
    "SPACING_RANGE_MM",
    "GeometryError",
    "GeometryRule",
    "GeometrySource",
    "MetadataGeometry",
    "header_problem",
    "output_shape",
    "resolve_geometry",
]

GeometrySource = Literal["auto", "header", "metadata"]
SPACING_RANGE_MM: tuple[float, float] = (0.1, 20.0)
#: 2**28 voxels (1 GiB as float32): a 500 x 500 x 1000 mm scan at 1 x 1 x 1 mm is 250 M.
MAX_OUTPUT_VOXELS = 2**28
ORTHOGONALITY_TOLERANCE_DEG = 1.0
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_UNIT_TOLERANCE = 1e-3
_DISAGREEMENT = 0.01  # relative spacing difference, header vs metadata, worth a warning


class GeometryError(ValueError):
    """A volume's geometry is unusable or implausible; the message says which and how to fix it."""


@dataclass(frozen=True)
class MetadataGeometry:
    """A volume's geometry as its dataset's metadata states it (see the module docstring).

    Args:
        spacing: Voxel size in mm along the stored array's axes ``i, j, k``.
        orientation: DICOM ImageOrientationPatient (6 numbers, LPS); ``None``: axial, i->L, j->P.
        position: DICOM ImagePositionPatient (3 numbers, LPS mm); ``None``: the origin.
    """

    spacing: tuple[float, float, float]
    orientation: tuple[float, ...] | None = None
    position: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise GeometryError(f"metadata spacing must be three positive mm, got {self.spacing}")
        if self.orientation is not None:
            if len(self.orientation) != 6 or not all(map(math.isfinite, self.orientation)):
                raise GeometryError(
                    f"ImageOrientationPatient must be 6 numbers, got {self.orientation}"
                )
            row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
            norms = np.linalg.norm(row), np.linalg.norm(col)
            if max(abs(n - 1) for n in norms) > _UNIT_TOLERANCE or abs(row @ col) > _UNIT_TOLERANCE:
                raise GeometryError(
                    f"ImageOrientationPatient {list(self.orientation)} is not two orthogonal "
                    "unit vectors"
                )
        if self.position is not None and (
            len(self.position) != 3 or not all(map(math.isfinite, self.position))
        ):
            raise GeometryError(f"ImagePositionPatient must be 3 numbers, got {self.position}")

    def affine(self) -> np.ndarray:
        """Voxel ``(i, j, k)`` -> RAS+ mm, as the rest of the pipeline uses."""
        row, col = (
            (np.array(self.orientation[:3]), np.array(self.orientation[3:]))
            if self.orientation is not None
            else (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))
        )
        row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
        lps = np.column_stack([row, col, np.cross(row, col)]) * np.array(self.spacing)
        affine = np.eye(4)
        affine[:3, :3] = _LPS_TO_RAS @ lps
        affine[:3, 3] = _LPS_TO_RAS @ np.array(self.position or (0.0, 0.0, 0.0), dtype=float)
        return affine

    def to_json(self) -> dict:
        """Plain lists for ``meta.json`` (and for comparing with a previous run's inputs)."""

        def floats(values: tuple[float, ...] | None) -> list[float] | None:
            return None if values is None else [float(v) for v in values]

        return {
            "spacing": floats(self.spacing),
            "orientation": floats(self.orientation),
            "position": floats(self.position),
        }


@dataclass(frozen=True)
class GeometryRule:
    """How a run decides and bounds geometry (from the preprocessing settings).

    Args:
        source: ``auto``: the header unless it is uninformative, then the metadata (an error if
            there is none); ``header``: the header as it stands (only unusable ones fail);
            ``metadata``: always the metadata (an error where a study has none).
        spacing_range_mm: Plausible voxel sizes; anything outside fails the study.
        max_output_voxels: Budget of the resampled grid; a larger one fails the study.
        target_spacing: Output voxel size along the canonical axes (S, A, R), for the budget.
    """

    source: GeometrySource = "auto"
    spacing_range_mm: tuple[float, float] = SPACING_RANGE_MM
    max_output_voxels: int = MAX_OUTPUT_VOXELS
    target_spacing: tuple[float, float, float] | None = None


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _mm(values) -> str:
    return "x".join(f"{float(v):.4g}" for v in values) + " mm"


def header_problem(
    affine: np.ndarray,
    spacing_range_mm: tuple[float, float] = SPACING_RANGE_MM,
    transform_codes: tuple[int, int] | None = None,
) -> str | None:
    """Why ``affine`` says nothing reliable about the scan's geometry, or ``None`` if it does.

    Args:
        affine: The header's voxel -> RAS+ affine.
        spacing_range_mm: Plausible voxel sizes.
        transform_codes: NIfTI ``(qform_code, sform_code)`` where known.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        return "the affine holds NaN or infinite values"
    sizes = _spacing(affine)
    zero = [int(a) for a in np.flatnonzero(sizes < 1e-6)]
    if zero:
        return f"affine column(s) {zero} have zero length (no voxel size along that axis)"
    if np.allclose(affine, np.eye(4), rtol=0.0, atol=1e-9):
        return "identity affine (the converter wrote no geometry)"
    if transform_codes is not None and not any(transform_codes):
        return "no spatial transform in the header (qform_code and sform_code are 0)"
    directions = affine[:3, :3] / sizes
    cosines = np.abs(directions.T @ directions - np.eye(3)).max()
    if cosines > math.sin(math.radians(ORTHOGONALITY_TOLERANCE_DEG)):
        angle = math.degrees(math.asin(min(1.0, cosines)))
        return f"affine columns are not orthogonal (sheared by {angle:.1f} degrees)"
    low, high = spacing_range_mm
    if sizes.min() < low or sizes.max() > high:
        return f"voxel size {_mm(sizes)} is outside the plausible {low:g}-{high:g} mm"
    return None


def output_shape(
    shape: tuple[int, ...], affine: np.ndarray, target: tuple[float, float, float]
) -> tuple[int, int, int]:
    """Shape of the resampled grid on the canonical axes (S, A, R), from the header alone.

    Same rule as the resampler: ``round(n * s / t)`` voxels per axis, at least 1.
    """
    ornt = orientations.io_orientation(affine)
    sizes = _spacing(affine)
    out = [1, 1, 1]
    for axis, (world, _) in enumerate(ornt):
        canonical = 2 - int(world)  # world x (R) -> axis 2, y (A) -> 1, z (S) -> 0
        out[canonical] = max(1, int(round(shape[axis] * sizes[axis] / target[canonical])))
    return out[0], out[1], out[2]


def resolve_geometry(
    header_affine: np.ndarray,
    shape: tuple[int, ...],
    metadata: MetadataGeometry | None,
    rule: GeometryRule | None = None,
    transform_codes: tuple[int, int] | None = None,
) -> tuple[np.ndarray, dict]:
    """The affine to use (header or metadata) and the decision record for ``meta.json``.

    Raises:
        GeometryError: No usable geometry (uninformative header and no metadata, metadata
            required but absent), an implausible voxel size, or an output grid over the budget.
    """
    rule = rule or GeometryRule()
    problem = header_problem(header_affine, rule.spacing_range_mm, transform_codes)
    record: dict = {
        "source": "header",
        "reason": "",
        "header_spacing": [round(float(s), 6) for s in _spacing(header_affine)],
        "header_problem": problem,
        "metadata": None if metadata is None else metadata.to_json(),
        "warning": None,
    }
    if rule.source == "metadata" or (rule.source == "auto" and problem is not None):
        if metadata is None:
            why = "geometry 'metadata' is set" if rule.source == "metadata" else problem
            raise GeometryError(
                f"{why}, and the manifest gives no spacing for this study (columns spacing "
                "[, image_orientation, image_position], or CT-RATE's XYSpacing and ZSpacing)"
            )
        affine = metadata.affine()
        record["source"] = "metadata"
        record["reason"] = (
            "geometry 'metadata' is set" if rule.source == "metadata" else f"header: {problem}"
        )
    else:
        affine = np.asarray(header_affine, dtype=np.float64)
        record["reason"] = (
            "geometry 'header' is set" if rule.source == "header" else "header affine is usable"
        )
        if metadata is not None:
            record["warning"] = _disagreement(_spacing(affine), np.array(metadata.spacing))
    _check_plausible(affine, rule, "metadata" if record["source"] == "metadata" else "header")
    if rule.target_spacing is not None:
        grid = output_shape(shape, affine, rule.target_spacing)
        record["output_shape"] = list(grid)
        if math.prod(grid) > rule.max_output_voxels:
            raise GeometryError(
                f"output grid {grid[0]}x{grid[1]}x{grid[2]} ({math.prod(grid):,} voxels) exceeds "
                f"the budget of {rule.max_output_voxels:,} (voxel size {_mm(_spacing(affine))} "
                f"from the {record['source']}, {'x'.join(map(str, shape))} voxels stored): check "
                "the spacing or raise max_output_voxels"
            )
    return affine, record


def _check_plausible(affine: np.ndarray, rule: GeometryRule, source: str) -> None:
    sizes = _spacing(affine)
    if not np.isfinite(affine).all() or sizes.min() < 1e-6:
        raise GeometryError(f"{source} affine is unusable: {header_problem(affine)}")
    low, high = rule.spacing_range_mm
    if sizes.min() < low or sizes.max() > high:
        raise GeometryError(
            f"voxel size {_mm(sizes)} from the {source} is outside the plausible "
            f"{low:g}-{high:g} mm (spacing_range_mm)"
        )


def _disagreement(header: np.ndarray, metadata: np.ndarray) -> str | None:
    if np.all(np.abs(header - metadata) <= _DISAGREEMENT * metadata):
        return None
    return (
        f"header voxel size {_mm(header)} differs from the metadata's {_mm(metadata)}; "
        "the header was used (set geometry 'metadata' to use the metadata)"
    )
