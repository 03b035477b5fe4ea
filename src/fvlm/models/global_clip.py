"""The global CLIP baseline (paper Tab. 4, "w/o FGA"): whole volume vs whole report.

Same vision and text classes as :class:`~fvlm.models.FineGrainedCLIP`, so the comparison isolates
fine-grained alignment. Its output is a :class:`~fvlm.models.FineGrainedOutput` with a single
"anatomy" (``A = 1``), so the per-anatomy loss computes plain CLIP with no separate code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.models.fine_grained_clip import FineGrainedOutput, LogitScale, _batch_tensor
from fvlm.models.text import MINILM, TextEncoder, TextPooling
from fvlm.models.vision import VisionConfig, VisionTransformer3D

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["GlobalCLIP"]


class GlobalCLIP(nn.Module):
    """Mean-pooled volume tokens -> linear -> L2 against the report's CLS -> linear -> L2."""

    def __init__(
        self,
        vision: VisionConfig | None = None,
        text_model: str | Path | None = MINILM,
        text_config: PretrainedConfig | None = None,
        embed_dim: int = 512,
        text_pooling: TextPooling = "cls",
        text_gradient_checkpointing: bool = False,
        text_trainable_layers: int | None = None,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        """Build the towers; arguments as in :class:`~fvlm.models.FineGrainedCLIP`."""
        super().__init__()
        self.vision = VisionTransformer3D(vision)
        self.proj = nn.Linear(self.vision.hidden_size, embed_dim)
        self.text = TextEncoder(
            text_model,
            config=text_config,
            embed_dim=embed_dim,
            pooling=text_pooling,
            gradient_checkpointing=text_gradient_checkpointing,
            trainable_layers=text_trainable_layers,
        )
        self.logit_scale = LogitScale(temperature, max_logit_scale)

    def encode_image(
        self, image: torch.Tensor, anatomy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Whole-volume embedding ``(B, 1, E)``; ``anatomy`` is accepted and ignored.

        The signature matches :meth:`FineGrainedCLIP.encode_image` so evaluation code can score
        either model; every anatomy-level disease is scored against this one embedding.
        """
        tokens = self.vision(image)
        return F.normalize(self.proj(tokens.mean(1)).float(), dim=-1).unsqueeze(1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``(M, E)`` of ``(M, L)`` tokenised texts."""
        return self.text(input_ids, attention_mask)

    def global_embedding(
        self,
        image: torch.Tensor,
        anatomy: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Whole-scan embedding ``(B, E)`` (the image embedding itself); for interface parity."""
        return self.encode_image(image)[:, 0]

    def forward(self, batch: dict[str, object]) -> FineGrainedOutput:
        """Embed a batch as one pair per study.

        Uses ``image``, ``report_input_ids``, ``report_attention_mask`` and ``normal``; the study
        counts as normal only when every anatomy is normal (the paper's global definition).
        Identical reports are encoded once and share a ``text_key``.
        """
        image = _batch_tensor(batch, "image")
        image_emb = self.encode_image(image)
        valid = torch.ones(image.shape[0], 1, dtype=torch.bool, device=image.device)
        text_emb, text_key = self.text.encode_unique(
            _batch_tensor(batch, "report_input_ids").unsqueeze(1),
            _batch_tensor(batch, "report_attention_mask").unsqueeze(1),
            valid,
        )
        normal = _batch_tensor(batch, "normal").bool().all(dim=1, keepdim=True)
        return FineGrainedOutput(
            image_emb=image_emb,
            text_emb=text_emb,
            valid=valid,
            normal=normal,
            text_key=text_key,
            logit_scale=self.logit_scale(),
        )
