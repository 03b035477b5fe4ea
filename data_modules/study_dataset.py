"""A map-style dataset over the preprocessing cache: crop, flip and tokenise one study per item.

The cache (:class:`~fvlm.preprocess.cache.StudyCache`, documented in ``docs/architecture.md``,
"Preprocessing cache") holds each study as memory-mappable ``.npy`` arrays plus two small JSON
files. A sample decides its crop from the per-anatomy bounding boxes in ``meta.json`` first, then
reads only the crop's pages of ``image.npy`` and ``anatomy.npy``, so loading cost scales with the
crop, not with the scan. Tokenisation happens here, i.e. in the loader's worker processes, so the
training process never waits on it.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fvlm.anatomy import AnatomyTable
from fvlm.crop import (
    anatomy_aware_crop_box,
    center_crop_start,
    crop_valid,
    draw_flip_axes,
)
from fvlm.models.text import MINILM, load_tokenizer
from fvlm.preprocess.cache import CacheError, StudyCache

from .collate import CROP_EXTENT
from .crop_read import read_crop_window

__all__ = ["CachedStudyDataset", "cache_hu_window", "read_cache_manifest", "whole_report_text"]


def read_cache_manifest(cache_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``<cache>/manifest.csv`` as dicts (use :meth:`StudyCache.read_manifest`)."""
    return [row._asdict() for row in StudyCache(cache_dir).read_manifest()]


def cache_hu_window(cache_dir: str | Path) -> tuple[float, float] | None:
    """The HU window the cache mapped to [0, 1] (use :meth:`StudyCache.hu_window`)."""
    return StudyCache(cache_dir).hu_window()


def whole_report_text(report: dict[str, Any]) -> str:
    """Findings then impression of ``report.json``: the text global CLIP pairs with the scan."""
    return " ".join(
        part.strip() for part in (report.get("findings"), report.get("impression")) if part
    )


