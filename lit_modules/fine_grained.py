"""``FineGrainedCLIPModule``: one fVLM network, optionally with self/momentum label correction.

Tab. 5 compares sources of the soft targets of Eq. 3: none (FNCN targets only), the training model
itself, a momentum (EMA) copy, and co-teaching (see :mod:`fvlm.lit_modules.co_teaching`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fvlm.lit_modules.contrastive import ContrastiveModule, SoftTargets
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
        self.alpha = alpha

    def configure_models(self) -> None:
        """The network, and its EMA copy (``torch.optim.swa_utils``) for momentum correction."""
        super().configure_models()
        self.momentum_network: AveragedModel | None = None
        if self.hparams.label_correction == "momentum":
            average = get_ema_multi_avg_fn(self.hparams.momentum)
            self.momentum_network = AveragedModel(self.network, multi_avg_fn=average)
            self.momentum_network.requires_grad_(False)

    def soft_targets(self, batch: dict, out: FineGrainedOutput) -> SoftTargets | None:
        """The network's own or its EMA copy's probabilities, after the burn-in."""
        hp = self.hparams
        if hp.label_correction == "none" or self.current_epoch < hp.burn_in_epochs:
            return None
        teacher = out
        if self.momentum_network is not None:
            with torch.no_grad():
                teacher = self.momentum_network(batch)
        return self.loss.teacher_targets(
            teacher.image_emb.detach(), teacher.text_emb.detach(), out.valid, teacher.logit_scale
        )

    def label_correction_network(self) -> torch.nn.Module | None:
        """Fig. 10's label-correction model: the EMA copy, or the network itself (``self``)."""
        if self.momentum_network is not None:
            return self.momentum_network.module
        return self.network if self.hparams.label_correction == "self" else None

    def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
        """Update the momentum copy after each optimiser step."""
        if self.momentum_network is not None:
            self.momentum_network.update_parameters(self.network)
