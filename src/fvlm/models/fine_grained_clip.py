"""fVLM's fine-grained (anatomy-level) CLIP: 3D ViT + anatomy pooling + BERT, one embedding each.

Embeddings stay dense ``(B, A, E)`` with a validity mask rather than a ragged list of pairs, so a
DDP all-gather moves fixed shapes and the per-anatomy contrastive loss is one batched computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.models.anatomy_pooling import AnatomyPooling, token_membership
from fvlm.models.text import MINILM, TextEncoder, TextPooling
from fvlm.models.vision import VisionConfig, VisionTransformer3D

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["FineGrainedCLIP", "FineGrainedOutput", "LogitScale", "whole_scan_embedding"]


@dataclass
class FineGrainedOutput:
    """What a contrastive model returns for a batch; the loss needs nothing else.

    Attributes:
        image_emb: ``(B, A, E)`` unit vectors (float32).
        text_emb: ``(B, A, E)`` unit vectors, zeros where invalid (float32).
        valid: ``(B, A)`` bool, pairs that enter the loss.
        normal: ``(B, A)`` bool, anatomy not mentioned in the impression (false-negative
            correction of normals).
        text_key: ``(B, A)`` int64 content hash of the text, ``-1`` where invalid; equal keys are
            identical texts (positives for each other, also across ranks).
        logit_scale: Scalar tensor ``1 / temperature``, already clamped.
    """

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    valid: torch.Tensor
    normal: torch.Tensor
    text_key: torch.Tensor
    logit_scale: torch.Tensor


class LogitScale(nn.Module):
    """CLIP's learnable inverse temperature, stored as a log and clamped when read.

    Clamping at read time (rather than in-place after the optimiser step, as open_clip does) keeps
    the trainer free of model-specific hooks; at the cap the gradient is zero, which is the point.
    """

    def __init__(self, temperature: float = 0.07, max_scale: float = 100.0) -> None:
        """Initialise to ``log(1 / temperature)``.

        Args:
            temperature: Initial temperature ``tau`` (CLIP and the paper: 0.07).
            max_scale: Upper bound of ``1 / tau``.
        """
        super().__init__()
        if temperature <= 0.0 or max_scale <= 1.0 / temperature:
            raise ValueError(
                "need temperature > 0 and max_scale > 1 / temperature, got "
                f"temperature={temperature}, max_scale={max_scale}"
            )
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        """The current ``1 / tau`` as a scalar tensor."""
        return self.log_scale.clamp(max=self.max_log_scale).exp()


def whole_scan_embedding(image_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Renormalised mean of each study's valid anatomy embeddings, ``(S, E)``.

    fVLM has no global image embedding; whole-scan findings are scored against this direction.
    Rows of studies without any valid anatomy are NaN: there is nothing to score them with.
    """
    emb = F.normalize(image_emb if image_emb.is_floating_point() else image_emb.float(), dim=-1)
    summed = (emb * valid.to(emb.dtype).unsqueeze(-1)).sum(dim=1)
    whole = F.normalize(summed, dim=-1)
    empty = valid.sum(dim=1) == 0
    return torch.where(empty[:, None], torch.full_like(whole, float("nan")), whole)


def _batch_tensor(batch: dict[str, object], key: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"batch has no {key!r} (see docs/architecture.md, 'Batches')")
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}")
    return value


