"""``GlobalCLIPModule``: the global CLIP baseline (whole volume vs whole report; Tab. 4, row 1)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable

from fvlm.lit_modules.contrastive import ContrastiveModule, adamw
from fvlm.models import MINILM, FineGrainedOutput, VisionConfig

__all__ = ["GlobalCLIPModule"]


class GlobalCLIPModule(ContrastiveModule):
    """CLIP on the same data and towers as fVLM, for comparison.

    With ``fncn`` on, studies whose every anatomy is normal are positives of each other (the
    paper's patient-level definition of normal); the default is plain CLIP (``fncn: false``).
    ``num_anatomies`` is accepted (and ignored) so the same data-module link works.
    """

    def __init__(
        self,
        num_anatomies: int = 0,
        vision: VisionConfig | None = None,
        text_model: str = MINILM,
        text_config: dict | None = None,
        text_trainable_layers: int | None = None,
        text_pooling: Literal["cls", "mean"] = "cls",
        embed_dim: int = 512,
        fncn: bool = False,
        identical_text_positive: bool = False,
        optimizer: OptimizerCallable = adamw,
        warmup_epochs: float = 1.0,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__(
            num_anatomies=num_anatomies,
            vision=vision,
            text_model=text_model,
            text_config=text_config,
            text_trainable_layers=text_trainable_layers,
            text_pooling=text_pooling,
            embed_dim=embed_dim,
            fncn=fncn,
            identical_text_positive=identical_text_positive,
            optimizer=optimizer,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
        )
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
