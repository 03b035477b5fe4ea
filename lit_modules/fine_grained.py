"""``FineGrainedCLIPModule``: one fVLM network, optionally with self/momentum label correction.

Tab. 5 compares sources of the soft targets of Eq. 3: none (FNCN targets only), the training model
itself, a momentum (EMA) copy, and co-teaching (see :mod:`fvlm.lit_modules.co_teaching`).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch

from fvlm.lit_modules.contrastive import ContrastiveModule
from fvlm.models import FineGrainedOutput

__all__ = ["FineGrainedCLIPModule"]


class FineGrainedCLIPModule(ContrastiveModule):
    """fVLM with a single network (Tab. 4 rows FGA and FGA+FNCN; Tab. 5 none/self/momentum).

    Args:
        label_correction: Source of Eq. 3's ``p_other``: ``none``, ``self`` (the network's own
            detached probabilities) or ``momentum`` (an EMA copy of the network).
        alpha: Weight of the hard targets in Eq. 3 (paper: 0.5).
        burn_in_epochs: Epochs trained on hard targets before label correction starts.
        momentum: EMA decay of the momentum network.
        **kwargs: The towers, loss and optimiser options of
            :class:`~fvlm.lit_modules.contrastive.ContrastiveModule` (all shown by ``--help``).
    """

    def __init__(
        self,
        label_correction: Literal["none", "self", "momentum"] = "none",
        alpha: float = 0.5,
        burn_in_epochs: int = 5,
        momentum: float = 0.999,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer"])
        self.network = self.build_network("fine_grained")
        self.momentum_network = None
        if label_correction == "momentum":
            self.momentum_network = copy.deepcopy(self.network).requires_grad_(False)

    def forward(self, batch: dict) -> FineGrainedOutput:
        """Embed a batch with the trained network."""
        return self.network(batch)

    def _soft_targets(self, batch: dict, out: FineGrainedOutput) -> tuple | None:
        hp = self.hparams
        if hp.label_correction == "none" or self.current_epoch < hp.burn_in_epochs:
            return None
        teacher = out
        if hp.label_correction == "momentum":
            with torch.no_grad():
                teacher = self.momentum_network(batch)
        return self.loss.teacher_targets(
            teacher.image_emb.detach(), teacher.text_emb.detach(), out.valid, teacher.logit_scale
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One contrastive step (Eq. 2, with Eq. 3 after burn-in if label correction is on)."""
        out = self.network(batch)
        losses = self.contrastive_loss(out, self._soft_targets(batch, out))
        self.log_loss("train", losses, out)
        return losses["loss"]

    def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
        """Update the momentum copy after each optimiser step."""
        if self.momentum_network is None:
            return
        decay = self.hparams.momentum
        with torch.no_grad():
            for ema, live in zip(
                self.momentum_network.parameters(), self.network.parameters(), strict=True
            ):
                ema.lerp_(live, 1.0 - decay)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Validation loss with hard targets."""
        out = self.network(batch)
        self.log_loss("val", self.contrastive_loss(out), out)

    def configure_optimizers(self) -> dict:
        """AdamW + warm-up/cosine over the trained network only (not the momentum copy)."""
        return self.make_optimizer(self.network.parameters())
