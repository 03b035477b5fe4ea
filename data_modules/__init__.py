"""Datasets and LightningDataModules over the preprocessing cache."""

from .collate import BATCH_KEYS, collate_studies
from .ct_report import CTReportDataModule
from .study_dataset import CachedStudyDataset

__all__ = ["BATCH_KEYS", "CTReportDataModule", "CachedStudyDataset", "collate_studies"]
