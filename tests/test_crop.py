"""Anatomy-aware crop (paper A.2): containment, validity, padding, uniformity, flips, bad args."""

from __future__ import annotations

import numpy as np
import pytest

from fvlm.crop import (
    anatomy_aware_crop_box,
    anatomy_aware_crop_boxes,
    bboxes_to_array,
    center_crop_start,
    crop_array,
    crop_pad_width,
    crop_starts_holding,
    crop_valid,
    crops_valid,
    draw_flip_axes,
    random_crop_start,
    random_flip,
)


def random_boxes(rng: np.random.Generator, shape: np.ndarray, n: int) -> np.ndarray:
    """Random half-open boxes inside ``shape``; about one in five is absent (all zeros)."""
    lo = rng.integers(0, shape, size=(n, 3))
    hi = rng.integers(lo + 1, shape + 1)
    boxes = np.stack([lo, hi], axis=-1)
    boxes[rng.random(n) < 0.2] = 0
    return boxes


def inside(box: np.ndarray, start: np.ndarray, crop: np.ndarray) -> bool:
    return bool((box[:, 0] >= start).all() and (box[:, 1] <= start + crop).all())


def test_chosen_anatomy_wholly_inside_over_many_seeds() -> None:
    chosen_seen = fallback_seen = 0
    for seed in range(500):
        rng = np.random.default_rng(seed)
        shape = rng.integers(4, 40, size=3)
        crop = rng.integers(2, 48, size=3)
        boxes = random_boxes(rng, shape, int(rng.integers(1, 8)))
        start, index = anatomy_aware_crop_box(tuple(shape), tuple(crop), boxes, rng)
        assert start.shape == (3,) and start.dtype == np.int64
        # The crop stays inside the volume where it can, and covers the volume where it cannot.
        small = shape < crop
        assert (start[~small] >= 0).all() and (start[~small] + crop[~small] <= shape[~small]).all()
        assert (start[small] <= 0).all() and (start[small] + crop[small] >= shape[small]).all()
        present = (boxes[:, :, 1] > boxes[:, :, 0]).all(axis=1)
        fits = present & ((boxes[:, :, 1] - boxes[:, :, 0]) <= crop).all(axis=1)
        valid = crop_valid(boxes, start, crop)
        if index >= 0:
            chosen_seen += 1
            assert fits[index]
            assert inside(boxes[index], start, crop)
            assert valid[index]
        else:
            fallback_seen += 1
            assert not fits.any()
        for a in range(len(boxes)):
            assert valid[a] == (present[a] and inside(boxes[a], start, crop))
    assert chosen_seen > 300 and fallback_seen > 0


def test_crop_valid_flags_truncated_anatomies() -> None:
    boxes = np.array(
        [
            [[2, 6], [2, 6], [2, 6]],  # wholly inside [0, 8)^3
            [[6, 10], [2, 6], [2, 6]],  # cut at d = 8
            [[0, 8], [0, 8], [0, 8]],  # exactly the crop: inside (half-open)
            [[0, 0], [0, 0], [0, 0]],  # absent
            [[-1, 3], [2, 6], [2, 6]],  # starts before the crop
        ]
    )
    assert crop_valid(boxes, (0, 0, 0), (8, 8, 8)).tolist() == [True, False, True, False, False]
    assert crop_valid(boxes, (1, 0, 0), (8, 8, 8)).tolist() == [True, False, False, False, False]


def test_crop_array_exact_shape_and_content() -> None:
    volume = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    crop = crop_array(volume, (2, 3, 4), (5, 6, 7))
    assert crop.shape == (5, 6, 7)
    np.testing.assert_array_equal(crop, volume[2:7, 3:9, 4:11])
    # Float16 cache converted to float32 while copying.
    crop32 = crop_array(volume.astype(np.float16), (0, 0, 0), (3, 3, 3), dtype=np.float32)
    assert crop32.dtype == np.float32 and crop32.flags.c_contiguous


