"""DICOM CT input: a series folder (or one file) read into the same volume a NIfTI file gives.

A hospital export is a folder of single-slice files (sometimes several series, nested folders, a
``DICOMDIR``), or one enhanced multi-frame file. The reader turns the chosen series into a
:class:`~fvlm.preprocess.volume.NiftiVolume` in HU with a voxel -> RAS+ mm affine, in the array
layout NIfTI converters (dicom2nifti, dcm2niix) write: axis 0 runs along a row (the column index),
axis 1 down the columns (the row index), axis 2 through the slices in the order of their position
along the slice normal. A TotalSegmentator mask made from the converter's NIfTI therefore lies on
this grid.

Geometry is DICOM's: ``ImageOrientationPatient`` gives the row and column directions and their
cross product the slice normal, ``PixelSpacing`` the in-plane voxel size (between rows, then
between columns), ``ImagePositionPatient`` the centre of each slice's first voxel. Slices are
sorted by that position projected on the normal (never by file name or ``InstanceNumber``, which
scanners number either way), and the step between them is measured, not read from
``SliceThickness``. DICOM's patient frame is LPS (x to the patient's left, y to the posterior) and
nibabel's world frame is RAS, so the affine's first two rows change sign. ``RescaleSlope`` and
``RescaleIntercept`` are applied per slice (they may differ between slices).

A series that cannot give one regular stack is refused with a one-line error naming the folder or
file: several series and no choice (they are listed), a modality other than CT, slices of
different size, orientation or pixel spacing, two slices at one position, a gap over 1.5 times the
median step (missing slices), uneven steps, a gantry tilt, an unreadable file or one whose
compression has no decoder installed.

pydicom reads the files. The alternatives installed with TotalSegmentator were measured on a
512 x 512 x 300 series (152 MB, 2 shared CPU cores, 2026-12-01, imports excluded): this reader
1.4-3.2 s and 349 MiB peak (int16 out), SimpleITK 2.6-8.1 s and 946 MiB (int32 out), dicom2nifti
6.0-9.3 s and 805 MiB (float64 out). Besides, dicom2nifti copies the whole folder to a temporary one
before converting, keeps its options in module-global settings and reports problems as bare codes
(``SLICE_INCREMENT_INCONSISTENT``) without the file; SimpleITK's series reader reads a series with
a missing slice as fewer slices at the average step, with only a warning (10 slices of 2.5 mm, one
removed: 9 of 2.8125 mm). The tests check this reader against dicom2nifti on the same series.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from .geometry import ORTHOGONALITY_TOLERANCE_DEG, GeometryRule, MetadataGeometry, resolve_geometry
from .volume import NiftiVolume, Volume

__all__ = [
    "MAX_GAP_RATIO",
    "STEP_TOLERANCE",
    "DicomError",
    "folder_fingerprint",
    "is_dicom",
    "load_dicom",
]

#: A step this many times the median step means slices are missing.
MAX_GAP_RATIO = 1.5
#: Steps may differ from the median by this fraction (or 0.01 mm) before the spacing is uneven.
STEP_TOLERANCE = 0.01
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".npz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_CHUNK = 1 << 20
_SAME_DIRECTION = 1e-4  # direction cosines of two slices that count as the same orientation


class DicomError(ValueError):
    """A DICOM input cannot give one regular CT volume; the message names the file or folder."""


@dataclass(frozen=True)
class _Slice:
    """One image plane: where it lies and how to read and rescale its pixels."""

    path: Path
    frame: int | None  # index in a multi-frame file, None for a single-frame one
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...]  # ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # between rows, between columns (mm)
    size: tuple[int, int]  # rows, columns
    slope: float
    intercept: float


@dataclass
class _Series:
    """The image slices of one SeriesInstanceUID, with what identifies it to a person."""

    uid: str
    number: str
    description: str
    modality: str
    slices: list[_Slice]
    header: Dataset  # of its first file: thickness and spacing of a one-slice series

    def describe(self) -> str:
        """One line for an error that lists the series of a folder."""
        return (
            f"number {self.number or '?'} {self.description!r} ({self.modality}, "
            f"{len(self.slices)} slices, uid {self.uid})"
        )


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is read as DICOM: a folder, a ``.dcm``/``.ima`` file or a ``DICM`` file."""
    path = Path(path)
    if path.is_dir():
        return True
    if path.name.lower().endswith(_NOT_DICOM_SUFFIXES):
        return False
    return path.suffix.lower() in _DICOM_SUFFIXES or _has_magic(path)


