"""Batching of study samples with dynamic padding of the token tensors.

Text encoding dominates the fine-grained step (a BERT-base over 35 anatomy texts costs 2,473 GFLOP
padded to 384 tokens, 192 padded to 32), so each batch pads its texts only to its own longest
text, never to a fixed maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

__all__ = ["BATCH_KEYS", "collate_studies", "pad_last_dim"]

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


def collate_studies(samples: Sequence[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Stack samples of :class:`~fvlm.data_modules.study_dataset.CachedStudyDataset` into a batch.

    Token ids are padded with ``pad_token_id`` and attention masks with 0, each to the longest text
    of the batch (per-anatomy texts and whole reports separately). ``study_id`` stays a list.

    Args:
        samples: Sample dicts with the keys of :data:`BATCH_KEYS`; token tensors are ``(A, L_i)``
            for anatomy texts and ``(L_i,)`` for the report.
        pad_token_id: The tokenizer's padding id (0 for BERT vocabularies).

    Returns:
        A dict with exactly the keys of :data:`BATCH_KEYS`.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    missing = set(BATCH_KEYS) - set(samples[0])
    if missing:
        raise ValueError(f"sample lacks batch keys {sorted(missing)}")
    batch: dict[str, Any] = {}
    for key in BATCH_KEYS:
        values = [sample[key] for sample in samples]
        if key == "study_id":
            batch[key] = list(values)
        elif key in _TOKEN_KEYS:
            value = pad_token_id if _TOKEN_KEYS[key] == "input" else 0
            batch[key] = pad_last_dim(values, value)
        else:
            # default_collate stacks straight into shared memory inside a worker process, which
            # saves the second copy of the (large) image batch on its way to the main process.
            batch[key] = default_collate(values)
    return batch
