"""Anatomy heatmaps (paper Fig. 11): how much each visual token of an anatomy says a finding.

Usage::

    from fvlm.checkpoint import load_network
    from fvlm.heatmap import anatomy_heatmap, save_heatmap_nifti, save_heatmap_png

    trained = load_network("runs/demo/fvlm/checkpoints/last.ckpt")
    heat = anatomy_heatmap(
        trained, "data/cache/phantom", "phantom_00007", "kidney", "kidney shows a renal cyst."
    )
    save_heatmap_nifti(heat, "out/kidney_cyst.nii.gz")  # overlays the input scan (same world mm)
    save_heatmap_png(heat, "out/kidney_cyst.png")  # axial + coronal through the hottest voxel

**What is measured.** The paper's heatmap is "the correlation between anatomy-specific visual
tokens and the textual embedding of abnormality" (A.5). A token lives in the encoder's width, not
in the joint space, so it is carried there along the path the anatomy embedding itself takes
(:class:`~fvlm.models.anatomy_pooling.AnatomyPooling`): LayerNorm, the value projection, the output
projection, added to the anatomy's query, then the anatomy's own projection and L2 norm. That
vector is the embedding the anatomy would have if its attention fell on that token alone, and the
anatomy's embedding (before its norm) is the attention-weighted mean of these vectors (exactly so
per attention head), so the heat is each token's share in the zero-shot decision, not a proxy from
another layer. The heat is its cosine similarity to the finding's text embedding (several texts:
their mean direction, CLIP's prompt ensembling), or, with ``negative`` texts, the difference of the
two similarities (the per-token zero-shot logit divided by the logit scale).

**Where.** The network sees the crop evaluation embeds the anatomy from
(:func:`~fvlm.evaluation.crop_plan.plan_crops`, read through the training reader
:meth:`~fvlm.data_modules.CachedStudyDataset.read_crop`), so the heat comes from the same forward
pass as the anatomy's zero-shot score. The token grid is upsampled trilinearly to voxels (token
centres at patch centres) and kept only inside the anatomy's mask on the cache grid: outside it
the array holds NaN (so statistics cannot mistake it for similarity 0, a real cosine value), as
it does for mask voxels outside the crop of an anatomy larger than the crop. An absent anatomy, or
one the field of view cuts, has no evaluation crop and raises :class:`AnatomyNotEvaluable`.

**Alignment with the input.** The cache grid is the input resampled onto canonical axes;
``meta.json`` records its voxel -> world (RAS mm) ``affine``, so the NIfTI is written on the cache
grid with that affine and lands on the input's world positions in any viewer that reads the
header (3D Slicer, ITK-SNAP). ``reference=`` resamples it onto the input file's own grid instead,
for tools that want identical grids. NIfTI files hold 0 outside the anatomy (viewers handle NaN
badly); the mask tells which zeros are outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib as mpl
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.checkpoint import TrainedNetwork
from fvlm.crop import crop_pad_width
from fvlm.data_modules.collate import CROP_EXTENT, finish_crops
from fvlm.data_modules.study_dataset import CachedStudyDataset
from fvlm.evaluation.crop_plan import plan_crops
from fvlm.evaluation.embedding import network_device
from fvlm.evaluation.evaluability import AnatomyStatus, anatomy_status
from fvlm.evaluation.run import text_encoder
from fvlm.models import FineGrainedCLIP
from fvlm.models.anatomy_pooling import AnatomyPooling
from fvlm.models.intensity_windows import check_source_window
from fvlm.preprocess.cache import CacheError, StudyCache

__all__ = [
    "AnatomyHeatmap",
    "AnatomyNotEvaluable",
    "anatomy_heatmap",
    "draw_slice",
    "hottest_voxel",
    "save_figure",
    "save_heatmap_nifti",
    "save_heatmap_png",
    "study_status",
    "text_direction",
    "token_embeddings",
]

Plane = Literal["axial", "coronal"]


class AnatomyNotEvaluable(ValueError):
    """The anatomy has no evaluation crop in this scan (absent, or cut by the field of view)."""


@dataclass(frozen=True)
class AnatomyHeatmap:
    """One anatomy's heat for one finding, on the study's cache grid.

    Attributes:
        heat: ``(D, H, W)`` float32; cosine similarity (or its difference to ``negative``) inside
            the anatomy's mask, NaN elsewhere.
        mask: ``(D, H, W)`` bool, the anatomy's voxels.
        image: ``(D, H, W)`` the cache image (a read-only memory map), [0, 1] over ``hu_window``.
        study_id: The study.
        anatomy: Anatomy name in the table.
        finding: Short name of what the heat scores, for titles.
        affine: Cache-grid voxel -> world (RAS mm) affine from ``meta.json`` (``None`` in caches
            written before it was recorded).
        spacing: Voxel size (mm) of the cache grid.
        hu_window: The HU range the cache image maps to [0, 1].
        crop_start: Start corner of the evaluation crop the heat comes from.
        status: The anatomy's :class:`~fvlm.evaluation.evaluability.AnatomyStatus` (whole or
            larger than the crop).
        measure: What a heat value is, for colour bars.
    """

    heat: np.ndarray
    mask: np.ndarray
    image: np.ndarray
    study_id: str
    anatomy: str
    finding: str
    affine: np.ndarray | None
    spacing: tuple[float, float, float]
    hu_window: tuple[float, float]
    crop_start: tuple[int, int, int]
    status: AnatomyStatus
    measure: str = "cosine similarity to the finding"


def token_embeddings(
    pooling: AnatomyPooling, tokens: torch.Tensor, anatomy_index: int
) -> torch.Tensor:
    """``(B, N, E)`` unit vectors: anatomy ``anatomy_index``'s embedding from each token alone.

    The value/output path of :class:`AnatomyPooling` (pre-norm, value projection, output
    projection, plus the anatomy's query, then its projection): the anatomy embedding before
    its norm is the attention-weighted mean of these vectors and of its query's own.
    """
    width = tokens.shape[-1]
    values = pooling.to_kv(pooling.norm(tokens))[..., width:]  # to_kv packs (keys, values)
    pooled = pooling.query[anatomy_index].to(tokens.dtype) + pooling.out(values)
    embedding = pooled @ pooling.proj_weight[anatomy_index] + pooling.proj_bias[anatomy_index]
    return F.normalize(embedding.float(), dim=-1)


def _texts(text: str | Sequence[str], what: str) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{what} must be a non-empty text or list of non-empty texts")
    return texts


def text_direction(trained: TrainedNetwork, text: str | Sequence[str]) -> torch.Tensor:
    """Mean direction ``(E,)`` of the texts' unit embeddings (CLIP's prompt ensembling).

    Pass the result as ``text`` / ``negative`` of :func:`anatomy_heatmap` to encode a finding
    once for many studies.
    """
    encoded = F.normalize(text_encoder(trained)(_texts(text, "text")).float(), dim=-1)
    return F.normalize(encoded.mean(0), dim=-1)


def _direction(
    trained: TrainedNetwork, text: str | Sequence[str] | torch.Tensor, width: int
) -> torch.Tensor:
    if not isinstance(text, torch.Tensor):
        return text_direction(trained, text)
    if text.shape != (width,):
        raise ValueError(f"a text embedding must have shape ({width},), got {tuple(text.shape)}")
    return F.normalize(text.float(), dim=-1)


def study_status(
    cache: StudyCache, study_id: str, table: AnatomyTable, crop_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Each anatomy's evaluation crop and status in one study, as evaluation decides them.

    Returns:
        ``(starts, status)``: ``(A, 3)`` start of the crop that embeds each anatomy (-1 rows for
        anatomies without one) and ``(A,)`` :class:`AnatomyStatus`.
    """
    meta = cache.study_meta(study_id)
    if "shape" not in meta:
        raise CacheError(f"study {study_id!r}: meta.json has no 'shape'")
    bboxes = cache.bboxes(meta, table, study_id)
    truncated = cache.truncated(meta, table, study_id)
    plan = plan_crops([int(n) for n in meta["shape"]], crop_size, bboxes, ~truncated)
    starts = np.full((len(table), 3), -1, dtype=np.int64)
    assigned = plan.crop_of >= 0
    starts[assigned] = plan.starts[plan.crop_of[assigned]]
    return starts, anatomy_status(plan, bboxes, truncated)


