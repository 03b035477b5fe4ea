"""Rad-ChestCT (Draelos et al. 2021) as external test set: manifest, labels mapped to CT-RATE's.

What we rely on, and what we assume where the public record is silent (check against your copy):

* Volumes (Zenodo release): one compressed numpy file per study, ``<NoteAcc_DEID>.npz`` (e.g.
  ``tst00001.npz``; ``trn``/``val``/``tst`` prefixes), array key ``ct``, int16/float values already
  in HU. Users who converted them keep ``<NoteAcc_DEID>.nii.gz`` instead; both are found anywhere
  under ``root`` (or ``volume_dir``).
* Geometry (assumption, from third-party checks of the release): the volumes were resampled to
  isotropic 0.8 mm and stored with axis 0 running superior -> inferior, axis 1 anterior ->
  posterior, axis 2 right -> left (nibabel axis codes ``("I", "P", "L")``). A per-study spacing is
  read from a ``final_spacing`` column of ``CT_Scan_Metadata_Complete_35747.csv`` when that file
  exists, else ``spacing`` (default 0.8) is used. :func:`radchestct_affine` encodes this so the
  preprocessor reorients ``.npz`` volumes like any NIfTI: it reads them itself
  (:func:`fvlm.preprocess.volume.load_npz`), taking the spacing from the manifest's
  ``npz_spacing`` column.
* Masks: TotalSegmentator maps are not part of the release; precomputed ones (``mask_dir``,
  ``<NoteAcc_DEID>.nii.gz`` on the volume's grid, i.e. with :func:`radchestct_affine`) spare
  running it.
* Labels: ``img{train,valid,test}_Abnormality_and_Location_Labels.csv`` with ``NoteAcc_DEID`` and
  one 0/1 column per ``<abnormality>*<location>`` pair (e.g. ``nodule*left_lung``). A study has an
  abnormality when any of its location columns is 1. Columns are matched on the exact abnormality
  name (``nodule`` does not match ``nodulegr1cm`` unless listed), unlike substring filters seen in
  some reference code.
* Reports are not part of the public release; ``findings``/``impression`` are empty.

Mapping to CT-RATE's labels (:data:`RADCHESTCT_TO_CTRATE`). CT-RATE/CT-CLIP evaluate 16 of the 18
labels on Rad-ChestCT but did not publish the mapping (CT-CLIP issues #20, #29); CT-CLIP's
``eval.py`` skips "Mosaic attenuation pattern" and scores Rad-ChestCT's calcification with the
maximum of the arterial-wall and coronary-artery-wall calcification predictions. Our mapping
follows that: those two CT-RATE labels have no Rad-ChestCT column of their own (NaN labels, listed
as single-class, never silently dropped), and :func:`merge_max_scores` reproduces the max rule.
The abnormality groups below are our reading of the Rad-ChestCT vocabulary; override with
``label_map``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd

from fvlm.anatomy import AnatomyTable
from fvlm.evaluation.ctrate import ctrate_label_map
from fvlm.preprocess.volume import NPZ_SPACING_MM, load_npz, npz_affine

__all__ = [
    "RADCHESTCT_CALCIFICATION_MERGE",
    "RADCHESTCT_SPACING_MM",
    "RADCHESTCT_TO_CTRATE",
    "load_radchestct_volume",
    "merge_max_scores",
    "radchestct_affine",
    "radchestct_manifest",
]

log = logging.getLogger(__name__)

RADCHESTCT_SPACING_MM = NPZ_SPACING_MM
_LABEL_FILES = {
    "train": "imgtrain_Abnormality_and_Location_Labels.csv",
    "valid": "imgvalid_Abnormality_and_Location_Labels.csv",
    "test": "imgtest_Abnormality_and_Location_Labels.csv",
}
_METADATA_FILE = "CT_Scan_Metadata_Complete_35747.csv"

# CT-RATE column -> Rad-ChestCT abnormality names (any location). Empty: no counterpart.
RADCHESTCT_TO_CTRATE: dict[str, tuple[str, ...]] = {
    "Medical material": (
        "catheter_or_port",
        "pacemaker_or_defib",
        "heart_valve_replacement",
        "stent",
        "chest_tube",
        "tracheal_tube",
        "gi_tube",
        "hardware",
        "breast_implant",
        "clip",
        "staple",
        "suture",
    ),
    "Arterial wall calcification": ("calcification",),
    "Cardiomegaly": ("cardiomegaly",),
    "Pericardial effusion": ("pericardial_effusion",),
    "Coronary artery wall calcification": (),
    "Hiatal hernia": ("hernia",),
    "Lymphadenopathy": ("lymphadenopathy",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",),
    "Lung nodule": ("nodule", "nodulegr1cm"),
    "Lung opacity": ("opacity", "groundglass"),
    "Pulmonary fibrotic sequela": ("fibrosis", "scarring"),
    "Pleural effusion": ("pleural_effusion",),
    "Mosaic attenuation pattern": (),
    "Peribronchial thickening": ("bronchial_wall_thickening",),
    "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("septal_thickening",),
}

# CT-CLIP's external protocol: Rad-ChestCT calcification is scored by the max of these two.
RADCHESTCT_CALCIFICATION_MERGE: dict[str, tuple[str, ...]] = {
    "Arterial wall calcification": (
        "Arterial wall calcification",
        "Coronary artery wall calcification",
    ),
}


def radchestct_affine(spacing: float = RADCHESTCT_SPACING_MM) -> np.ndarray:
    """Voxel -> RAS+ mm affine of a Rad-ChestCT array with axes (inferior, posterior, left)."""
    return npz_affine(spacing)


def load_radchestct_volume(
    path: str | Path, spacing: float = RADCHESTCT_SPACING_MM
) -> nib.Nifti1Image:
    """A Rad-ChestCT volume as a NIfTI image in HU, with :func:`radchestct_affine` for ``.npz``.

    For converting the release (e.g. to run TotalSegmentator on it); the preprocessor reads the
    ``.npz`` files directly. NIfTI files are returned as stored (their header is trusted).

    Raises:
        ValueError: a corrupt ``.npz`` file, named in the message (see
            :func:`fvlm.preprocess.volume.load_npz`).
    """
    path = Path(path)
    if path.suffix == ".npz":
        volume = load_npz(path, spacing).volume
        return nib.Nifti1Image(volume.data, volume.affine)
    return nib.load(path)  # type: ignore[return-value]


def _abnormality(column: str) -> str:
    return column.split("*", 1)[0].strip().lower()


def _volume_index(folder: Path, exclude: Path | None = None) -> dict[str, Path]:
    """Study id -> volume file under ``folder``; files under ``exclude`` (the masks) are not."""
    skip = exclude.resolve() if exclude is not None else None
    index: dict[str, Path] = {}
    for pattern in ("*.npz", "*.nii.gz", "*.nii"):
        for path in sorted(folder.rglob(pattern)):
            if skip is not None and path.resolve().is_relative_to(skip):
                continue
            stem = path.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".npz")
            index.setdefault(stem, path)
    return index


def _find(root: Path, name: str) -> Path | None:
    direct = root / name
    if direct.is_file():
        return direct
    return next(iter(sorted(root.rglob(name))), None)


def _read_label_files(root: Path, split: str) -> pd.DataFrame:
    """The label CSV(s) of ``split`` (every one present for ``all``), with a ``_split`` column."""
    splits = list(_LABEL_FILES) if split == "all" else [split]
    if split != "all" and split not in _LABEL_FILES:
        raise ValueError(f"split must be one of {(*_LABEL_FILES, 'all')}, got {split!r}")
    frames = []
    for name in splits:
        path = _find(root, _LABEL_FILES[name])
        if path is None:
            if split != "all":
                raise FileNotFoundError(
                    f"Rad-ChestCT {name} labels {_LABEL_FILES[name]} not under {root}"
                )
            continue
        frame = pd.read_csv(path)
        if "NoteAcc_DEID" not in frame.columns:
            raise ValueError(f"{str(path)!r}: missing column 'NoteAcc_DEID'")
        frames.append(frame.assign(_split=name))
    if not frames:
        raise FileNotFoundError(
            f"no Rad-ChestCT label file {tuple(_LABEL_FILES.values())} under {root}"
        )
    raw = pd.concat(frames, ignore_index=True)
    if raw["NoteAcc_DEID"].duplicated().any():
        raise ValueError("Rad-ChestCT label files list a study twice")
    return raw


def _ctrate_keyed_labels(
    raw: pd.DataFrame, label_map: Mapping[str, Sequence[str]], table: AnatomyTable | str
) -> pd.DataFrame:
    """``study_id`` + one column per CT-RATE disease key: 1 if any mapped column is positive."""
    by_abnormality: dict[str, list[str]] = {}
    for column in raw.columns:
        if column not in ("NoteAcc_DEID", "_split"):
            by_abnormality.setdefault(_abnormality(column), []).append(column)
    labels = pd.DataFrame({"study_id": raw["NoteAcc_DEID"].astype(str)})
    for column, key in ctrate_label_map(table).items():
        sources = [c for a in label_map.get(column, ()) for c in by_abnormality.get(a.lower(), [])]
        if sources:
            labels[key] = (raw[sources].fillna(0).to_numpy() > 0).any(axis=1).astype(float)
        else:
            labels[key] = np.nan
    unknown = [a for names in label_map.values() for a in names if a.lower() not in by_abnormality]
    if unknown:
        log.warning("Rad-ChestCT abnormalities named in the label map but absent: %s", unknown)
    return labels


def radchestct_manifest(
    root: str | Path,
    split: Literal["train", "valid", "test", "all"] = "all",
    table: AnatomyTable | str = "chest",
    label_map: Mapping[str, Sequence[str]] | None = None,
    volume_dir: str | Path | None = None,
    spacing: float = RADCHESTCT_SPACING_MM,
    missing: Literal["drop", "keep", "error"] = "drop",
    mask_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest and CT-RATE-keyed labels of Rad-ChestCT.

    Args:
        root: folder holding the label CSVs (searched recursively) and, by default, the volumes.
        split: which label file(s) to read; ``"all"`` reads every one present (fVLM evaluates on
            the whole public release).
        table: anatomy table; its CT-RATE diseases are the label columns (default ``chest``).
        label_map: CT-RATE column -> Rad-ChestCT abnormality names (default
            :data:`RADCHESTCT_TO_CTRATE`).
        volume_dir: where the ``.npz``/NIfTI volumes are (default ``root``).
        spacing: isotropic spacing used when the metadata CSV gives none.
        missing: studies whose volume is absent: ``"drop"`` (with a warning), ``"keep"``, raise.
        mask_dir: optional folder of precomputed TotalSegmentator maps ``<NoteAcc_DEID>.nii.gz``;
            adds a ``mask`` column (empty where no file exists). Its files are never taken for
            volumes, even when it lies under ``root``.

    Returns:
        ``(manifest, labels)`` like :func:`fvlm.evaluation.ctrate.ctrate_manifest`: manifest
        columns ``study_id, image, findings, impression, split, rescale_slope (1),
        rescale_intercept (0), xy_spacing, z_spacing, npz_spacing`` (the preprocessor's voxel
        size of ``.npz`` volumes; empty for NIfTI) [, ``mask``]; labels ``study_id`` + disease
        keys, NaN for diseases without a Rad-ChestCT counterpart (listed in
        ``labels.attrs["unmapped"]``).
    """
    if missing not in ("drop", "keep", "error"):
        raise ValueError(f"missing must be 'drop', 'keep' or 'error', got {missing!r}")
    root = Path(root)
    raw = _read_label_files(root, split)
    labels = _ctrate_keyed_labels(
        raw, RADCHESTCT_TO_CTRATE if label_map is None else label_map, table
    )

    spacing_of = _spacings(root)
    masks = Path(mask_dir) if mask_dir is not None else None
    volumes = _volume_index(Path(volume_dir) if volume_dir is not None else root, masks)
    rows, absent = [], []
    for study, study_split in zip(labels["study_id"], raw["_split"], strict=True):
        image = volumes.get(study)
        if image is None:
            absent.append(study)
            if missing == "error":
                raise FileNotFoundError(f"Rad-ChestCT volume of {study!r} not found")
            if missing == "drop":
                continue
        s = spacing_of.get(study, spacing)
        row = {
            "study_id": study,
            "image": str(image.resolve()) if image is not None else "",
            "findings": "",
            "impression": "",
            "split": study_split,
            "rescale_slope": 1.0,
            "rescale_intercept": 0.0,
            "xy_spacing": (s, s),
            "z_spacing": s,
            "npz_spacing": s if image is not None and image.suffix == ".npz" else np.nan,
        }
        if masks is not None:
            mask = masks / f"{study}.nii.gz"
            row["mask"] = str(mask.resolve()) if mask.is_file() else ""
        rows.append(row)
    if absent and missing == "drop":
        log.warning("Rad-ChestCT: %d labelled studies without a volume, left out", len(absent))
    manifest = pd.DataFrame(
        rows,
        columns=[
            "study_id",
            "image",
            "findings",
            "impression",
            "split",
            "rescale_slope",
            "rescale_intercept",
            "xy_spacing",
            "z_spacing",
            "npz_spacing",
            *(["mask"] if masks is not None else []),
        ],
    )
    labels = labels.set_index("study_id").loc[manifest["study_id"]].reset_index()
    manifest.attrs["missing_volumes"] = absent
    labels.attrs["unmapped"] = [k for k in labels.columns[1:] if labels[k].isna().all()]
    return manifest, labels


