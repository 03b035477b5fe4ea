"""Zero-shot AUROC during training, so checkpoints can be chosen on what the model is for.

Each validation (or test) batch is scored with :func:`fvlm.evaluation.zero_shot_scores`, the same
prompts and rule as ``fvlm evaluate``, on the embeddings the step computed anyway (the centre
crop); torchmetrics accumulates the scores over the epoch and across DDP ranks. The prompt
embeddings are encoded once per epoch (the weights change only between epochs).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn
from torchmetrics.classification import MultilabelAUROC, MultilabelStatScores
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from fvlm.anatomy import AnatomyTable
from fvlm.evaluation import zero_shot_scores
from fvlm.models import FineGrainedOutput, load_tokenizer

__all__ = ["ZeroShotAUROC"]

_IGNORE = -1  # target of a study whose label is unknown or that has no embedding to score


class ZeroShotAUROC(nn.Module):
    """Per-disease and macro zero-shot AUROC over an epoch of batches.

    Args:
        table: The anatomy table of the data (disease keys and prompts).
        labels: Per-study disease labels (0/1, NaN unknown), indexed by study id; only the
            table's diseases with a column here are scored.
        text_model: The tokenizer's model name (the network's own vocabulary).
        mode: ``fine`` (anatomy embeddings) or ``global`` (CLIP baseline).
    """

    def __init__(
        self, table: AnatomyTable, labels: pd.DataFrame, text_model: str, mode: str
    ) -> None:
        super().__init__()
        self.table = table
        self.diseases = [d for d in table.diseases() if d.key in labels.columns]
        if not self.diseases:
            raise ValueError(
                f"no disease of table {table.name!r} has a column in the labels "
                f"(columns: {list(labels.columns)[:8]})"
            )
        self.keys = [d.key for d in self.diseases]
        self.labels = labels[self.keys]
        self.tokenizer = load_tokenizer(text_model)
        self.mode = mode
        count = len(self.keys)
        self.auroc = MultilabelAUROC(count, average=None, ignore_index=_IGNORE)
        # Only the support counts are used: a disease needs positives and negatives to be scored.
        self.counts = MultilabelStatScores(count, average=None, ignore_index=_IGNORE)
        self._prompts: dict[str, torch.Tensor] = {}

    def start_epoch(self) -> None:
        """Forget the prompt embeddings of the previous weights."""
        self._prompts.clear()

    def _targets(self, study_ids: Sequence[str], scores: torch.Tensor) -> torch.Tensor:
        truth = torch.as_tensor(
            self.labels.reindex([str(s) for s in study_ids]).to_numpy(dtype=float)
        )
        known = torch.isfinite(truth) & torch.isfinite(scores)
        return torch.where(known, truth, float(_IGNORE)).long()

    @torch.no_grad()
    def update(self, network: nn.Module, out: FineGrainedOutput, study_ids: Sequence[str]) -> None:
        """Score one batch's embeddings and add them to the epoch's metric state."""
        device = out.image_emb.device

        def encode(texts: list[str]) -> torch.Tensor:
            missing = [t for t in texts if t not in self._prompts]
            if missing:
                tokens = self.tokenizer(missing, padding=True, truncation=True, return_tensors="pt")
                encoded = network.encode_text(
                    tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
                )
                self._prompts.update(zip(missing, encoded, strict=True))
            return torch.stack([self._prompts[t] for t in texts])

        frame = zero_shot_scores(
            out.image_emb, out.valid, encode, out.logit_scale, self.table, self.diseases,
            mode=self.mode, output="logit",
        )  # fmt: skip
        scores = torch.tensor(frame[self.keys].to_numpy(dtype="float32"))
        target = self._targets(study_ids, scores)
        scores, target = scores.nan_to_num(0.0).to(device), target.to(device)
        self.auroc.update(scores, target)
        self.counts.update(scores, target)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{disease key: AUROC}`` of diseases with both classes seen, plus ``macro``; resets."""
        stats = self.counts.compute()  # (K, 5): tp, fp, tn, fn, support
        positives, negatives = stats[:, 0] + stats[:, 3], stats[:, 1] + stats[:, 2]
        scored = (positives > 0) & (negatives > 0)
        # Per disease on the (rank-synced) scores: a disease whose every study was ignored (e.g.
        # its anatomy cut by every centre crop of a short sanity check) has nothing to score.
        with self.auroc.sync_context():
            scores = dim_zero_cat(self.auroc.preds) if self.auroc.preds else None
            target = dim_zero_cat(self.auroc.target) if self.auroc.target else None
        self.auroc.reset()
        self.counts.reset()
        result = {}
        for i, key in enumerate(self.keys):
            if scored[i]:
                keep = target[:, i] != _IGNORE
                result[key] = binary_auroc(scores[keep, i], target[keep, i])
        macro = (
            torch.stack(list(result.values())).mean()
            if result
            else stats.new_tensor(float("nan"), dtype=torch.float32)
        )
        return result | {"macro": macro}