@torch.no_grad()
def anatomy_heatmap(
    trained: TrainedNetwork,
    cache: StudyCache | str | Path,
    study_id: str,
    anatomy: str,
    text: str | Sequence[str] | torch.Tensor,
    negative: str | Sequence[str] | torch.Tensor | None = None,
    table: AnatomyTable | None = None,
    label: str | None = None,
) -> AnatomyHeatmap:
    """The heat of ``text`` over ``anatomy`` in one cached study (one forward pass).

    Args:
        trained: An fVLM network (:func:`fvlm.checkpoint.load_network`).
        cache: The preprocessing cache holding the study (preprocessed as in training).
        study_id: The study.
        anatomy: Anatomy name of the network's table.
        text: The finding's text, or several phrasings (their mean direction is used), e.g. the
            positive prompts of :func:`fvlm.evaluation.zero_shot.build_prompts`; or its
            :func:`text_direction`, computed once.
        negative: Optional texts (or direction) of the normal anatomy; the heat is then
            ``cos(token, text) - cos(token, negative)``, the token's zero-shot logit / scale.
        table: The network's anatomy table (default: the one named in the study's ``meta.json``).
        label: Short name of the finding for titles (default: the text, or the first text and
            the number of other phrasings).

    Raises:
        AnatomyNotEvaluable: The anatomy is absent from the scan or cut by its field of view.
        ValueError: A CLIP network (no anatomy tokens), an unknown anatomy, a table of another
            length than the network's, empty texts, or a cache of another HU window.
        CacheError: Unreadable study files (the message names them).
    """
    cache = cache if isinstance(cache, StudyCache) else StudyCache(cache)
    network = trained.network
    if not isinstance(network, FineGrainedCLIP):
        raise ValueError(
            f"heatmaps need an fVLM network with anatomy tokens, got {type(network).__name__}"
        )
    texts = [] if isinstance(text, torch.Tensor) else _texts(text, "text")
    meta = cache.study_meta(study_id)
    if table is None:
        if "table" not in meta:
            raise CacheError(f"study {study_id!r}: meta.json names no anatomy 'table'; pass one")
        table = load_anatomy_table(meta["table"])
    if len(table) != network.num_anatomies:
        raise ValueError(
            f"anatomy table {table.name!r} has {len(table)} anatomies, the network "
            f"{network.num_anatomies}"
        )
    if anatomy not in table.names:
        raise ValueError(f"unknown anatomy {anatomy!r}; table {table.name!r} has {table.names}")
    for key in ("hu_window", "spacing"):
        if key not in meta:
            raise CacheError(f"study {study_id!r}: meta.json has no {key!r}")
    hu_window = meta["hu_window"]
    check_source_window(network.vision.config.source_hu_window, hu_window, cache.root)
    crop_size = tuple(int(c) for c in network.vision.config.img_size)
    index = table.index(anatomy)
    starts, status = study_status(cache, study_id, table, crop_size)
    if status[index] in (AnatomyStatus.ABSENT, AnatomyStatus.TRUNCATED):
        why = {
            AnatomyStatus.ABSENT: "is absent from the scan",
            AnatomyStatus.TRUNCATED: "is cut by the scan's field of view",
        }[AnatomyStatus(int(status[index]))]
        raise AnatomyNotEvaluable(
            f"study {study_id!r}: anatomy {anatomy!r} {why}: no evaluation crop, no heatmap"
        )
    start = starts[index]
    image, labels = cache.open_arrays(study_id, meta)
    reader = CachedStudyDataset(cache.root, None, table, crop_size, train=False)
    crop, crop_labels, extent = reader.read_crop(image, labels, start)
    device = network_device(trained)
    sample = {
        "image": torch.from_numpy(crop)[None, None],
        "anatomy": torch.from_numpy(crop_labels)[None],
        CROP_EXTENT: torch.from_numpy(extent)[None],
    }
    finished = finish_crops({k: v.to(device) for k, v in sample.items()})  # as evaluation does
    tokens = network.vision(finished["image"])
    per_token = token_embeddings(network.pooling, tokens, index)[0]
    width = per_token.shape[-1]
    scores = per_token @ _direction(trained, text, width).to(device)
    measure = "cosine similarity to the finding"
    if negative is not None:
        negative = negative if isinstance(negative, torch.Tensor) else _texts(negative, "negative")
        scores -= per_token @ _direction(trained, negative, width).to(device)
        measure = "cos(finding) - cos(normal)"
    grid = network.vision.config.grid_size
    voxels = (
        F.interpolate(
            scores.reshape(1, 1, *grid), size=crop_size, mode="trilinear", align_corners=False
        )[0, 0]
        .cpu()
        .numpy()
    )
    heat = np.full(image.shape, np.nan, dtype=np.float32)
    source, target, _ = crop_pad_width(image.shape, start, crop_size)
    heat[source] = voxels[target]
    mask = np.asarray(labels) == table[anatomy].id
    heat[~mask] = np.nan
    affine = meta.get("affine")
    return AnatomyHeatmap(
        heat=heat,
        mask=mask,
        image=image,
        study_id=study_id,
        anatomy=anatomy,
        finding=label or _label(texts),
        affine=None if affine is None else np.asarray(affine, dtype=np.float64),
        spacing=tuple(float(s) for s in meta["spacing"]),  # type: ignore[arg-type]
        hu_window=tuple(float(v) for v in hu_window),  # type: ignore[arg-type]
        crop_start=tuple(int(s) for s in start),  # type: ignore[arg-type]
        status=AnatomyStatus(int(status[index])),
        measure=measure,
    )


