"""``fvlm predict``: run a trained model on one's own scans; findings, embeddings and heatmaps.

Each scan is preprocessed exactly as the model's training cache was (its recipe travels with the
model, :mod:`fvlm.pretrained`), embedded from crops of the training size, and scored zero-shot on
every (anatomy, disease) of the model's anatomy table plus the ``--query`` findings. The model is
loaded once; the scans are preprocessed and embedded as one batch. Per scan, in ``out/<scan>/``:

* ``findings.csv`` / ``findings.json``: one row per (anatomy, finding): ``probability`` =
  P(finding) = softmax over {negative, positive} prompt logits of the anatomy's embedding, i.e.
  ``sigmoid(logit_scale * (cos(v, t_pos) - cos(v, t_neg)))`` with prompt embeddings averaged over
  templates (the zero-shot evaluation's score, :mod:`fvlm.evaluation.zero_shot`); empty (NaN)
  where the anatomy is not evaluable in this scan (absent, or cut by the field of view);
* ``embeddings.npz``: ``embeddings (A, E)``, ``valid``, ``present``, ``status``, ``anatomies``;
* ``heatmaps/``: Fig. 11 heatmaps of the top findings and of every query (:mod:`fvlm.heatmap`);
* ``summary.png``: a one-page summary (:mod:`fvlm.summary_page`).

A scan that fails (unreadable file, mask on another grid, ...) is listed with its one-line reason
in ``out/failed.csv``; the others are written and the exit status is 1.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
from tqdm.auto import tqdm

from fvlm.pretrained import (
    FVLM,
    MASK_HELP,
    Scan,
    ScanEmbeddings,
    nifti_reference,
    parse_query,
    scan_id,
    write_heatmaps,
)

if TYPE_CHECKING:
    from fvlm.heatmap import AnatomyHeatmap

__all__ = ["PROBABILITY_DEFINITION", "collect_scans", "load_model", "plan_scans", "predict"]

PROBABILITY_DEFINITION = (
    "P(finding) = softmax over {negative, positive} prompt logits of the anatomy embedding "
    "= sigmoid(logit_scale * (cos(v, t_pos) - cos(v, t_neg))), prompt embeddings averaged over "
    "templates (fvlm.evaluation.zero_shot); empty where the anatomy is not evaluable in the scan "
    "(absent, or truncated by the field of view)"
)
_NIFTI = (".nii", ".nii.gz")
_DISPLAY_ROWS = 5


def load_model(model: str | Path, cache: str | Path | None = None, device: str = "cpu") -> FVLM:
    """A pretrained folder (or Hub id), or a training ``.ckpt`` with its cache's recipe."""
    path = Path(model)
    if path.is_file():
        return FVLM.from_checkpoint(path, cache, device)
    return FVLM.from_pretrained(model, device)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI)


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _mask_for(image: Path, masks: Path) -> Path | None:
    """The label map of ``image`` in a folder of masks: same file name, or ``<id>.nii[.gz]``."""
    for candidate in (masks / image.name, masks / f"{scan_id(image)}.nii.gz"):
        if candidate.is_file():
            return candidate
    return None


def collect_scans(scans: str | Path, mask: str | Path | None = None) -> list[Scan]:
    """The scans of ``--scans``: one NIfTI, one DICOM folder, a folder of them, or a CSV.

    A CSV manifest has an ``image`` column (paths relative to the CSV) and optionally
    ``study_id`` and ``mask``. ``mask`` is one label map (one scan) or a folder of them named like
    the scans.
    """
    source = Path(scans)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such scan, folder or manifest")
    masks = Path(mask) if mask is not None else None
    if masks is not None and not masks.exists():
        raise FileNotFoundError(f"{masks}: no such mask file or folder")
    if source.is_file() and source.suffix.lower() == ".csv":
        table = pd.read_csv(source, dtype=str, keep_default_na=False)
        if "image" not in table.columns:
            raise ValueError(f"{source}: a scan manifest needs an 'image' column")
        images = [source.parent / p for p in table["image"]]
        ids = list(table["study_id"]) if "study_id" in table else [scan_id(p) for p in images]
        mask_paths = [
            source.parent / m if m else None
            for m in (table["mask"] if "mask" in table else [""] * len(table))
        ]
    else:
        folder_of_scans = source.is_dir() and any(
            _is_nifti(p) or p.is_dir() for p in _entries(source)
        )
        images = (
            [p for p in _entries(source) if _is_nifti(p) or p.is_dir()]
            if folder_of_scans
            else [source]
        )
        ids = [scan_id(p) for p in images]
        if masks is None:
            mask_paths = [None] * len(images)
        elif masks.is_dir():
            mask_paths = [_mask_for(p, masks) for p in images]
        elif len(images) == 1:
            mask_paths = [masks]
        else:
            raise ValueError(f"{masks}: one mask file for {len(images)} scans; give a folder")
    if not images:
        raise ValueError(f"{source}: no scan (NIfTI file or DICOM folder) in it")
    seen: dict[str, int] = {}
    out = []
    for study_id, image, path in zip(ids, images, mask_paths, strict=True):
        seen[study_id] = seen.get(study_id, 0) + 1
        unique = study_id if seen[study_id] == 1 else f"{study_id}_{seen[study_id]}"
        out.append(Scan(study_id=unique, image=image, mask=path))
    return out


