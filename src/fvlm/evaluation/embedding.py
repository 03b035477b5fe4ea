"""Study embeddings of a trained network over a preprocessing cache, from crops training could see.

Training embeds an anatomy only from a crop of the training size that holds it whole, with the
position embeddings of that crop (paper Sec. 3.2, A.2). Evaluation does the same: each scan gets
the few crops of :func:`~fvlm.evaluation.crop_plan.plan_crops` that together hold every complete
anatomy whole, the network runs on those crops (batched across studies, each read from the
cache's memory maps and padded where it overruns the volume, exactly as a training sample is),
and each anatomy's embedding is taken from its assigned crop. Anatomies absent, truncated by the
field of view or larger than the crop are flagged (:mod:`~fvlm.evaluation.evaluability`).

The CLIP baseline has no anatomies: its study embedding is the renormalised mean of its unit
embeddings over crops tiling the whole scan (:func:`~fvlm.evaluation.crop_plan.tile_crops`).
Why: CLIP was trained on crops of this size paired with the whole report, so one crop's
embedding describes that crop; the report describes the whole scan, and the mean over crops that
hold every voxel is the crop-size analogue of the whole-scan direction fVLM's whole-scan diseases
use (the mean of its anatomy embeddings). It needs no anatomy masks, as CLIP never did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fvlm.anatomy import AnatomyTable
from fvlm.checkpoint import TrainedNetwork
from fvlm.data_modules.collate import CROP_EXTENT, finish_crops
from fvlm.data_modules.study_dataset import CachedStudyDataset
from fvlm.evaluation.crop_plan import CropPlan, plan_crops, tile_crops
from fvlm.evaluation.evaluability import AnatomyStatus, anatomy_status
from fvlm.models import GlobalCLIP
from fvlm.models.intensity_windows import check_source_window
from fvlm.preprocess.cache import CacheError, StudyCache

__all__ = ["CropRule", "PlannedCrops", "StudyEmbeddings", "embed_studies", "network_device"]

CropRule = Literal["plan", "tile"]


@dataclass(frozen=True)
class StudyEmbeddings:
    """A split's embeddings and how they were obtained.

    Attributes:
        embeddings: ``(S, A, E)`` anatomy embeddings (``(S, 1, E)`` for CLIP); rows of anatomies
            that are not evaluable are zero.
        valid: ``(S, A)`` bool, the anatomy was embedded (status whole or larger than crop);
            ``(S, 1)`` all true for CLIP.
        status: ``(S, A)`` int8 :class:`~fvlm.evaluation.evaluability.AnatomyStatus`.
        forward_passes: ``(S,)`` crops the network ran on per study.
        study_ids: Row labels.
        crop_size: The training crop ``(d, h, w)`` every forward pass used.
        crop_rule: ``plan`` (fVLM, :func:`plan_crops`) or ``tile`` (CLIP, :func:`tile_crops`).
    """

    embeddings: torch.Tensor
    valid: torch.Tensor
    status: np.ndarray
    forward_passes: np.ndarray
    study_ids: list[str]
    crop_size: tuple[int, int, int]
    crop_rule: CropRule

    def forward_pass_summary(self) -> dict[str, object]:
        """Forward passes per study (mean, max, total), the crop and the crop rule, for reports."""
        passes = self.forward_passes
        return {
            "mean": float(passes.mean()) if passes.size else 0.0,
            "max": int(passes.max()) if passes.size else 0,
            "total": int(passes.sum()),
            "studies": len(passes),
            "crop_size": list(self.crop_size),
            "crop_rule": self.crop_rule,
        }


def network_device(trained: TrainedNetwork) -> torch.device:
    """The device the network's weights were loaded to."""
    return next(trained.network.parameters()).device