def _label(texts: list[str]) -> str:
    if not texts:
        return "finding"
    return texts[0] if len(texts) == 1 else f"{texts[0]} (+{len(texts) - 1} phrasings)"


def hottest_voxel(heat: np.ndarray) -> tuple[int, int, int]:
    """Index of the largest finite heat (raises when there is none)."""
    if not np.isfinite(heat).any():
        raise ValueError("the heatmap holds no finite value")
    return tuple(int(i) for i in np.unravel_index(np.nanargmax(heat), heat.shape))  # type: ignore[return-value]


def save_heatmap_nifti(
    heatmap: AnatomyHeatmap, path: str | Path, reference: str | Path | None = None
) -> Path:
    """Write the heat as a NIfTI that overlays the input scan (0 outside the anatomy).

    Args:
        heatmap: From :func:`anatomy_heatmap`.
        path: ``.nii`` or ``.nii.gz`` to write.
        reference: The input image the study was preprocessed from: the heat is resampled
            (trilinear) onto its grid. ``None``: written on the cache grid with the cache's
            affine, which places it on the same world positions.

    Raises:
        ValueError: The study's ``meta.json`` records no affine (a cache from before it was).
    """
    if heatmap.affine is None:
        raise ValueError(
            f"study {heatmap.study_id!r}: meta.json records no 'affine' (cache written by an "
            "older `fvlm preprocess`): rerun it with --force to place the heatmap in the world"
        )
    data = np.nan_to_num(heatmap.heat, nan=0.0).astype(np.float32)
    image = nib.Nifti1Image(data, heatmap.affine)
    if reference is not None:
        from nibabel.processing import resample_from_to  # scipy is imported on use only

        target = nib.load(str(reference))
        image = resample_from_to(image, (target.shape[:3], target.affine), order=1, cval=0.0)
        image = nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), target.affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = f"{heatmap.anatomy}: {heatmap.finding}"[:79].encode(
        "ascii", "replace"
    )
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _plane(volume: np.ndarray, plane: Plane, index: int) -> np.ndarray:
    if plane == "axial":
        return np.asarray(volume[index], dtype=np.float32)  # (A, R)
    if plane == "coronal":
        return np.asarray(volume[:, index], dtype=np.float32)  # (S, R)
    raise ValueError(f"plane must be 'axial' or 'coronal', got {plane!r}")


