"""Anatomy-aware random crop, crop validity and consistent flips (plain numpy).

The paper crops CT volumes to a fixed size so they batch (Sec. 3.2, RandomCrop) and drops every
anatomy the crop truncates from the loss, because a partial organ may miss the very finding its
text describes. A purely random crop would then mostly drop the large anatomies, so the paper
(A.2) first picks an anatomy uniformly among those present and places the crop so that anatomy is
wholly inside. This module implements exactly that, on bounding boxes only, so a data loader can
decide the crop before it reads a single voxel and then read only the crop from a memory map.

Conventions:
    * A bounding box is half-open per axis, ``[[d0, d1], [h0, h1], [w0, w1]]`` (as in the cache's
      ``meta.json``), stored as one row of an ``(A, 3, 2)`` integer array in anatomy-table order.
    * An anatomy is *absent* when its box is empty on any axis (``hi <= lo``), e.g. all zeros.
    * A crop is given by its ``start`` corner (3 ints) and ``crop_size``. A ``start`` below 0 or a
      crop end beyond the volume means padding: where the volume is smaller than the crop along an
      axis, the crop always covers the whole volume along it and the rest is padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "ABSENT_BBOX",
    "anatomy_aware_crop_box",
    "anatomy_aware_crop_boxes",
    "bboxes_to_array",
    "center_crop_start",
    "crop_array",
    "crop_pad_width",
    "crop_starts_holding",
    "crop_valid",
    "crops_valid",
    "draw_flip_axes",
    "random_crop_start",
    "random_flip",
]

#: The box that marks an absent anatomy (empty on every axis).
ABSENT_BBOX = ((0, 0), (0, 0), (0, 0))

BBoxes = np.ndarray | Mapping[str, Sequence[Sequence[int]] | None]


def _triple(value: Sequence[int], what: str, minimum: int) -> np.ndarray:
    """Check a 3-vector of integers (a shape, a crop size or a start) and return it as int64."""
    array = np.asarray(value)
    if array.shape != (3,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be 3 integers (D, H, W), got {value!r}")
    array = array.astype(np.int64)
    if (array < minimum).any():
        raise ValueError(f"{what} must be >= {minimum} on every axis, got {tuple(array.tolist())}")
    return array


def bboxes_to_array(
    bboxes: Mapping[str, Sequence[Sequence[int]] | None], names: Sequence[str]
) -> np.ndarray:
    """Boxes from a ``{name: box}`` mapping as an ``(A, 3, 2)`` array in ``names`` order.

    The cache stores boxes by anatomy name; the model indexes anatomies by table position, so the
    table's order decides the rows. Names missing from the mapping or mapped to ``None`` are absent.
    """
    array = np.zeros((len(names), 3, 2), dtype=np.int64)
    for i, name in enumerate(names):
        box = bboxes.get(name)
        if box is None:
            continue
        row = np.asarray(box)
        if row.shape != (3, 2):
            raise ValueError(
                f"bbox of {name!r} must be [[d0, d1], [h0, h1], [w0, w1]], got {box!r}"
            )
        array[i] = row
    return array


def _integer_boxes(bboxes: npt.ArrayLike, layout: str) -> np.ndarray:
    """Half-open integer boxes of ``layout`` (``"A, 3, 2"`` or ``"N, A, 3, 2"``) as int64."""
    array = np.asarray(bboxes)
    if array.ndim != layout.count(",") + 1 or array.shape[-2:] != (3, 2):
        raise ValueError(f"bboxes must have shape ({layout}), got {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"bboxes must be integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _as_bbox_array(bboxes: BBoxes, shape: np.ndarray | None) -> np.ndarray:
    """Validate boxes; a mapping is taken in its own key order (the caller's anatomy order)."""
    if isinstance(bboxes, Mapping):
        bboxes = bboxes_to_array(bboxes, list(bboxes))
    array = _integer_boxes(bboxes, "A, 3, 2")
    if shape is not None:
        present = _present(array)
        inside = (array[..., 0] >= 0) & (array[..., 1] <= shape)
        bad = present & ~inside.all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"bbox {i} {array[i].tolist()} lies outside the volume of shape {shape.tolist()}"
            )
    return array