def test_small_volume_is_padded() -> None:
    volume = np.ones((4, 5, 6), dtype=np.float32)
    start = center_crop_start((4, 5, 6), (8, 5, 10))
    assert start.tolist() == [-2, 0, -2]
    crop = crop_array(volume, start, (8, 5, 10), pad_value=-1.0)
    assert crop.shape == (8, 5, 10)
    assert (crop == 1).sum() == volume.size  # every voxel of the volume is kept
    assert (crop == -1).sum() == crop.size - volume.size
    np.testing.assert_array_equal(crop[2:6, :, 2:8], volume)
    source, target, pad = crop_pad_width((4, 5, 6), start, (8, 5, 10))
    assert pad == ((2, 2), (0, 0), (2, 2))
    assert source == (slice(0, 4), slice(0, 5), slice(0, 6))
    assert target == (slice(2, 6), slice(0, 5), slice(2, 8))


def test_anatomy_crop_on_small_volume_covers_it() -> None:
    boxes = np.array([[[0, 4], [1, 3], [0, 6]]])
    for seed in range(50):
        rng = np.random.default_rng(seed)
        start, index = anatomy_aware_crop_box((4, 5, 6), (8, 5, 10), boxes, rng)
        assert index == 0
        assert -4 <= start[0] <= 0 and start[1] == 0 and -4 <= start[2] <= 0
        crop = crop_array(np.ones((4, 5, 6)), start, (8, 5, 10))
        assert crop.sum() == 4 * 5 * 6


def test_anatomy_choice_is_uniform() -> None:
    # A huge anatomy, a tiny one, one that never fits, one absent: the two that fit must be drawn
    # equally often even though a random crop would almost always truncate the huge one.
    shape, crop = (64, 64, 64), (32, 32, 32)
    boxes = np.array(
        [
            [[0, 30], [0, 30], [0, 30]],
            [[40, 42], [40, 42], [40, 42]],
            [[0, 40], [0, 10], [0, 10]],
            [[0, 0], [0, 0], [0, 0]],
        ]
    )
    rng = np.random.default_rng(0)
    n = 4000
    counts = np.bincount(
        [anatomy_aware_crop_box(shape, crop, boxes, rng)[1] for _ in range(n)], minlength=4
    )
    assert counts[2] == 0 and counts[3] == 0
    expected = n / 2
    chi2 = ((counts[:2] - expected) ** 2 / expected).sum()
    assert chi2 < 10.83  # p = 0.001 for 1 degree of freedom


def test_start_is_uniform_over_valid_positions() -> None:
    # Box [10, 12) on a 1D-like axis of 20 with crop 5: valid starts are 7..10 (4 positions).
    boxes = np.array([[[10, 12], [0, 1], [0, 1]]])
    rng = np.random.default_rng(1)
    starts = [anatomy_aware_crop_box((20, 1, 1), (5, 1, 1), boxes, rng)[0][0] for _ in range(4000)]
    values, counts = np.unique(starts, return_counts=True)
    assert values.tolist() == [7, 8, 9, 10]
    assert ((counts - 1000) ** 2 / 1000).sum() < 16.27  # p = 0.001, 3 degrees of freedom


def test_fallback_when_nothing_fits() -> None:
    boxes = np.array([[[0, 30], [0, 2], [0, 2]], [[0, 0], [0, 0], [0, 0]]])
    rng = np.random.default_rng(0)
    start, index = anatomy_aware_crop_box((40, 8, 8), (16, 8, 8), boxes, rng)
    assert index == -1
    assert 0 <= start[0] <= 24 and start[1] == 0 and start[2] == 0
    assert not crop_valid(boxes, start, (16, 8, 8)).any()
    # No anatomy at all: still a crop.
    _, index = anatomy_aware_crop_box((40, 8, 8), (16, 8, 8), np.zeros((0, 3, 2), int), rng)
    assert index == -1
    start = random_crop_start((40, 8, 8), (16, 8, 8), rng)
    assert 0 <= start[0] <= 24


def test_mapping_input_follows_key_order() -> None:
    boxes = {"liver": [[0, 2], [0, 2], [0, 2]], "spleen": None}
    rng = np.random.default_rng(0)
    _, index = anatomy_aware_crop_box((8, 8, 8), (4, 4, 4), boxes, rng)
    assert index == 0
    array = bboxes_to_array(boxes, ["spleen", "kidney", "liver"])
    assert array[0].sum() == 0 and array[1].sum() == 0 and array[2].tolist() == boxes["liver"]
    assert crop_valid(boxes, (0, 0, 0), (4, 4, 4)).tolist() == [True, False]