def draw_slice(
    ax: Axes,
    image: np.ndarray,
    plane: Plane,
    index: int,
    spacing: Sequence[float],
    window: tuple[float, float],
    image_window: tuple[float, float],
    heat: np.ndarray | None = None,
    heat_range: tuple[float, float] | None = None,
    labels: np.ndarray | None = None,
) -> mpl.image.AxesImage | None:
    """Draw one canonical slice in radiological view: grey CT, heat and anatomy contours.

    The cache axes are (inferior->superior, posterior->anterior, left->right): axial slices show
    anterior up, coronal ones superior up, and both the patient's right on the viewer's left.
    Extents are millimetres, so anisotropic voxels keep their true aspect.

    Args:
        ax: The axes.
        image: ``(D, H, W)`` cache image, [0, 1] over ``image_window`` HU.
        plane: ``axial`` (index along axis 0) or ``coronal`` (along axis 1).
        index: The slice.
        spacing: Voxel size (mm) per axis.
        window: Display window (HU).
        image_window: The HU range the image maps to [0, 1].
        heat: Optional ``(D, H, W)`` heat, NaN where there is none (drawn transparent).
        heat_range: Colour limits of the heat (default: its finite range on the slice).
        labels: Optional ``(D, H, W)`` label map whose regions are outlined.

    Returns:
        The heat's image (for a colour bar), or ``None`` without heat.
    """
    row_mm = spacing[1] if plane == "axial" else spacing[0]
    col_mm = spacing[2]
    grey = _plane(image, plane, index)
    lo, hi = image_window
    hu = lo + grey * (hi - lo)
    rows, cols = grey.shape
    extent = (cols * col_mm, 0.0, 0.0, rows * row_mm)  # x reversed: patient's right on the left
    ax.imshow(hu, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=extent)
    shown = None
    if heat is not None:
        values = _plane(heat, plane, index)
        finite = values[np.isfinite(values)]
        if heat_range is None:
            heat_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        shown = ax.imshow(
            np.ma.masked_invalid(values), cmap="inferno", alpha=0.6, origin="lower",
            extent=extent, vmin=heat_range[0], vmax=heat_range[1], interpolation="nearest",
        )  # fmt: skip
    if labels is not None:
        region = _plane(labels, plane, index)
        ids = [int(i) for i in np.unique(region) if i]
        colours = mpl.colormaps["tab20"]
        for i in ids:
            ax.contour(
                (region == i).astype(np.float32), levels=[0.5], origin="lower", extent=extent,
                colors=[colours(i % 20)], linewidths=0.8,
            )  # fmt: skip
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Render a pyplot-free figure with Agg (headless) and write it, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def save_heatmap_png(
    heatmap: AnatomyHeatmap, path: str | Path, window: tuple[float, float] | None = None
) -> Path:
    """Axial and coronal slices through the hottest voxel, heat over grey CT, with a colour bar.

    Args:
        heatmap: From :func:`anatomy_heatmap`.
        path: PNG to write.
        window: Display window in HU (default: the cache's HU window, the preprocessing recipe).
    """
    window = heatmap.hu_window if window is None else window
    hot = hottest_voxel(heatmap.heat)
    finite = heatmap.heat[np.isfinite(heatmap.heat)]
    heat_range = (float(finite.min()), float(finite.max()))
    fig = Figure(figsize=(10, 5))
    axes = fig.subplots(1, 2)
    shown = None
    for ax, plane, index in zip(axes, ("axial", "coronal"), hot[:2], strict=True):
        shown = draw_slice(
            ax, heatmap.image, plane, index, heatmap.spacing, window, heatmap.hu_window,
            heatmap.heat, heat_range,
        )  # fmt: skip
        ax.set_title(f"{plane}, slice {index}", fontsize=9)
    colourbar = fig.colorbar(shown, ax=list(axes), shrink=0.8)
    colourbar.set_label(heatmap.measure)
    fig.suptitle(f"{heatmap.study_id}: {heatmap.anatomy} - {_short(heatmap.finding)}", fontsize=11)
    return save_figure(fig, path)


def _short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