def _present(bboxes: np.ndarray) -> np.ndarray:
    """``(..., A)`` bool: the box is non-empty on every axis."""
    return (bboxes[..., 1] > bboxes[..., 0]).all(axis=-1)


def _start_range(shape: np.ndarray, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive range of starts keeping the crop inside the volume (or the volume inside the crop).

    Along an axis where the volume is larger than the crop, the crop must stay inside the volume
    (no padding needed); where it is smaller, the crop must cover the whole volume (no voxel lost).
    """
    return np.minimum(0, shape - crop), np.maximum(0, shape - crop)


def random_crop_start(
    shape: Sequence[int], crop_size: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """Start of a uniformly random crop (anatomy-agnostic), padding axes smaller than the crop."""
    shape_a, crop = _triple(shape, "shape", 1), _triple(crop_size, "crop_size", 1)
    low, high = _start_range(shape_a, crop)
    return rng.integers(low, high + 1).astype(np.int64)


def center_crop_start(shape: Sequence[int], crop_size: Sequence[int]) -> np.ndarray:
    """Start of the centred crop; deterministic, so evaluation sees the same region every epoch.

    Where the volume is smaller than the crop the start is negative and the padding is split
    evenly (one more voxel after than before when odd).
    """
    shape_a, crop = _triple(shape, "shape", 1), _triple(crop_size, "crop_size", 1)
    return (shape_a - crop) // 2


def _placement_range(
    boxes: np.ndarray, low: np.ndarray, high: np.ndarray, crop: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive starts per axis whose crop holds ``boxes`` (``(..., 3, 2)``) wholly.

    The crop's end must reach the box's end and its start must not pass the box's start, while
    staying within the volume's start range ``[low, high]`` (see :func:`_start_range`).
    """
    return np.maximum(low, boxes[..., 1] - crop), np.minimum(high, boxes[..., 0])


def _eligible(boxes: np.ndarray, crop: np.ndarray, complete: npt.ArrayLike | None) -> np.ndarray:
    """``(..., A)`` bool: present, complete and no larger than the crop on any axis."""
    extent = boxes[..., 1] - boxes[..., 0]
    eligible = _present(boxes) & (extent <= crop).all(axis=-1)
    return eligible if complete is None else eligible & _complete_flags(complete, eligible.shape)


def crop_starts_holding(
    shape: Sequence[int], crop_size: Sequence[int], bboxes: BBoxes
) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive range ``(first, last)``, each ``(A, 3)``, of crop starts that hold each box whole.

    The starts keep the crop inside the volume (or the volume inside the crop along axes where
    the volume is smaller), as the training crop does; the range is empty (``first > last`` on
    some axis) for a box larger than the crop. A start ``s`` holds box ``a`` exactly when
    ``first[a] <= s <= last[a]`` on every axis, which turns planning crops into covering boxes.
    """
    shape_a, crop = _triple(shape, "shape", 1), _triple(crop_size, "crop_size", 1)
    boxes = _as_bbox_array(bboxes, shape_a)
    low, high = _start_range(shape_a, crop)
    return _placement_range(boxes, low, high, crop)


def anatomy_aware_crop_box(
    shape: Sequence[int],
    crop_size: Sequence[int],
    bboxes: BBoxes,
    rng: np.random.Generator,
    complete: npt.ArrayLike | None = None,
) -> tuple[np.ndarray, int]:
    """Choose a crop that wholly contains one uniformly chosen anatomy (paper A.2).

    The anatomy is drawn uniformly among those that are present, structurally complete in the
    scan and whose box fits in the crop (an anatomy larger than the crop on some axis, or cut by
    the scan's field of view, can never be valid, so drawing it would only waste the sample). The
    start is then drawn uniformly, independently per axis, among the positions whose crop contains
    that box wholly and which keep the crop inside the volume (or the whole volume inside the
    crop, along axes where the volume is smaller than the crop).

    If no eligible anatomy exists, the crop falls back to a uniformly random crop and the
    returned index is ``-1``; :func:`crop_valid` then flags whatever happens to be complete, so
    the sample still contributes what it can. :func:`anatomy_aware_crop_boxes` draws the same
    distribution for many studies at once.

    Args:
        shape: Volume shape ``(D, H, W)``.
        crop_size: Crop shape ``(d, h, w)``.
        bboxes: ``(A, 3, 2)`` half-open boxes in anatomy order (empty box = absent), or a
            ``{name: box or None}`` mapping taken in its key order.
        rng: Source of randomness; pass a seeded generator for reproducible crops.
        complete: Optional ``(A,)`` bool, false for an anatomy cut by the scan's field of view
            (``truncated`` in the cache's ``meta.json``); ``None``: every anatomy is complete.

    Returns:
        ``(start, index)``: the crop's start corner ``(3,)`` int64 (negative where the crop pads
        before the volume) and the chosen anatomy's index, or ``-1`` for the fallback.

    Raises:
        ValueError: On a malformed shape, crop size, box array or ``complete`` flags, or a box
            outside the volume.
    """
    shape_a, crop = _triple(shape, "shape", 1), _triple(crop_size, "crop_size", 1)
    boxes = _as_bbox_array(bboxes, shape_a)
    low, high = _start_range(shape_a, crop)
    candidates = np.flatnonzero(_eligible(boxes, crop, complete))
    if candidates.size == 0:
        return rng.integers(low, high + 1).astype(np.int64), -1
    index = int(rng.choice(candidates))
    first, last = _placement_range(boxes[index], low, high, crop)
    return rng.integers(first, last + 1).astype(np.int64), index


def anatomy_aware_crop_boxes(
    shapes: npt.ArrayLike,
    crop_size: Sequence[int],
    bboxes: npt.ArrayLike,
    rng: np.random.Generator,
    complete: npt.ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`anatomy_aware_crop_box` for ``N`` studies at once, without a Python loop.

    Same distribution (uniform eligible anatomy, then a uniform start per axis among those that
    hold it; uniformly random crop when nothing is eligible), but another random stream, so a
    crop validity report can simulate a hundred thousand crops in well under a second.

    Args:
        shapes: ``(N, 3)`` volume shapes (or one ``(3,)`` shape shared by all).
        crop_size: Crop shape ``(d, h, w)``.
        bboxes: ``(N, A, 3, 2)`` half-open boxes, each inside its volume (empty box = absent).
        rng: Source of randomness.
        complete: Optional ``(N, A)`` bool, false for anatomies cut by the field of view.

    Returns:
        ``(starts, index)``: ``(N, 3)`` int64 crop starts and ``(N,)`` chosen anatomy indices
        (``-1`` for the fallback).
    """
    crop = _triple(crop_size, "crop_size", 1)
    boxes = _integer_boxes(bboxes, "N, A, 3, 2")
    n = boxes.shape[0]
    shapes_a = np.broadcast_to(np.asarray(shapes), (n, 3))
    if not np.issubdtype(shapes_a.dtype, np.integer) or (shapes_a < 1).any():
        raise ValueError("shapes must be positive integers, (N, 3) or (3,)")
    shapes_a = shapes_a.astype(np.int64)
    present = _present(boxes)
    outside = present & ~((boxes[..., 0] >= 0) & (boxes[..., 1] <= shapes_a[:, None, :])).all(
        axis=-1
    )
    if outside.any():
        study, a = (int(i[0]) for i in np.nonzero(outside))
        raise ValueError(
            f"study {study}: bbox {a} {boxes[study, a].tolist()} lies outside the volume of "
            f"shape {shapes_a[study].tolist()}"
        )
    low, high = _start_range(shapes_a, crop)
    eligible = _eligible(boxes, crop, complete)
    counts = eligible.sum(axis=1)
    # The k-th eligible anatomy, k uniform in [0, count): first position where the running count
    # of eligible anatomies exceeds k.
    k = np.floor(rng.random(n) * counts).astype(np.int64)
    index = np.argmax(np.cumsum(eligible, axis=1) > k[:, None], axis=1)
    index = np.where(counts > 0, index, -1)
    chosen = boxes[np.arange(n), np.maximum(index, 0)]
    first, last = _placement_range(chosen, low, high, crop)
    fallback = (index < 0)[:, None]
    first, last = np.where(fallback, low, first), np.where(fallback, high, last)
    return rng.integers(first, last + 1).astype(np.int64), index


def _holds(boxes: np.ndarray, starts: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """``(..., A)`` bool: present and wholly inside the crop starting at ``starts`` ``(..., 3)``."""
    starts = starts[..., None, :]
    inside = (boxes[..., 0] >= starts) & (boxes[..., 1] <= starts + crop)
    return _present(boxes) & inside.all(axis=-1)


def crop_valid(
    bboxes: BBoxes,
    start: Sequence[int],
    crop_size: Sequence[int],
    complete: npt.ArrayLike | None = None,
) -> np.ndarray:
    """``(A,)`` bool: the anatomy is present, complete and its box lies wholly inside the crop.

    Truncated anatomies are invalid, whether the crop or the scan's field of view (``complete``
    false) cuts them: the paper leaves them out of the contrastive loss because the missing part
    may hold the finding the text describes (Sec. 3.2).
    """
    start_a = _triple(start, "start", np.iinfo(np.int64).min)
    crop = _triple(crop_size, "crop_size", 1)
    boxes = _as_bbox_array(bboxes, None)
    valid = _holds(boxes, start_a, crop)
    return valid if complete is None else valid & _complete_flags(complete, valid.shape)


def crops_valid(
    bboxes: npt.ArrayLike,
    starts: npt.ArrayLike,
    crop_size: Sequence[int],
    complete: npt.ArrayLike | None = None,
) -> np.ndarray:
    """:func:`crop_valid` for ``N`` crops: ``(N, A, 3, 2)`` boxes, ``(N, 3)`` starts."""
    crop = _triple(crop_size, "crop_size", 1)
    boxes, starts_a = np.asarray(bboxes), np.asarray(starts)
    if boxes.ndim != 4 or boxes.shape[2:] != (3, 2) or starts_a.shape != (boxes.shape[0], 3):
        raise ValueError(
            f"bboxes must be (N, A, 3, 2) and starts (N, 3), got {boxes.shape} and {starts_a.shape}"
        )
    valid = _holds(boxes.astype(np.int64), starts_a.astype(np.int64), crop)
    return valid if complete is None else valid & _complete_flags(complete, valid.shape)


def _complete_flags(complete: npt.ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    flags = np.asarray(complete, dtype=bool)
    if flags.shape != shape:
        raise ValueError(f"complete must have shape {shape} (one flag per box), got {flags.shape}")
    return flags


def crop_pad_width(
    shape: Sequence[int], start: Sequence[int], crop_size: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...], tuple[tuple[int, int], ...]]:
    """Where a crop reads from the volume, where that lands in the crop, and the padding per axis.

    Returns ``(source, target, pad)``: ``volume[source]`` is the part of the crop inside the
    volume, ``crop[target]`` is where it goes, and ``pad`` holds ``(before, after)`` voxels of
    padding per axis (in ``np.pad`` order).
    """
    shape_a = _triple(shape, "shape", 0)
    start_a = _triple(start, "start", np.iinfo(np.int64).min)
    crop = _triple(crop_size, "crop_size", 1)
    lo = np.clip(start_a, 0, shape_a)
    hi = np.clip(start_a + crop, 0, shape_a)
    hi = np.maximum(hi, lo)
    source = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    before = lo - start_a
    target = tuple(slice(int(a), int(a + b - c)) for a, b, c in zip(before, hi, lo, strict=True))
    after = crop - before - (hi - lo)
    pad = tuple((int(a), int(b)) for a, b in zip(before, after, strict=True))
    return source, target, pad


def crop_array(
    array: np.ndarray,
    start: Sequence[int],
    crop_size: Sequence[int],
    pad_value: float | int = 0,
    dtype: npt.DTypeLike | None = None,
    flip: Sequence[int] = (),
) -> np.ndarray:
    """Crop the last three axes of ``array``, padding with ``pad_value`` outside the volume.

    Only the crop's region is indexed, so on a ``np.load(..., mmap_mode="r")`` array only the pages
    holding the crop are read from disk. The result is a fresh, writable, C-contiguous array;
    giving ``dtype`` converts while copying (e.g. float16 cache -> float32 sample), and ``flip``
    (spatial axes ``0..2``, e.g. from :func:`draw_flip_axes`) mirrors the crop while copying,
    so neither costs a second full-size copy.
    """
    array_shape = np.shape(array)
    if len(array_shape) < 3:
        raise ValueError(f"array must have at least 3 dimensions, got shape {array_shape}")
    flip = _check_axes(flip)
    source, target, _ = crop_pad_width(array_shape[-3:], start, crop_size)
    crop = tuple(int(c) for c in crop_size)
    out = np.full(array_shape[:-3] + crop, pad_value, dtype=array.dtype if dtype is None else dtype)
    source_l, target_l = list(source), list(target)
    for axis in flip:
        src, dst = source[axis], target[axis]
        if src.stop > src.start:  # mirror the target window and read the source backwards
            target_l[axis] = slice(crop[axis] - dst.stop, crop[axis] - dst.start)
            source_l[axis] = slice(src.stop - 1, src.start - 1 if src.start > 0 else None, -1)
    lead = (Ellipsis,)
    out[lead + tuple(target_l)] = array[lead + tuple(source_l)]
    return out


def _check_axes(axes: Sequence[int]) -> tuple[int, ...]:
    axes = tuple(int(a) for a in axes)
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"flip axes must be distinct values among 0, 1, 2, got {axes}")
    return axes


def draw_flip_axes(
    axes: Sequence[int], rng: np.random.Generator, prob: float = 0.5
) -> tuple[int, ...]:
    """The subset of ``axes`` to flip: each independently with probability ``prob``.

    Drawing the axes apart from flipping lets a loader fold the flip into its crop read
    (``crop_array(..., flip=...)``) for the image and the anatomy map alike.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"flip prob must be in [0, 1], got {prob}")
    return tuple(a for a in _check_axes(axes) if rng.random() < prob)


def random_flip(
    arrays: Sequence[np.ndarray],
    axes: Sequence[int],
    rng: np.random.Generator,
    prob: float = 0.5,
) -> tuple[list[np.ndarray], tuple[int, ...]]:
    """Flip every array along the same randomly chosen spatial axes (paper A.2, RandomFlip).

    Each axis in ``axes`` (0 = inferior-superior, 1 = posterior-anterior, 2 = left-right of the
    canonical cache layout; counted from the last three axes, so channel-first arrays work too)
    is flipped independently with probability ``prob``, identically for all arrays, so an image
    and its anatomy map stay aligned. Crop validity is unaffected: a flip maps the crop onto
    itself. A left-right flip needs no relabelling because the anatomy table merges left and
    right structures (one ``kidney``, one ``lung``); note that laterality words in the report
    ("left kidney") then describe the mirrored side, which is why the flip axes are a choice.

    Returns:
        The arrays (flipped ones as contiguous copies, ready for ``torch.from_numpy``; the
        others as given) and the flipped axes (as given, ``0..2``).
    """
    flipped = draw_flip_axes(axes, rng, prob)
    out = []
    for array in arrays:
        if np.ndim(array) < 3:
            raise ValueError(f"arrays must have at least 3 dimensions, got {np.shape(array)}")
        if flipped:
            array = np.ascontiguousarray(np.flip(array, axis=[a - 3 for a in flipped]))
        out.append(array)
    return out, flipped