def test_flip_folded_into_crop_equals_flip_after_crop() -> None:
    for seed in range(200):
        rng = np.random.default_rng(seed)
        shape = rng.integers(1, 9, size=3)
        crop = rng.integers(1, 12, size=3)
        volume = rng.random((2, *shape))  # a leading channel axis is carried along
        start = random_crop_start(tuple(shape), tuple(crop), rng)
        start = start + rng.integers(-3, 4, size=3)  # also crops partly or wholly outside
        axes = draw_flip_axes((0, 1, 2), rng)
        plain = crop_array(volume, start, crop, pad_value=-1.0)
        folded = crop_array(volume, start, crop, pad_value=-1.0, flip=axes)
        expected = np.flip(plain, axis=[a + 1 for a in axes]) if axes else plain
        np.testing.assert_array_equal(folded, expected)


def test_random_flip_is_consistent() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 4, 5, 6)).astype(np.float32)
    labels = (image[0] * 10).astype(np.uint8)
    seen: set[tuple[int, ...]] = set()
    for seed in range(40):
        (flipped_image, flipped_labels), axes = random_flip(
            [image, labels], (0, 1, 2), np.random.default_rng(seed)
        )
        seen.add(axes)
        expected = np.flip(image, axis=[a + 1 for a in axes]) if axes else image
        np.testing.assert_array_equal(flipped_image, expected)
        np.testing.assert_array_equal(flipped_labels, (flipped_image[0] * 10).astype(np.uint8))
        assert flipped_labels.flags.c_contiguous
    assert len(seen) == 8  # every subset of the three axes occurs
    _, axes = random_flip([labels], (2,), rng, prob=0.0)
    assert axes == ()
    _, axes = random_flip([labels], (2,), rng, prob=1.0)
    assert axes == (2,)


@pytest.mark.parametrize(
    "call",
    [
        lambda: anatomy_aware_crop_box((8, 8), (4, 4, 4), np.zeros((1, 3, 2), int), None),
        lambda: anatomy_aware_crop_box((8, 8, 8), (4, 0, 4), np.zeros((1, 3, 2), int), None),
        lambda: anatomy_aware_crop_box((8, 8, 8), (4, 4, 4), np.zeros((1, 3)), None),
        lambda: anatomy_aware_crop_box((8, 8, 8), (4, 4, 4), np.zeros((1, 3, 2)), None),
        lambda: anatomy_aware_crop_box(
            (8, 8, 8), (4, 4, 4), np.array([[[0, 9], [0, 2], [0, 2]]]), None
        ),
        lambda: anatomy_aware_crop_box((8.5, 8, 8), (4, 4, 4), np.zeros((1, 3, 2), int), None),
        lambda: crop_valid(np.zeros((2, 2, 2), int), (0, 0, 0), (4, 4, 4)),
        lambda: crop_array(np.zeros((4, 4)), (0, 0, 0), (2, 2, 2)),
        lambda: random_flip([np.zeros((2, 2, 2))], (3,), np.random.default_rng(0)),
        lambda: random_flip([np.zeros((2, 2, 2))], (0,), np.random.default_rng(0), prob=2.0),
        lambda: crop_array(np.zeros((4, 4, 4)), (0, 0, 0), (2, 2, 2), flip=(0, 0)),
        lambda: bboxes_to_array({"liver": [[0, 1], [0, 1]]}, ["liver"]),
    ],
)
def test_ill_arg(call) -> None:
    with pytest.raises(ValueError):
        call()


def random_studies(rng: np.random.Generator, n: int, a: int) -> tuple[np.ndarray, np.ndarray]:
    shapes = rng.integers(4, 40, size=(n, 3))
    boxes = np.stack([random_boxes(rng, shape, a) for shape in shapes])
    return shapes, boxes


