"""Image-to-text and text-to-image retrieval Recall@k, per anatomy and whole scan.

CT-CLIP reports retrieval; users of a vision-language model expect it. Two scopes:

* per anatomy (fVLM): a study's embedding of anatomy ``a`` against the anatomy's own text from the
  report decomposition (``report.json``), over the studies where ``a`` is valid (embedded whole,
  :mod:`~fvlm.evaluation.evaluability`);
* whole scan: the renormalised mean of the valid anatomy embeddings (fVLM) or the study embedding
  (CLIP) against the whole report (findings then impression, the text CLIP trained on). CLIP has
  no anatomy embedding, so it has the whole-scan rows only.

Decomposed texts repeat ("liver shows no significant abnormalities." in most studies), so a pair
is not the only correct answer. Identical texts are one item: the image-to-text gallery is the
scope's distinct texts (a query image's one relevant item is its own text), and a text-to-image
query is a distinct text whose relevant items are all the studies with that text.

Definitions (written beside the numbers in every output):

* ``recall@k``: share of queries with a relevant item among the top k by cosine similarity (hit
  rate). Ties count against the query: an item's rank is 1 + the number of irrelevant items that
  score at least as high, so equal scores never help.
* ``chance@k``: the expected ``recall@k`` of a random ranking, per query
  ``1 - C(G - r, k) / C(G, k)`` for ``r`` relevant items among ``G`` (``k / G`` when ``r = 1``),
  averaged over queries.

A scope needs two distinct texts (otherwise every ranking is right); those left out are listed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fvlm.anatomy import AnatomyTable
from fvlm.data_modules.study_dataset import CachedStudyDataset, whole_report_text
from fvlm.evaluation.embedding import StudyEmbeddings
from fvlm.models.fine_grained_clip import whole_scan_embedding

__all__ = [
    "DIRECTIONS",
    "RETRIEVAL_DEFINITIONS",
    "TOP_K",
    "encode_texts",
    "format_retrieval",
    "retrieval_hits",
    "retrieval_rows",
    "retrieval_table",
    "study_texts",
]

TOP_K: tuple[int, ...] = (1, 5, 10)
DIRECTIONS: tuple[str, ...] = ("image_to_text", "text_to_image")
WHOLE_SCAN = "whole_scan"
MEAN_OVER_ANATOMIES = "mean_over_anatomies"

RETRIEVAL_DEFINITIONS: dict[str, str] = {
    "scope": "an anatomy (its embedding vs its decomposed report text, studies where it is "
    f"valid), {WHOLE_SCAN!r} (mean of valid anatomy embeddings for fVLM, study embedding for "
    f"CLIP, vs findings + impression) or {MEAN_OVER_ANATOMIES!r} (unweighted mean of the "
    "anatomy rows)",
    "n_queries": "image_to_text: studies; text_to_image: distinct texts",
    "n_gallery": "image_to_text: distinct texts; text_to_image: studies",
    "recall@k": "share of queries with a relevant item in the top k by cosine similarity; an "
    "item's rank is 1 + the irrelevant items scoring at least as high (ties count against)",
    "chance@k": "expected recall@k of a random ranking: mean over queries of "
    "1 - C(G - r, k) / C(G, k), r relevant among G (k / G for one relevant item)",
}

TextEncoder = Callable[[list[str]], torch.Tensor]


def retrieval_hits(
    similarity: torch.Tensor, relevant: torch.Tensor, top_k: Sequence[int] = TOP_K
) -> dict[int, torch.Tensor]:
    """Per query, whether a relevant item ranks within the top k, ``{k: (Q,) bool}``.

    Args:
        similarity: ``(Q, G)`` query-item scores.
        relevant: ``(Q, G)`` bool; every query needs at least one relevant item.
        top_k: The k values.
    """
    if similarity.shape != relevant.shape or similarity.ndim != 2:
        raise ValueError(
            f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} must be "
            "the same (queries, gallery) shape"
        )
    if not relevant.any(dim=1).all():
        raise ValueError("every query needs at least one relevant item")
    best = similarity.masked_fill(~relevant, -math.inf).max(dim=1, keepdim=True).values
    rank = 1 + ((similarity >= best) & ~relevant).sum(dim=1)
    return {int(k): rank <= k for k in top_k}


def _chance(n_relevant: np.ndarray, n_gallery: int, k: int) -> float:
    """Mean over queries of the hit probability of a random ranking."""
    if k >= n_gallery:
        return 1.0
    miss = [math.comb(n_gallery - int(r), k) / math.comb(n_gallery, k) for r in n_relevant]
    return float(1.0 - np.mean(miss))


def retrieval_rows(
    images: torch.Tensor,
    texts: Sequence[str],
    text_embedding: dict[str, torch.Tensor],
    top_k: Sequence[int] = TOP_K,
) -> list[dict[str, float | int | str]]:
    """Recall@k and chance@k in both directions for paired images and texts of one scope.

    Args:
        images: ``(N, E)`` image embeddings (need not be normalised).
        texts: The N paired texts (repeats allowed, see the module notes).
        text_embedding: Text -> ``(E,)`` embedding, for every text of ``texts``.
        top_k: The k values.

    Returns:
        One dict per direction: ``direction``, ``n_queries``, ``n_gallery``, ``recall@k`` and
        ``chance@k`` for every k.
    """
    if len(texts) != len(images):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < 2:
        raise ValueError("retrieval needs at least two distinct texts")
    image = F.normalize(images.to(torch.float64), dim=-1)
    text = F.normalize(torch.stack([text_embedding[t] for t in distinct]).to(torch.float64), -1)
    position = {t: i for i, t in enumerate(distinct)}
    own = torch.as_tensor([position[t] for t in texts])
    relevant = own[:, None] == torch.arange(len(distinct))[None, :]  # (N, U)
    similarity = image @ text.T
    rows = []
    for direction, sim, rel in (
        ("image_to_text", similarity, relevant),
        ("text_to_image", similarity.T, relevant.T),
    ):
        hits = retrieval_hits(sim, rel, top_k)
        n_relevant = rel.sum(dim=1).numpy()
        row: dict[str, float | int | str] = {
            "direction": direction,
            "n_queries": int(sim.shape[0]),
            "n_gallery": int(sim.shape[1]),
        }
        for k in top_k:
            row[f"recall@{k}"] = float(hits[k].double().mean())
        for k in top_k:
            row[f"chance@{k}"] = _chance(n_relevant, int(sim.shape[1]), int(k))
        rows.append(row)
    return rows


def study_texts(
    cache_dir: str | Path, studies: StudyEmbeddings, table: AnatomyTable
) -> tuple[list[list[str]], list[str]]:
    """Per study: the anatomy texts in table order (as training reads them) and the whole report.

    Read through :class:`~fvlm.data_modules.CachedStudyDataset`, so an anatomy the report does
    not list gets the same default text as in training.
    """
    dataset = CachedStudyDataset(cache_dir, None, table, studies.crop_size, train=False)
    anatomy_texts, reports = [], []
    for study_id in studies.study_ids:
        report = dataset.cache.study_report(study_id)
        anatomy_texts.append(dataset.read_texts(report, study_id)[0])
        reports.append(whole_report_text(report))
    return anatomy_texts, reports


def encode_texts(
    encode: TextEncoder, texts: Sequence[str], batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Each distinct text of ``texts`` encoded once, in batches, ``{text: (E,) float64}``."""
    distinct = list(dict.fromkeys(texts))
    with torch.no_grad():
        chunks = [
            encode(distinct[i : i + batch_size]).detach().cpu().to(torch.float64)
            for i in range(0, len(distinct), batch_size)
        ]
    encoded = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    if len(encoded) != len(distinct):
        raise ValueError(f"text encoder returned {len(encoded)} rows for {len(distinct)} texts")
    return dict(zip(distinct, encoded, strict=True))


