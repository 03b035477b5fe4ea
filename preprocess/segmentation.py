"""Anatomy masks: TotalSegmentator label maps (run here or precomputed), grouped by the table.

TotalSegmentator is called through its Python API. Its weights normally download on first use;
where that cannot happen (no network, as on most clusters) the call would fail only after network
timeouts and a partly written weights folder, so :func:`check_totalsegmentator` looks for the
weights up front, exactly where TotalSegmentator will look, and fails at once with instructions.

A label map comes from TotalSegmentator v1 (104 classes, used by the paper) or v2 (117 classes,
the ``total`` task of TotalSegmentator 2); their class ids differ from id 7 on, so the version
must be known before grouping. :func:`detect_totalseg_version` tells them apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from scipy import ndimage

from fvlm.anatomy import AnatomyTable, totalsegmentator_classes

from .volume import Volume

__all__ = [
    "TotalSegmentatorUnavailable",
    "anatomy_stats",
    "check_totalsegmentator",
    "detect_totalseg_version",
    "load_mask",
    "run_totalsegmentator",
    "totalsegmentator_weights",
]

VersionOption = Literal["auto", "v1", "v2"]
_V1_MAX_ID = 104
_AFFINE_ATOL_MM = 1e-3
_CENTROID_SAMPLES = 250_000
_VERTEBRAE = (
    [f"vertebrae_C{i}" for i in range(1, 8)]
    + [f"vertebrae_T{i}" for i in range(1, 13)]
    + [f"vertebrae_L{i}" for i in range(1, 6)]
    + ["vertebrae_S1"]
)


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
        "and set `segmenter: precomputed`."
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


def load_mask(path: str | Path, image: Volume) -> np.ndarray:
    """Read a precomputed TotalSegmentator label map and check it lies on the image's grid.

    Raises:
        ValueError: Shape or affine differ from the image's (beyond 1 micrometre), or the map
            holds non-integer or negative values.
    """
    mask = nib.load(str(path))
    data = np.asanyarray(mask.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.shape != image.data.shape:
        raise ValueError(f"mask shape {data.shape} differs from image shape {image.data.shape}")
    if not np.allclose(mask.affine, image.affine, rtol=0.0, atol=_AFFINE_ATOL_MM):
        worst = float(np.abs(mask.affine - image.affine).max())
        raise ValueError(f"mask affine differs from the image affine (by up to {worst:.4g} mm)")
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError("mask holds non-integer values; expected TotalSegmentator class ids")
        data = rounded
    if data.size and data.min() < 0:
        raise ValueError(f"mask holds negative values (min {data.min()})")
    if data.size and data.max() > np.iinfo(np.int32).max:
        raise ValueError(f"mask holds class ids up to {data.max()}")
    return data.astype(np.int32 if data.max(initial=0) > 255 else np.uint8)


def detect_totalseg_version(
    labels: np.ndarray, affine: np.ndarray, option: VersionOption = "auto"
) -> tuple[Literal["v1", "v2"], str]:
    """Which TotalSegmentator class map ``labels`` uses, and why (recorded in ``meta.json``).

    Ids above 104 exist only in v2. Below that both maps are possible, so each reading is scored
    on anatomy it implies: a class named ``*_right`` must lie on the patient's right of its
    ``*_left`` partner, and vertebrae must stack C1 (top) to S1; the better-scoring reading wins.
    A tie (too few such classes present) falls back to v2, the map TotalSegmentator 2 writes.
    """
    if option in ("v1", "v2"):
        return option, "set by config"
    if option != "auto":
        raise ValueError(f"totalseg_version must be 'auto', 'v1' or 'v2', got {option!r}")
    top = int(labels.max(initial=0))
    if top > _V1_MAX_ID:
        return "v2", f"auto: class id {top} > {_V1_MAX_ID} exists only in v2"
    step = max(1, round((labels.size / _CENTROID_SAMPLES) ** (1 / 3)))
    coarse = labels[::step, ::step, ::step]  # a subsample is plenty for centroids
    ids = [int(i) for i in np.unique(coarse) if i]
    if not ids:
        return "v2", "auto: empty label map; assumed v2"
    centres = ndimage.center_of_mass(np.ones(coarse.shape, dtype=np.float32), coarse, ids)
    world = {
        cid: (affine @ np.array([*(step * np.asarray(c)), 1.0]))[:3]
        for cid, c in zip(ids, centres, strict=True)
    }
    scores = {v: _plausibility(world, totalsegmentator_classes(v)) for v in ("v1", "v2")}
    if scores["v1"] > scores["v2"]:
        return "v1", f"auto: anatomy plausibility v1 {scores['v1']} > v2 {scores['v2']}"
    if scores["v2"] > scores["v1"]:
        return "v2", f"auto: anatomy plausibility v2 {scores['v2']} > v1 {scores['v1']}"
    return "v2", f"auto: ambiguous (plausibility {scores['v2']} for both); assumed v2"


def _plausibility(world: dict[int, np.ndarray], classes: dict[int, str]) -> int:
    """+1 per left/right pair or vertebra pair in the right place, -1 per one in the wrong place."""
    at = {classes[cid]: xyz for cid, xyz in world.items() if cid in classes}
    score = 0
    for name, xyz in at.items():
        if name.endswith("_right") and (left := at.get(name[: -len("right")] + "left")) is not None:
            score += 1 if xyz[0] > left[0] else -1  # RAS+: x grows towards the patient's right
    present = [at[name] for name in _VERTEBRAE if name in at]
    for upper, lower in zip(present, present[1:], strict=False):
        score += 1 if upper[2] > lower[2] else -1
    return score


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
