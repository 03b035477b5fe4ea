"""Crops leave the loader in the cache dtype, unpadded; the device finishes them to today's batch.

The reference is the CPU path of earlier versions: ``crop_array`` converting to float32 and padding
with 0 while it copies. The loader's batch, finished by ``finish_crops`` (what the training
module's ``on_after_batch_transfer`` runs on the device), must equal it bit for bit, for crops
inside the volume and overrunning it, flipped or not, and the reads must touch only the crop's
rows of the cache files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_factory import write_cache
from test_lit_modules import tiny_module_args

from fvlm.crop import crop_array
from fvlm.data_modules import CachedStudyDataset, CTReportDataModule, collate_studies
from fvlm.data_modules import crop_read as crop_read_module
from fvlm.data_modules.collate import CROP_EXTENT, finish_crops
from fvlm.data_modules.crop_read import read_crop_window
from fvlm.data_modules.ct_report import SeededItems
from fvlm.lit_modules import FineGrainedCLIPModule
from fvlm.preprocess.cache import CacheError

SHAPE = (6, 10, 12)
# (start, crop): inside, overrunning every axis, before the volume, larger than the volume.
CASES = [
    ((1, 2, 3), (4, 5, 6)),
    ((3, 7, 9), (5, 6, 7)),
    ((-2, -3, 0), (5, 6, 7)),
    ((-1, -2, -3), (9, 14, 17)),
    ((0, 0, 0), (6, 10, 12)),
]
FLIPS = [(), (0,), (2,), (0, 1, 2)]


@pytest.fixture
def volume(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A float16 image and uint8 map saved as ``.npy`` and opened as the cache opens them."""
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float16)
    labels = rng.integers(0, 5, SHAPE).astype(np.uint8)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "anatomy.npy", labels)
    return (
        np.load(tmp_path / "image.npy", mmap_mode="r"),
        np.load(tmp_path / "anatomy.npy", mmap_mode="r"),
    )


@pytest.mark.parametrize(("start", "crop"), CASES)
def test_window_holds_the_volume_voxels_of_crop_array(volume, start, crop) -> None:
    image, labels = volume
    for array in (image, labels):
        for source in (array, np.asarray(array).copy()):  # file reads, then in-memory slicing
            for flip in FLIPS:
                reference = crop_array(array, start, crop, pad_value=0, flip=flip)
                out, extent = read_crop_window(source, start, crop, flip)
                assert out.dtype == array.dtype and out.shape == crop
                window = tuple(slice(int(lo), int(hi)) for lo, hi in extent)
                np.testing.assert_array_equal(out[window], reference[window])
                # Outside the window the reference is padding only.
                outside = np.ones(crop, dtype=bool)
                outside[window] = False
                assert (reference[outside] == 0).all()
                inside = [
                    min(s + c, n) - max(s, 0) for s, c, n in zip(start, crop, SHAPE, strict=True)
                ]
                assert np.array_equal(extent[:, 1] - extent[:, 0], inside)


@pytest.mark.parametrize("masked", [False, True])  # CPU slabs; the accelerators' voxel mask
def test_finish_crops_pads_and_converts_exactly(volume, masked) -> None:
    image, labels = volume
    crop = (5, 6, 7)
    starts = [start for start, size in CASES if size == crop]
    images, maps, extents, want_image, want_map = [], [], [], [], []
    for start, flip in zip(starts, FLIPS, strict=False):
        out, extent = read_crop_window(image, start, crop, flip)
        window = tuple(slice(int(lo), int(hi)) for lo, hi in extent)
        poisoned = np.full(crop, np.nan, dtype=np.float16)  # whatever lies outside the window
        poisoned[window] = out[window]
        images.append(poisoned)
        maps.append(read_crop_window(labels, start, crop, flip)[0])
        extents.append(extent)
        want_image.append(crop_array(image, start, crop, dtype=np.float32, flip=flip))
        want_map.append(crop_array(labels, start, crop, flip=flip))
    batch = {
        "image": torch.from_numpy(np.stack(images))[:, None],
        "anatomy": torch.from_numpy(np.stack(maps)),
        CROP_EXTENT: torch.from_numpy(np.stack(extents)),
    }
    done = finish_crops(batch, masked)
    assert CROP_EXTENT not in done and done["image"].dtype == torch.float32
    expected = torch.from_numpy(np.stack(want_image))[:, None]
    assert torch.equal(done["image"], expected)  # bitwise: poison gone, conversion exact
    assert torch.equal(done["anatomy"], torch.from_numpy(np.stack(want_map)))
    # Idempotent, and a list of batches (co-teaching streams) is finished batch by batch.
    assert finish_crops(done) is done
    both = finish_crops([batch, batch], masked)
    assert isinstance(both, list) and all(torch.equal(b["image"], expected) for b in both)