def retrieval_table(
    studies: StudyEmbeddings,
    anatomy_texts: Sequence[Sequence[str]],
    reports: Sequence[str],
    encode: TextEncoder,
    table: AnatomyTable,
    top_k: Sequence[int] = TOP_K,
) -> pd.DataFrame:
    """Retrieval rows of one model: per anatomy (fVLM), mean over anatomies, whole scan.

    Args:
        studies: The evaluation's embeddings (``(S, A, E)`` fVLM or ``(S, 1, E)`` CLIP).
        anatomy_texts: Per study, the anatomy texts in table order (:func:`study_texts`).
        reports: Per study, findings then impression.
        encode: The model's text tower (texts -> ``(M, E)``).
        table: The anatomy table of the embeddings.
        top_k: The k values.

    Returns:
        One row per (scope, direction); ``attrs["skipped"]`` lists the scopes with fewer than
        two distinct texts among their valid studies, ``attrs["definitions"]`` the columns.
    """
    n = len(studies.study_ids)
    if len(anatomy_texts) != n or len(reports) != n:
        raise ValueError(
            f"{n} studies but {len(anatomy_texts)} text rows and {len(reports)} reports"
        )
    is_clip = studies.crop_rule == "tile"  # CLIP: one study embedding, no anatomies
    emb, valid = studies.embeddings.to(torch.float64), studies.valid
    scopes: list[tuple[str, torch.Tensor, list[str]]] = []
    if not is_clip:
        for a, anatomy in enumerate(table.anatomies):
            keep = torch.nonzero(valid[:, a]).flatten().tolist()
            texts = [anatomy_texts[s][a] for s in keep]
            scopes.append((anatomy.name, emb[keep, a], texts))
        whole = whole_scan_embedding(emb, valid)
    else:
        whole = emb[:, 0]
    keep = torch.nonzero(~whole.isnan().any(dim=1)).flatten().tolist()
    scopes.append((WHOLE_SCAN, whole[keep], [reports[s] for s in keep]))
    text_embedding = encode_texts(encode, [t for _, _, texts in scopes for t in texts])
    rows, skipped = [], []
    for scope, images, texts in scopes:
        if len(set(texts)) < 2:
            skipped.append(scope)
            continue
        rows += [{"scope": scope} | r for r in retrieval_rows(images, texts, text_embedding, top_k)]
    columns = ["scope", "direction", "n_queries", "n_gallery"]
    columns += [f"{m}@{k}" for m in ("recall", "chance") for k in top_k]
    frame = pd.DataFrame(rows, columns=columns)
    anatomy_rows = frame[frame["scope"] != WHOLE_SCAN]
    if len(anatomy_rows):
        mean = anatomy_rows.drop(columns="scope").groupby("direction", sort=False).mean()
        mean[["n_queries", "n_gallery"]] = mean[["n_queries", "n_gallery"]].round()
        mean = mean.reset_index().assign(scope=MEAN_OVER_ANATOMIES)
        frame = pd.concat([anatomy_rows, mean, frame[frame["scope"] == WHOLE_SCAN]])
    frame = frame[columns].reset_index(drop=True)
    frame[["n_queries", "n_gallery"]] = frame[["n_queries", "n_gallery"]].astype(int)
    frame.attrs["skipped"] = skipped
    frame.attrs["definitions"] = RETRIEVAL_DEFINITIONS
    return frame


def format_retrieval(name: str, frame: pd.DataFrame) -> str:
    """Printed lines: whole scan and mean over anatomies, Recall@k with chance in brackets."""
    ks = [c.split("@")[1] for c in frame.columns if c.startswith("recall@")]
    lines = []
    for scope in (WHOLE_SCAN, MEAN_OVER_ANATOMIES):
        for _, row in frame[frame["scope"] == scope].iterrows():
            recall = "/".join(f"{row[f'recall@{k}']:.2f}" for k in ks)
            chance = "/".join(f"{row[f'chance@{k}']:.2f}" for k in ks)
            lines.append(
                f"  {name:<8} {scope:<20} {row['direction']:<14} {recall} (chance {chance})"
            )
    return "\n".join(lines)
