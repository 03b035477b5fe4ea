"""CT-RATE as published: manifest and labels readers, and a CT-RATE-like folder from the phantom.

Layout of the Hugging Face dataset ``ibrahimhamamci/CT-RATE`` (``root`` may be the repository
folder or its ``dataset/`` subfolder)::

    dataset/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz   # <split>_<patient>_<scan>_<recon>
    dataset/radiology_text_reports/validation_reports.csv
        # VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
    dataset/multi_abnormality_labels/valid_predicted_labels.csv   # VolumeName + 18 labels
    dataset/metadata/validation_metadata.csv
        # VolumeName, XYSpacing "[x, y]", ZSpacing, RescaleSlope, RescaleIntercept, ...
    dataset/metadata/no_chest_valid.txt   # optional: volumes to leave out

The training split uses ``train``, ``train_reports.csv``, ``train_predicted_labels.csv`` and
``train_metadata.csv``; CT-RATE v2 may store volumes under ``valid_fixed``/``train_fixed``.

The HU trap: CT-RATE v2 volumes are already in HU (int16), but ``RescaleSlope``/``RescaleIntercept``
in the metadata still list the DICOM values (e.g. 1 / -1024). Applying them again, as CT-CLIP's and
fVLM's public preprocessing do, shifts every voxel by -1024 HU. The manifest passes the metadata
values through unchanged (``rescale_slope``/``rescale_intercept``) so the preprocessor can decide
from the data (see ``fvlm.preprocess``); :func:`fvlm.phantom.ctrate_layout.write_ctrate_like`
reproduces this trap and the others (identity affines, 'Not given.' sections) on purpose.

The geometry trap: some CT-RATE volumes carry an identity NIfTI affine, their spacing and
orientation only in the metadata CSV. The manifest passes them on as ``spacing``,
``image_orientation`` and ``image_position`` (:func:`ctrate_geometry`); the preprocessor uses them
where the header is uninformative and records the choice in ``meta.json``.

Labels: every disease of the anatomy table whose ``label`` is a CT-RATE column is evaluated, all 18
with the ``chest`` preset (the reference code silently drops 2).
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fvlm.anatomy import AnatomyTable, load_anatomy_table

__all__ = [
    "CTRATE_LABELS",
    "CTRATE_SPLITS",
    "CTRateSplit",
    "NOT_GIVEN",
    "ctrate_files",
    "ctrate_geometry",
    "ctrate_label_map",
    "ctrate_manifest",
    "ctrate_volume_path",
    "parse_xy_spacing",
]

log = logging.getLogger(__name__)

# The 18 abnormality columns of multi_abnormality_labels/*_predicted_labels.csv, in file order.
CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

#: What CT-RATE's reports write for a missing section (read back as empty text).
NOT_GIVEN = "Not given."
CTRateSplit = Literal["train", "valid"]
# split -> (volume folder, reports CSV, labels CSV, metadata CSV, no-chest list)
CTRATE_SPLITS: dict[str, tuple[str, str, str, str, str]] = {
    "train": (
        "train",
        "train_reports.csv",
        "train_predicted_labels.csv",
        "train_metadata.csv",
        "no_chest_train.txt",
    ),
    "valid": (
        "valid",
        "validation_reports.csv",
        "valid_predicted_labels.csv",
        "validation_metadata.csv",
        "no_chest_valid.txt",
    ),
}
_VOLUME_NAME = re.compile(r"^(train|valid)_(\d+)_([a-z]+)_(\d+)\.nii\.gz$")
_REPORT_COLUMNS = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)


def _check_split(split: str) -> None:
    if split not in CTRATE_SPLITS:
        raise ValueError(f"CT-RATE split must be one of {tuple(CTRATE_SPLITS)}, got {split!r}")


def _dataset_dir(root: str | Path) -> Path:
    root = Path(root)
    if (root / "dataset").is_dir():
        return root / "dataset"
    if root.is_dir():
        return root
    raise FileNotFoundError(f"CT-RATE root {str(root)!r} does not exist")


def ctrate_files(root: str | Path, split: CTRateSplit = "valid") -> dict[str, Path]:
    """Paths of one split's volume folder and tables; raises when a required one is missing.

    Returns:
        ``{"volumes", "reports", "labels", "metadata", "no_chest"}``; ``no_chest`` may not exist.
    """
    _check_split(split)
    base = _dataset_dir(root)
    folder, reports, labels, metadata, no_chest = CTRATE_SPLITS[split]
    volumes = next(
        (base / f for f in (folder, f"{folder}_fixed") if (base / f).is_dir()), base / folder
    )
    files = {
        "volumes": volumes,
        "reports": base / "radiology_text_reports" / reports,
        "labels": base / "multi_abnormality_labels" / labels,
        "metadata": base / "metadata" / metadata,
        "no_chest": base / "metadata" / no_chest,
    }
    for key in ("reports", "labels", "metadata"):
        if not files[key].is_file():
            raise FileNotFoundError(f"CT-RATE {split}: missing {key} table {str(files[key])!r}")
    return files


def ctrate_volume_path(volumes_dir: str | Path, volume_name: str) -> Path:
    """``valid_1_a_1.nii.gz`` -> ``<volumes_dir>/valid_1/valid_1_a/valid_1_a_1.nii.gz``."""
    match = _VOLUME_NAME.match(volume_name)
    if not match:
        raise ValueError(f"not a CT-RATE volume name: {volume_name!r}")
    split, patient, scan, _ = match.groups()
    patient_dir = f"{split}_{patient}"
    return Path(volumes_dir) / patient_dir / f"{patient_dir}_{scan}" / volume_name


def parse_xy_spacing(value: object) -> tuple[float, float]:
    """CT-RATE's ``XYSpacing`` (a string like ``"[0.75, 0.75]"``) as two floats."""
    if isinstance(value, str):
        parsed = ast.literal_eval(value.strip())
    else:
        parsed = value
    if isinstance(parsed, int | float):
        return float(parsed), float(parsed)
    values = [float(v) for v in parsed]  # type: ignore[union-attr]
    if len(values) != 2:
        raise ValueError(f"XYSpacing must hold two numbers, got {value!r}")
    return values[0], values[1]