class _FloatOnCPU(CachedStudyDataset):
    """The dataset as earlier versions read crops: float32 and padded on the CPU."""

    def read_crop(self, image, labels, start, flip=(), out=None):  # noqa: ANN001, ANN201
        out = crop_array(image, start, self.crop_size, pad_value=0.0, dtype=np.float32, flip=flip)
        anatomy = crop_array(labels, start, self.crop_size, pad_value=0, flip=flip)
        extent = np.array([[0, c] for c in self.crop_size], dtype=np.int64)
        return out, anatomy if self._lut_is_identity else self._lut[anatomy], extent


@pytest.mark.parametrize("crop", [(8, 16, 16), (14, 28, 20)])  # inside; overrunning D and H
def test_finished_batch_equals_the_cpu_float_batch(tmp_path, paper_table, crop) -> None:
    cache = write_cache(tmp_path / "cache", n_train=4, n_val=0, shape=(12, 24, 24), seed=3)
    args = {"split": "train", "table": paper_table, "crop_size": crop, "train": True}
    new = SeededItems(CachedStudyDataset(cache, flip_axes=(0, 1, 2), **args))
    old = SeededItems(_FloatOnCPU(cache, flip_axes=(0, 1, 2), **args))
    for epoch in range(4):
        keys = [(i, 100 * epoch + i) for i in range(4)]  # as EpochSampler yields them
        batch = collate_studies([new[k] for k in keys], finish=False)
        assert batch["image"].dtype == torch.float16 and CROP_EXTENT in batch
        finished, expected = finish_crops(batch), collate_studies([old[k] for k in keys])
        assert set(finished) == set(expected)
        assert finished["study_id"] == expected["study_id"]
        for key in set(expected) - {"study_id"}:
            assert torch.equal(finished[key], expected[key]), key
    if crop[1] > 24:  # the overrunning crop really padded
        assert (finished["image"] == 0).sum() >= 4 * crop[0] * crop[2] * (crop[1] - 24)


def test_module_finishes_batches_after_transfer(tmp_path, tiny_bert, paper_table) -> None:
    """Lightning calls the module's hook on the device: the network gets today's batch."""
    module = FineGrainedCLIPModule(**tiny_module_args(tiny_bert(), num_anatomies=35))
    cache = write_cache(tmp_path / "cache", n_train=2, n_val=0, shape=(12, 24, 24))
    dataset = CachedStudyDataset(cache, "train", paper_table, (10, 28, 20), train=False)
    samples = [dataset[0], dataset[1]]
    done = module.on_after_batch_transfer(collate_studies(samples, finish=False), 0)
    assert done["image"].dtype == torch.float32 and CROP_EXTENT not in done
    assert torch.equal(done["image"], collate_studies(samples)["image"])
    assert torch.equal(done["anatomy"], collate_studies(samples)["anatomy"])


