"""A phantom dataset rewritten in CT-RATE's published layout, traps included (tests, eval demo).

CT-RATE (``ibrahimhamamci/CT-RATE``) is read by :func:`fvlm.evaluation.ctrate.ctrate_manifest`;
this module writes a small folder that reader must survive, with the real dataset's traps, each
switchable per study so that a test can build a trapped study next to its clean twin:

* **Identity affines** (``identity_every``): the NIfTI header holds the identity, the geometry is
  only in ``metadata/*_metadata.csv`` (``XYSpacing`` as DICOM PixelSpacing, i.e. along j then i;
  ``ZSpacing``; ``ImageOrientationPatient``; ``ImagePositionPatient``). A reader that trusts the
  header sees 1 mm voxels.
* **Raw stored values** (``raw_every``): CT-RATE v1 kept the scanner's stored values (HU minus the
  intercept) while v2 stores HU; both list the same ``RescaleSlope`` 1 / ``RescaleIntercept``
  ``stale_intercept``. Applying it to every volume shifts v2 by -1024 HU; skipping it leaves v1
  at +1024.
* **'Not given.'** report sections: ``ClinicalInformation_EN`` always, ``Impressions_EN`` where the
  phantom has none and on every ``not_given_every``-th study.
* **Several reconstructions** of one scan (``second_recon_every``): ``<scan>_2`` is the same scan
  with every second slice (twice the ``ZSpacing``), with the same report and labels.

Every volume is stored as CT-RATE stores them: int16, no NIfTI scaling, voxel axes in LPS order
(i -> patient's left, j -> posterior, k -> superior). Phantom diseases map to CT-RATE columns
through the table's labels (``heart/cardiomegaly`` -> ``Cardiomegaly``, ...); other columns are 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel import orientations

from fvlm.anatomy import AnatomyTable
from fvlm.evaluation.ctrate import (
    CTRATE_LABELS,
    CTRATE_SPLITS,
    NOT_GIVEN,
    CTRateSplit,
    ctrate_label_map,
    ctrate_volume_path,
)

__all__ = ["CTRateTraps", "write_ctrate_like"]

_LPS = ("L", "P", "S")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class CTRateTraps:
    """Which studies get which trap: every n-th study (1 = all, 0 = none), in manifest order."""

    identity_every: int = 0
    raw_every: int = 0
    not_given_every: int = 0
    second_recon_every: int = 0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def applies(self, name: str, index: int) -> bool:
        """Whether trap ``name`` (e.g. ``identity``) hits study ``index`` (0-based)."""
        every = getattr(self, f"{name}_every")
        return every > 0 and index % every == every - 1


@dataclass(frozen=True)
class _Volume:
    """One reconstruction as CT-RATE stores it: LPS voxel axes, its mask, its DICOM geometry."""

    hu: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray

    def thinned(self) -> _Volume:
        """Every second slice: a thicker reconstruction of the same scan."""
        affine = self.affine.copy()
        affine[:3, 2] *= 2
        mask = None if self.mask is None else np.ascontiguousarray(self.mask[:, :, ::2])
        return _Volume(np.ascontiguousarray(self.hu[:, :, ::2]), mask, affine)

    def metadata(self) -> dict[str, object]:
        """CT-RATE's geometry columns: DICOM terms in the patient's LPS frame."""
        lps = _LPS_FROM_RAS @ self.affine[:3, :3]
        sizes = np.linalg.norm(lps, axis=0)
        row, col = lps[:, 0] / sizes[0], lps[:, 1] / sizes[1]
        return {
            "Rows": self.hu.shape[1],
            "Columns": self.hu.shape[0],
            "XYSpacing": f"[{sizes[1]:g}, {sizes[0]:g}]",  # PixelSpacing: along j, along i
            "ZSpacing": float(f"{sizes[2]:g}"),
            "ImagePositionPatient": _list(_LPS_FROM_RAS @ self.affine[:3, 3]),
            "ImageOrientationPatient": _list(np.concatenate([row, col])),
        }

    def write(self, image_path: Path, mask_path: Path | None, identity: bool) -> None:
        affine = np.eye(4) if identity else self.affine
        image = nib.Nifti1Image(self.hu, affine)
        image.header.set_data_dtype(np.int16)
        image.header.set_slope_inter(1.0, 0.0)
        nib.save(image, image_path)
        if mask_path is not None and self.mask is not None:
            nib.save(nib.Nifti1Image(self.mask, affine), mask_path)


def _list(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v + 0.0:.6g}" for v in np.asarray(values, dtype=float)) + "]"


def _as_lps(image: nib.Nifti1Image, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of ``image`` (scaling applied, rounded) in LPS axis order, and their affine."""
    transform = orientations.ornt_transform(
        orientations.io_orientation(image.affine), orientations.axcodes2ornt(_LPS)
    )
    data = np.rint(np.asarray(image.dataobj, dtype=np.float64)).astype(dtype)
    stored = np.ascontiguousarray(orientations.apply_orientation(data, transform))
    return stored, image.affine @ orientations.inv_ornt_aff(transform, data.shape)


