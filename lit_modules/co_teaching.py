"""``CoTeachingModule``: two fVLM networks trained alternately, each softening the other's targets.

Sec. 3.3 / A.2: "we iteratively train two fVLMs, alternating between them after each iteration";
after a burn-in the network being trained takes Eq. 3's ``p_other`` from its partner, which limits
the error accumulation of self-correction (Tab. 5). The networks differ in

* data order and augmentation: the module asks the data module for one training stream per
  network (:attr:`~fvlm.data_modules.CTReportDataModule.train_streams`); each stream iterates the
  whole training split every epoch in its own order with its own crops and flips, and a training
  batch is the list of the streams' batches. So one epoch is one pass over the data *for each
  network*, the burn-in counts each network's own epochs, and each network takes one optimiser
  step per batch (network 0, then network 1: updates alternate);
* initialisation: each network is built under its own seed (``seeds``). Pretrained weights leave
  equal what they load: the text encoder (``text_model``) and, with ``vision.init_from``, the ViT
  blocks, patch embedding and position table. The anatomy queries and attention, the projections
  to the joint space, and every layer the checkpoint does not provide differ.

The partner computes its soft targets in evaluation mode (no dropout) without gradients, on the
student's batch, and returns to training mode afterwards.

A plain loader that yields single batches (no data module) still trains: both networks then step
on the same batch, so they differ by initialisation only (a warning says so).

Under DDP each backward uses one network's parameters: use ``strategy:
ddp_find_unused_parameters_true`` (configs/fvlm.yaml does). ``trainer.global_step`` counts the
optimiser steps of both networks (twice the batches), so ``max_steps`` and ``fast_dev_run`` cap
both networks' steps together: ``max_steps: 2 * n`` trains ``n`` batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
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
        gradient_clip_val: Clip each network's gradient norm to this value before its step
            (``None``: no clipping). Lightning refuses ``trainer.gradient_clip_val`` with the two
            manually stepped optimisers, so co-teaching runs state their clipping here.
        **kwargs: The towers, loss and optimiser options of
            :class:`~fvlm.lit_modules.contrastive.ContrastiveModule` (all shown by ``--help``).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        burn_in_epochs: int = 5,
        seeds: tuple[int, int] = (0, 1),
        gradient_clip_val: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha
        self.automatic_optimization = False
        self._warned_single_stream = False

    def configure_models(self) -> None:
        """Two networks from two seeds; the first is the one evaluated and saved for inference."""
        if len(self.hparams.seeds) != 2:
            raise ValueError(f"seeds must give two seeds, got {self.hparams.seeds!r}")
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

    def label_correction_network(self) -> nn.Module:
        """Fig. 10: network 0's label-correction model is its partner."""
        return self.networks[1]

    def setup(self, stage: str) -> None:
        """Ask the data module for one training stream per network (before its loader is built)."""
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "train_streams"):
            datamodule.train_streams = len(self.networks)

    def streams(self, batch: dict | Sequence[dict]) -> list[dict]:
        """One batch per network: the streams' batches, or the same plain batch for both."""
        if isinstance(batch, Mapping):
            if not self._warned_single_stream:
                rank_zero_warn(
                    "CoTeachingModule got single batches: both networks train on the same "
                    "samples (use CTReportDataModule for one order and augmentation each)"
                )
                self._warned_single_stream = True
            return [batch] * len(self.networks)
        if len(batch) != len(self.networks):
            raise ValueError(
                f"co-teaching needs one batch per network ({len(self.networks)}), got {len(batch)}"
            )
        return list(batch)

    def teaching(self) -> bool:
        """Whether the burn-in is over (it counts each network's own epochs)."""
        return self.current_epoch >= self.hparams.burn_in_epochs

    def partner_targets(self, partner: int, batch: dict, out: FineGrainedOutput) -> SoftTargets:
        """Eq. 3's ``p_other``: the partner's probabilities on the student's batch.

        The partner runs in evaluation mode (no dropout) under ``no_grad``, then returns to the
        mode it was in.
        """
        teacher = self.networks[partner]
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                other = teacher(batch)
        finally:
            teacher.train(was_training)
        return self.loss.teacher_targets(
            other.image_emb, other.text_emb, out.valid, other.logit_scale
        )

    def network_loss(
        self, k: int, batch: dict, teach: bool | None = None
    ) -> tuple[dict[str, torch.Tensor], FineGrainedOutput]:
        """Network ``k``'s loss on its batch, softened by its partner when ``teach``.

        Args:
            k: The student network.
            batch: The student's batch.
            teach: Use the partner's soft targets; ``None``: once the burn-in is over.
        """
        out = self.networks[k](batch)
        teach = self.teaching() if teach is None else teach
        soft = self.partner_targets(1 - k, batch, out) if teach else None
        return self.contrastive_loss(out, soft), out

    def training_step(self, batch: dict | Sequence[dict], batch_idx: int) -> torch.Tensor:
        """One optimiser step of each network on its own batch, network 0 first (Eq. 3)."""
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        first = None
        for k, sample in enumerate(self.streams(batch)):
            losses, out = self.network_loss(k, sample)
            self.manual_backward(losses["loss"])
            if self.hparams.gradient_clip_val:
                self.clip_gradients(optimizers[k], self.hparams.gradient_clip_val, "norm")
            optimizers[k].step()
            optimizers[k].zero_grad()  # the idle network holds no stale gradient
            schedulers[k].step()
            if k == 0:
                self.log_loss("train", losses, out)
                first = losses["loss"].detach()
            else:
                self.log(f"train/network{k}/loss", losses["loss"], batch_size=out.valid.shape[0])
        return first

    def configure_optimizers(self) -> tuple[list, list]:
        """One optimiser and schedule per network; each steps once per batch."""
        configs = [self.make_optimizer(net.parameters()) for net in self.networks]
        return [c["optimizer"] for c in configs], [c["lr_scheduler"] for c in configs]
