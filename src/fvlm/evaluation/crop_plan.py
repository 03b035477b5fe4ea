"""Evaluation crops: a few crops of the training size that together hold every anatomy whole.

Training embeds an anatomy only from a crop that holds it whole (paper Sec. 3.2, A.2), with the
position embeddings of that crop size. Evaluation should see the same: not the whole scan padded
to the split's largest with stretched position embeddings, but crops of the training size, each
anatomy embedded from one that holds it whole. Several anatomies share a crop, so a scan needs
only a few forward passes; :func:`plan_crops` chooses them by greedy set cover.

Rules:
    * An anatomy absent from the scan or cut by its field of view (``complete`` false) gets no
      crop (``crop_of == -1``): its diseases are not evaluable on this scan unless the caller
      applies a documented rule of its own.
    * An anatomy larger than the crop on some axis cannot be whole in any crop. It is embedded
      from the crop centred on its box (so the crop holds its central part, as much of it as the
      crop size allows) and flagged in ``larger_than_crop``; that crop is its own unless an
      identical crop was already planned.

The CLIP baseline has no anatomies to plan for: :func:`tile_crops` covers the whole scan with
evenly overlapping crops of the training size instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fvlm.crop import BBoxes, bboxes_to_array, center_crop_start, crop_starts_holding

__all__ = ["CropPlan", "plan_crops", "tile_crops"]


@dataclass(frozen=True)
class CropPlan:
    """Crops planned for one scan.

    Attributes:
        starts: ``(K, 3)`` int64 start corners of the crops (negative: padding before the
            volume), each of the training crop size; ``K`` forward passes.
        crop_of: ``(A,)`` int, the crop (row of ``starts``) that embeds each anatomy, ``-1`` for
            an anatomy absent or cut by the field of view.
        larger_than_crop: ``(A,)`` bool, the anatomy exceeds the crop; its crop is centred on it
            and holds only its central part.
    """

    starts: np.ndarray
    crop_of: np.ndarray
    larger_than_crop: np.ndarray

    @property
    def forward_passes(self) -> int:
        """Number of crops to embed for this scan."""
        return len(self.starts)


def plan_crops(
    shape: Sequence[int],
    crop_size: Sequence[int],
    bboxes: BBoxes,
    complete: npt.ArrayLike | None = None,
) -> CropPlan:
    """Plan crops of ``crop_size`` so that every complete anatomy that fits is whole in one.

    Greedy set cover over the boxes of crop starts that hold each anatomy
    (:func:`fvlm.crop.crop_starts_holding`): repeatedly take the start held by the most
    still-uncovered boxes, then centre the crop within the starts that hold all of them (so the
    shared anatomies sit as centrally as possible). A start can be pushed up on each axis to the
    nearest box end without leaving any box, so the best start is among the box ends: a search
    over at most ``A**3`` candidates per crop.

    Args:
        shape: Volume shape ``(D, H, W)``.
        crop_size: The training crop ``(d, h, w)``.
        bboxes: ``(A, 3, 2)`` half-open boxes (empty = absent) or a ``{name: box}`` mapping.
        complete: ``(A,)`` bool, false for anatomies cut by the scan's field of view.

    Returns:
        The :class:`CropPlan`.
    """
    first, last = crop_starts_holding(shape, crop_size, bboxes)
    if isinstance(bboxes, Mapping):
        bboxes = bboxes_to_array(bboxes, list(bboxes))
    boxes = np.asarray(bboxes, dtype=np.int64).reshape(-1, 3, 2)
    n = len(boxes)
    present = (boxes[..., 1] > boxes[..., 0]).all(axis=-1)
    if complete is not None:
        present &= np.asarray(complete, dtype=bool)
    fits = present & (first <= last).all(axis=-1)
    larger = present & ~fits
    crop_of = np.full(n, -1, dtype=np.int64)
    starts: list[np.ndarray] = []
    uncovered = fits.copy()
    while uncovered.any():
        idx = np.flatnonzero(uncovered)
        grid = np.stack(
            np.meshgrid(*(np.unique(last[idx, axis]) for axis in range(3)), indexing="ij"), -1
        ).reshape(-1, 3)
        holds = ((grid[:, None] >= first[idx]) & (grid[:, None] <= last[idx])).all(axis=-1)
        covered = idx[holds[int(np.argmax(holds.sum(axis=1)))]]
        lo, hi = first[covered].max(axis=0), last[covered].min(axis=0)
        crop_of[covered] = len(starts)
        starts.append((lo + hi) // 2)
        uncovered[covered] = False
    for a in np.flatnonzero(larger):
        # The anatomy's central part, as large as the crop allows, fits: centre the crop on it.
        part = np.minimum(boxes[a, :, 1] - boxes[a, :, 0], np.asarray(crop_size))
        lo = (boxes[a, :, 0] + boxes[a, :, 1] - part) // 2
        low, high = crop_starts_holding(shape, crop_size, np.stack([lo, lo + part], -1)[None])
        start = (low[0] + high[0]) // 2
        match = [k for k, s in enumerate(starts) if (s == start).all()]
        crop_of[a] = match[0] if match else len(starts)
        if not match:
            starts.append(start)
    return CropPlan(
        starts=np.asarray(starts, dtype=np.int64).reshape(-1, 3),
        crop_of=crop_of,
        larger_than_crop=larger,
    )


def tile_crops(shape: Sequence[int], crop_size: Sequence[int]) -> np.ndarray:
    """``(K, 3)`` starts of crops of ``crop_size`` that together hold every voxel of ``shape``.

    Per axis, ``ceil(size / crop)`` crops spread evenly from the first voxel to the last (they
    overlap by equal amounts); an axis no larger than the crop gets one centred crop, padded as
    training pads. ``K`` is the product over the axes.
    """
    centre = center_crop_start(shape, crop_size)
    per_axis = []
    for size, crop, middle in zip(shape, crop_size, centre, strict=True):
        count = math.ceil(size / crop)
        if count <= 1:
            per_axis.append([int(middle)])
        else:
            per_axis.append(np.rint(np.linspace(0, size - crop, count)).astype(int).tolist())
    return np.asarray(list(itertools.product(*per_axis)), dtype=np.int64).reshape(-1, 3)
