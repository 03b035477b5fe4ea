"""``CoTeachingModule``: two fVLM networks trained alternately, each softening the other's targets.

Sec. 3.3 / A.2: after a burn-in, the network being trained at a step takes Eq. 3's ``p_other``
from its partner, which limits the error accumulation of self-correction (Tab. 5). The two
networks differ in initialisation (separate seeds), data order (network ``k`` trains on every
other batch, ``batch_idx % 2 == k``) and augmentation (each batch has its own random crop/flip).

Under DDP the idle network's parameters get no gradient in a step: use
``strategy: ddp_find_unused_parameters_true`` (configs/fvlm.yaml does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fvlm.lit_modules.contrastive import ContrastiveModule, SoftTargets
from fvlm.models import FineGrainedCLIP, FineGrainedOutput

__all__ = ["CoTeachingModule"]


class CoTeachingModule(ContrastiveModule):
    """fVLM with co-teaching (Tab. 4 "CoT", Tab. 5 "CoT").

    Args:
        alpha: Weight of the hard targets in Eq. 3 (paper: 0.5).
        burn_in_epochs: Epochs of independent training before co-teaching starts (paper: 5).
        seeds: Initialisation seeds of the two networks.
        **kwargs: The towers, loss and optimiser options of
            :class:`~fvlm.lit_modules.contrastive.ContrastiveModule` (all shown by ``--help``).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        burn_in_epochs: int = 5,
        seeds: tuple[int, int] = (0, 1),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha
        self.automatic_optimization = False

    def configure_models(self) -> None:
        """Two networks from two seeds; the first is the one evaluated and saved for inference."""
        networks = []
        for seed in self.hparams.seeds:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                networks.append(self.build_network())
        self.networks = nn.ModuleList(networks)

    @property
    def network(self) -> FineGrainedCLIP:  # type: ignore[override]
        """The evaluated network (the first one)."""
        return self.networks[0]

    def student_index(self, batch_idx: int) -> int:
        """Which network trains on this batch: they alternate every iteration."""
        return batch_idx % 2

    def partner_targets(self, batch: dict, out: FineGrainedOutput, partner: int) -> SoftTargets:
        """Eq. 3's ``p_other``: the partner network's probabilities on the student's batch."""
        with torch.no_grad():
            other = self.networks[partner](batch)
        return self.loss.teacher_targets(
            other.image_emb, other.text_emb, out.valid, other.logit_scale
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Train one network; after burn-in its targets are softened by the other's (Eq. 3)."""
        k = self.student_index(batch_idx)
        out = self.networks[k](batch)
        soft = None
        if self.current_epoch >= self.hparams.burn_in_epochs:
            soft = self.partner_targets(batch, out, 1 - k)
        losses = self.contrastive_loss(out, soft)
        optimizer = self.optimizers()[k]
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        optimizer.step()
        self.lr_schedulers()[k].step()
        self.log_loss("train", losses, out)
        self.log("train/student", float(k), batch_size=out.valid.shape[0])
        return losses["loss"].detach()

    def configure_optimizers(self) -> tuple[list, list]:
        """One optimiser and schedule per network; each steps on every other batch."""
        configs = [self.make_optimizer(net.parameters(), share=0.5) for net in self.networks]
        return [c["optimizer"] for c in configs], [c["lr_scheduler"] for c in configs]