def test_reads_only_the_crop_rows(volume, monkeypatch) -> None:
    image, _ = volume
    calls: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd, buffers, offset):  # noqa: ANN001, ANN202
        calls.append((offset, sum(memoryview(b).nbytes for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(crop_read_module.os, "preadv", spy)
    row = SHAPE[2] * 2  # float16 row bytes
    read_crop_window(image, (1, 2, 3), (4, 5, 6))
    # One read per slice of the crop's 5 rows (whole rows), nothing else.
    assert calls == [(image.offset + ((z * SHAPE[1]) + 2) * row, 5 * row) for z in range(1, 5)]
    calls.clear()
    read_crop_window(image, (1, -2, 0), (3, 20, 12))  # whole slices: one contiguous read
    assert calls == [(image.offset + SHAPE[1] * row, 3 * SHAPE[1] * row)]


def test_truncated_file_names_the_file(tmp_path) -> None:
    np.save(tmp_path / "image.npy", np.ones(SHAPE, dtype=np.float16))
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    os.truncate(tmp_path / "image.npy", image.offset + 100)
    with pytest.raises(CacheError, match="image.npy: file ends at byte"):
        read_crop_window(image, (0, 0, 0), (6, 10, 12))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_loader_reads_crops_into_the_batch(tmp_path, paper_table, monkeypatch, workers):
    """The loader's batch: crops read straight into one tensor, equal to the float CPU batch."""
    from fvlm.data_modules import collate as collate_module

    stacked: list[tuple] = []
    real = collate_module.default_collate
    monkeypatch.setattr(
        collate_module, "default_collate", lambda v: stacked.append(v[0].shape) or real(v)
    )
    cache = write_cache(tmp_path / "cache", n_train=6, n_val=0, shape=(12, 24, 24), seed=5)
    crop = (14, 20, 28)  # overruns D and W
    module = CTReportDataModule(
        str(cache), "paper", crop_size=crop, batch_size=3, num_workers=workers,
        flip_axes=(0, 1, 2), crop_check="off",
    )  # fmt: skip
    loader = module.train_dataloader()
    loader.sampler.set_epoch(0)
    keys = list(loader.sampler)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    if workers == 0:  # the crops were never stacked: only the small tensors were
        assert stacked and (1, *crop) not in stacked and crop not in stacked
    old = SeededItems(
        _FloatOnCPU(cache, "train", paper_table, crop, train=True, flip_axes=(0, 1, 2))
    )
    for b, batch in enumerate(batches):
        assert batch["image"].dtype == torch.float16
        expected = collate_studies([old[k] for k in keys[3 * b : 3 * b + 3]])
        finished = finish_crops(batch)
        for key in ("image", "anatomy", "valid"):
            assert torch.equal(finished[key], expected[key]), key


def test_a_cpu_trainer_gets_finished_crops_from_the_workers(tmp_path):
    """On the CPU there is no device to offload to: the loader's collate finishes the crops."""
    from types import SimpleNamespace

    import torch
    from cache_factory import write_cache

    from fvlm.data_modules import CTReportDataModule

    cache = write_cache(tmp_path / "cache", n_train=4, n_val=0, shape=(12, 24, 24))
    data = CTReportDataModule(
        str(cache), anatomy_table="paper", tokenizer="minilm", crop_size=(8, 16, 16),
        batch_size=2, num_workers=0, crop_check="off",
    )  # fmt: skip
    data.setup("fit")
    assert "crop_extent" in next(iter(data.train_dataloader()))  # no trainer: left to the device
    for device, finished in (("cpu", True), ("meta", False)):
        root = SimpleNamespace(root_device=torch.device(device))
        data.trainer = SimpleNamespace(strategy=root, world_size=1, global_rank=0)
        batch = next(iter(data.train_dataloader()))
        assert ("crop_extent" not in batch) is finished
        assert (batch["image"].dtype == torch.float32) is finished


def test_a_batch_outside_workers_is_one_root_tensor_over_its_own_mapping() -> None:
    """The huge-page batch storage: rows are views of one root tensor, and it outlives gc."""
    import gc

    from fvlm.data_modules.study_dataset import _empty

    batch = _empty((3, 1, 4, 5, 6), torch.float16, shared=False)
    gc.collect()  # the mapping must be owned by the storage, not by a dropped local
    batch.fill_(1.5)
    rows = [batch[k] for k in range(3)]
    assert all(row._base is batch for row in rows) and batch.is_contiguous()
    assert float(batch.float().sum()) == 1.5 * 3 * 4 * 5 * 6
    assert batch.untyped_storage().nbytes() == 3 * 4 * 5 * 6 * 2