class PlannedCrops(Dataset):
    """Every planned crop of a split's studies, one item per crop, in study order.

    Planning reads only ``meta.json`` (boxes and field-of-view truncation); an item then reads its
    crop alone from the memory maps through :meth:`CachedStudyDataset.read_crop`, the reader of
    training samples. No text is read or tokenised.

    Args:
        cache_dir: The preprocessing cache.
        split: The cache split.
        table: The anatomy table of the cache.
        crop_size: The network's training crop ``(d, h, w)``.
        rule: ``plan`` (anatomy crops) or ``tile`` (crops tiling the scan).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: str,
        table: AnatomyTable,
        crop_size: tuple[int, int, int],
        rule: CropRule = "plan",
    ) -> None:
        self.studies = CachedStudyDataset(cache_dir, split, table, crop_size, train=False)
        self.rule = rule
        cache = self.studies.cache
        if not self.studies.study_ids:
            raise ValueError(f"no study with status ok and split {split!r} in {cache_dir}")
        self.plans: list[CropPlan] = []
        status, starts, owner = [], [], []
        for s, study_id in enumerate(self.studies.study_ids):
            meta = cache.study_meta(study_id)
            if "shape" not in meta:
                raise CacheError(f"study {study_id!r}: meta.json has no 'shape'")
            shape = [int(n) for n in meta["shape"]]
            bboxes = cache.bboxes(meta, table, study_id)
            truncated = cache.truncated(meta, table, study_id)
            plan = plan_crops(shape, crop_size, bboxes, ~truncated)
            self.plans.append(plan)
            status.append(anatomy_status(plan, bboxes, truncated))
            crops = plan.starts if rule == "plan" else tile_crops(shape, crop_size)
            starts.append(crops)
            owner += [s] * len(crops)
        self.status = np.stack(status)
        self.starts = np.concatenate(starts).reshape(-1, 3)
        self.study_of = np.asarray(owner, dtype=np.int64)
        # served[k, a]: crop k embeds anatomy a (its crop in the plan).
        self.served = np.zeros((len(self.starts), len(table)), dtype=bool)
        if rule == "plan":
            first = np.concatenate([[0], np.cumsum([len(p.starts) for p in self.plans])])
            for s, plan in enumerate(self.plans):
                assigned = np.flatnonzero(plan.crop_of >= 0)
                self.served[first[s] + plan.crop_of[assigned], assigned] = True
        self._open: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def study_ids(self) -> list[str]:
        """The split's ``ok`` studies in manifest order."""
        return self.studies.study_ids

    def forward_passes(self) -> np.ndarray:
        """``(S,)`` crops per study."""
        return np.bincount(self.study_of, minlength=len(self.study_ids))

    def __len__(self) -> int:
        return len(self.starts)

    def __getstate__(self) -> dict[str, Any]:
        """Drop open memory maps when pickled for worker processes."""
        return self.__dict__ | {"_open": None}

    def _arrays(self, study_id: str) -> tuple[np.ndarray, np.ndarray]:
        # Crops of one study are consecutive: keep its memory maps open between them.
        if self._open is None or self._open[0] != study_id:
            self._open = (study_id, self.studies.cache.open_arrays(study_id))
        return self._open[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        study_id = self.study_ids[int(self.study_of[index])]
        image, anatomy, extent = self.studies.read_crop(*self._arrays(study_id), self.starts[index])
        return {
            "image": torch.from_numpy(image).unsqueeze(0),
            "anatomy": torch.from_numpy(anatomy),
            CROP_EXTENT: torch.from_numpy(extent),
            "index": index,
        }


@torch.no_grad()
def embed_studies(
    trained: TrainedNetwork,
    cache_dir: Path,
    split: str,
    table: AnatomyTable,
    batch_size: int = 4,
    num_workers: int = 0,
    progress: bool = True,
) -> StudyEmbeddings:
    """Embed every ``ok`` study of ``split`` from crops of the network's training size.

    Args:
        trained: The network (fVLM or CLIP).
        cache_dir: The preprocessing cache.
        split: The cache split.
        table: The anatomy table the network was trained with.
        batch_size: Crops per forward pass (crops of several studies share a batch).
        num_workers: DataLoader worker processes reading crops.
        progress: Show a progress bar.

    Raises:
        CacheError: A planned crop holds no voxel of the anatomy ``meta.json`` places in it.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}"
        )
    network, device = trained.network, network_device(trained)
    check_source_window(
        network.vision.config.source_hu_window, StudyCache(cache_dir).hu_window(), cache_dir
    )
    crop_size = tuple(int(c) for c in network.vision.config.img_size)
    is_clip = isinstance(network, GlobalCLIP)
    crops = PlannedCrops(cache_dir, split, table, crop_size, rule="tile" if is_clip else "plan")
    n_studies, width = len(crops.study_ids), network.text.proj.out_features
    # CLIP: sum of unit crop embeddings per study; fVLM: each anatomy's row from its crop.
    sums = torch.zeros((n_studies, width) if is_clip else (n_studies, len(table), width))
    loader = DataLoader(crops, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    for batch in tqdm(loader, desc=f"embed {split}", unit="batch", disable=not progress):
        # Converted to float32 and padded on the device, as training batches are.
        moved = {k: batch[k].to(device) for k in ("image", "anatomy", CROP_EXTENT)}
        finished = finish_crops(moved)
        image, index = finished["image"], batch["index"].numpy()
        owner = torch.as_tensor(crops.study_of[index])
        if is_clip:
            emb = F.normalize(network.encode_image(image)[:, 0].float(), dim=-1).cpu()
            sums.index_add_(0, owner, emb)
            continue
        emb, seen = network.encode_image_with_presence(image, finished["anatomy"])
        emb, served = emb.float().cpu(), torch.as_tensor(crops.served[index])
        missing = served & ~seen.cpu()
        if missing.any():
            row, a = (int(i[0]) for i in torch.nonzero(missing, as_tuple=True))
            study_id = crops.study_ids[int(owner[row])]
            raise CacheError(
                f"study {study_id!r}: meta.json places {table.names[a]!r} in evaluation crop "
                f"{crops.starts[index[row]].tolist()}, but anatomy.npy has no voxel of it there"
            )
        rows, anatomies = torch.nonzero(served, as_tuple=True)
        sums[owner[rows], anatomies] = emb[rows, anatomies]
    passes = crops.forward_passes()
    if is_clip:
        embeddings = F.normalize(sums, dim=-1).unsqueeze(1)
        valid = torch.ones(n_studies, 1, dtype=torch.bool)
    else:
        status = torch.as_tensor(crops.status)
        valid = (status == AnatomyStatus.WHOLE) | (status == AnatomyStatus.LARGER_THAN_CROP)
        embeddings = sums
    return StudyEmbeddings(
        embeddings=embeddings,
        valid=valid,
        status=crops.status,
        forward_passes=passes,
        study_ids=list(crops.study_ids),
        crop_size=crop_size,  # type: ignore[arg-type]
        crop_rule=crops.rule,
    )