def predict(
    model: str,
    scans: str,
    out: Path,
    mask: str | None = None,
    segmenter: Literal["precomputed", "totalsegmentator"] = "precomputed",
    query: list[str] | None = None,
    cache: str | None = None,
    heatmaps: bool = True,
    top: int = 3,
    batch_size: int = 4,
    device: str = "cpu",
    work_dir: Path | None = None,
    progress: bool = True,
) -> int:
    """Score one's own CT scans with a trained model: findings, embeddings, heatmaps, summary.

    Example: ``fvlm predict --model runs/demo/pretrained --scans ct.nii.gz --mask seg.nii.gz
    --query "liver: hepatic steatosis" --out predictions``. Exit status 1 when a scan failed
    (listed in ``out/failed.csv``), 0 otherwise.

    Args:
        model: Pretrained folder (``fvlm export``), Hugging Face Hub id, or a training ``.ckpt``.
        scans: One NIfTI file, one DICOM series folder, a folder of them, or a CSV manifest
            (``image`` column, optional ``study_id`` and ``mask``; paths relative to it).
        out: Output folder (one sub-folder per scan, ``failed.csv``).
        mask: TotalSegmentator label map on the scan's grid (one scan), or a folder of them named
            like the scans.
        segmenter: ``precomputed`` (``mask``/manifest masks) or ``totalsegmentator`` (runs it;
            its weights must be installed).
        query: Free-text findings ``"anatomy: finding"`` scored besides the table's diseases
            (repeat the option; ``scan: ...`` uses the whole-scan embedding).
        cache: With a ``.ckpt``: its training cache (default: the checkpoint's data.cache_dir).
        heatmaps: Write heatmaps of the ``top`` findings and of every query.
        top: Findings per scan printed and given heatmaps.
        batch_size: Crops per forward pass.
        device: ``cpu`` or ``cuda``; also TotalSegmentator's device.
        work_dir: Keep the preprocessed scans here (default: a temporary folder).
        progress: Progress bars on stderr.
    """
    queries = list(query or [])
    fvlm = load_model(model, cache, device)
    for text in queries:
        parse_query(text, fvlm.table)  # an unknown anatomy fails before any scan is read
    batch, todo, failed = plan_scans(scans, mask, segmenter, fvlm.recipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fvlm-predict-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        start = time.perf_counter()
        embeddings, more = _embed(fvlm, todo, work, segmenter, device, batch_size, progress)
        failed |= more
        scores = fvlm.score(embeddings, queries)
        images = {s.study_id: Path(s.image) for s in batch}
        for emb in tqdm(embeddings, desc="write", unit="scan", disable=not progress):
            rows = scores[scores["study_id"] == emb.study_id].drop(columns="study_id")
            try:
                _write_scan(
                    fvlm, emb, images[emb.study_id], rows, work / "cache", out / emb.study_id,
                    heatmaps, top,
                )  # fmt: skip
            except (ValueError, OSError) as err:
                failed[emb.study_id] = f"{emb.study_id}: writing outputs failed: {err}"
            _print_findings(emb.study_id, rows)
        seconds = time.perf_counter() - start
    _write_failed(out, batch, failed)
    done = len(batch) - len(failed)
    print(f"predict: {done} of {len(batch)} scans in {seconds:.1f} s; outputs in {out}/")
    for study_id, reason in failed.items():
        print(f"failed {study_id}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def plan_scans(
    scans: str | Path, mask: str | None, segmenter: str, recipe: dict
) -> tuple[list[Scan], list[Scan], dict[str, str]]:
    """The scans of ``scans`` (see :func:`collect_scans`): all, those to run, and failures.

    A scan without its label map fails (when masks are precomputed) and keeps its row; with
    ``segmenter: totalsegmentator`` its weights are checked before any scan is read.
    """
    batch = collect_scans(scans, mask)
    if segmenter == "precomputed" and all(s.mask is None for s in batch):
        raise ValueError(f"{scans}: {MASK_HELP}")
    if segmenter == "totalsegmentator":
        from fvlm.preprocess.segmentation import (
            TotalSegmentatorUnavailable,
            check_totalsegmentator,
        )

        try:
            check_totalsegmentator(bool(recipe.get("totalseg_fast") or False))
        except TotalSegmentatorUnavailable as err:
            raise ValueError(f"{err} (or give --mask: {MASK_HELP})") from None
    failed = {
        s.study_id: f"{s.image}: no label map in {mask}"
        for s in batch
        if segmenter == "precomputed" and s.mask is None
    }
    return batch, [s for s in batch if s.study_id not in failed], failed


def _embed(
    fvlm: FVLM,
    scans: Sequence[Scan],
    work: Path,
    segmenter: str,
    device: str,
    batch_size: int,
    progress: bool,
) -> tuple[list[ScanEmbeddings], dict[str, str]]:
    """Preprocess and embed the batch; failures by study id."""
    if not scans:
        return [], {}
    cache_dir = work / "cache"
    summary = fvlm.preprocess(scans, cache_dir, segmenter, device, progress=progress)
    failed = {r.study_id: r.reason for r in summary.results if r.status == "failed"}
    if len(failed) == len(scans):
        return [], failed
    try:
        studies = fvlm.embed_cache(cache_dir, batch_size, progress)
    except ValueError as err:  # a cache inconsistency: no scan of the batch can be trusted
        return [], failed | {s.study_id: str(err) for s in scans if s.study_id not in failed}
    return fvlm.scan_embeddings(studies, cache_dir), failed


def _write_scan(
    fvlm: FVLM,
    emb: ScanEmbeddings,
    image: Path,
    rows: pd.DataFrame,
    cache_dir: Path,
    folder: Path,
    heatmaps: bool,
    top: int,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows.to_csv(folder / "findings.csv", index=False)
    emb.save(folder / "embeddings.npz")
    maps: dict = {}
    if heatmaps:
        keys = list(_top(rows, top)["key"]) + list(rows.loc[rows["query"], "key"])
        by_key = {d.key: d for d in fvlm.diseases(_queries(rows))}
        maps = write_heatmaps(
            fvlm, cache_dir, emb.study_id, [by_key[k] for k in dict.fromkeys(keys)],
            folder / "heatmaps", nifti_reference(image),
        )  # fmt: skip
    written = [path for _, files in maps.values() for path in files]
    top_heat = next(iter(maps.values()))[0] if maps else None
    summary = _summary_page(fvlm, emb, rows, cache_dir, folder / "summary.png", top_heat)
    record = {
        "study_id": emb.study_id,
        "definitions": {"probability": PROBABILITY_DEFINITION},
        "model": {"kind": fvlm.kind, "anatomy_table": fvlm.table.name},
        "preprocessing": fvlm.recipe,
        "anatomies": {
            name: {"valid": bool(v), "present": bool(p), "status": s}
            for name, v, p, s in zip(emb.anatomies, emb.valid, emb.present, emb.status, strict=True)
        },
        "findings": [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in rows.to_dict("records")
        ],
        "heatmaps": [str(p.relative_to(folder)) for p in written],
        "summary_page": None if summary is None else str(summary.relative_to(folder)),
    }
    (folder / "findings.json").write_text(json.dumps(record, indent=2) + "\n")


def _queries(rows: pd.DataFrame) -> list[str]:
    """The query strings back from their rows (``anatomy: finding``)."""
    return [f"{r.anatomy}: {r.finding}" for r in rows[rows["query"]].itertuples()]


def _top(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    table = rows[~rows["query"]].dropna(subset=["probability"])
    return table.sort_values("probability", ascending=False).head(n)


def _summary_page(
    fvlm: FVLM,
    emb: ScanEmbeddings,
    rows: pd.DataFrame,
    cache_dir: Path,
    path: Path,
    heat: AnatomyHeatmap | None,
) -> Path | None:
    """The one-page summary (:mod:`fvlm.summary_page`) on the cache grid; not for CLIP."""
    from fvlm.preprocess.cache import StudyCache
    from fvlm.summary_page import save_summary_page

    if fvlm.kind != "fine_grained":
        return None
    cache = StudyCache(cache_dir)
    image, labels = cache.open_arrays(emb.study_id)
    meta = cache.study_meta(emb.study_id)
    return save_summary_page(
        path, image, labels, meta["spacing"], tuple(fvlm.recipe["hu_window"]),
        rows,
        dict(zip(emb.anatomies, emb.status, strict=True)),
        anatomy_names={a.id: a.name for a in fvlm.table.anatomies},
        heat=None if heat is None else heat.heat,
        heat_title="" if heat is None else f"{heat.anatomy}: {heat.finding}",
        title=emb.study_id,
    )  # fmt: skip


def _print_findings(study_id: str, rows: pd.DataFrame) -> None:
    best = _top(rows, _DISPLAY_ROWS)
    lines = [f"{study_id}: top findings (P = softmax of positive vs negative prompts)"]
    lines += [f"  {r.probability:6.3f}  {r.anatomy}: {r.finding}" for r in best.itertuples()]
    lines += [
        f"  {r.probability:6.3f}  {r.anatomy}: {r.finding}  (query)"
        for r in rows[rows["query"]].itertuples()
    ]
    print("\n".join(lines))


def _write_failed(out: Path, batch: Sequence[Scan], failed: dict[str, str]) -> None:
    images = {s.study_id: str(s.image) for s in batch}
    frame = pd.DataFrame(
        [{"study_id": k, "image": images.get(k, ""), "reason": v} for k, v in failed.items()],
        columns=["study_id", "image", "reason"],
    )
    frame.to_csv(out / "failed.csv", index=False)
