"""The study manifest: one CSV row per study, file paths relative to the manifest's folder.

Columns: ``study_id, image, findings, impression[, mask][, split][, npz_spacing][, dicom_series]``.
``image`` is a NIfTI file, a header-less ``.npz`` array (the Rad-ChestCT release) or a DICOM series
(a folder, or one file; see :mod:`fvlm.preprocess.dicom`); ``npz_spacing`` is the isotropic voxel
size (mm) of an ``.npz`` volume (default 0.8; NIfTI volumes take theirs from the header);
``dicom_series`` picks one series (SeriesInstanceUID or SeriesNumber) of a folder holding several.

A malformed row must cost only its own study, so rows are parsed one at a time and a bad row comes
back as a :class:`ManifestRow` with ``error`` set (the runner lists it as failed) instead of an
exception that would stop the run. A stray quote that makes one field swallow the rows after it
fails the row it opens in, naming the lines it ran over, and a field longer than
:data:`MAX_FIELD_CHARS` (no report is that long) fails its study by id. Only problems that would
fail every study - a missing file, a missing required column - raise :class:`ManifestError`.

Optional columns ``rescale_slope``/``rescale_intercept`` (or CT-RATE's ``RescaleSlope``/
``RescaleIntercept``) carry DICOM rescale metadata; see :mod:`fvlm.preprocess.rescale`.

Optional geometry columns, used where a volume's header is uninformative (an identity affine, as in
CT-RATE; see :mod:`fvlm.preprocess.geometry`): ``spacing`` (mm along the stored array's axes i, j,
k, e.g. ``[0.75, 0.75, 1.5]``), ``image_orientation`` (DICOM ImageOrientationPatient, 6 numbers)
and ``image_position`` (ImagePositionPatient, 3 numbers). CT-RATE's own metadata columns are read
too: ``XYSpacing`` (DICOM PixelSpacing: row spacing, i.e. along j, then column spacing, along i)
with ``ZSpacing``, ``ImageOrientationPatient`` and ``ImagePositionPatient``. Lists may be written
``[a, b, c]``, ``a b c`` or backslash-separated as in DICOM.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .geometry import GeometryError, MetadataGeometry

__all__ = [
    "MAX_FIELD_CHARS",
    "REQUIRED_COLUMNS",
    "Manifest",
    "ManifestError",
    "ManifestRow",
    "read_manifest",
]

REQUIRED_COLUMNS = ("study_id", "image", "findings", "impression")
MAX_FIELD_CHARS = 1 << 17  # csv's own default limit; a field this long is no report
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npz")
_SLOPE = ("rescale_slope", "RescaleSlope")
_INTERCEPT = ("rescale_intercept", "RescaleIntercept")
_NPZ_SPACING = ("npz_spacing",)
_ORIENTATION = ("image_orientation", "ImageOrientationPatient")
_POSITION = ("image_position", "ImagePositionPatient")
_LIST_SEPARATORS = re.compile(r"[\s,;\\]+")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing file or required column)."""


@dataclass(frozen=True)
class ManifestRow:
    """One study of the manifest; ``error`` says why it cannot be processed (else ``None``)."""

    line: int
    study_id: str
    image: Path | None = None
    mask: Path | None = None
    findings: str = ""
    impression: str = ""
    split: str = ""
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    npz_spacing: float | None = None
    dicom_series: str | None = None
    geometry: MetadataGeometry | None = None
    error: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: rows in file order and the columns it had."""

    path: Path
    columns: tuple[str, ...]
    rows: list[ManifestRow]

    @property
    def has_masks(self) -> bool:
        """Whether the manifest has a ``mask`` column at all."""
        return "mask" in self.columns


def _resolve(folder: Path, value: str) -> Path | None:
    value = value.strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


def _number(record: dict[str, str], names: tuple[str, ...]) -> float | None:
    for name in names:
        text = (record.get(name) or "").strip()
        if text:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(f"column {name!r} is not a finite number: {text!r}")
            return value
    return None


def _numbers(record: dict[str, str], names: tuple[str, ...], count: int) -> list[float] | None:
    """A list of ``count`` finite numbers from the first non-empty column of ``names``."""
    for name in names:
        text = (record.get(name) or "").strip()
        if text:
            parts = [p for p in _LIST_SEPARATORS.split(text.strip("[]() ")) if p]
            try:
                values = [float(p) for p in parts]
            except ValueError:
                values = []
            if len(values) != count or not all(map(math.isfinite, values)):
                raise ValueError(f"column {name!r} must hold {count} numbers, got {text!r}")
            return values
    return None


def _geometry(record: dict[str, str]) -> MetadataGeometry | None:
    """The study's metadata geometry, or ``None`` when the manifest gives no spacing."""
    spacing = _numbers(record, ("spacing",), 3)
    if spacing is None and (record.get("XYSpacing") or "").strip():
        row_col = _numbers(record, ("XYSpacing",), 2)
        z = _number(record, ("ZSpacing",))
        if row_col is None or z is None:
            raise ValueError("column 'XYSpacing' needs 'ZSpacing' next to it")
        spacing = [row_col[1], row_col[0], z]  # PixelSpacing is (along j, along i)
    orientation = _numbers(record, _ORIENTATION, 6)
    position = _numbers(record, _POSITION, 3)
    if spacing is None:
        if orientation is not None or position is not None:
            raise ValueError("image orientation/position given without a spacing")
        return None
    return MetadataGeometry(
        tuple(spacing),  # type: ignore[arg-type]
        None if orientation is None else tuple(orientation),
        None if position is None else tuple(position),  # type: ignore[arg-type]
    )


