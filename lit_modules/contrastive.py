"""The base task of the three training modules: one network, one loss, shared steps and logging.

As torchgeo's ``BaseTask``: ``__init__`` saves the hyper-parameters and calls
:meth:`~ContrastiveModule.configure_models`, :meth:`~ContrastiveModule.configure_losses` and
:meth:`~ContrastiveModule.configure_metrics`; ``forward``, the training, validation and test steps
and the optimiser are written once. :class:`FineGrainedCLIPModule`, :class:`GlobalCLIPModule` and
:class:`CoTeachingModule` state only what differs (the network kind, the source of Eq. 3's soft
targets, the second network).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from fvlm.checkpoint import NETWORK_KEY
from fvlm.data_modules.collate import finish_crops
from fvlm.data_modules.study_dataset import cache_hu_window
from fvlm.lit_modules.parameter_distance import parameter_distance
from fvlm.lit_modules.schedule import warmup_cosine
from fvlm.lit_modules.zero_shot_validation import ZeroShotAUROC
from fvlm.loss import AnatomyReduction, FineGrainedContrastiveLoss
from fvlm.models import (
    MINILM,
    FineGrainedCLIP,
    FineGrainedOutput,
    GlobalCLIP,
    NetworkKind,
    VisionConfig,
    build_network,
    network_options,
)
from fvlm.models.intensity_windows import check_source_window
from fvlm.models.vision import warn_if_uninitialised

__all__ = ["ContrastiveModule", "adamw"]

SoftTargets = tuple[torch.Tensor, torch.Tensor]


def adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The paper's optimiser (A.2: Adam-type, peak lr 1e-4); weight decay as in CLIP practice."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)


class ContrastiveModule(LightningModule):
    """Base LightningModule: builds the network, computes the contrastive loss, logs and scores.

    Args:
        num_anatomies: Length of the anatomy table (linked from the data module).
        vision: 3D ViT shape; ``None`` is the paper's ViT-B on its 96x256x384 crop.
        text_model: Text backbone: ``minilm`` (offline package), a local path or a hub name
            (linked from the data module's tokenizer so both always match).
        text_config: Keyword arguments of a ``BertConfig`` for a randomly initialised text tower
            (tests); overrides ``text_model``.
        text_trainable_layers: Train only the last ``k`` text layers (``None``: all, as the paper;
            ``0``: frozen backbone, only the projection learns; fast on CPU).
        text_pooling: ``cls`` (paper, BERT) or ``mean`` (what sentence encoders such as MiniLM
            were trained with; use it when the backbone is frozen).
        text_gradient_checkpointing: Recompute the text layers in backward (saves memory).
        embed_dim: Joint embedding width.
        pooling_heads: Heads of the anatomy attention (fine-grained networks).
        temperature: Initial temperature (paper and CLIP: 0.07).
        max_logit_scale: Cap of the learned ``1 / temperature``.
        fncn: False-negative correction of normals (Tab. 4 "FNCN").
        identical_text_positive: Identical anatomy descriptions are positives of each other.
        anatomy_reduction: Sum (Eq. 2) or mean of the per-anatomy losses.
        skip_all_normal_anatomies: Leave out of the loss the anatomies without any abnormal
            sample in the global batch (the authors' release; the paper is silent).
        optimizer: Optimiser factory (``class_path``/``init_args`` in YAML); its ``lr`` is the peak.
        warmup_epochs: Linear warm-up length (A.2: one epoch).
        min_lr: Final learning rate of the cosine decay (A.2: 1e-6).
    """

    network_kind: ClassVar[NetworkKind] = "fine_grained"
    alpha: float = 0.5
    """Weight of the hard targets in Eq. 3; modules with label correction set their own."""
    network: FineGrainedCLIP | GlobalCLIP
    """The network that is validated, tested and loaded by :func:`fvlm.checkpoint.load_network`."""

    def __init__(
        self,
        num_anatomies: int = 0,
        vision: VisionConfig | None = None,
        text_model: str = MINILM,
        text_config: dict | None = None,
        text_trainable_layers: int | None = None,
        text_pooling: Literal["cls", "mean"] = "cls",
        text_gradient_checkpointing: bool = False,
        embed_dim: int = 512,
        pooling_heads: int = 8,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        fncn: bool = True,
        identical_text_positive: bool = True,
        anatomy_reduction: AnatomyReduction = "sum",
        skip_all_normal_anatomies: bool = False,
        optimizer: OptimizerCallable = adamw,
        warmup_epochs: float = 1.0,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.zero_shot: nn.ModuleDict = nn.ModuleDict()
        self.configure_models()
        self.configure_losses()

    # -- hooks a subclass overrides ------------------------------------------------------------

    def configure_models(self) -> None:
        """Build the trained network(s); the base builds one network of ``network_kind``."""
        self.network = self.build_network()

    def configure_losses(self) -> None:
        """The anatomy-level contrastive loss with this module's options."""
        hp = self.hparams
        self.loss = FineGrainedContrastiveLoss(
            fncn=hp.fncn,
            identical_text_positive=hp.identical_text_positive,
            anatomy_reduction=hp.anatomy_reduction,
            skip_all_normal_anatomies=hp.skip_all_normal_anatomies,
        )

    def configure_metrics(self) -> None:
        """Zero-shot AUROC for validation and test when the data module has disease labels.

        Called from :meth:`setup`: the diseases scored are the label file's columns.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        labels: pd.DataFrame | None = getattr(datamodule, "disease_labels", None)
        if labels is None or len(self.zero_shot):
            return
        mode = "global" if self.network_kind == "global" else "fine"
        for stage in ("val", "test"):
            self.zero_shot[stage] = ZeroShotAUROC(
                datamodule.table, labels, self.hparams.text_model, mode
            )

    def soft_targets(self, batch: dict, out: FineGrainedOutput) -> SoftTargets | None:
        """Eq. 3's ``p_other`` for this batch; ``None`` trains on the hard (FNCN) targets."""
        return None

    def label_correction_network(self) -> nn.Module | None:
        """The model whose predictions correct :attr:`network`'s labels (``None``: no such one)."""
        return None

    # -- shared machinery ----------------------------------------------------------------------

    def build_network(self) -> FineGrainedCLIP | GlobalCLIP:
        """A fresh network of ``network_kind`` with this module's tower options."""
        return build_network(self.network_kind, **network_options(self.hparams))

    def setup(self, stage: str) -> None:
        """Tell the loss about the process group, check the cache's HU window, build metrics."""
        if stage == "fit":
            warn_if_uninitialised(self.network.vision.config)
        self.loss.rank = self.global_rank
        self.loss.world_size = self.trainer.world_size if self._trainer is not None else 1
        cache_dir = getattr(getattr(self._trainer, "datamodule", None), "cache_dir", None)
        if cache_dir is not None:
            source = self.network.vision.config.source_hu_window
            check_source_window(source, cache_hu_window(cache_dir), cache_dir)
        self.configure_metrics()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Convert the crops to float32 and pad them on the device (the loader leaves both undone).

        Done here, once per batch on the accelerator, it costs the loader's CPU nothing: see
        :func:`fvlm.data_modules.collate.finish_crops`.
        """
        return finish_crops(batch)

    def forward(self, batch: dict) -> FineGrainedOutput:
        """Embed a batch with the evaluated network."""
        return self.network(batch)

    def contrastive_loss(
        self, out: FineGrainedOutput, soft: SoftTargets | None = None
    ) -> dict[str, torch.Tensor]:
        """The loss of one network's output; ``soft`` softens its targets as in Eq. 3."""
        return self.loss(
            out.image_emb,
            out.text_emb,
            out.valid,
            out.normal,
            out.text_key,
            out.logit_scale,
            soft_targets=soft,
            alpha=self.alpha,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One contrastive step (Eq. 2; Eq. 3 when :meth:`soft_targets` gives targets)."""
        out = self.network(batch)
        losses = self.contrastive_loss(out, self.soft_targets(batch, out))
        self.log_loss("train", losses, out)
        return losses["loss"]

    def on_train_epoch_end(self) -> None:
        """Fig. 10: log ``train/param_distance`` (relative) and ``train/param_distance_l2``."""
        teacher = self.label_correction_network()
        if teacher is None:
            return
        distance, relative = parameter_distance(self.network, teacher)
        self.log("train/param_distance", relative.float())
        self.log("train/param_distance_l2", distance.float())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss with hard targets, and the batch's zero-shot scores."""
        self._evaluation_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """As :meth:`validation_step`, on the test split (``fvlm test``)."""
        self._evaluation_step("test", batch)

    def _evaluation_step(self, stage: str, batch: dict) -> None:
        out = self.network(batch)
        self.log_loss(stage, self.contrastive_loss(out), out)
        if stage in self.zero_shot:
            self.zero_shot[stage].update(self.network, out, batch["study_id"])

    def on_validation_epoch_start(self) -> None:
        """Prompts are encoded afresh with this epoch's weights."""
        if "val" in self.zero_shot:
            self.zero_shot["val"].start_epoch()

    def on_test_epoch_start(self) -> None:
        """Prompts are encoded afresh with the tested weights."""
        if "test" in self.zero_shot:
            self.zero_shot["test"].start_epoch()

    def on_validation_epoch_end(self) -> None:
        """Log ``val/auroc/<disease>`` and ``val/auroc_macro`` (monitor it to keep the best)."""
        self._log_auroc("val")

    def on_test_epoch_end(self) -> None:
        """Log ``test/auroc/<disease>`` and ``test/auroc_macro``."""
        self._log_auroc("test")

    def _log_auroc(self, stage: str) -> None:
        if stage not in self.zero_shot or self.trainer.sanity_checking:
            if stage in self.zero_shot:
                self.zero_shot[stage].compute()  # drop the sanity batches' state
            return
        values = self.zero_shot[stage].compute()
        macro = values.pop("macro")
        for key, value in values.items():
            self.log(f"{stage}/auroc/{key}", value)
        self.log(f"{stage}/auroc_macro", macro, prog_bar=True)
        if torch.isnan(macro):
            rank_zero_warn(f"{stage}/auroc_macro is NaN: no disease had positives and negatives")

    def log_loss(self, stage: str, losses: dict[str, torch.Tensor], out: FineGrainedOutput) -> None:
        """Log total, per-direction and per-anatomy losses and the temperature."""
        batch_size = out.valid.shape[0]
        sync = stage != "train"
        self.log(
            f"{stage}/loss", losses["loss"], prog_bar=True, batch_size=batch_size, sync_dist=sync
        )
        for key in ("loss_i2t", "loss_t2i"):
            self.log(f"{stage}/{key}", losses[key], batch_size=batch_size, sync_dist=sync)
        names = self.anatomy_names(out.valid.shape[1])
        for name, value in zip(names, losses["per_anatomy"], strict=True):
            if torch.isfinite(value):
                self.log(f"{stage}/anatomy/{name}", value, batch_size=batch_size, sync_dist=sync)
        self.log(f"{stage}/temperature", 1.0 / out.logit_scale.detach(), batch_size=batch_size)

    def anatomy_names(self, count: int) -> list[str]:
        """Anatomy names for logging (from the data module when there is one)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        names = getattr(datamodule, "anatomy_names", None)
        if names is not None and len(names) == count:
            return list(names)
        return ["global"] if count == 1 else [str(i) for i in range(count)]

    def make_optimizer(self, params: Iterable[nn.Parameter], share: float = 1.0) -> dict:
        """Optimiser + per-step warm-up/cosine schedule over the whole run.

        ``share`` is the fraction of training batches this optimiser steps on (co-teaching: 0.5).
        """
        optimizer = self.optimizer_factory(params)
        total = max(1, math.ceil(self.trainer.estimated_stepping_batches * share))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total, int(round(total * self.hparams.warmup_epochs / epochs)))
        scheduler = warmup_cosine(optimizer, total, warmup, self.hparams.min_lr)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_optimizers(self) -> Any:
        """AdamW + warm-up/cosine over the trained network."""
        return self.make_optimizer(self.network.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the network kind, and keep the file loadable with ``weights_only=True``."""
        checkpoint[NETWORK_KEY] = {"kind": self.network_kind}
        hparams = checkpoint.get("hyper_parameters", {})
        if isinstance(hparams.get("vision"), VisionConfig):
            hparams["vision"] = dataclasses.asdict(hparams["vision"])