def _has_magic(path: Path) -> bool:
    """The ``DICM`` mark after the 128-byte preamble of a DICOM Part 10 file."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _files(path: Path) -> list[Path]:
    """The files of a folder (recursively, hidden ones left out) in a stable order, or the file."""
    if not path.is_dir():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def folder_fingerprint(folder: Path, previous: dict | None = None) -> dict:
    """SHA-256 over a folder's files (names and bytes), with their total size and latest mtime.

    The folder counterpart of :func:`fvlm.preprocess.cache.file_fingerprint`: the hash is reused
    when the file count, total size and latest mtime match ``previous``, so a resumed run does not
    read a whole series again.
    """
    files = _files(folder)
    stats = [f.stat() for f in files]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime_ns for s in stats), default=0)
    if (
        previous
        and previous.get("sha256")
        and (previous.get("size"), previous.get("mtime_ns"), previous.get("files"))
        == (size, mtime, len(files))
    ):
        digest = previous["sha256"]
    else:
        sha = hashlib.sha256()
        for file in files:
            sha.update(file.relative_to(folder).as_posix().encode() + b"\0")
            with file.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    sha.update(chunk)
        digest = sha.hexdigest()
    return {"sha256": digest, "size": size, "mtime_ns": mtime, "files": len(files)}


def _header(path: Path) -> Dataset | None:
    """The file's DICOM header (no pixels); ``None`` for a file that is not DICOM by name or mark.

    Raises:
        DicomError: A file that should be DICOM cannot be parsed.
    """
    magic = _has_magic(path)
    if not magic and path.suffix.lower() not in _DICOM_SUFFIXES:
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=not magic)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise DicomError(
            f"{path}: not a readable DICOM file ({type(err).__name__}: {err})"
        ) from err
    if not magic and "SOPClassUID" not in header:
        raise DicomError(f"{path}: not a DICOM file (no DICM mark and no SOP class)")
    return header


def _number(header: Dataset, keyword: str, path: Path, default: float | None = None) -> float:
    value = header.get(keyword, default)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise DicomError(f"{path}: {keyword} missing or not a number ({value!r})") from err
    if not math.isfinite(number):
        raise DicomError(f"{path}: {keyword} is not finite ({value!r})")
    return number


def _numbers(header: Dataset, keyword: str, count: int, path: Path) -> tuple[float, ...]:
    value = header.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise DicomError(f"{path}: {keyword} missing or not numbers ({value!r})") from err
    if len(numbers) != count or not all(map(math.isfinite, numbers)):
        raise DicomError(f"{path}: {keyword} must be {count} finite numbers, got {value!r}")
    return numbers


def _item(groups: Sequence[Dataset], keyword: str) -> Dataset:
    """The first item of functional group ``keyword`` in the per-frame, then the shared groups."""
    for group in groups:
        if keyword in group and len(group[keyword].value):
            return group[keyword].value[0]
    return Dataset()


def _slices(path: Path, header: Dataset) -> list[_Slice]:
    """The image planes of one file: one for a classic file, one per frame for an enhanced one."""
    size = (int(_number(header, "Rows", path)), int(_number(header, "Columns", path)))
    frames = int(header.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" not in header:
        if frames != 1:
            raise DicomError(f"{path}: {frames} frames without per-frame positions")
        return [
            _Slice(
                path,
                None,
                np.array(_numbers(header, "ImagePositionPatient", 3, path)),
                _numbers(header, "ImageOrientationPatient", 6, path),
                _numbers(header, "PixelSpacing", 2, path),  # type: ignore[arg-type]
                size,
                _number(header, "RescaleSlope", path, 1.0),
                _number(header, "RescaleIntercept", path, 0.0),
            )
        ]
    shared = header.get("SharedFunctionalGroupsSequence") or [Dataset()]
    per_frame = header.PerFrameFunctionalGroupsSequence
    if len(per_frame) != frames:
        raise DicomError(f"{path}: {len(per_frame)} per-frame groups for {frames} frames")
    slices = []
    for frame, group in enumerate(per_frame):
        groups = (group, shared[0])
        rescale = _item(groups, "PixelValueTransformationSequence")
        slices.append(
            _Slice(
                path,
                frame,
                np.array(
                    _numbers(
                        _item(groups, "PlanePositionSequence"), "ImagePositionPatient", 3, path
                    )
                ),
                _numbers(
                    _item(groups, "PlaneOrientationSequence"), "ImageOrientationPatient", 6, path
                ),
                _numbers(_item(groups, "PixelMeasuresSequence"), "PixelSpacing", 2, path),  # type: ignore[arg-type]
                size,
                _number(rescale, "RescaleSlope", path, 1.0),
                _number(rescale, "RescaleIntercept", path, 0.0),
            )
        )
    return slices


def _scan(path: Path) -> tuple[dict[str, _Series], int, int]:
    """The image series under ``path`` by SeriesInstanceUID, files not DICOM, non-image objects."""
    series: dict[str, _Series] = {}
    not_dicom = other_objects = 0
    for file in _files(path):
        header = _header(file)
        if header is None:
            not_dicom += 1
            continue
        if "Rows" not in header:  # DICOMDIR, structured reports, presentation states
            other_objects += 1
            continue
        uid = str(header.get("SeriesInstanceUID") or "")
        if uid not in series:
            series[uid] = _Series(
                uid,
                str(header.get("SeriesNumber") or ""),
                str(header.get("SeriesDescription") or ""),
                str(header.get("Modality") or "unknown"),
                [],
                header,
            )
        series[uid].slices.extend(_slices(file, header))
    return series, not_dicom, other_objects


def _choose(series: dict[str, _Series], wanted: str | int | None, path: Path) -> _Series:
    """The series named by ``wanted`` (SeriesInstanceUID or SeriesNumber), or the only one."""
    listing = "; ".join(s.describe() for s in series.values())
    if wanted is None or not str(wanted).strip():
        if len(series) == 1:
            return next(iter(series.values()))
        raise DicomError(
            f"{path}: {len(series)} image series, choose one with dicom_series (its UID or "
            f"number): {listing}"
        )
    text = str(wanted).strip()
    if text in series:
        return series[text]
    matches = [s for s in series.values() if s.number == text]
    if len(matches) == 1:
        return matches[0]
    why = "several series have" if matches else "no series has"
    raise DicomError(f"{path}: {why} UID or number {text!r} (dicom_series): {listing}")


def _check_planes(slices: list[_Slice], path: Path) -> None:
    """All slices must share size, orientation and pixel spacing."""
    first = slices[0]
    for other in slices[1:]:
        if other.size != first.size:
            raise DicomError(
                f"{path}: slices of different size: {first.size} in {first.path.name}, "
                f"{other.size} in {other.path.name}"
            )
        if not np.allclose(other.orientation, first.orientation, atol=_SAME_DIRECTION):
            raise DicomError(
                f"{path}: slices of different orientation (ImageOrientationPatient "
                f"{list(first.orientation)} in {first.path.name}, {list(other.orientation)} in "
                f"{other.path.name}): several stacks in one series?"
            )
        if not np.allclose(other.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=0):
            raise DicomError(
                f"{path}: slices of different PixelSpacing ({list(first.pixel_spacing)} in "
                f"{first.path.name}, {list(other.pixel_spacing)} in {other.path.name})"
            )


def _name(item: _Slice) -> str:
    return item.path.name + ("" if item.frame is None else f" frame {item.frame + 1}")


def _slice_step(slices: list[_Slice], along: np.ndarray, path: Path) -> float:
    """The regular step (mm) between slices sorted by ``along``; an error for gaps or unevenness."""
    steps = np.diff(along)
    if steps.size and steps.min() < 1e-3:
        at = int(np.argmin(steps))
        raise DicomError(
            f"{path}: two slices at position {along[at]:.3f} mm ({_name(slices[at])}, "
            f"{_name(slices[at + 1])}): several acquisitions or phases in one series?"
        )
    median = float(np.median(steps))
    gap = int(np.argmax(steps))
    if steps[gap] > MAX_GAP_RATIO * median:
        raise DicomError(
            f"{path}: missing slices: {steps[gap]:.3f} mm between {_name(slices[gap])} and "
            f"{_name(slices[gap + 1])}, where the median step is {median:.3f} mm"
        )
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > max(0.01, STEP_TOLERANCE * median):
        raise DicomError(
            f"{path}: uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
            f"(median {median:.3f} mm; {steps[worst]:.3f} mm after {_name(slices[worst])})"
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


def _one_slice_step(series: _Series, path: Path) -> float:
    """The slice thickness of a one-slice volume: SpacingBetweenSlices, else SliceThickness."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if series.header.get(keyword) not in (None, ""):
            step = _number(series.header, keyword, path)
            if step > 0:
                return step
    raise DicomError(f"{path}: one slice and no SpacingBetweenSlices or SliceThickness")