def ctrate_label_map(table: AnatomyTable | str = "chest") -> dict[str, str]:
    """CT-RATE column -> disease key, from each table disease whose ``label`` is a CT-RATE column.

    Raises:
        ValueError: if a disease the table marks for the ``ctrate`` benchmark names no CT-RATE
            column (a typo in a user's table would otherwise drop it from the evaluation).
    """
    table = load_anatomy_table(table) if isinstance(table, str) else table
    mapping: dict[str, str] = {}
    for disease in table.diseases():
        if disease.label in CTRATE_LABELS:
            if disease.label in mapping:
                raise ValueError(
                    f"CT-RATE column {disease.label!r} is claimed by {mapping[disease.label]!r} "
                    f"and {disease.key!r}"
                )
            mapping[disease.label] = disease.key
        elif "ctrate" in disease.sets:
            raise ValueError(
                f"disease {disease.key!r} is in the ctrate set but its label {disease.label!r} "
                f"is not a CT-RATE column {CTRATE_LABELS}"
            )
    return mapping


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.read_csv(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{str(path)!r}: missing columns {missing}")
    if frame["VolumeName"].duplicated().any():
        dup = frame.loc[frame["VolumeName"].duplicated(), "VolumeName"].iloc[0]
        raise ValueError(f"{str(path)!r}: duplicate VolumeName {dup!r}")
    return frame.set_index("VolumeName")


def _text(value: object) -> str:
    """A report cell as text; CT-RATE's ``Not given.`` (a missing section) and blanks are ``""``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip()
    return "" if text.casefold() == NOT_GIVEN.casefold() else text


def _numbers(value: object) -> list[float] | None:
    """A metadata cell holding a number list (``"[1, 0, 0]"``), or ``None`` when blank."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        value = ast.literal_eval(value)
    if isinstance(value, int | float):
        return [float(value)]
    return [float(v) for v in value]  # type: ignore[union-attr]


def _list_text(values: list[float] | None) -> str:
    return "" if values is None else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def ctrate_geometry(meta: pd.Series | None) -> dict[str, str]:
    """The preprocessor's geometry columns of one volume, from its CT-RATE metadata row.

    ``spacing`` is mm along the NIfTI array's axes i, j, k: ``XYSpacing`` is DICOM PixelSpacing
    (along j, then along i), ``ZSpacing`` the slice spacing; ``image_orientation`` and
    ``image_position`` pass ImageOrientationPatient and ImagePositionPatient on where listed. The
    preprocessor uses them where a volume's affine is uninformative (the identity, in CT-RATE).
    Empty strings where the metadata lack them (all three where the spacing is incomplete).
    """
    if meta is None or any(_numbers(meta[c]) is None for c in ("XYSpacing", "ZSpacing")):
        return {"spacing": "", "image_orientation": "", "image_position": ""}
    row_col, z = parse_xy_spacing(meta["XYSpacing"]), float(meta["ZSpacing"])
    return {
        "spacing": _list_text([row_col[1], row_col[0], z]),
        "image_orientation": _list_text(_numbers(meta.get("ImageOrientationPatient"))),
        "image_position": _list_text(_numbers(meta.get("ImagePositionPatient"))),
    }


def _ctrate_tables(
    files: dict[str, Path], table: AnatomyTable | str
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """Reports, labels and metadata tables (indexed by VolumeName) and the label mapping."""
    reports = _read_table(files["reports"], ("VolumeName", "Findings_EN", "Impressions_EN"))
    label_csv = _read_table(files["labels"], ("VolumeName",))
    metadata = _read_table(
        files["metadata"],
        ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"),
    )
    mapping = ctrate_label_map(table)
    absent = [c for c in mapping if c not in label_csv.columns]
    if absent:
        raise ValueError(f"{str(files['labels'])!r}: missing label columns {absent}")
    unmapped = [c for c in label_csv.columns if c not in mapping]
    if unmapped:
        log.warning("CT-RATE label columns without a disease in the table (ignored): %s", unmapped)
    no_report = [n for n in label_csv.index if n not in reports.index]
    if no_report:
        raise ValueError(f"{len(no_report)} labelled volumes have no report, e.g. {no_report[:3]}")
    return reports, label_csv, metadata, mapping


def _selected(
    names: list[str], no_chest: Path, exclude_no_chest: bool, reconstructions: str
) -> tuple[list[str], list[str]]:
    """Volumes left after the no-chest list and the reconstruction choice, and those excluded."""
    excluded: list[str] = []
    if exclude_no_chest and no_chest.is_file():
        listed = {line.strip() for line in no_chest.read_text().splitlines()}
        excluded = [n for n in names if n in listed]
        names = [n for n in names if n not in listed]
    if reconstructions == "first":
        seen: set[str] = set()
        kept = set()
        for name in sorted(names, key=_recon_order):
            scan = name.rsplit("_", 1)[0]
            if scan not in seen:
                seen.add(scan)
                kept.add(name)
        names = [n for n in names if n in kept]
    return names, excluded


def _manifest_row(
    name: str,
    image: Path,
    reports: pd.DataFrame,
    meta: pd.Series | None,
    split: str,
    mask_dir: str | Path | None,
) -> dict[str, object]:
    _, patient, scan, _ = _VOLUME_NAME.match(name).groups()  # type: ignore[union-attr]
    row: dict[str, object] = {
        "study_id": name.removesuffix(".nii.gz"),
        "image": str(image),
        "findings": _text(reports.loc[name, "Findings_EN"]),
        "impression": _text(reports.loc[name, "Impressions_EN"]),
        "split": split,
        "rescale_slope": float(meta["RescaleSlope"]) if meta is not None else np.nan,
        "rescale_intercept": float(meta["RescaleIntercept"]) if meta is not None else np.nan,
        **ctrate_geometry(meta),
        "patient_id": f"{split}_{patient}",
        "scan_id": f"{split}_{patient}_{scan}",
    }
    if mask_dir is not None:
        mask = Path(mask_dir) / name
        row["mask"] = str(mask.resolve()) if mask.is_file() else ""
    return row


def _labels_frame(
    label_csv: pd.DataFrame, names: list[str], study_ids: list[str], mapping: dict[str, str]
) -> pd.DataFrame:
    """``study_id`` + one column per disease key: int 0/1, or float with NaN for blank cells."""
    labels = label_csv.loc[names, list(mapping)].rename(columns=mapping)
    labels = labels.apply(pd.to_numeric, errors="raise")
    labels = labels.astype(np.int64) if not labels.isna().any().any() else labels.astype(float)
    labels.insert(0, "study_id", study_ids)
    return labels.reset_index(drop=True)


def ctrate_manifest(
    root: str | Path,
    split: CTRateSplit = "valid",
    table: AnatomyTable | str = "chest",
    missing: Literal["drop", "keep", "error"] = "drop",
    reconstructions: Literal["all", "first"] = "all",
    exclude_no_chest: bool = True,
    mask_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest and labels of one CT-RATE split.

    Args:
        root: the CT-RATE folder (or its ``dataset/`` subfolder).
        split: ``"valid"`` (the benchmark's internal test set) or ``"train"``.
        table: anatomy table whose diseases name the label columns (default ``chest``).
        missing: what to do with listed volumes whose file is absent (partial downloads are
            common): ``"drop"`` them with a warning, ``"keep"`` them, or raise (``"error"``).
        reconstructions: ``"all"`` reconstructions of a scan (CT-CLIP's protocol) or only the
            ``"first"`` (statistically independent samples; they share report and labels).
        exclude_no_chest: leave out volumes listed in ``metadata/no_chest_<split>.txt``.
        mask_dir: optional folder of precomputed TotalSegmentator maps ``<VolumeName>``; adds a
            ``mask`` column (empty where no file exists).

    Returns:
        ``(manifest, labels)``. ``manifest`` has ``study_id`` (VolumeName without ``.nii.gz``),
        ``image`` (absolute path), ``findings``, ``impression`` (``Not given.`` -> empty),
        ``split``, ``rescale_slope``, ``rescale_intercept``, the geometry columns ``spacing``,
        ``image_orientation``, ``image_position`` (:func:`ctrate_geometry`), ``patient_id``,
        ``scan_id`` [, ``mask``] - a manifest the preprocessor reads as it is. ``labels`` has
        ``study_id`` and one 0/1 column per disease key (NaN where the CSV cell is blank).
        ``manifest.attrs`` counts what was left out.
    """
    if missing not in ("drop", "keep", "error"):
        raise ValueError(f"missing must be 'drop', 'keep' or 'error', got {missing!r}")
    if reconstructions not in ("all", "first"):
        raise ValueError(f"reconstructions must be 'all' or 'first', got {reconstructions!r}")
    files = ctrate_files(root, split)
    reports, label_csv, metadata, mapping = _ctrate_tables(files, table)
    names, excluded = _selected(
        list(label_csv.index), files["no_chest"], exclude_no_chest, reconstructions
    )
    rows, kept, absent_files = [], [], []
    for name in names:
        image = ctrate_volume_path(files["volumes"], name).resolve()
        if not image.is_file():
            absent_files.append(name)
            if missing == "drop":
                continue
            if missing == "error":
                raise FileNotFoundError(f"CT-RATE volume not found: {str(image)!r}")
        meta = metadata.loc[name] if name in metadata.index else None
        rows.append(_manifest_row(name, image, reports, meta, split, mask_dir))
        kept.append(name)
    if absent_files and missing == "drop":
        log.warning("CT-RATE %s: %d listed volumes not found, left out", split, len(absent_files))
    manifest = pd.DataFrame(rows, columns=None if rows else ["study_id", "image"])
    labels = _labels_frame(label_csv, kept, [str(r["study_id"]) for r in rows], mapping)
    manifest.attrs.update(
        missing_volumes=absent_files,
        excluded_no_chest=excluded,
        no_metadata=[n for n in names if n not in metadata.index],
    )
    return manifest, labels


def _recon_order(name: str) -> tuple[str, int]:
    stem = name.removesuffix(".nii.gz")
    scan, recon = stem.rsplit("_", 1)
    return scan, int(recon)
