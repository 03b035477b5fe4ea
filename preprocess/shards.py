"""Preprocessing across machines: ``--shard K/N`` runs into one shared cache, then one merge.

A SLURM array (or any scheduler) starts N ``fvlm preprocess --shard K/N`` runs on the same
manifest and the same cache folder. Each run takes the studies whose id hashes to its shard, so the
split does not depend on the manifest's row order and a study added later lands in one shard
only. Study folders are written atomically by rename, so shards share ``studies/``; what they
must not share is the lock, the staging folder and the manifest, so each shard has its own
(``.lock-shard-K-of-N``, ``.tmp-shard-K-of-N``, ``manifest.shard-K-of-N.csv``).
:func:`merge_shards` (``fvlm merge-shards``) then writes the ``manifest.csv`` that training and
evaluation read, in the input manifest's order, and refuses while a shard is missing or
incomplete.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .cache import CacheEntry, StudyCache
from .manifest import read_manifest

__all__ = ["Shard", "ShardError", "merge_shards", "shard_manifests"]

_SHARD_FILE = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.csv")


class ShardError(ValueError):
    """Shards that cannot be merged (missing, of different counts, lacking studies)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based, as SLURM's array task ids usually are) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard must be K/N with 1 <= K <= N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` -> :class:`Shard` (e.g. ``"$SLURM_ARRAY_TASK_ID/8"``)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"shard must be written K/N (e.g. 3/8), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def name(self) -> str:
        """Suffix of this shard's lock, staging folder and manifest."""
        return f"shard-{self.index}-of-{self.count}"

    def holds(self, study_id: str) -> bool:
        """Whether the study belongs to this shard (a hash of its id, stable across machines)."""
        digest = hashlib.sha256(study_id.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1


def shard_manifests(cache: Path) -> dict[Shard, Path]:
    """The shard manifests in ``cache``, by shard."""
    found = {}
    for path in Path(cache).glob("manifest.shard-*-of-*.csv"):
        if match := _SHARD_FILE.fullmatch(path.name):
            found[Shard(int(match.group(1)), int(match.group(2)))] = path
    return found


def _shard_rows(cache: Path, manifest: Path) -> list[CacheEntry]:
    found = shard_manifests(cache)
    counts = sorted({shard.count for shard in found})
    if not counts:
        raise ShardError(f"{cache}: no shard manifests (manifest.shard-K-of-N.csv) to merge")
    if len(counts) > 1:
        raise ShardError(
            f"{cache}: shard manifests of different shard counts {counts}; remove the stale ones"
        )
    count = counts[0]
    missing = [k for k in range(1, count + 1) if Shard(k, count) not in found]
    if missing:
        raise ShardError(
            f"{cache}: shards {', '.join(f'{k}/{count}' for k in missing)} have not finished "
            "(no manifest.shard file); run them, then merge"
        )
    by_id: dict[str, CacheEntry] = {}
    for shard in sorted(found, key=lambda s: s.index):
        for entry in StudyCache(cache, shard=shard.name).read_manifest():
            by_id[entry.study_id] = entry
    rows, lacking = [], []
    for row in read_manifest(manifest).rows:
        entry = by_id.get(row.study_id)
        if entry is None:
            lacking.append(row.study_id)
        else:
            rows.append(entry)
    if lacking:
        raise ShardError(
            f"{cache}: {len(lacking)} studies of {manifest} are in no shard manifest (e.g. "
            f"{', '.join(lacking[:5])}); a shard run stopped early: rerun it, then merge"
        )
    return rows


def merge_shards(manifest: Path, cache: Path) -> int:
    """Write the cache's ``manifest.csv`` from its shard manifests (after ``--shard K/N`` runs).

    Rows follow ``manifest``'s order; the shard manifests are kept (a rerun of one shard and a
    new merge update it). Exit status: 0 merged, all studies ok; 1 merged, some studies failed;
    2 not merged (a shard missing or incomplete, or shard counts mixed).

    Args:
        manifest: The input manifest every shard ran on.
        cache: The shared cache folder.
    """
    try:
        rows = _shard_rows(Path(cache), Path(manifest))
        store = StudyCache(cache)
        with store.lock():
            path = store.write_manifest(rows)
    except (ShardError, OSError) as err:
        print(f"fvlm merge-shards: error: {err}", file=sys.stderr)
        return 2
    failed = sum(entry.status != "ok" for entry in rows)
    print(f"merged {len(rows)} studies ({failed} failed) -> {path}")
    return 1 if failed else 0
