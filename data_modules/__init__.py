"""Datasets and LightningDataModules over the preprocessing cache.

The dataset and collate function are plain PyTorch, used by evaluation too; the LightningDataModule
is imported on first use, so ``fvlm.evaluation`` never loads Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .collate import BATCH_KEYS, collate_studies
from .study_dataset import CachedStudyDataset

if TYPE_CHECKING:
    from .ct_report import CTReportDataModule

__all__ = ["BATCH_KEYS", "CTReportDataModule", "CachedStudyDataset", "collate_studies"]


def __getattr__(name: str) -> object:
    if name == "CTReportDataModule":
        from .ct_report import CTReportDataModule

        return CTReportDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
