"""Tiny but realistic preprocessing caches, written through the cache contract (``StudyCache``).

Shared by the training tests and ``benchmarks/bench_train.py`` so that both exercise the real
``CTReportDataModule`` on data shaped like ``fvlm preprocess`` output: a windowed float16 body with
organs of distinct attenuation (an abnormal organ carries a lesion whose contrast and size depend on
its disease, so a model can learn to tell diseases apart), a uint8 anatomy map,
``meta.json`` listing every anatomy of the table (absent ones with ``voxels: 0, bbox: null``), and
a ``report.json`` whose per-anatomy texts follow the merge rule of
``fvlm.preprocess.decomposition.merge`` (findings text + impression text or ``"null"``; unmentioned
anatomies get the table's default text, source ``default``). The repetition of the default texts is
what makes text deduplication pay off, so it matters that these caches have it too.

Organs sit in the cells of a grid laid over the volume (one cell per anatomy, jittered per study),
so they never overlap and a crop a little smaller than the volume keeps most of them whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fvlm.anatomy import Anatomy, AnatomyTable, load_anatomy_table
from fvlm.preprocess.cache import StudyCache

__all__ = [
    "DEFAULT_ANATOMIES",
    "DISEASES_PER_ANATOMY",
    "disease_terms",
    "organ_grid",
    "study_report",
    "write_cache",
    "write_study",
]

#: A handful of abdominal anatomies of the ``paper`` table with evaluated diseases.
DEFAULT_ANATOMIES = ("liver", "spleen", "kidney", "gallbladder", "pancreas")

_NORMAL_PHRASES = (
    "The {label} is unremarkable.",
    "No abnormality of the {label}.",
    "The {label} appears normal in size and attenuation.",
)
_ABNORMAL_PHRASES = (
    "There is {term}.",
    "Findings consistent with {term}.",
    "{Term} is noted.",
)
#: Distinct diseases (visual signatures) drawn per anatomy.
DISEASES_PER_ANATOMY = 2
_BODY = 0.45  # soft tissue of the abdomen window [-300, 400] HU, scaled to [0, 1]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def disease_terms(anatomy: Anatomy, kind: int) -> tuple[str, ...]:
    """Synonyms of the anatomy's ``kind``-th disease in the table (a generic lesion if none)."""
    if not anatomy.diseases:
        return (f"a {anatomy.label} lesion" if kind % 2 == 0 else f"a dense {anatomy.label} focus",)
    return anatomy.diseases[kind % len(anatomy.diseases)].terms


def organ_grid(shape: Sequence[int], count: int) -> tuple[int, int, int]:
    """Cells per axis: roughly cubic cells, at least ``count``, none thinner than 3 voxels."""
    shape = np.asarray(shape, dtype=float)
    side = (shape.prod() / max(count, 1)) ** (1 / 3)
    grid = np.maximum(1, np.floor(shape / side)).astype(int)
    while grid.prod() < count:
        # Split the axis whose cells are currently the largest.
        grid[int(np.argmax(shape / grid))] += 1
    if np.any(shape / grid < 3):
        raise ValueError(f"volume {tuple(shape.astype(int))} is too small for {count} organs")
    return tuple(int(g) for g in grid)


