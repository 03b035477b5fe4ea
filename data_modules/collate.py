"""Batching of study samples with dynamic padding of the token tensors; crops finished on device.

Text encoding dominates the fine-grained step (a BERT-base over 35 anatomy texts costs 2,473 GFLOP
padded to 384 tokens, 192 padded to 32), so each batch pads its texts only to its own longest
text, never to a fixed maximum.

Crops come from the loader as the cache stores them (float16 image, uint8 anatomy map) with
their padding unwritten and the window holding volume voxels under :data:`CROP_EXTENT`
(:mod:`~fvlm.data_modules.crop_read`): converting and padding on the CPU cost 80-90 % of a
sample's loading time. :func:`finish_crops` does both on whatever device the batch is on
(the training module calls it in ``on_after_batch_transfer``); :func:`collate_studies` calls it
itself unless asked to leave that to the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

__all__ = [
    "BATCH_KEYS",
    "CROP_EXTENT",
    "collate_studies",
    "crop_inside",
    "finish_crops",
    "pad_last_dim",
]

#: The keys of every batch, as specified in ``docs/architecture.md`` ("Batches").
BATCH_KEYS = (
    "image",
    "anatomy",
    "valid",
    "normal",
    "text_input_ids",
    "text_attention_mask",
    "report_input_ids",
    "report_attention_mask",
    "study_id",
)

#: Key of a sample's (or an unfinished batch's) ``(3, 2)`` / ``(B, 3, 2)`` int64 crop window
#: ``[lo, hi)`` per axis that holds volume voxels; outside it ``image`` and ``anatomy`` are
#: undefined until :func:`finish_crops`.
CROP_EXTENT = "crop_extent"

_TOKEN_KEYS = {
    "text_input_ids": "input",
    "text_attention_mask": "mask",
    "report_input_ids": "input",
    "report_attention_mask": "mask",
}


def pad_last_dim(tensors: Sequence[Tensor], value: int) -> Tensor:
    """Stack tensors that differ only in their last dimension, right-padding it with ``value``."""
    if not tensors:
        raise ValueError("cannot pad an empty sequence of tensors")
    length = max(t.shape[-1] for t in tensors)
    padded = [torch.nn.functional.pad(t, (0, length - t.shape[-1]), value=value) for t in tensors]
    return torch.stack(padded)


def collate_studies(
    samples: Sequence[dict[str, Any]], pad_token_id: int = 0, finish: bool = True
) -> dict[str, Any]:
    """Stack samples of :class:`~fvlm.data_modules.study_dataset.CachedStudyDataset` into a batch.

    Token ids are padded with ``pad_token_id`` and attention masks with 0, each to the longest text
    of the batch (per-anatomy texts and whole reports separately). ``study_id`` stays a list.

    Args:
        samples: Sample dicts with the keys of :data:`BATCH_KEYS` and :data:`CROP_EXTENT`; token
            tensors are ``(A, L_i)`` for anatomy texts and ``(L_i,)`` for the report.
        pad_token_id: The tokenizer's padding id (0 for BERT vocabularies).
        finish: Convert and pad the crops here (:func:`finish_crops`); ``False`` leaves the cache
            dtype and :data:`CROP_EXTENT` in the batch for the device (the training loaders).

    Returns:
        A dict with the keys of :data:`BATCH_KEYS` (plus :data:`CROP_EXTENT` unless finished).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    missing = {*BATCH_KEYS, CROP_EXTENT} - set(samples[0])
    if missing:
        raise ValueError(f"sample lacks batch keys {sorted(missing)}")
    batch: dict[str, Any] = {}
    for key in (*BATCH_KEYS, CROP_EXTENT):
        values = [sample[key] for sample in samples]
        if key == "study_id":
            batch[key] = list(values)
        elif key in _TOKEN_KEYS:
            value = pad_token_id if _TOKEN_KEYS[key] == "input" else 0
            batch[key] = pad_last_dim(values, value)
        else:
            # Crops read into one batch tensor (CachedStudyDataset.batched) are taken as they are;
            # otherwise default_collate stacks straight into shared memory inside a worker
            # process, which saves the second copy on the way to the main process.
            rows_of = _rows_of_one_tensor(values)
            batch[key] = rows_of if rows_of is not None else default_collate(values)
    return finish_crops(batch) if finish else batch


def _rows_of_one_tensor(values: Sequence[Any]) -> Tensor | None:
    """The tensor whose rows ``0..n-1`` the ``n`` values are, in order; ``None`` otherwise."""
    base = getattr(values[0], "_base", None)
    if base is None or base.ndim == 0 or base.shape[0] != len(values) or not base.is_contiguous():
        return None
    for row, value in enumerate(values):
        if not (
            isinstance(value, Tensor)
            and value._base is base
            and value.storage_offset() == row * base.stride(0)
            and value.shape == base.shape[1:]
        ):
            return None
    return base


def crop_inside(extent: Tensor, crop_size: Sequence[int]) -> Tensor:
    """``(B, d, h, w)`` bool: the voxel lies in its sample's window ``extent`` ``(B, 3, 2)``."""
    inside = []
    for axis, size in enumerate(crop_size):
        position = torch.arange(int(size), device=extent.device)
        lo, hi = extent[:, axis, 0, None], extent[:, axis, 1, None]
        inside.append((position >= lo) & (position < hi))
    return inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]


def finish_crops(batch: Any, masked: bool | None = None) -> Any:
    """The batch's crops as the model takes them: float32 image, zero outside the volume.

    Outside :data:`CROP_EXTENT` the image becomes 0 (the HU window's lower end) and the anatomy
    map 0 (background), which is what the CPU padding of earlier versions wrote; inside, the
    float16 -> float32 conversion is exact. A batch without :data:`CROP_EXTENT` is returned as is
    (already finished); a list or tuple of batches (one per co-teaching stream) is finished batch
    by batch.

    Args:
        batch: A batch of :func:`collate_studies` (``finish=False``), on any device.
        masked: Zero the padding through a voxel mask built on the device (no host sync: the
            default off the CPU) or, ``False``, by filling each sample's padding slabs (fewer
            passes over memory: the default on the CPU). Both give the same batch.
    """
    if isinstance(batch, list | tuple):
        return type(batch)(finish_crops(b, masked) for b in batch)
    if not isinstance(batch, dict) or CROP_EXTENT not in batch:
        return batch
    batch = dict(batch)
    extent = batch.pop(CROP_EXTENT)
    image, anatomy = batch["image"], batch["anatomy"]
    if masked if masked is not None else extent.device.type != "cpu":
        inside = crop_inside(extent, anatomy.shape[-3:])
        batch["image"] = torch.where(inside[:, None], image.float(), 0.0)
        batch["anatomy"] = torch.where(inside, anatomy, 0)
        return batch
    image = image.to(torch.float32, copy=True)
    anatomy = anatomy.clone()
    for i, window in enumerate(extent.tolist()):
        for volume in (image[i, 0], anatomy[i]):
            for axis, (lo, hi) in enumerate(window):
                volume.narrow(axis, 0, lo).zero_()
                volume.narrow(axis, hi, volume.shape[axis] - hi).zero_()
    batch["image"], batch["anatomy"] = image, anatomy
    return batch
