"""Anatomy masks: TotalSegmentator label maps (run here or precomputed), grouped by the table.

TotalSegmentator is called through its Python API. Its weights normally download on first use;
where that cannot happen (no network, as on most clusters) the call would fail only after network
timeouts and a partly written weights folder, so :func:`check_totalsegmentator` looks for the
weights up front, exactly where TotalSegmentator will look, and fails at once with instructions.

A label map comes from TotalSegmentator v1 (104 classes, used by the paper) or v2 (117 classes,
the ``total`` task of TotalSegmentator 2); their class ids differ from id 7 on, so the version
must be known before grouping. :func:`detect_totalseg_version` tells them apart from what no wrong
affine can flip: the class names TotalSegmentator writes into the file, the ids present and their
voxel counts; a map they cannot decide is an error, not a guess.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from fvlm.anatomy import AnatomyTable, totalsegmentator_classes

from .geometry import header_problem
from .volume import Volume, open_nifti

__all__ = [
    "TotalSegmentatorUnavailable",
    "MaskFile",
    "UndecidableVersion",
    "anatomy_stats",
    "check_mask_grid",
    "check_totalsegmentator",
    "class_counts",
    "detect_totalseg_version",
    "load_mask",
    "mask_class_names",
    "read_mask",
    "run_totalsegmentator",
    "totalsegmentator_weights",
]

VersionOption = Literal["auto", "v1", "v2"]
_V1_MAX_ID = 104
_AFFINE_ATOL_MM = 1e-3
# Ids whose classes are large in one version and small in the other, as (large in v2, large in
# v1): v2's lung lobes 10-12 are v1's pancreas and adrenals, v1's lobes 15-17 are v2's esophagus,
# trachea and thyroid; v2's bowel 18-20 are v1's lumbar vertebrae, v1's bowel 55-57 are v2's neck
# arteries; v2's heart 51 is v1's iliac artery, v1's heart chambers 44-48 are v2's cervical
# vertebrae. Voxel counts do not depend on the affine, their ratios not even on the spacing.
_SIZE_CONTRASTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "lung lobes": ((10, 11, 12), (15, 16, 17)),
    "bowel": ((18, 19, 20), (55, 56, 57)),
    "heart": ((51,), (44, 45, 46, 47, 48)),
}
_CONTRAST_RATIO = 4.0  # the large side must hold this many times the voxels of the small side
_CONTRAST_MIN_VOXELS = 50  # ... and at least this many voxels
_SHARED_IDS = frozenset(range(1, 7))  # spleen .. stomach: the same classes in v1 and v2


class TotalSegmentatorUnavailable(RuntimeError):
    """TotalSegmentator cannot run here (missing weights); the message says how to fix it."""


def totalsegmentator_weights(fast: bool) -> tuple[Path, list[str]]:
    """Where TotalSegmentator looks for the ``total`` task's weights, and which are missing.

    Mirrors ``totalsegmentator.config.get_weights_dir`` (``TOTALSEG_WEIGHTS_PATH``, else
    ``TOTALSEG_HOME_DIR/nnunet/results``, else ``~/.totalsegmentator/nnunet/results``) and the task
    table of ``totalsegmentator.map_tasks_config``; a dataset folder counts as present only if it
    holds a trained checkpoint, so an interrupted extraction is caught too.
    """
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    if "TOTALSEG_WEIGHTS_PATH" in os.environ:
        weights_dir = Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    else:
        if "TOTALSEG_HOME_DIR" in os.environ:
            home = Path(os.environ["TOTALSEG_HOME_DIR"])
        else:  # TotalSegmentator maps a home of "/" (containers) to /tmp
            user_home = Path.home()
            home = (Path("/tmp") if str(user_home) == "/" else user_home) / ".totalsegmentator"
        weights_dir = home / "nnunet" / "results"
    task_ids = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]["task_id"]
    task_ids = task_ids if isinstance(task_ids, list) else [task_ids]
    missing = []
    for task_id in task_ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = Path(info.get("rel_path") or "") / info["foldername"]
        if not any((weights_dir / folder).glob("*/fold_*/checkpoint_final.pth")):
            missing.append(str(folder))
    return weights_dir, missing


def check_totalsegmentator(fast: bool) -> None:
    """Fail fast, without touching the network, when TotalSegmentator's weights are absent.

    Raises:
        TotalSegmentatorUnavailable: With the folder searched, the missing models and the three
            ways to proceed (download elsewhere and copy, import a zip, or precomputed masks).
    """
    weights_dir, missing = totalsegmentator_weights(fast)
    if not missing:
        return
    task = "total_fast" if fast else "total"
    raise TotalSegmentatorUnavailable(
        f"TotalSegmentator weights for task 'total' (fast={fast}) are not in {weights_dir} "
        f"(missing: {', '.join(missing)}), and they cannot be downloaded during preprocessing. "
        "Either: (1) on a machine with internet run `totalseg_download_weights -t "
        f"{task}` and copy its ~/.totalsegmentator/nnunet/results here, or point "
        "TOTALSEG_WEIGHTS_PATH (the results folder) or TOTALSEG_HOME_DIR at a copy; "
        "(2) import downloaded weight zips with `totalseg_import_weights -i <file.zip>`; or "
        "(3) segment elsewhere and use precomputed masks: add a `mask` column to the manifest "
        "and set `segmenter: precomputed` (`fvlm eval-ctrate` / `eval-radchestct`: pass "
        "`--masks DIR` of maps named like the volumes, or `make eval-ctrate MASKS=DIR`)."
    )


def run_totalsegmentator(image: nib.Nifti1Image, fast: bool, device: str) -> np.ndarray:
    """TotalSegmentator v2 ``total`` class ids on the grid of ``image`` (which must be in HU)."""
    check_totalsegmentator(fast)
    from totalsegmentator.python_api import totalsegmentator

    result = totalsegmentator(
        input=image, output=None, task="total", fast=fast, device=device, quiet=True
    )
    labels = np.asarray(result.dataobj)
    if labels.shape != image.shape[:3]:
        raise RuntimeError(
            f"TotalSegmentator returned shape {labels.shape}, expected {image.shape[:3]}"
        )
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.int16)


class UndecidableVersion(ValueError):
    """A label map's TotalSegmentator version cannot be told from its content."""