class FineGrainedCLIP(nn.Module):
    """Anatomy-level CLIP of the paper (Sec. 3.2, Fig. 3).

    Image side: the 3D ViT's tokens are pooled per anatomy (:class:`AnatomyPooling`) using the
    token membership computed from the batch's anatomy label map. Text side: each anatomy's
    description goes through the BERT-family encoder (valid pairs only, deduplicated).
    """

    def __init__(
        self,
        num_anatomies: int,
        vision: VisionConfig | None = None,
        text_model: str | Path | None = MINILM,
        text_config: PretrainedConfig | None = None,
        embed_dim: int = 512,
        pooling_heads: int = 8,
        text_pooling: TextPooling = "cls",
        text_gradient_checkpointing: bool = False,
        text_trainable_layers: int | None = None,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        """Build the towers.

        Args:
            num_anatomies: ``A``, the length of the anatomy table (label ``a + 1`` = index ``a``).
            vision: 3D ViT shape (``None``: the paper's ViT-B, see :class:`VisionConfig`).
            text_model: Text backbone: local path, hub name or ``"minilm"``.
            text_config: A ``transformers`` config for a randomly initialised backbone (tests);
                takes precedence over ``text_model``.
            embed_dim: Joint embedding width ``E``.
            pooling_heads: Heads of the anatomy attention.
            text_pooling: ``cls`` (paper) or ``mean``.
            text_gradient_checkpointing: Activation checkpointing in the text backbone.
            text_trainable_layers: Train only the last ``k`` text layers (``None``: all).
            temperature: Initial temperature.
            max_logit_scale: Cap of ``1 / temperature``.
        """
        super().__init__()
        self.num_anatomies = num_anatomies
        self.vision = VisionTransformer3D(vision)
        self.pooling = AnatomyPooling(
            self.vision.hidden_size, num_anatomies, embed_dim, num_heads=pooling_heads
        )
        self.text = TextEncoder(
            text_model,
            config=text_config,
            embed_dim=embed_dim,
            pooling=text_pooling,
            gradient_checkpointing=text_gradient_checkpointing,
            trainable_layers=text_trainable_layers,
        )
        self.logit_scale = LogitScale(temperature, max_logit_scale)

    def encode_image_with_presence(
        self, image: torch.Tensor, anatomy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anatomy embeddings ``(B, A, E)`` and presence ``(B, A)`` (anatomy has >= 1 token)."""
        if anatomy.shape != image.shape[:1] + image.shape[2:]:
            raise ValueError(
                f"anatomy {tuple(anatomy.shape)} must be the image {tuple(image.shape)} "
                "without its channel axis"
            )
        membership = token_membership(anatomy, self.num_anatomies, self.vision.patch_size)
        embedding = self.pooling(self.vision(image), membership)
        return embedding, membership.any(-1)

    def encode_image(self, image: torch.Tensor, anatomy: torch.Tensor) -> torch.Tensor:
        """Anatomy embeddings ``(B, A, E)`` of ``image (B, 1, D, H, W)``, labels ``(B, D, H, W)``.

        Rows of anatomies absent from ``anatomy`` are finite but meaningless (the query alone).
        """
        return self.encode_image_with_presence(image, anatomy)[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``(M, E)`` of ``(M, L)`` tokenised texts (prompts, descriptions)."""
        return self.text(input_ids, attention_mask)

    def global_embedding(
        self, image: torch.Tensor, anatomy: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One whole-scan embedding ``(B, E)``: :func:`whole_scan_embedding` of the anatomies.

        Averaged are the anatomies in ``valid`` (default: all present in ``anatomy``); a sample
        with none gets a zero vector, i.e. similarity 0.

        Args:
            image: ``(B, 1, D, H, W)``.
            anatomy: ``(B, D, H, W)`` labels.
            valid: Optional ``(B, A)`` bool restricting the anatomies averaged.
        """
        embedding, present = self.encode_image_with_presence(image, anatomy)
        weight = present if valid is None else present & valid.bool()
        return whole_scan_embedding(embedding, weight).nan_to_num(0.0)

    def forward(self, batch: dict[str, object]) -> FineGrainedOutput:
        """Embed a training batch (keys as in docs/architecture.md, "Batches").

        ``valid`` is the batch's ``valid`` restricted to anatomies that own at least one token, so
        an inconsistent crop can never put a query-only embedding into the loss.
        """
        image = _batch_tensor(batch, "image")
        image_emb, present = self.encode_image_with_presence(image, _batch_tensor(batch, "anatomy"))
        valid = _batch_tensor(batch, "valid").bool() & present
        text_emb, text_key = self.text.encode_unique(
            _batch_tensor(batch, "text_input_ids"),
            _batch_tensor(batch, "text_attention_mask"),
            valid,
        )
        return FineGrainedOutput(
            image_emb=image_emb,
            text_emb=text_emb,
            valid=valid,
            normal=_batch_tensor(batch, "normal").bool(),
            text_key=text_key,
            logit_scale=self.logit_scale(),
        )