def _organ_boxes(
    shape: Sequence[int], count: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (low, high) box per organ inside its own grid cell, with random size and offset."""
    grid = np.asarray(organ_grid(shape, count))
    cell = np.asarray(shape) // grid
    boxes = []
    for index in range(count):
        origin = np.asarray(np.unravel_index(index, tuple(grid))) * cell
        size = np.maximum(2, (cell * rng.uniform(0.55, 0.9, 3)).astype(int))
        low = origin + rng.integers(0, cell - size + 1)
        boxes.append((low, low + size))
    return boxes


def _draw_organs(
    shape: tuple[int, int, int],
    anatomies: Sequence[tuple[int, str]],
    abnormal: dict[str, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Image in [0, 1] and anatomy ids: ellipsoidal organs in a noisy body, lesions if abnormal.

    The lesion of disease ``k`` is dark for even ``k``, bright for odd ``k``, and larger for
    ``k // 2`` odd: a visible signature per disease, as the phantom has.
    """
    labels = np.zeros(shape, dtype=np.uint8)
    image = np.zeros(shape, dtype=np.float32)
    grid = np.stack(np.meshgrid(*(np.arange(n) + 0.5 for n in shape), indexing="ij"), axis=-1)
    centre, radius = np.asarray(shape) / 2, np.asarray(shape) / 2
    body = (((grid[..., 1:] - centre[1:]) / radius[1:]) ** 2).sum(-1) <= 1.0
    image[body] = _BODY
    for (anatomy_id, name), (low, high) in zip(
        anatomies, _organ_boxes(shape, len(anatomies), rng), strict=True
    ):
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        local = grid[box]
        mid, half = (low + high) / 2, (high - low) / 2
        organ = (((local - mid) / half) ** 2).sum(-1) <= 1.0
        labels[box][organ] = anatomy_id
        # Distinct, stable attenuation per anatomy id, so image and map agree across studies.
        image[box][organ] = 0.25 + 0.5 * ((anatomy_id * 0.618) % 1.0)
        if name in abnormal:
            kind = abnormal[name]
            scale = 0.75 if (kind // 2) % 2 else 0.45
            lesion = (((local - mid) / np.maximum(half * scale, 0.75)) ** 2).sum(-1) <= 1.0
            image[box][organ & lesion] += 0.3 if kind % 2 else -0.3
    image += rng.normal(0.0, 0.02, shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0), labels


def study_report(
    table: AnatomyTable,
    present: Sequence[str],
    abnormal: dict[str, int],
    rng: np.random.Generator,
    mention_normal: float = 0.3,
) -> dict:
    """``report.json`` content: sections and per-anatomy text/normal/source as the merge writes.

    A normal present anatomy is mentioned in the findings with a normal phrase with probability
    ``mention_normal`` and otherwise left unmentioned (default text); abnormal ones are described
    in the findings and summarised in the impression, so ``normal = not in the impression``.
    """
    findings, impression, anatomies = [], [], {}
    for anatomy in table.anatomies:
        name = anatomy.name
        if name in abnormal:
            term = str(rng.choice(disease_terms(anatomy, abnormal[name])))
            found = str(rng.choice(_ABNORMAL_PHRASES)).format(term=term, Term=_capital(term))
            said = _capital(term) + "."
            findings.append(found)
            impression.append(said)
            anatomies[name] = {"text": f"{found} {said}", "normal": False, "source": "rules"}
        elif name in present and rng.random() < mention_normal:
            found = str(rng.choice(_NORMAL_PHRASES)).format(label=anatomy.label)
            findings.append(found)
            anatomies[name] = {"text": f"{found} null", "normal": True, "source": "rules"}
        else:
            anatomies[name] = {"text": anatomy.default_text, "normal": True, "source": "default"}
    return {
        "findings": " ".join(findings) or "No acute abnormality.",
        "impression": " ".join(impression) or "No acute abnormality.",
        "decomposer": "rules",
        "anatomies": anatomies,
    }


def write_study(
    cache: Path,
    study_id: str,
    table: AnatomyTable,
    shape: tuple[int, int, int],
    present: Sequence[str],
    abnormal: dict[str, int],
    rng: np.random.Generator,
) -> None:
    """Write one study folder (image, anatomy map, meta, report) of the cache.

    Args:
        cache: The cache folder.
        study_id: Folder name under ``studies/``.
        table: The anatomy table of the cache.
        shape: Volume ``(D, H, W)``.
        present: Anatomies drawn in the volume.
        abnormal: Abnormal anatomy -> index of its disease (see :func:`disease_terms`).
        rng: Source of all randomness of the study.
    """
    lookup = {a.name: a.id for a in table.anatomies}
    image, labels = _draw_organs(shape, [(lookup[n], n) for n in present], abnormal, rng)
    stats = {}
    for anatomy in table.anatomies:
        where = np.argwhere(labels == anatomy.id)
        bbox = None
        if len(where):
            bbox = [[int(lo), int(hi) + 1] for lo, hi in zip(where.min(0), where.max(0))]  # noqa: B905
        stats[anatomy.name] = {
            "id": anatomy.id,
            "voxels": len(where),
            "bbox": bbox,
            "truncated": False,  # organs sit inside their grid cells, never cut by the scan
            "truncated_faces": [],
        }
    meta = {
        "study_id": study_id,
        "shape": list(shape),
        "spacing": [5.0, 1.0, 1.0],
        "hu_window": [-300.0, 400.0],
        "table": table.name,
        "orientation": {"source_axcodes": "SAR", "canonical_axcodes": "SAR", "transform": []},
        "anatomies": stats,
    }
    if StudyCache(cache).study_dir(study_id).exists():
        raise FileExistsError(f"study {study_id!r} is already in {cache}")
    report = study_report(table, present, abnormal, rng) | {"study_id": study_id}
    StudyCache(cache).write_study(study_id, image.astype(np.float16), labels, meta, report)


def write_cache(
    cache: str | Path,
    table: str | AnatomyTable = "paper",
    anatomies: Sequence[str] | None = DEFAULT_ANATOMIES,
    n_train: int = 10,
    n_val: int = 2,
    n_test: int = 0,
    shape: tuple[int, int, int] = (12, 24, 24),
    abnormal_rate: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write a whole cache with ``manifest.csv``; one extra ``failed`` study tests the filter.

    Args:
        cache: Output folder (created).
        table: Anatomy table (preset name, path or loaded table) the cache is written with.
        anatomies: Names of the anatomies drawn in every study; ``None`` draws all of the table.
        n_train: Training studies.
        n_val: Validation studies.
        n_test: Test studies.
        shape: Volume ``(D, H, W)`` of every study.
        abnormal_rate: Probability that a present anatomy is abnormal; every study has at least
            one normal and (when it has two anatomies) one abnormal anatomy.
        seed: Everything is a function of this seed.

    Returns:
        The cache folder.
    """
    cache = Path(cache)
    table = table if isinstance(table, AnatomyTable) else load_anatomy_table(table)
    names = list(table.names if anatomies is None else anatomies)
    unknown = set(names) - set(table.names)
    if unknown:
        raise ValueError(f"anatomies {sorted(unknown)} are not in table {table.name!r}")
    rng = np.random.default_rng(seed)
    rows = []
    splits = [("train", n_train), ("val", n_val), ("test", n_test)]
    for split, count in splits:
        for i in range(count):
            study_id = f"{split}_{i:03d}"
            flags = rng.random(len(names)) < abnormal_rate
            if len(names) > 1:
                flags[rng.integers(len(names))] = True
                flags[rng.integers(len(names))] = False
            abnormal = {
                n: int(rng.integers(DISEASES_PER_ANATOMY))
                for n, f in zip(names, flags, strict=True)
                if f
            }
            write_study(cache, study_id, table, shape, names, abnormal, rng)
            rows.append((study_id, split, "ok", ""))
    rows.append(("failed_000", "train", "failed", "test"))
    StudyCache(cache).write_manifest(rows)
    return cache