@dataclass(frozen=True)
class MaskFile:
    """A label map as read from its file, before it is checked against its image's grid."""

    labels: np.ndarray
    affine: np.ndarray
    informative: bool  # whether the file's own affine carries geometry to compare


def read_mask(path: str | Path) -> MaskFile:
    """Read a precomputed TotalSegmentator label map (integer ids, narrowest dtype).

    Gzipped maps are decoded by :func:`fvlm.preprocess.volume.open_nifti` (ISA-L when
    installed). Reading needs nothing of the image, so the runner decodes the map while the
    image decodes; :func:`check_mask_grid` compares the two afterwards.

    Raises:
        ValueError: The map holds non-integer or negative values, or ids beyond int32.
    """
    with open_nifti(path) as mask:
        data = np.asanyarray(mask.dataobj)
        codes = (int(mask.header["qform_code"]), int(mask.header["sform_code"]))
        affine = np.asarray(mask.affine, dtype=np.float64)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError("mask holds non-integer values; expected TotalSegmentator class ids")
        data = rounded
    if data.size and data.dtype.kind != "u" and data.min() < 0:
        raise ValueError(f"mask holds negative values (min {data.min()})")
    top = int(data.max(initial=0))
    if top > np.iinfo(np.int32).max:
        raise ValueError(f"mask holds class ids up to {top}")
    labels = data.astype(np.int32 if top > 255 else np.uint8, copy=False)  # uint8 maps: no copy
    informative = header_problem(affine, transform_codes=codes) is None
    return MaskFile(labels, affine, informative)


def check_mask_grid(mask: MaskFile, image: Volume) -> None:
    """Check that a label map lies on its image's grid.

    A mask whose own affine is uninformative (identity, no transform; see
    :func:`fvlm.preprocess.geometry.header_problem`) carries no geometry to compare: it is taken
    to lie on the image's grid when the shapes agree (a map TotalSegmentator wrote for an
    identity-affine CT-RATE volume has the identity too).

    Raises:
        ValueError: Shape or affine differ from the image's (beyond 1 micrometre).
    """
    shape = mask.labels.shape
    if shape != image.data.shape:
        raise ValueError(f"mask shape {shape} differs from image shape {image.data.shape}")
    if mask.informative and not np.allclose(
        mask.affine, image.affine, rtol=0.0, atol=_AFFINE_ATOL_MM
    ):
        worst = float(np.abs(mask.affine - image.affine).max())
        raise ValueError(f"mask affine differs from the image affine (by up to {worst:.4g} mm)")


def load_mask(path: str | Path, image: Volume) -> np.ndarray:
    """Read a precomputed TotalSegmentator label map and check it lies on the image's grid.

    Raises:
        ValueError: See :func:`read_mask` and :func:`check_mask_grid`.
    """
    mask = read_mask(path)
    check_mask_grid(mask, image)
    return mask.labels


def mask_class_names(path: str | Path) -> dict[int, str] | None:
    """Class id -> name from the label table TotalSegmentator writes into a mask's header.

    TotalSegmentator stores it as an XML NIfTI extension (``<Label Key="5">...liver...``); masks
    from other tools have none (``None``).
    """
    image = nib.load(str(path))
    for extension in getattr(image.header, "extensions", []):
        text = extension.get_content()
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        names = dict(_LABEL_ENTRY.findall(text))
        if names:
            return {int(k): v.strip() for k, v in names.items()}
    return None


_LABEL_ENTRY = re.compile(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[([^\]]*)\]\]></Label>')


