"""A tiny chest checkpoint and preprocessing config shared by the dataset evaluation tests.

`fvlm eval-ctrate` and `fvlm eval-radchestct` run the whole path (preprocess, embed, score); the
weights are not the point there, so one optimisation step of a width-16 model is enough, and both
tests must build it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from fvlm.evaluation.embedding import StudyEmbeddings
from fvlm.evaluation.evaluability import AnatomyStatus
from fvlm.lit_modules import FineGrainedCLIPModule
from fvlm.models import VisionConfig

VISION = VisionConfig.vit_tiny(img_size=(8, 16, 16), patch_size=(8, 16, 16), hidden_size=16)


def tiny_checkpoint(path: Path, num_anatomies: int, text_config: dict) -> Path:
    """A checkpoint after one optimisation step (weights are not the point here).

    Args:
        path: Where to write the ``.ckpt``.
        num_anatomies: Length of the anatomy table the evaluation uses.
        text_config: The text tower, the suite's ``tiny_bert()`` (conftest).
    """
    module = FineGrainedCLIPModule(
        num_anatomies=num_anatomies, vision=VISION, text_config=text_config, embed_dim=8
    )
    b, a = 2, num_anatomies
    anatomy = torch.zeros(b, 8, 16, 16, dtype=torch.uint8)
    anatomy[:, :, :8] = 1
    anatomy[:, :, 8:] = 2
    batch = {
        "image": torch.rand(b, 1, 8, 16, 16),
        "anatomy": anatomy,
        "valid": torch.ones(b, a, dtype=torch.bool),
        "normal": torch.zeros(b, a, dtype=torch.bool),
        "text_input_ids": torch.randint(5, 100, (b, a, 4)),
        "text_attention_mask": torch.ones(b, a, 4, dtype=torch.long),
    }
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(path)
    return path


def chest_preprocess_config(path: Path, spacing: Sequence[float] = (12.0, 9.0, 9.0)) -> Path:
    """configs/preprocess/chest.yaml at phantom resolution, with the phantom's precomputed masks."""
    path.write_text(yaml.safe_dump({
        "spacing": list(spacing), "hu_window": [-1000.0, 1000.0], "anatomy_table": "chest",
        "segmenter": "precomputed", "rescale": "auto", "decomposer": "rules", "workers": 1,
    }))  # fmt: skip
    return path


def study_embeddings(
    embeddings: torch.Tensor, status: np.ndarray | None = None, crop_rule: str = "plan"
) -> StudyEmbeddings:
    """Hand-made evaluation embeddings ``(S, A, E)`` (``(S, 1, E)`` and ``tile`` for CLIP).

    ``status`` ``(S, A_table)`` defaults to every anatomy whole; ``valid`` follows it for fVLM
    (whole or larger than the crop) and is all true for CLIP, as ``embed_studies`` sets them.
    """
    n = len(embeddings)
    if status is None:
        status = np.zeros(embeddings.shape[:2], dtype=np.int8)
    evaluable = np.isin(status, (AnatomyStatus.WHOLE, AnatomyStatus.LARGER_THAN_CROP))
    valid = torch.ones(n, 1, dtype=torch.bool) if crop_rule == "tile" else torch.tensor(evaluable)
    return StudyEmbeddings(
        embeddings=embeddings, valid=valid, status=np.asarray(status, dtype=np.int8),
        forward_passes=np.ones(n, dtype=np.int64), study_ids=[f"s{i:03d}" for i in range(n)],
        crop_size=(8, 16, 16), crop_rule=crop_rule,
    )  # fmt: skip