def _spacings(root: Path) -> dict[str, float]:
    path = _find(root, _METADATA_FILE)
    if path is None:
        return {}
    meta = pd.read_csv(path)
    if "final_spacing" not in meta.columns or "NoteAcc_DEID" not in meta.columns:
        return {}
    values = pd.to_numeric(meta["final_spacing"], errors="coerce")
    return {str(k): float(v) for k, v in zip(meta["NoteAcc_DEID"], values, strict=True) if v == v}


def merge_max_scores(
    scores: pd.DataFrame,
    merges: Mapping[str, Sequence[str]],
    table: AnatomyTable | str = "chest",
) -> pd.DataFrame:
    """Replace a disease's score by the maximum of several diseases' scores (CT-CLIP's rule).

    Args:
        scores: ``(S, K)`` scores with disease keys as columns.
        merges: CT-RATE column -> CT-RATE columns whose max it takes, e.g.
            :data:`RADCHESTCT_CALCIFICATION_MERGE`.
        table: anatomy table giving the column -> key mapping.

    Returns:
        A copy of ``scores`` with the merged columns replaced.
    """
    key_of = ctrate_label_map(table)
    merged = scores.copy()
    for target, sources in merges.items():
        keys = [key_of[s] for s in sources]
        merged[key_of[target]] = scores[keys].max(axis=1)
    return merged