def _affine(series: _Series, path: Path) -> tuple[list[_Slice], np.ndarray, float]:
    """Slices in stack order, the voxel -> RAS+ affine (axes: column, row, slice), the step."""
    slices = series.slices
    _check_planes(slices, path)
    orientation = np.array(slices[0].orientation)
    row, col = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(row @ col) > 1e-3
    ):
        raise DicomError(
            f"{path}: ImageOrientationPatient {list(orientation)} is not two orthogonal unit "
            "vectors"
        )
    normal = np.cross(row, col)
    along = np.array([s.position @ normal for s in slices])
    order = np.argsort(along, kind="stable")
    slices, along = [slices[i] for i in order], along[order]
    if len(slices) == 1:
        step = _one_slice_step(series, path)
    else:
        step = _slice_step(slices, along, path)
        offsets = np.array([s.position for s in slices]) - slices[0].position
        sideways = offsets - np.outer(offsets @ normal, normal)
        drift = float(np.linalg.norm(sideways, axis=1).max())
        tilt = math.degrees(math.atan2(drift, along[-1] - along[0]))
        if tilt > ORTHOGONALITY_TOLERANCE_DEG:
            raise DicomError(
                f"{path}: slices are not stacked along their normal (gantry tilt of about "
                f"{tilt:.1f} degrees, {drift:.1f} mm sideways): resample it first (e.g. dcm2niix)"
            )
    between_rows, between_columns = slices[0].pixel_spacing
    lps = np.column_stack([row * between_columns, col * between_rows, normal * step])
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ lps
    affine[:3, 3] = _LPS_TO_RAS @ slices[0].position
    return slices, affine, step


