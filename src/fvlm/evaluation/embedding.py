"""Study embeddings of a trained network over a preprocessing cache, for zero-shot scoring.

Each study is embedded as a whole: the volume is padded to the split's largest, rounded up to
whole patches, so no anatomy is cut (the anatomy-level embeddings need whole anatomies).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fvlm.anatomy import AnatomyTable
from fvlm.checkpoint import TrainedNetwork
from fvlm.data_modules.collate import collate_studies
from fvlm.data_modules.study_dataset import (
    CachedStudyDataset,
    cache_hu_window,
    read_cache_manifest,
)
from fvlm.models import GlobalCLIP
from fvlm.models.intensity_windows import check_source_window

__all__ = ["StudyEmbeddings", "embed_studies", "network_device", "whole_volume_crop"]


@dataclass(frozen=True)
class StudyEmbeddings:
    """Embeddings ``(S, A, E)`` (``(S, 1, E)`` for CLIP), validity ``(S, A)`` and study ids."""

    embeddings: torch.Tensor
    valid: torch.Tensor
    study_ids: list[str]


def network_device(trained: TrainedNetwork) -> torch.device:
    """The device the network's weights were loaded to."""
    return next(trained.network.parameters()).device


def whole_volume_crop(cache_dir: Path, split: str, patch_size: tuple[int, ...]) -> tuple[int, ...]:
    """Smallest crop holding every study of ``split``, rounded up to whole patches."""
    largest = [0, 0, 0]
    for row in read_cache_manifest(cache_dir):
        if row.get("status") != "ok" or row.get("split") != split:
            continue
        meta = json.loads((cache_dir / "studies" / row["study_id"] / "meta.json").read_text())
        largest = [max(a, int(b)) for a, b in zip(largest, meta["shape"], strict=True)]
    if not any(largest):
        raise ValueError(f"no study with status ok and split {split!r} in {cache_dir}")
    return tuple(math.ceil(s / p) * p for s, p in zip(largest, patch_size, strict=True))


@torch.no_grad()
def embed_studies(
    trained: TrainedNetwork,
    cache_dir: Path,
    split: str,
    table: AnatomyTable,
    batch_size: int = 2,
    num_workers: int = 0,
) -> StudyEmbeddings:
    """Embed every ``ok`` study of ``split``; an anatomy is valid where present and uncut."""
    network, device = trained.network, network_device(trained)
    check_source_window(
        network.vision.config.source_hu_window, cache_hu_window(cache_dir), cache_dir
    )
    crop = whole_volume_crop(cache_dir, split, network.vision.patch_size)
    dataset = CachedStudyDataset(
        cache_dir, split, table, crop, train=False, tokenizer=trained.hparams["text_model"]
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_studies
    )
    embeddings, valid, ids = [], [], []
    for batch in tqdm(loader, desc=f"embed {split}", unit="batch"):
        image = batch["image"].to(device)
        if isinstance(network, GlobalCLIP):
            emb = network.encode_image(image)
            seen = torch.ones(emb.shape[:2], dtype=torch.bool)
        else:
            emb, seen = network.encode_image_with_presence(image, batch["anatomy"].to(device))
        embeddings.append(emb.float().cpu())
        valid.append(seen.cpu() & batch["valid"])
        ids.extend(batch["study_id"])
    return StudyEmbeddings(torch.cat(embeddings), torch.cat(valid), ids)