_COUNT_CHUNK = 1 << 22


def class_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per class id, without the full-size copies a plain ``np.bincount`` makes.

    ``ravel(order="K")`` views a Fortran-ordered map (nibabel's) instead of copying it, and
    counting in chunks bounds ``bincount``'s int64 cast to a few MiB (a 512 x 512 x 300 map would
    otherwise cost 600 MiB twice).
    """
    flat = np.asarray(labels).ravel(order="K")
    counts = np.zeros(int(flat.max(initial=0)) + 1, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_CHUNK):
        chunk = np.bincount(flat[start : start + _COUNT_CHUNK])
        counts[: len(chunk)] += chunk
    return counts


def detect_totalseg_version(
    labels: np.ndarray, option: VersionOption = "auto", path: str | Path | None = None
) -> tuple[Literal["v1", "v2"], str]:
    """Which TotalSegmentator class map ``labels`` uses, and why (recorded in ``meta.json``).

    In order: the config (``v1``/``v2``); the class names in the file's header (``path``), when
    TotalSegmentator wrote them; an id above 104 (only v2 has one); only ids 1-6 present (the
    same classes in both, so either reading is right: v2); else voxel counts of classes that are
    large in one version and small in the other (:data:`_SIZE_CONTRASTS`), which every contrast
    with enough voxels must agree on. Nothing here depends on the affine, so a wrong one (an
    identity affine, a flipped axis) cannot change the answer.

    Raises:
        UndecidableVersion: The evidence is absent or contradictory; the message names ``path``
            and says how to settle it (``totalseg_version``).
    """
    if option in ("v1", "v2"):
        return option, "set by config"
    if option != "auto":
        raise ValueError(f"totalseg_version must be 'auto', 'v1' or 'v2', got {option!r}")
    where = f"{path}: " if path is not None else ""
    names = mask_class_names(path) if path is not None else None
    if names:
        for version in ("v2", "v1"):
            classes = totalsegmentator_classes(version)
            if all(classes.get(cid) == name for cid, name in names.items()):
                return (
                    version,
                    f"auto: the {len(names)} class names in the mask header are {version}'s",
                )
        raise UndecidableVersion(
            f"{where}the class names in the mask header match neither TotalSegmentator v1 nor "
            "v2; set totalseg_version"
        )
    top = int(np.max(labels, initial=0))  # one cheap pass decides most v2 maps
    if top > _V1_MAX_ID:
        return "v2", f"auto: class id {top} > {_V1_MAX_ID} exists only in v2"
    counts = class_counts(labels)
    present = {int(i) for i in np.flatnonzero(counts)} - {0}
    if present <= _SHARED_IDS:
        return "v2", "auto: only ids 1-6 present, the same classes in v1 and v2"
    votes: dict[str, str] = {}
    for name, (large_v2, large_v1) in _SIZE_CONTRASTS.items():
        v2_side = int(counts[[i for i in large_v2 if i < counts.size]].sum())
        v1_side = int(counts[[i for i in large_v1 if i < counts.size]].sum())
        if max(v2_side, v1_side) < _CONTRAST_MIN_VOXELS:
            continue
        if v2_side >= _CONTRAST_RATIO * v1_side:
            votes[name] = f"v2 ({name}: {v2_side} vs {v1_side} voxels)"
        elif v1_side >= _CONTRAST_RATIO * v2_side:
            votes[name] = f"v1 ({name}: {v1_side} vs {v2_side} voxels)"
    decided = {vote[:2] for vote in votes.values()}
    if len(decided) == 1:
        return decided.pop(), "auto: class sizes say " + "; ".join(votes.values())  # type: ignore[return-value]
    what = "contradict each other" if decided else "are absent or too small to tell"
    raise UndecidableVersion(
        f"{where}TotalSegmentator version undecidable: ids <= {_V1_MAX_ID} only, no class names "
        f"in the header, and the class sizes that differ between v1 and v2 {what}; set "
        "totalseg_version to v1 or v2"
    )


def anatomy_stats(anatomy: np.ndarray, table: AnatomyTable) -> dict[str, dict]:
    """Per anatomy of the table: id, half-open bounding box and voxel count, for ``meta.json``.

    Every anatomy is listed, absent ones with ``voxels: 0`` and ``bbox: null``, so that readers
    never meet a missing key. One ``find_objects`` pass, then counts inside each box.
    """
    boxes = ndimage.find_objects(anatomy)
    stats = {}
    for entry in table.anatomies:
        box = boxes[entry.id - 1] if entry.id <= len(boxes) else None
        # counting inside the box only: far cheaper than a bincount over the whole volume
        voxels = 0 if box is None else int(np.count_nonzero(anatomy[box] == entry.id))
        stats[entry.name] = {
            "id": entry.id,
            "voxels": voxels,
            "bbox": None if box is None else [[int(s.start), int(s.stop)] for s in box],
        }
    return stats
