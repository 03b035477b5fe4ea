"""What the three training modules share: the towers' options, the loss, optimiser and logging.

:class:`FineGrainedCLIPModule`, :class:`GlobalCLIPModule` and :class:`CoTeachingModule` differ only
in which network(s) they build and how a step uses them; everything else lives here once.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from fvlm.data_modules.study_dataset import cache_hu_window
from fvlm.lit_modules.schedule import warmup_cosine
from fvlm.loss import AnatomyReduction, FineGrainedContrastiveLoss
from fvlm.models import MINILM, FineGrainedCLIP, FineGrainedOutput, GlobalCLIP, VisionConfig
from fvlm.models.intensity_windows import check_source_window

__all__ = ["ContrastiveModule", "Network", "adamw", "load_checkpoint"]

Network = Literal["fine_grained", "global"]


def adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The paper's optimiser (A.2: Adam-type, peak lr 1e-4); weight decay as in CLIP practice."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)


class ContrastiveModule(LightningModule):
    """Base LightningModule: builds networks on request, computes the contrastive loss, logs.

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
        embed_dim: Joint embedding width.
        fncn: False-negative correction of normals (Tab. 4 "FNCN").
        identical_text_positive: Identical anatomy descriptions are positives of each other.
        anatomy_reduction: Sum (Eq. 2) or mean of the per-anatomy losses.
        optimizer: Optimiser factory (``class_path``/``init_args`` in YAML); its ``lr`` is the peak.
        warmup_epochs: Linear warm-up length (A.2: one epoch).
        min_lr: Final learning rate of the cosine decay (A.2: 1e-6).
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
        fncn: bool = True,
        identical_text_positive: bool = True,
        anatomy_reduction: AnatomyReduction = "sum",
        optimizer: OptimizerCallable = adamw,
        warmup_epochs: float = 1.0,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.loss = FineGrainedContrastiveLoss(
            fncn=fncn,
            identical_text_positive=identical_text_positive,
            anatomy_reduction=anatomy_reduction,
        )

    def build_network(self, kind: Network) -> FineGrainedCLIP | GlobalCLIP:
        """A fresh network of ``kind`` with this module's tower options."""
        hp = self.hparams
        text_config = None
        if hp.text_config is not None:
            from transformers import BertConfig

            text_config = BertConfig(**hp.text_config)
        vision = hp.vision
        if isinstance(vision, dict):  # hparams restored from YAML or a checkpoint
            vision = VisionConfig(**vision)
        common = {
            "vision": vision,
            "text_model": hp.text_model,
            "text_config": text_config,
            "text_trainable_layers": hp.text_trainable_layers,
            "text_pooling": hp.text_pooling,
            "embed_dim": hp.embed_dim,
        }
        if kind == "global":
            return GlobalCLIP(**common)
        if hp.num_anatomies < 1:
            raise ValueError("num_anatomies must be >= 1 (linked from data.num_anatomies)")
        return FineGrainedCLIP(num_anatomies=hp.num_anatomies, **common)

    def setup(self, stage: str) -> None:
        """Tell the loss about the process group so features are gathered across ranks."""
        self.loss.rank = self.global_rank
        self.loss.world_size = self.trainer.world_size if self._trainer is not None else 1
        cache_dir = getattr(getattr(self._trainer, "datamodule", None), "cache_dir", None)
        if cache_dir is not None:
            source = self.network.vision.config.source_hu_window
            check_source_window(source, cache_hu_window(cache_dir), cache_dir)

    def contrastive_loss(
        self, out: FineGrainedOutput, soft_targets: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The loss of one network's output, optionally with Eq. 3's softened targets."""
        return self.loss(
            out.image_emb,
            out.text_emb,
            out.valid,
            out.normal,
            out.text_key,
            out.logit_scale,
            soft_targets=soft_targets,
            alpha=self.hparams.get("alpha", 0.5),
        )

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
        total = max(1, int(self.trainer.estimated_stepping_batches * share))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(total, int(round(total * self.hparams.warmup_epochs / epochs)))
        scheduler = warmup_cosine(optimizer, total, warmup, self.hparams.min_lr)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the module class so :func:`load_checkpoint` needs no other information."""
        checkpoint["fvlm_module"] = f"{type(self).__module__}.{type(self).__qualname__}"
        # A VisionConfig object would make the checkpoint unloadable with weights_only=True.
        hparams = checkpoint.get("hyper_parameters", {})
        if isinstance(hparams.get("vision"), VisionConfig):
            hparams["vision"] = dataclasses.asdict(hparams["vision"])


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> ContrastiveModule:
    """Load any fvlm training checkpoint (fVLM, co-teaching or CLIP) in eval mode."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if "fvlm_module" not in checkpoint:
        raise ValueError(f"{path}: not an fvlm checkpoint (no 'fvlm_module' entry)")
    module_name, _, class_name = checkpoint["fvlm_module"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    return module.eval()
