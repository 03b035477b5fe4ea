"""The clinical-accuracy reader of paper A.1: a BERT-family classifier of diseases in a report.

The paper fine-tunes a text classifier on reports with known labels (0.95 F1) and reads the
generated reports with it. Here the reports with known labels are the phantom's (its
``labels.csv``): a multi-label sequence classifier (``transformers``'
``AutoModelForSequenceClassification``, ``problem_type="multi_label_classification"``) is
fine-tuned on the training split, its own precision / recall / F1 is measured on held-out
reports, and it is saved next to the run so every generator is scored by the same reader.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fvlm.models.text import MINILM, load_tokenizer, resolve_text_model

__all__ = ["ClinicalClassifier", "classifier_scores"]

_DISEASES_FILE = "diseases.json"


class ClinicalClassifier:
    """A multi-label report classifier with its tokenizer and disease names.

    Args:
        diseases: Disease keys in label-column order (e.g. ``kidney/cyst``).
        text_model: Pretrained backbone (``minilm``, path or hub name); also the tokenizer.
        config: ``BertConfig`` fields of a randomly initialised classifier (tests); the
            tokenizer still comes from ``text_model``.
        max_length: Token limit of a report (longer ones are truncated).
    """

    def __init__(
        self,
        diseases: Sequence[str],
        text_model: str = MINILM,
        config: Mapping[str, Any] | None = None,
        max_length: int = 256,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, BertConfig

        if not diseases:
            raise ValueError("the classifier needs at least one disease")
        self.diseases = list(diseases)
        self.text_model = text_model
        self.max_length = max_length
        self.tokenizer = load_tokenizer(text_model)
        labels = {"num_labels": len(self.diseases), "problem_type": "multi_label_classification"}
        if config is not None:
            self.model = AutoModelForSequenceClassification.from_config(
                BertConfig(**dict(config), **labels)
            )
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolve_text_model(text_model), **labels
            )

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=True,
            return_tensors="pt",
        )  # fmt: skip

    def fit(
        self,
        texts: Sequence[str],
        labels: torch.Tensor,
        epochs: int = 3,
        batch_size: int = 16,
        lr: float = 5e-5,
        seed: int = 0,
    ) -> list[float]:
        """Fine-tune on reports with known labels; returns the mean loss of each epoch.

        Args:
            texts: Reports (findings then impression).
            labels: ``(N, K)`` 0/1 labels, columns in :attr:`diseases` order.
            epochs: Passes over the reports.
            batch_size: Reports per step.
            lr: AdamW learning rate.
            seed: Order of the reports.
        """
        if labels.shape != (len(texts), len(self.diseases)):
            raise ValueError(
                f"labels {tuple(labels.shape)} must be ({len(texts)}, {len(self.diseases)})"
            )
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.model.train()
        history = []
        for _ in range(epochs):
            order, total = torch.randperm(len(texts), generator=generator), 0.0
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                inputs = self._encode([texts[i] for i in rows])
                loss = self.model(**inputs, labels=labels[rows].float()).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            history.append(total / len(texts))
        self.model.eval()
        return history

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """``(N, K)`` disease probabilities of each report."""
        self.model.eval()
        parts = [
            torch.sigmoid(self.model(**self._encode(texts[i : i + batch_size])).logits)
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, len(self.diseases))

    def predict(self, texts: Sequence[str], threshold: float = 0.5) -> torch.Tensor:
        """``(N, K)`` 0/1: the diseases the classifier finds in each report."""
        return (self.predict_proba(texts) >= threshold).long()

    def save(self, directory: str | Path) -> Path:
        """Write model, tokenizer and disease names to ``directory``."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        info = {"diseases": self.diseases, "max_length": self.max_length}
        (directory / _DISEASES_FILE).write_text(json.dumps(info, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ClinicalClassifier:
        """A classifier written by :meth:`save`."""
        directory = Path(directory)
        info_path = directory / _DISEASES_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{directory}: no clinical classifier here ({_DISEASES_FILE})")
        info = json.loads(info_path.read_text())
        return cls(info["diseases"], text_model=str(directory), max_length=info["max_length"])


def classifier_scores(
    predicted: torch.Tensor, truth: torch.Tensor, diseases: Sequence[str]
) -> dict[str, float]:
    """The classifier's own precision, recall and F1, per disease and macro-averaged.

    A disease without positives in ``truth`` and predictions has precision/recall/F1 of 0 in the
    per-disease values (torchmetrics' convention) and still counts in the macro mean.
    """
    from torchmetrics.functional.classification import (
        multilabel_f1_score,
        multilabel_precision,
        multilabel_recall,
    )

    k = len(diseases)
    pred, target = predicted.long(), truth.long()
    out: dict[str, float] = {}
    for name, metric in (
        ("precision", multilabel_precision),
        ("recall", multilabel_recall),
        ("f1", multilabel_f1_score),
    ):
        per = metric(pred, target, num_labels=k, average=None)
        out.update({f"{name}/{d}": float(v) for d, v in zip(diseases, per, strict=True)})
        out[f"{name}_macro"] = float(per.mean())
    return out