def _check_decoder(header: Dataset, path: Path) -> None:
    """A clear error before reading pixels whose compression no installed plugin decodes."""
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise DicomError(
            f"{path}: pydicom cannot decode transfer syntax {syntax.name} ({syntax})"
        ) from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise DicomError(
            f"{path}: pixel data compressed as {syntax.name} ({syntax}) and no decoder for it is "
            f"installed ({missing})"
        )


def _pixels(slices: list[_Slice]) -> tuple[np.ndarray, str]:
    """HU array (columns, rows, slices) and the stored dtype.

    int16 where the rescale keeps integers that fit (half the memory of float32 until the first
    resampling pass, as for NIfTI), else float32. Slices are filled contiguously in a (slices,
    rows, columns) buffer returned transposed: Fortran order, as nibabel returns NIfTI data
    (writing each slice across the last axis of a C-ordered array took 3x longer).
    """
    rows, columns = slices[0].size
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    out = np.empty((len(slices), rows, columns), dtype=np.int16 if integral else np.float32)
    stored = "unknown"
    by_file: dict[Path, list[int]] = {}
    for k, item in enumerate(slices):
        by_file.setdefault(item.path, []).append(k)
    for file, indices in by_file.items():
        try:
            dataset = pydicom.dcmread(file)
            _check_decoder(dataset, file)
            raw = dataset.pixel_array
            stored = str(raw.dtype)
        except DicomError:
            raise
        except Exception as err:  # pydicom raises many kinds for truncated or corrupt pixel data
            raise DicomError(
                f"{file}: unreadable pixel data ({type(err).__name__}: {err})"
            ) from err
        for k in indices:
            item = slices[k]
            plane = raw if item.frame is None else raw[item.frame]
            if plane.shape != (rows, columns):
                raise DicomError(
                    f"{file}: pixel array {plane.shape}, header says {(rows, columns)}"
                )
            if out.dtype == np.int16:
                hu = plane.astype(np.int32) * int(item.slope) + int(item.intercept)
                if hu.min() < np.iinfo(np.int16).min or hu.max() > np.iinfo(np.int16).max:
                    out = out.astype(np.float32)
                out[k] = hu
            else:
                out[k] = plane.astype(np.float32) * item.slope + item.intercept
    return out.transpose(2, 1, 0), stored