def _text(value: object) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _phantom_tables(phantom_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.read_csv(phantom_dir / "manifest.csv")
    labels = pd.read_csv(phantom_dir / "labels.csv")
    for need in ("study_id", "image", "findings", "impression"):
        if need not in manifest.columns:
            raise ValueError(f"{phantom_dir / 'manifest.csv'}: missing column {need!r}")
    return manifest, labels.set_index("study_id")


def write_ctrate_like(
    phantom_dir: str | Path,
    out_root: str | Path,
    splits: Mapping[str, CTRateSplit] | None = None,
    table: AnatomyTable | str = "chest",
    masks: bool = True,
    stale_intercept: float = -1024.0,
    traps: CTRateTraps | None = None,
) -> pd.DataFrame:
    """Turn a phantom folder into a small CT-RATE-layout folder (see the module docstring).

    Args:
        phantom_dir: output of ``fvlm phantom`` (``manifest.csv``, ``labels.csv``, images, masks).
        out_root: folder to create; the CT-RATE tree goes to ``out_root/dataset``.
        splits: phantom split -> CT-RATE split (default: ``train`` -> ``train``, anything else,
            or no split column, -> ``valid``).
        table: anatomy table giving the label mapping (default ``chest``).
        masks: also write the phantom's TotalSegmentator maps to ``out_root/totalseg/<VolumeName>``
            on each volume's grid and header (not part of CT-RATE; spares running it).
        stale_intercept: the ``RescaleIntercept`` listed for every volume (HU or raw).
        traps: which studies get which trap (default: none; every volume in HU with its affine).

    Returns:
        The mapping ``phantom_id, study_id, split``, one row per volume (also written to
        ``out_root/phantom_ids.csv``).
    """
    phantom_dir, out_root = Path(phantom_dir), Path(out_root)
    traps = traps or CTRateTraps()
    manifest, phantom_labels = _phantom_tables(phantom_dir)
    key_of = ctrate_label_map(table)  # CT-RATE column -> disease key
    split_of = dict(splits) if splits is not None else {"train": "train"}
    base = out_root / "dataset"
    tables: dict[str, dict[str, list[dict[str, object]]]] = {}
    mapping_rows = []
    counters: dict[str, int] = {}
    for index, (_, study) in enumerate(manifest.iterrows()):
        phantom_split = str(study["split"]) if "split" in manifest.columns else ""
        split = split_of.get(phantom_split, "valid")
        if split not in CTRATE_SPLITS:
            raise ValueError(f"CT-RATE split must be one of {tuple(CTRATE_SPLITS)}, got {split!r}")
        counters[split] = counters.get(split, 0) + 1
        hu, affine = _as_lps(nib.load(phantom_dir / str(study["image"])), np.int16)
        mask = None
        if masks and "mask" in manifest.columns and isinstance(study["mask"], str):
            mask, _ = _as_lps(nib.load(phantom_dir / study["mask"]), np.uint8)
        volumes = [_Volume(hu, mask, affine)]
        if traps.applies("second_recon", index):
            volumes.append(volumes[0].thinned())
        raw = traps.applies("raw", index)
        impression = _text(study["impression"])
        if traps.applies("not_given", index):
            impression = ""
        row_labels = phantom_labels.loc[study["study_id"]]
        labels = {
            column: int(row_labels[key_of[column]]) if key_of.get(column) in row_labels else 0
            for column in CTRATE_LABELS
        }
        split_tables = tables.setdefault(split, {"reports": [], "labels": [], "metadata": []})
        for recon, volume in enumerate(volumes, start=1):
            name = f"{split}_{counters[split]}_a_{recon}.nii.gz"
            target = ctrate_volume_path(base / CTRATE_SPLITS[split][0], name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if raw:  # CT-RATE v1: stored = (HU - intercept) / slope, slope 1
                volume = _Volume(
                    (volume.hu.astype(np.int32) - int(stale_intercept)).astype(np.int16),
                    volume.mask,
                    volume.affine,
                )
            mask_path = None
            if volume.mask is not None:
                (out_root / "totalseg").mkdir(parents=True, exist_ok=True)
                mask_path = out_root / "totalseg" / name
            volume.write(target, mask_path, identity=traps.applies("identity", index))
            split_tables["reports"].append(
                {
                    "VolumeName": name,
                    "ClinicalInformation_EN": NOT_GIVEN,
                    "Technique_EN": "Non-contrast chest CT (synthetic phantom).",
                    "Findings_EN": _text(study["findings"]) or NOT_GIVEN,
                    "Impressions_EN": impression or NOT_GIVEN,
                }
            )
            split_tables["labels"].append({"VolumeName": name} | labels)
            split_tables["metadata"].append(
                {"VolumeName": name, "Manufacturer": "fvlm-phantom"}
                | volume.metadata()
                | {"RescaleIntercept": stale_intercept, "RescaleSlope": 1.0}
            )
            mapping_rows.append(
                {"phantom_id": study["study_id"], "study_id": name[:-7], "split": split}
            )
    _write_tables(base, tables)
    mapping = pd.DataFrame(mapping_rows, columns=["phantom_id", "study_id", "split"])
    mapping.to_csv(out_root / "phantom_ids.csv", index=False)
    return mapping


def _write_tables(base: Path, tables: dict[str, dict[str, list[dict[str, object]]]]) -> None:
    for split, frames in tables.items():
        _, reports, labels, metadata, _ = CTRATE_SPLITS[split]
        for sub, file, rows in (
            ("radiology_text_reports", reports, frames["reports"]),
            ("multi_abnormality_labels", labels, frames["labels"]),
            ("metadata", metadata, frames["metadata"]),
        ):
            (base / sub).mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(base / sub / file, index=False)