class _CropBatch:
    """The image and anatomy tensors of one loader batch, filled row by row by the samples.

    Allocated at the first sample (the cache's image dtype is known then), in shared memory
    inside a loader worker, so the batch crosses to the training process without a copy.
    """

    def __init__(self, size: int, crop: tuple[int, ...]) -> None:
        self.size, self.crop, self.taken = size, crop, 0
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def next_rows(self, dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows ``(1, d, h, w)`` and ``(d, h, w)`` for the next sample (``None``: read alone)."""
        image_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        if self.tensors is None:
            shared = get_worker_info() is not None
            self.tensors = tuple(
                _empty((self.size, *shape), kind, shared)
                for shape, kind in (((1, *self.crop), image_dtype), (self.crop, torch.uint8))
            )
        if self.taken >= self.size or self.tensors[0].dtype != image_dtype:
            return None
        return self.tensors[0][self.taken], self.tensors[1][self.taken]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, its storage in shared memory when ``shared`` (no copy later).

    Otherwise the storage is an anonymous mapping advised to use transparent huge pages where
    the kernel offers them: a fresh batch is written once, and faulting in its 4 KiB pages one by
    one cost more CPU than reading the crops (10 against 1.8 ms per chest crop, measured).
    """
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if shared:  # a root tensor over the storage: collate_studies recognises its rows
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    if nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    with warnings.catch_warnings():  # a writable buffer, shared on purpose
        warnings.simplefilter("ignore", UserWarning)
        storage = torch.frombuffer(memory, dtype=torch.uint8).untyped_storage()  # keeps memory
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class CachedStudyDataset(Dataset):
    """Studies of one split of the cache, as fixed-size crops with their per-anatomy texts.

    Train mode draws the paper's anatomy-aware random crop (A.2: an anatomy chosen uniformly among
    those present is wholly inside the crop) and a random flip. Eval mode takes the deterministic
    centre crop with no flip, padding axes where the volume is smaller than the crop, so every
    epoch scores the same voxels. In both modes an anatomy is ``valid`` only if it is present,
    not truncated by the scan's field of view (``meta.json``) and wholly inside the crop (Sec. 3.2:
    truncated anatomies are left out of the loss). An anatomy the field of view truncates is
    therefore never drawn as the crop's anchor either: it could not become valid.

    Randomness comes from torch's per-process generator (one seed drawn per item), which the
    DataLoader seeds per worker from its own ``generator``; runs are thus reproducible given the
    loader's generator (workers) or ``seed_everything`` (no workers), and differ between epochs.

    A sample is a dict with:
        ``image`` ``(1, d, h, w)`` in the cache's dtype (float16); ``anatomy`` uint8 ``(d, h, w)``
        holding ``a + 1`` for anatomy table index ``a`` and 0 for background (for the bundled
        presets this equals the table id); ``crop_extent`` int64 ``(3, 2)``, the window of both
        that holds volume voxels: outside it they are undefined until
        :func:`~fvlm.data_modules.collate.finish_crops` converts the image to float32 and pads
        both with 0, on the device (:func:`~fvlm.data_modules.collate.collate_studies` does it
        by default); ``valid``, ``normal`` bool ``(A,)``; ``text_input_ids``,
        ``text_attention_mask`` long ``(A, L)`` (padded to the sample's longest text);
        ``report_input_ids``, ``report_attention_mask`` long ``(L,)`` (findings then impression);
        ``study_id`` str.

    Args:
        cache_dir: The preprocessing cache (``manifest.csv`` and ``studies/``).
        split: Value of the manifest's ``split`` column to serve; ``None`` serves every split.
        table: The anatomy table the cache was written with (fixes the anatomy axis order).
        crop_size: Crop ``(d, h, w)`` in voxels of the cache grid (paper: 96, 256, 384).
        train: Random anatomy-aware crop and flip if true, centre crop otherwise.
        tokenizer: ``"minilm"`` (offline default) or a path / hub name for ``AutoTokenizer``.
        max_text_length: Token limit of one anatomy text (longer ones are truncated).
        report_max_length: Token limit of the whole report (global CLIP).
        flip_axes: Axes flipped at random in train mode (see :func:`fvlm.crop.random_flip`);
            ``()`` disables flipping.
        flip_prob: Probability of flipping each axis of ``flip_axes``.
        skip_unreadable: A study whose cache files cannot be read (truncated, deleted, bad JSON)
            is skipped with a warning naming it, and the next study of the split is served in
            its place, instead of the error (which also names it) ending the epoch.
            ``fvlm verify-cache`` lists such studies; ``fvlm preprocess`` redoes them.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: str | None,
        table: AnatomyTable,
        crop_size: Sequence[int],
        train: bool,
        tokenizer: str = MINILM,
        max_text_length: int = 128,
        report_max_length: int = 512,
        flip_axes: Sequence[int] = (2,),
        flip_prob: float = 0.5,
        skip_unreadable: bool = False,
    ) -> None:
        crop = tuple(int(c) for c in crop_size)
        if len(crop) != 3 or min(crop) < 1:
            raise ValueError(f"crop_size must be 3 positive integers, got {crop_size!r}")
        if max_text_length < 2 or report_max_length < 2:
            raise ValueError("max_text_length and report_max_length must be >= 2 (CLS + SEP)")
        if any(a not in (0, 1, 2) for a in flip_axes) or not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"bad flip settings: axes {flip_axes!r}, prob {flip_prob}")
        self.cache_dir = Path(cache_dir)
        self.cache = StudyCache(self.cache_dir)
        self.split = split
        self.table = table
        self.crop_size = crop
        self.train = train
        self.tokenizer_name = tokenizer
        self.max_text_length = int(max_text_length)
        self.report_max_length = int(report_max_length)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.flip_prob = float(flip_prob)
        self.skip_unreadable = bool(skip_unreadable)
        self.unreadable: dict[str, str] = {}  # study id -> why, found so far in this process
        self.study_ids = self.cache.ok_studies(split)
        # Anatomy id (cache value) -> table index + 1; ids outside the table become background
        # (a cache of another table is caught earlier, by the anatomy names in meta.json).
        self._lut = np.zeros(256, dtype=np.uint8)
        self._lut[np.asarray(table.ids)] = np.arange(1, len(table) + 1)
        # The bundled presets number their anatomies 1..A already: skip the per-voxel lookup.
        self._lut_is_identity = table.ids == list(range(1, len(table) + 1))
        self._tokenizer: Any = None
        self._batch: _CropBatch | None = None

    def __len__(self) -> int:
        return len(self.study_ids)

    def __getstate__(self) -> dict[str, Any]:
        """Drop the tokenizer when pickled (spawned workers), so each worker builds its own."""
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        state["_batch"] = None
        return state

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, built on first use in each process (workers included)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """Padding id for :func:`~fvlm.data_modules.collate.collate_studies` (0 when undefined)."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def read_texts(self, report: dict[str, Any], study_id: str) -> tuple[list[str], np.ndarray]:
        """Per-anatomy texts and normal flags in table order from ``report.json``.

        An anatomy the report does not list gets the paper's default text and counts as normal
        (it cannot be mentioned in the impression).
        """
        entries = report.get("anatomies") or {}
        self.cache.check_names(entries, self.table, study_id, "report.json")
        texts, normal = [], np.ones(len(self.table), dtype=bool)
        for i, anatomy in enumerate(self.table.anatomies):
            entry = entries.get(anatomy.name) or {}
            text = entry.get("text")
            texts.append(text.strip() if isinstance(text, str) and text.strip() else None)
            if texts[-1] is None:
                texts[-1] = anatomy.default_text
            normal[i] = bool(entry.get("normal", True))
        return texts, normal

    def choose_crop(
        self, shape: Sequence[int], bboxes: np.ndarray, rng: np.random.Generator | None
    ) -> np.ndarray:
        """Crop start: anatomy-aware random in train mode (``rng`` given), centred otherwise."""
        if rng is None:
            return center_crop_start(shape, self.crop_size)
        start, _ = anatomy_aware_crop_box(shape, self.crop_size, bboxes, rng)
        return start

    @staticmethod
    def _item_rng() -> np.random.Generator:
        """A generator for one item, seeded from torch's per-process (per-worker) generator."""
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return np.random.default_rng(seed)

    def _tokenize(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(
            texts,
            truncation=True,
            max_length=max_length,
            padding="longest",
            return_tensors="pt",
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].long()

    def read_crop(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        start: Sequence[int],
        flip: Sequence[int] = (),
        out: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The crop at ``start`` of a study's memory maps, as a sample holds it.

        Returns the image in the cache's dtype, the anatomy map as table index + 1, and their
        window ``extent`` ``(3, 2)`` holding volume voxels; outside it both are undefined until
        :func:`~fvlm.data_modules.collate.finish_crops` pads them with 0 (the HU window's lower
        end, background) on the device. Evaluation reads its planned crops through this too, so
        it sees exactly what training saw. ``out`` holds arrays to write image and map into.
        """
        image_out, anatomy_out = out if out is not None else (None, None)
        image_crop, extent = read_crop_window(image, start, self.crop_size, flip, image_out)
        anatomy_crop, _ = read_crop_window(labels, start, self.crop_size, flip, anatomy_out)
        if not self._lut_is_identity:
            np.take(self._lut, anatomy_crop, out=anatomy_crop)
        return image_crop, anatomy_crop, extent

    @contextmanager
    def batched(self, size: int) -> Iterator[None]:
        """Within the block, the next ``size`` samples' crops are read into one batch tensor.

        Sample ``k``'s ``image`` and ``anatomy`` are then row ``k`` of two batch tensors (in
        shared memory inside a loader worker), which
        :func:`~fvlm.data_modules.collate.collate_studies` hands on as they are: no per-sample
        crop and no stacking copy (they were most of a sample's CPU time after the read).
        """
        self._batch = _CropBatch(size, self.crop_size)
        try:
            yield
        finally:
            self._batch = None

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The samples of a loader batch, their crops read into one batch tensor."""
        with self.batched(len(indices)):
            return [self[index] for index in indices]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of study ``index``; an unreadable one raises or, if skipped, the next."""
        for step in range(len(self.study_ids)):
            study_id = self.study_ids[(index + step) % len(self.study_ids)]
            try:
                return self._sample(study_id)
            except (CacheError, OSError) as err:
                why = str(err) if isinstance(err, CacheError) else f"{type(err).__name__}: {err}"
                if study_id not in why:
                    why = f"study {study_id!r}: {why}"
                if not self.skip_unreadable:
                    raise CacheError(
                        f"{why} (skip_unreadable: true skips such studies; `fvlm preprocess` "
                        "redoes them)"
                    ) from err
                if study_id not in self.unreadable:
                    self.unreadable[study_id] = why
                    warnings.warn(f"skipping unreadable {why}", RuntimeWarning, stacklevel=2)
        raise CacheError(
            f"every study of split {self.split!r} in {self.cache_dir} is unreadable, e.g. "
            f"{next(iter(self.unreadable.values()), '?')}"
        )

    def _sample(self, study_id: str) -> dict[str, Any]:
        meta = self.cache.study_meta(study_id)
        report = self.cache.study_report(study_id)
        image, labels = self.cache.open_arrays(study_id, meta)

        rng = self._item_rng() if self.train else None
        bboxes = self.cache.bboxes(meta, self.table, study_id)
        complete = ~self.cache.truncated(meta, self.table, study_id)
        # A truncated anatomy can never be valid: it is no candidate for the anatomy-aware crop.
        start = self.choose_crop(image.shape, bboxes * complete[:, None, None], rng)
        valid = crop_valid(bboxes, start, self.crop_size) & complete
        flip = draw_flip_axes(self.flip_axes, rng, self.flip_prob) if rng is not None else ()
        rows = self._batch.next_rows(image.dtype) if self._batch is not None else None
        out = None if rows is None else (rows[0][0].numpy(), rows[1].numpy())
        image_crop, anatomy_crop, extent = self.read_crop(image, labels, start, flip, out)
        # A reader that did not write into the batch's rows (a subclass) keeps its own arrays.
        in_rows = out is not None and image_crop is out[0] and anatomy_crop is out[1]

        texts, normal = self.read_texts(report, study_id)
        text_ids, text_mask = self._tokenize(texts, self.max_text_length)
        whole = whole_report_text(report)
        report_ids, report_mask = self._tokenize([whole], self.report_max_length)
        if in_rows:
            self._batch.taken += 1
        return {
            "image": rows[0] if in_rows else torch.from_numpy(image_crop).unsqueeze(0),
            "anatomy": rows[1] if in_rows else torch.from_numpy(anatomy_crop),
            "valid": torch.from_numpy(valid),
            "normal": torch.from_numpy(normal),
            "text_input_ids": text_ids,
            "text_attention_mask": text_mask,
            "report_input_ids": report_ids[0],
            "report_attention_mask": report_mask[0],
            "study_id": study_id,
            CROP_EXTENT: torch.from_numpy(extent),
        }
