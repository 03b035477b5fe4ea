"""``CTReportDataModule``: the preprocessing cache as train/val/test loaders of CT crops + texts."""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.crop_validity import check_crop_validity
from fvlm.models.text import MINILM, resolve_text_model
from fvlm.preprocess.cache import StudyCache

from .collate import collate_studies
from .study_dataset import CachedStudyDataset

__all__ = [
    "CTReportDataModule",
    "CropCheck",
    "EpochSampler",
    "LazyLoader",
    "SeededItems",
    "Split",
    "stream_seed",
]

Split = Literal["train", "val", "test"]
#: What ``fit`` does about disease-carrying anatomies the training crop rarely holds whole.
CropCheck = Literal["warn", "strict", "off"]


def stream_seed(seed: int, stream: int) -> int:
    """The sampler seed of training stream ``stream``: ``seed`` itself for stream 0.

    Co-teaching's second network iterates the data in its own order with its own crops and flips
    (Sec. 3.3). Its seed is drawn from ``(seed, stream)`` rather than ``seed + stream``, so that two
    runs with neighbouring seeds (an ablation's two seeds per row) share no stream.
    """
    if stream == 0:
        return int(seed)
    return int(np.random.SeedSequence((int(seed), int(stream))).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """Order and per-study augmentation seeds as functions of ``(seed, epoch, index)`` only.

    A resumed run must see the batches and crops an uninterrupted one would have seen: Lightning
    calls :meth:`set_epoch` before every epoch (also right after loading a checkpoint), while a
    generator- or worker-seeded loader would restart from its first epoch. Each index is yielded
    with the seed of its random crop/flip, so augmentation no longer depends on the number of
    workers either. Iterated without :meth:`set_epoch` (plain loops), it advances one epoch per
    pass so every pass still draws fresh orders and crops. ``stream`` ``k > 0`` replaces ``seed``
    by :func:`stream_seed` (co-teaching's second network).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        drop_last: bool,
        stream: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
            seed=stream_seed(seed, stream), drop_last=drop_last,
        )  # fmt: skip
        self.stream = stream
        self._passes = 0
        self._epoch_given = False

    def set_epoch(self, epoch: int) -> None:
        """Pin the epoch (Lightning calls this before every training epoch)."""
        super().set_epoch(epoch)
        self._epoch_given = True

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._passes and not self._epoch_given:
            self.epoch += 1
        self._passes, self._epoch_given = self._passes + 1, False
        for index in super().__iter__():
            entropy = np.random.SeedSequence((self.seed, self.epoch, index))
            yield index, int(entropy.generate_state(1)[0])


class SeededItems(Dataset):
    """Reads ``(index, seed)`` keys: the item's crop/flip draw from a generator seeded by ``seed``.

    ``fork_rng`` keeps the caller's generator untouched, which matters without workers, where the
    dataset runs in the training process.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        """A loader batch's items, crops read into one batch tensor where the dataset can."""
        batched = getattr(self.dataset, "batched", None)
        if batched is None:
            return [self[key] for key in keys]
        with batched(len(keys)):
            return [self[key] for key in keys]


class LazyLoader(DataLoader):
    """A DataLoader whose iterator, and so its workers' index prefetch, starts at the first batch.

    Lightning creates the training iterator before its ``set_epoch`` call of a fit's first epoch
    (``estimated_stepping_batches`` even loads it before a checkpoint's loop state is restored);
    an eager iterator with workers would then have drawn the first batches for epoch 0.
    """

    def __iter__(self) -> Iterator:
        yield from super().__iter__()


class CTReportDataModule(LightningDataModule):
    """Loaders over a preprocessing cache (``fvlm preprocess``) for fine-grained and global CLIP.

    Training batches use the paper's anatomy-aware random crop and random flip (A.2); validation
    and test batches use the centred crop without flip (see :class:`CachedStudyDataset`). Texts are
    tokenised in the workers and padded per batch to the longest text. Batches follow
    ``docs/architecture.md`` ("Batches").

    The anatomy table is loaded at construction, so :attr:`num_anatomies`, :attr:`anatomy_names`
    and :attr:`tokenizer_path` can be linked to the model by LightningCLI
    (``parser.link_arguments("data.num_anatomies", ..., apply_on="instantiate")``).

    Args:
        cache_dir: The preprocessing cache: ``manifest.csv`` (``study_id, split, status``) and
            ``studies/<id>/``. Only studies with status ``ok`` are used.
        anatomy_table: Preset name (``paper``, ``chest``) or YAML path; must be the table the
            cache was written with, since it fixes what the anatomy ids mean.
        tokenizer: The text model whose tokenizer to use: ``"minilm"`` for the offline
            all-MiniLM-L6-v2 package, else a local path or hub name (see
            :func:`fvlm.models.text.resolve_text_model`). The CLI links it to the model's
            ``text_model``, so texts are tokenised with the encoder's own vocabulary.
        crop_size: Crop ``(d, h, w)`` in cache voxels (paper: 96 x 256 x 384 at 5 x 1 x 1 mm).
        batch_size: Training batch size per device.
        eval_batch_size: Validation/test batch size per device; ``None`` uses ``batch_size``.
        num_workers: Loader worker processes (0 loads in the training process). Workers persist
            across epochs so the per-worker tokenizer is built once. With several training
            streams each stream's loader gets ``ceil(num_workers / train_streams)`` of them.
        max_text_length: Token limit of one anatomy text; the paper's texts are short, and
            padding is dynamic, so this only bounds outliers.
        report_max_length: Token limit of the whole report (global CLIP), at most the text
            encoder's position limit (512 for BERT).
        flip: Random flip in training (paper A.2 RandomFlip).
        flip_axes: Axes flipped at random when ``flip``: 0 inferior-superior, 1 posterior-anterior,
            2 left-right. The default mirrors left-right only, which keeps the body upright;
            laterality words in reports then refer to the mirrored side. The paper's RandomFlip
            as the authors' release draws it is ``flip_axes: [0, 1, 2]`` with ``flip_prob: 0.2``
            (the paper configs ``configs/fvlm.yaml`` and ``configs/ctrate.yaml`` set both).
        flip_prob: Probability that each axis of ``flip_axes`` is flipped, independently per axis
            (default 0.5: a left-right mirror every other sample).
        seed: Seeds the training order and every study's crop/flip as functions of
            ``(seed, epoch, index)`` (see :class:`EpochSampler`), so two co-teaching networks given
            different seeds see different orders and augmentations, the number of workers changes
            nothing, and a run resumed from a checkpoint repeats the uninterrupted run exactly.
            Under DDP each rank takes its own shard of that order. With :attr:`train_streams`
            ``> 1`` stream ``k`` uses :func:`stream_seed` ``(seed, k)``.
        pin_memory: Pin host memory for faster copies to the GPU; ``None`` pins when CUDA is
            available.
        train_split: ``split`` value of training studies in the cache manifest.
        val_split: ``split`` value of validation studies (``valid`` for CT-RATE-style caches).
        test_split: ``split`` value of test studies.
        labels: Optional CSV of per-study disease labels (``study_id`` + disease-key columns,
            0/1, empty = unknown; e.g. the phantom's ``labels.csv``). With it, validation and
            test log zero-shot AUROC (``val/auroc_macro``) for checkpoint selection.
        crop_check: At ``fit`` setup, simulate anatomy-aware crops of ``crop_size`` on the
            training split's bounding boxes (``meta.json`` only; see ``fvlm crop-report``), log
            the crop validity table and, for each disease-carrying anatomy valid in under 20 % of
            the crops where it is complete (its diseases would rarely enter the loss), ``warn``
            naming it and the smallest crop holding it in 95 % of the studies; ``strict`` raises
            a ``ValueError`` instead; ``off`` skips the check.
        skip_unreadable: A study whose cache files cannot be read is skipped with a warning
            naming it (the next readable study takes its place) instead of stopping the epoch;
            ``fvlm verify-cache`` lists such studies beforehand.
    """

    def __init__(
        self,
        cache_dir: str,
        anatomy_table: str = "paper",
        tokenizer: str = MINILM,
        crop_size: tuple[int, int, int] = (96, 256, 384),
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        max_text_length: int = 128,
        report_max_length: int = 512,
        flip: bool = True,
        flip_axes: tuple[int, ...] = (2,),
        flip_prob: float = 0.5,
        seed: int = 0,
        pin_memory: bool | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        labels: str | None = None,
        crop_check: CropCheck = "warn",
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        if len(crop_size) != 3 or any(int(c) < 1 for c in crop_size):
            raise ValueError(f"crop_size must be 3 positive integers, got {crop_size!r}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if batch_size == 1:
            raise ValueError(
                "batch_size must be >= 2 per device: a contrastive loss over one sample has no "
                "negatives (its loss is 0 and nothing is learned)"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_text_length < 2 or report_max_length < 2:
            raise ValueError("max_text_length and report_max_length must be >= 2 (CLS + SEP)")
        if any(a not in (0, 1, 2) for a in flip_axes) or len(set(flip_axes)) != len(flip_axes):
            raise ValueError(f"flip_axes must be distinct values among 0, 1, 2, got {flip_axes}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if crop_check not in ("warn", "strict", "off"):
            raise ValueError(f"crop_check must be 'warn', 'strict' or 'off', got {crop_check!r}")
        self.save_hyperparameters()
        self.cache_dir = cache_dir
        self.table: AnatomyTable = load_anatomy_table(anatomy_table)
        self.tokenizer = tokenizer
        self.crop_size = tuple(int(c) for c in crop_size)
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.max_text_length = max_text_length
        self.report_max_length = report_max_length
        self.flip_axes = tuple(flip_axes) if flip else ()
        self.flip_prob = float(flip_prob)
        self.seed = seed
        self.train_streams = 1
        """Independent sample sets per training batch: one per co-taught network.

        :class:`~fvlm.lit_modules.CoTeachingModule` sets it to 2 in its ``setup``, before the
        training loader is built; each stream then iterates the whole split every epoch in its
        own order with its own crops and flips, and a training batch is a list of one batch per
        stream.
        """
        self.skip_unreadable = skip_unreadable
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.splits: dict[Split, str] = {"train": train_split, "val": val_split, "test": test_split}
        self.datasets: dict[Split, CachedStudyDataset] = {}
        self.labels = labels
        self._disease_labels: pd.DataFrame | None = None
        self.crop_check = crop_check
        self._crops_checked = False

    @property
    def num_anatomies(self) -> int:
        """Length of the anatomy axis ``A`` of ``valid``, ``normal`` and the text tensors."""
        return len(self.table)

    @property
    def anatomy_names(self) -> list[str]:
        """Anatomy names in the order of the anatomy axis."""
        return self.table.names

    @property
    def hu_window(self) -> tuple[float, float] | None:
        """The HU window the cache maps to [0, 1], read from the cache (linked to the model)."""
        return StudyCache(self.cache_dir).hu_window()

    @property
    def disease_labels(self) -> pd.DataFrame | None:
        """The ``labels`` CSV indexed by study id (``None`` without one); read once."""
        if self.labels is not None and self._disease_labels is None:
            frame = pd.read_csv(self.labels, dtype={"study_id": str})
            if "study_id" not in frame.columns:
                raise ValueError(f"{self.labels}: no 'study_id' column")
            self._disease_labels = frame.set_index("study_id")
        return self._disease_labels

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer's resolved path or hub name (link it to the text encoder)."""
        return resolve_text_model(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs from the cache manifest's ``split`` column.

        ``fit`` builds train and val, ``validate`` val, ``test`` and ``predict`` test; ``None``
        builds all three. Fitting with no ``ok`` training study raises a ``ValueError`` that
        lists what the manifest holds.
        """
        wanted: dict[str | None, tuple[Split, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
            None: ("train", "val", "test"),
        }
        if stage not in wanted:
            raise ValueError(f"unknown stage {stage!r}")
        for split in wanted[stage]:
            if split not in self.datasets:
                self.datasets[split] = self._build_dataset(split)
        if stage == "fit" and len(self.datasets["train"]) == 0:
            rows = StudyCache(self.cache_dir).read_manifest()
            counts = Counter((row.split, row.status) for row in rows)
            raise ValueError(
                f"cache {self.cache_dir!r} has no 'ok' study in split {self.splits['train']!r}; "
                f"(split, status) counts: {dict(counts)}"
            )
        if stage == "fit":
            self._check_crops()

    def _check_crops(self) -> None:
        """Log the training split's crop validity table; warn (or raise) per ``crop_check``."""
        if self.crop_check == "off" or self._crops_checked:
            return
        check = check_crop_validity(
            self.cache_dir,
            self.crop_size,
            self.table,
            split=self.splits["train"],
            seed=self.seed,
            strict=self.crop_check == "strict",
        )
        self._crops_checked = True
        rank_zero_info(check.format())
        for line in check.warnings:
            rank_zero_warn(f"crop check: {line}")

    def _build_dataset(self, split: Split) -> CachedStudyDataset:
        return CachedStudyDataset(
            cache_dir=self.cache_dir,
            split=self.splits[split],
            table=self.table,
            crop_size=self.crop_size,
            train=split == "train",
            tokenizer=self.tokenizer,
            max_text_length=self.max_text_length,
            report_max_length=self.report_max_length,
            flip_axes=self.flip_axes,
            flip_prob=self.flip_prob,
            skip_unreadable=self.skip_unreadable,
        )

    def _dataloader_factory(self, split: Split, stream: int = 0) -> DataLoader:
        """One loader recipe for every split; training draws order and crops from seed and epoch.

        The training loader drops an incomplete last batch once a full batch exists: a
        contrastive loss over a batch of one has no negatives. Its :class:`EpochSampler` is a
        ``DistributedSampler`` (one replica without DDP), so Lightning neither replaces it under
        DDP nor forgets its ``set_epoch`` call. ``stream`` picks the training stream's seed.
        """
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        dataset = self.datasets[split]
        train = split == "train"
        batch_size = self.batch_size if train else self.eval_batch_size
        num_workers = self.num_workers
        if train and self.train_streams > 1:
            num_workers = -(-num_workers // self.train_streams)
        if num_workers > 0:
            # Forked workers inherit the parent's tokenizer; its thread pool must not be live.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        drop_last = train and len(dataset) >= batch_size
        sampler = None
        if train:
            trainer = self.trainer
            distributed = trainer is not None and trainer.world_size > 1
            sampler = EpochSampler(
                dataset,
                num_replicas=trainer.world_size if distributed else 1,
                rank=trainer.global_rank if distributed else 0,
                seed=self.seed,
                drop_last=drop_last,
                stream=stream,
            )
        return (LazyLoader if train else DataLoader)(
            SeededItems(dataset) if train else dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            # Crops stay float16 and unpadded: the LightningModule finishes them on the device;
            # training on the CPU has no device to hand them to, so the workers finish them.
            collate_fn=functools.partial(
                collate_studies, pad_token_id=dataset.pad_token_id, finish=self._finish_in_workers
            ),
            pin_memory=self.pin_memory,
            persistent_workers=num_workers > 0,
        )

    @property
    def _finish_in_workers(self) -> bool:
        """Whether crops are converted and padded in the loader (a trainer on the CPU)."""
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return device is not None and device.type == "cpu"

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Shuffled, anatomy-aware random crops with flips; one loader per training stream.

        Several streams are zipped by Lightning's ``CombinedLoader`` (equal lengths), whose
        batch is the list of the streams' batches; Lightning sets every stream's sampler epoch.
        """
        if self.train_streams == 1:
            return self._dataloader_factory("train")
        streams = [self._dataloader_factory("train", k) for k in range(self.train_streams)]
        return CombinedLoader(streams, mode="min_size")

    def val_dataloader(self) -> DataLoader:
        """Ordered, centre-cropped validation studies."""
        return self._dataloader_factory("val")

    def test_dataloader(self) -> DataLoader:
        """Ordered, centre-cropped test studies."""
        return self._dataloader_factory("test")