def _row(line: int, header: list[str], fields: list[str], folder: Path) -> ManifestRow:
    column = header.index("study_id")
    study_id = fields[column].strip() if column < len(fields) else ""
    record = dict(zip(header, fields, strict=False))
    label = study_id or f"<line {line}>"
    if len(fields) != len(header):
        return ManifestRow(
            line, label, error=f"line {line}: expected {len(header)} fields, got {len(fields)}"
        )
    if any("\udc80" <= ch <= "\udcff" for value in fields for ch in value):
        return ManifestRow(line, label, error=f"line {line}: not valid UTF-8")
    if long := [
        (name, len(value)) for name, value in record.items() if len(value) > MAX_FIELD_CHARS
    ]:
        name, size = long[0]
        return ManifestRow(
            line,
            label,
            error=f"line {line}: column {name!r} of study {label!r} is {size:,} characters, more "
            f"than {MAX_FIELD_CHARS:,}: no report is that long (a broken export?)",
        )
    if not study_id:
        return ManifestRow(line, label, error=f"line {line}: empty study_id")
    if not _SAFE_ID.match(study_id) or study_id in (".", ".."):
        return ManifestRow(
            line, label, error=f"line {line}: study_id {study_id!r} is not a safe folder name"
        )
    image = _resolve(folder, record["image"])
    if image is None:
        return ManifestRow(line, study_id, error=f"line {line}: empty image path")
    try:
        slope, intercept = _number(record, _SLOPE), _number(record, _INTERCEPT)
        npz_spacing = _number(record, _NPZ_SPACING)
        geometry = _geometry(record)
    except (ValueError, GeometryError) as err:
        return ManifestRow(line, study_id, error=f"line {line}: {err}")
    if npz_spacing is not None and npz_spacing <= 0:
        return ManifestRow(
            line, study_id, error=f"line {line}: npz_spacing must be > 0 mm, got {npz_spacing}"
        )
    return ManifestRow(
        line=line,
        study_id=study_id,
        image=image,
        mask=_resolve(folder, record.get("mask", "")),
        findings=record["findings"].strip(),
        impression=record["impression"].strip(),
        split=record.get("split", "").strip(),
        rescale_slope=slope,
        rescale_intercept=intercept,
        npz_spacing=npz_spacing,
        dicom_series=(record.get("dicom_series") or "").strip() or None,
        geometry=geometry,
    )


def _holds_rows(fields: list[str], header: list[str]) -> bool:
    """Whether a multi-line field holds lines that look like manifest rows (a swallowed row)."""
    columns = header.index("study_id"), header.index("image")
    for value in fields:
        for text in value.splitlines()[1:]:
            cells = next(csv.reader([text]), [])
            if len(cells) > max(columns):
                study_id, image = (cells[c].strip() for c in columns)
                if _SAFE_ID.match(study_id) and image.lower().endswith(_VOLUME_SUFFIXES):
                    return True
    return False


def _stray_quote(line: int, end: int, fields: list[str], header: list[str]) -> str | None:
    """The error for a row whose quoted field ran over later rows, else ``None``."""
    if end <= line or (len(fields) == len(header) and not _holds_rows(fields, header)):
        return None
    count = (
        "" if len(fields) == len(header) else f"; expected {len(header)} fields, got {len(fields)}"
    )
    return (
        f"lines {line}-{end}: a quoted field opened on line {line} runs to line {end} and swallows "
        f"the rows in between (a stray '\"'? quote the whole field and double quotes inside it)"
        f"{count}"
    )


def read_manifest(path: str | Path) -> Manifest:
    """Parse a manifest CSV; bad rows come back with ``error`` set, duplicates included.

    Raises:
        ManifestError: The file cannot be read or lacks a required column.
    """
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8", errors="surrogateescape")
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err.strerror or err}") from err
    limit = csv.field_size_limit(1 << 30)  # long fields are refused per study by _row, not here
    try:
        with handle:
            reader = csv.reader(handle)
            try:
                header = [name.strip().lstrip("\ufeff") for name in next(reader)]
            except StopIteration:
                raise ManifestError(f"manifest {path} is empty") from None
            except csv.Error as err:
                raise ManifestError(f"manifest {path}: unreadable header: {err}") from err
            missing = [name for name in REQUIRED_COLUMNS if name not in header]
            if missing:
                raise ManifestError(
                    f"manifest {path} lacks required column(s) {', '.join(missing)} "
                    f"(has: {', '.join(header)})"
                )
            rows = list(_rows(reader, header, path.parent))
    finally:
        csv.field_size_limit(limit)
    return Manifest(path, tuple(header), rows)


def _rows(reader: Any, header: list[str], folder: Path) -> Iterator[ManifestRow]:
    """The rows after the header, one :class:`ManifestRow` each (blank lines skipped)."""
    seen: dict[str, int] = {}
    while True:
        line = reader.line_num + 1  # where the next row starts (a quoted field may span lines)
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield ManifestRow(line, f"<line {line}>", error=f"line {line}: {err}")
            continue
        if not any(value.strip() for value in fields):
            continue  # blank line
        if error := _stray_quote(line, reader.line_num, fields, header):
            study_id = fields[header.index("study_id")].strip() if fields else ""
            yield ManifestRow(line, study_id or f"<line {line}>", error=error)
            continue
        row = _row(line, header, fields, folder)
        if row.error is None and row.study_id in seen:
            first = seen[row.study_id]
            row = ManifestRow(
                row.line,
                row.study_id,
                error=f"line {row.line}: duplicate study_id (first: line {first})",
            )
        seen.setdefault(row.study_id, row.line)
        yield row
