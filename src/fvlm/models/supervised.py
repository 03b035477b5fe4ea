"""The supervised baseline of the paper's Tab. 1: fVLM's image side with one logit per disease.

The paper compares zero-shot fVLM with a supervised model trained on disease labels. To measure
what the report supervision adds, this baseline keeps everything of the image side the same (the
3D ViT, the anatomy pooling and its projection) and replaces the contrastive text side with a
:class:`DiseaseHead`: the logit of a disease is an affine function of its anatomy's embedding, the
embedding zero-shot scoring uses for it. The network subclasses
:class:`~fvlm.models.FineGrainedCLIP` so evaluation embeds studies exactly as it embeds fVLM's
(same crops, same anatomy rows); its text tower is built but never run, and stays frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.models.fine_grained_clip import FineGrainedCLIP, whole_scan_embedding

__all__ = ["WHOLE_SCAN", "AnatomyClassifier", "DiseaseHead"]

WHOLE_SCAN = -1
"""Anatomy index of a whole-scan disease: its logit reads the mean of the valid anatomies."""


class DiseaseHead(nn.Module):
    """Per-disease logistic regression on the embedding of the disease's anatomy.

    ``logit_k = scale * cos(v_a(k), w_k) + b_k``: a learned direction per disease compared with
    the unit anatomy embedding, as zero-shot scoring compares it with prompt embeddings
    (``scale * (cos(v, t_pos) - cos(v, t_neg))``), with the contrastive models' initial scale
    ``1 / 0.07``. The scale matters: the anatomy embeddings of an untrained network differ across
    studies by a few thousandths, and a unit-scale head passes too small a gradient to the towers
    to spread them (on the test cache the BCE then learns only the prevalence).

    Args:
        embed_dim: Width ``E`` of the anatomy embeddings.
        disease_anatomies: For each disease ``k``, the index of its anatomy along the anatomy
            axis, or :data:`WHOLE_SCAN`.
        scale: Initial multiplier of the cosine (learned).
    """

    def __init__(
        self, embed_dim: int, disease_anatomies: Sequence[int], scale: float = 1 / 0.07
    ) -> None:
        super().__init__()
        if not disease_anatomies:
            raise ValueError("DiseaseHead needs at least one disease")
        self.register_buffer(
            "anatomy_index", torch.as_tensor(list(disease_anatomies), dtype=torch.long)
        )
        self.weight = nn.Parameter(torch.zeros(len(disease_anatomies), embed_dim))
        self.bias = nn.Parameter(torch.zeros(len(disease_anatomies)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        nn.init.normal_(self.weight, std=embed_dim**-0.5)

    def forward(self, image_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` from anatomy embeddings ``(B, A, E)`` and validity ``(B, A)``.

        A whole-scan disease reads the renormalised mean of the valid anatomy embeddings (zero
        for a sample without any); callers mask the diseases whose anatomy is not valid.
        """
        index = self.anatomy_index
        whole = whole_scan_embedding(image_emb, valid.bool()).nan_to_num(0.0)
        picked = image_emb[:, index.clamp(min=0)]  # (B, K, E)
        picked = torch.where((index == WHOLE_SCAN)[None, :, None], whole[:, None], picked)
        direction = F.normalize(self.weight, dim=-1)
        cosine = torch.einsum("bke,ke->bk", picked.to(direction.dtype), direction)
        return self.log_scale.exp() * cosine + self.bias

    def disease_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` bool: the disease's anatomy is valid (whole-scan: any anatomy is)."""
        anatomy = valid.bool()[:, self.anatomy_index.clamp(min=0)]
        any_valid = valid.bool().any(dim=1, keepdim=True).expand_as(anatomy)
        return torch.where(self.anatomy_index == WHOLE_SCAN, any_valid, anatomy)


class AnatomyClassifier(FineGrainedCLIP):
    """fVLM's vision tower and anatomy pooling with a :class:`DiseaseHead` (supervised, Tab. 1).

    Args:
        num_anatomies: Length of the anatomy table.
        disease_anatomies: Anatomy index per disease (see :class:`DiseaseHead`).
        **kwargs: The tower options of :class:`~fvlm.models.FineGrainedCLIP`.
    """

    def __init__(self, num_anatomies: int, disease_anatomies: Sequence[int], **kwargs: Any) -> None:
        super().__init__(num_anatomies=num_anatomies, **kwargs)
        self.text.requires_grad_(False)
        self.logit_scale.requires_grad_(False)
        self.head = DiseaseHead(self.text.proj.out_features, disease_anatomies)

    def disease_logits(self, image: torch.Tensor, anatomy: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` of a batch of crops; rows of anatomies absent are meaningless."""
        embedding, present = self.encode_image_with_presence(image, anatomy)
        return self.head(embedding, present)