def load_dicom(
    path: str | Path,
    series: str | int | None = None,
    metadata: MetadataGeometry | None = None,
    rule: GeometryRule | None = None,
) -> NiftiVolume:
    """Read a CT series (a folder of DICOM files, or one file) as HU with its RAS+ affine.

    Args:
        path: A folder (searched recursively; files that are neither ``.dcm``/``.ima`` nor carry
            the ``DICM`` mark are ignored) or a single DICOM file (one slice or multi-frame).
        series: Which series when there are several: its SeriesInstanceUID or SeriesNumber.
        metadata: Geometry from the manifest, used only where ``rule`` says ``metadata``.
        rule: How geometry is decided and bounded (default: :class:`GeometryRule`).

    Returns:
        The volume; its ``geometry`` record holds, under ``dicom``, which series was read (UID,
        number, description, modality, slices, step, rescale, transfer syntax) for ``meta.json``.
        The DICOM rescale is applied and recorded as ``scl_slope``/``scl_inter`` (that of the
        first slice): it is part of the encoding, and an external rescale must not repeat it.

    Raises:
        DicomError: No image series, several and no choice, not CT, an irregular stack, an
            unreadable or undecodable file; the message names the folder or the file.
        GeometryError: Implausible voxel size or output grid (see :mod:`.geometry`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found, not_dicom, other_objects = _scan(path)
    if not found:
        raise DicomError(
            f"{path}: no DICOM image files ({not_dicom} files not DICOM, {other_objects} DICOM "
            "objects without pixels)"
        )
    chosen = _choose(found, series, path)
    if chosen.modality.upper() != "CT":
        raise DicomError(
            f"{path}: series {chosen.describe()} has modality {chosen.modality}, not CT"
        )
    slices, affine, step = _affine(chosen, path)
    shape = (slices[0].size[1], slices[0].size[0], len(slices))
    affine, geometry = resolve_geometry(affine, shape, metadata, rule)
    data, stored = _pixels(slices)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DicomError(f"{path}: rescaled pixel data hold NaN or infinite values")
    syntax = getattr(getattr(chosen.header, "file_meta", None), "TransferSyntaxUID", None)
    geometry["reason"] = f"DICOM ImagePositionPatient/ImageOrientationPatient: {geometry['reason']}"
    geometry["dicom"] = {
        "reader": f"pydicom {pydicom.__version__}",
        "series_uid": chosen.uid,
        "series_number": chosen.number,
        "description": chosen.description,
        "modality": chosen.modality,
        "slices": len(slices),
        "files": len({s.path for s in slices}),
        "slice_step_mm": round(step, 6),
        "rescale_slopes": sorted({s.slope for s in slices}),
        "rescale_intercepts": sorted({s.intercept for s in slices}),
        "transfer_syntax": None if syntax is None else str(syntax.name),
        "other_series": len(found) - 1,
        "ignored_files": not_dicom + other_objects,
    }
    return NiftiVolume(Volume(data, affine), slices[0].slope, slices[0].intercept, stored, geometry)