def test_batched_crop_holds_its_anatomy_and_stays_in_range() -> None:
    rng = np.random.default_rng(0)
    shapes, boxes = random_studies(rng, 2000, 5)
    crop = np.array([12, 20, 8])
    complete = rng.random((2000, 5)) < 0.8
    starts, index = anatomy_aware_crop_boxes(shapes, tuple(crop), boxes, rng, complete)
    eligible = (
        (boxes[..., 1] > boxes[..., 0]).all(-1)
        & ((boxes[..., 1] - boxes[..., 0]) <= crop).all(-1)
        & complete
    )
    assert ((index == -1) == ~eligible.any(axis=1)).all()
    chosen = np.flatnonzero(index >= 0)
    assert eligible[chosen, index[chosen]].all()
    valid = crops_valid(boxes, starts, tuple(crop), complete)
    assert valid[chosen, index[chosen]].all()
    small = shapes < crop
    assert np.where(small, starts <= 0, starts >= 0).all()
    assert np.where(small, starts + crop >= shapes, starts + crop <= shapes).all()
    # crops_valid equals crop_valid row by row, and truncated anatomies are never valid.
    for i in range(50):
        assert (valid[i] == crop_valid(boxes[i], starts[i], tuple(crop), complete[i])).all()
    assert not valid[~complete].any()


def test_batched_crop_draws_the_scalar_distribution() -> None:
    # One study drawn many times by both functions: same anatomy shares and validity rates.
    boxes = np.array(
        [[[2, 10], [0, 6], [0, 20]], [[12, 30], [2, 8], [5, 9]], [[0, 40], [0, 2], [0, 2]]]
    )
    shape, crop, n = (40, 10, 30), (20, 10, 16), 6000
    rng = np.random.default_rng(0)
    scalar = [anatomy_aware_crop_box(shape, crop, boxes, rng) for _ in range(n)]
    scalar_valid = np.mean([crop_valid(boxes, s, crop) for s, _ in scalar], axis=0)
    starts, index = anatomy_aware_crop_boxes(shape, crop, np.repeat(boxes[None], n, 0), rng)
    batched_valid = crops_valid(np.repeat(boxes[None], n, 0), starts, crop).mean(axis=0)
    assert np.abs(scalar_valid - batched_valid).max() < 0.03
    shares = np.bincount([i for _, i in scalar], minlength=3) / n
    assert np.abs(shares - np.bincount(index, minlength=3) / n).max() < 0.03
    assert shares[2] == 0  # larger than the crop: never chosen


def test_truncated_anatomy_is_never_chosen_nor_valid() -> None:
    boxes = np.array([[[0, 4], [0, 4], [0, 4]], [[4, 8], [4, 8], [4, 8]]])
    rng = np.random.default_rng(0)
    for _ in range(100):
        start, index = anatomy_aware_crop_box((8, 8, 8), (8, 8, 8), boxes, rng, [False, True])
        assert index == 1
        assert crop_valid(boxes, start, (8, 8, 8), [False, True]).tolist() == [False, True]
    _, index = anatomy_aware_crop_box((8, 8, 8), (8, 8, 8), boxes, rng, [False, False])
    assert index == -1


def test_crop_starts_holding() -> None:
    boxes = np.array([[[10, 12], [0, 1], [0, 1]], [[0, 20], [0, 1], [0, 1]]])
    first, last = crop_starts_holding((20, 1, 1), (5, 1, 1), boxes)
    assert first[0].tolist() == [7, 0, 0] and last[0].tolist() == [10, 0, 0]
    assert first[1, 0] > last[1, 0]  # larger than the crop: no start holds it


@pytest.mark.parametrize(
    "call",
    [
        lambda: anatomy_aware_crop_boxes((8, 8, 8), (4, 4, 4), np.zeros((1, 3, 2), int), None),
        lambda: anatomy_aware_crop_boxes(
            (8, 8, 8), (4, 4, 4), np.array([[[[0, 9], [0, 2], [0, 2]]]]), None
        ),
        lambda: anatomy_aware_crop_boxes(
            (8, 8, 8), (4, 4, 4), np.zeros((2, 1, 3, 2), int), np.random.default_rng(0), [True]
        ),
        lambda: crops_valid(np.zeros((2, 1, 3, 2), int), np.zeros((3, 3), int), (4, 4, 4)),
        lambda: crop_valid(np.zeros((2, 3, 2), int), (0, 0, 0), (4, 4, 4), [True]),
    ],
)
def test_batched_ill_arg(call) -> None:
    with pytest.raises(ValueError):
        call()
