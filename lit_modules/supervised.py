"""``SupervisedModule``: the supervised baseline of the paper's Tab. 1, trained on disease labels.

The same vision tower and anatomy pooling as fVLM
(:class:`~fvlm.models.supervised.AnatomyClassifier`) learn from per-disease binary cross-entropy on
the training studies' labels (the ``data.labels`` CSV, e.g. the phantom's ``labels.csv``), each
disease read from its anatomy's embedding as the evaluation's disease table maps it. A (sample,
disease) pair enters the loss only where the disease's anatomy is valid in the crop and the label is
known: the anatomy-aware crop decides what each sample trains, as it does for the contrastive
modules. ``fvlm evaluate`` scores the checkpoint with the head's probabilities instead of prompts,
on the same split and metrics.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from fvlm.anatomy import load_anatomy_table
from fvlm.lit_modules.contrastive import ContrastiveModule
from fvlm.models import NetworkKind
from fvlm.models.supervised import WHOLE_SCAN, AnatomyClassifier

__all__ = ["SupervisedModule"]

_IGNORE = -1


class SupervisedModule(ContrastiveModule):
    """Per-disease BCE on fVLM's image side (Tab. 1 "Supervised baseline").

    Args:
        anatomy_table: The data's anatomy table (preset or YAML; must be ``data.anatomy_table``):
            it maps each disease to its anatomy.
        benchmark: Diseases of this set of the table get a logit (``phantom``, ``paper``, ...;
            ``None``: all); those without a labels column are never trained.
        **kwargs: The tower and optimiser options of
            :class:`~fvlm.lit_modules.contrastive.ContrastiveModule`; the text tower is built
            frozen and never run, the contrastive-loss options are ignored.
    """

    network_kind: ClassVar[NetworkKind] = "supervised"
    network: AnatomyClassifier

    def __init__(
        self, anatomy_table: str = "paper", benchmark: str | None = "phantom", **kwargs: Any
    ) -> None:
        table = load_anatomy_table(anatomy_table)
        diseases = table.diseases(benchmark)
        if not diseases:
            raise ValueError(f"table {table.name!r} has no disease of benchmark {benchmark!r}")
        self._disease_keys = [d.key for d in diseases]
        self._disease_anatomies = [
            WHOLE_SCAN if d.anatomy is None else table.index(d.anatomy) for d in diseases
        ]
        self._table_names = table.names
        super().__init__(**kwargs)
        # Stored with the hyper-parameters: the checkpoint rebuilds the head without the table.
        self.hparams["disease_keys"] = self._disease_keys
        self.hparams["disease_anatomies"] = self._disease_anatomies
        # The epoch's (probabilities, targets) batches; AUROC per disease over its known pairs.
        self._epoch: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def disease_keys(self) -> list[str]:
        """The diseases of the head, in logit order."""
        return list(self._disease_keys)

    def build_network(self) -> AnatomyClassifier:
        """The fVLM towers with a head of one logit per disease."""
        from fvlm.models import build_network, network_options

        options = network_options(self.hparams) | {"disease_anatomies": self._disease_anatomies}
        return build_network("supervised", **options)  # type: ignore[return-value]

    def configure_metrics(self) -> None:
        """Check that the data's anatomy table is the head's; the labels must exist."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            return
        names = getattr(datamodule, "anatomy_names", None)
        if names is not None and list(names) != list(self._table_names):
            raise ValueError(
                f"model.anatomy_table {self.hparams.anatomy_table!r} is not the data's anatomy "
                "table: set both to the same preset or file"
            )
        if getattr(datamodule, "disease_labels", None) is None:
            raise ValueError("the supervised baseline trains on labels: set data.labels to a CSV")

    def targets(self, study_ids: list[str], valid: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` float targets: 0/1, or ``-1`` where unknown or the anatomy is not valid."""
        labels: pd.DataFrame = self.trainer.datamodule.disease_labels
        missing = [s for s in study_ids if s not in labels.index]
        if missing:
            raise ValueError(f"{self.trainer.datamodule.labels}: no row for studies {missing[:3]}")
        frame = labels.reindex(index=study_ids, columns=self._disease_keys)
        values = torch.as_tensor(frame.to_numpy(dtype=float), dtype=torch.float32)
        values = values.to(valid.device).nan_to_num(_IGNORE)
        return torch.where(self.network.head.disease_valid(valid), values, _IGNORE)

    def _logits_and_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, present = self.network.encode_image_with_presence(
            batch["image"], batch["anatomy"]
        )
        valid = batch["valid"].bool() & present
        logits = self.network.head(embedding, valid)
        return logits, self.targets(list(batch["study_id"]), valid)

    def bce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean BCE over the known (sample, disease) pairs (0 with a graph when there are none)."""
        known = targets != _IGNORE
        if not known.any():
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits[known], targets[known])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """BCE of the batch's valid, labelled (sample, disease) pairs."""
        logits, targets = self._logits_and_targets(batch)
        loss = self.bce(logits, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def _evaluation_step(self, stage: str, batch: dict) -> None:
        logits, targets = self._logits_and_targets(batch)
        self.log(f"{stage}/loss", self.bce(logits, targets), batch_size=logits.shape[0])
        self._epoch.append((torch.sigmoid(logits.detach().float()).cpu(), targets.cpu()))

    def on_validation_epoch_start(self) -> None:
        """Forget the previous epoch's scores."""
        self._epoch = []

    on_test_epoch_start = on_validation_epoch_start

    def disease_auroc(self) -> dict[str, torch.Tensor]:
        """AUROC of each disease with known positives and negatives in the epoch (one process)."""
        if not self._epoch:
            return {}
        scores, targets = (torch.cat(parts) for parts in zip(*self._epoch, strict=True))
        values = {}
        for k, key in enumerate(self._disease_keys):
            known = targets[:, k] != _IGNORE
            truth = targets[known, k].long()
            if truth.numel() and 0 < int(truth.sum()) < truth.numel():
                values[key] = binary_auroc(scores[known, k], truth)
        return values

    def _log_auroc(self, stage: str) -> None:
        values = self.disease_auroc()
        self._epoch = []
        if self.trainer.sanity_checking:
            return
        for key, value in values.items():
            self.log(f"{stage}/auroc/{key}", value)
        nan = torch.tensor(float("nan"))
        macro = torch.stack(list(values.values())).mean() if values else nan
        self.log(f"{stage}/auroc_macro", macro, prog_bar=True)
