"""``GlobalCLIPModule``: the global CLIP baseline (whole volume vs whole report; Tab. 4, row 1)."""

from __future__ import annotations

from typing import Any

import torch

from fvlm.lit_modules.contrastive import ContrastiveModule
from fvlm.models import FineGrainedOutput

__all__ = ["GlobalCLIPModule"]


class GlobalCLIPModule(ContrastiveModule):
    """CLIP on the same data and towers as fVLM, for comparison.

    With ``fncn`` on, studies whose every anatomy is normal are positives of each other (the
    paper's patient-level definition of normal); the default is plain CLIP (``fncn: false``).
    ``num_anatomies`` is accepted (and ignored) so the same data-module link works.
    """

    def __init__(
        self, fncn: bool = False, identical_text_positive: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(fncn=fncn, identical_text_positive=identical_text_positive, **kwargs)
        self.network = self.build_network("global")

    def forward(self, batch: dict) -> FineGrainedOutput:
        """Embed a batch (one pair per study)."""
        return self.network(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One CLIP step."""
        out = self.network(batch)
        losses = self.contrastive_loss(out)
        self.log_loss("train", losses, out)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Validation loss."""
        out = self.network(batch)
        self.log_loss("val", self.contrastive_loss(out), out)

    def configure_optimizers(self) -> dict:
        """AdamW + warm-up/cosine."""
        return self.make_optimizer(self.network.parameters())
