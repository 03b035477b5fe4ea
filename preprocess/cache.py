"""The preprocessing cache on disk (contract: ``docs/architecture.md``), written crash-safely.

Layout::

    <cache>/manifest.csv                  study_id, split, status (ok|failed), reason
    <cache>/studies/<id>/image.npy        float16 (D, H, W), canonical axes, HU window -> [0, 1]
    <cache>/studies/<id>/anatomy.npy      uint8 (D, H, W) anatomy ids of the table
    <cache>/studies/<id>/meta.json        spacing, shape, decisions, per-anatomy bbox, input hashes
    <cache>/studies/<id>/report.json      findings, impression, per-anatomy text/normal/source

A study folder appears all at once: its files are written into ``<cache>/.tmp/`` and the folder is
renamed into place, so a run killed at any moment leaves each study either complete or absent, and
``manifest.csv`` is replaced atomically too. A lock file keeps two runs off one cache, and a second
lock lets a new run wait for worker processes that a killed run left finishing their last study.

``meta.json`` lists every anatomy of the table (absent ones with ``voxels: 0, bbox: null``).
Studies that are no longer in the input manifest stay on disk but are not listed in
``manifest.csv``, which is what readers go by.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "MANIFEST_COLUMNS",
    "STUDY_FILES",
    "CacheBusy",
    "StudyCache",
    "file_fingerprint",
    "text_fingerprint",
]

MANIFEST_COLUMNS = ("study_id", "split", "status", "reason")
STUDY_FILES = ("image.npy", "anatomy.npy", "meta.json", "report.json")
_CHUNK = 1 << 20
_worker_lock_fd: int | None = None


class CacheBusy(RuntimeError):
    """Another preprocessing run holds the cache."""


def file_fingerprint(path: Path, previous: dict | None = None) -> dict:
    """SHA-256, size and mtime of a file; reuses ``previous['sha256']`` if size and mtime match.

    The stat shortcut (as in ``git status``) lets a resumed run over thousands of large volumes
    decide "unchanged" without reading them again; a changed mtime falls back to hashing.
    """
    stat = path.stat()
    if (
        previous
        and previous.get("size") == stat.st_size
        and previous.get("mtime_ns") == stat.st_mtime_ns
        and previous.get("sha256")
    ):
        digest = previous["sha256"]
    else:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
        digest = sha.hexdigest()
    return {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def text_fingerprint(*parts: str) -> str:
    """SHA-256 of text parts (NUL-separated, so that moving text between parts changes it)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


_FLAT_LIST = re.compile(r"\[[^\[\]{}\"]*\]")
_LIST_OF_FLAT_LISTS = re.compile(r"\[\s*\[[^{}\"]*?\]\s*\]")


def _inline(match: re.Match) -> str:
    return re.sub(r"\s+", " ", match.group(0)).replace("[ ", "[").replace(" ]", "]")


def _json_bytes(value: object) -> bytes:
    """Indented JSON with number lists (spacing, bbox, affine) kept on one line, for reading."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    text = _LIST_OF_FLAT_LISTS.sub(_inline, _FLAT_LIST.sub(_inline, text))
    return (text + "\n").encode("utf-8")


class StudyCache:
    """Reader/writer of one cache folder.

    Args:
        root: The cache folder; created on first write.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.tmp = self.root / ".tmp"

    def study_dir(self, study_id: str) -> Path:
        """Folder of one study; refuses ids that would leave ``studies/``."""
        if not study_id or study_id in (".", "..") or "/" in study_id or "\\" in study_id:
            raise ValueError(f"study id {study_id!r} is not a safe folder name")
        return self.studies / study_id

    def is_complete(self, study_id: str) -> bool:
        """Whether all four files of the study are there (a user may have deleted some)."""
        folder = self.study_dir(study_id)
        return all((folder / name).is_file() for name in STUDY_FILES)

    def read_meta(self, study_id: str) -> dict | None:
        """The study's ``meta.json``, or ``None`` if absent or unreadable (then it is redone)."""
        try:
            return json.loads((self.study_dir(study_id) / "meta.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the cache for one run; clears what killed runs left in ``.tmp``.

        Raises:
            CacheBusy: Another run holds the lock (the message names the cache).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CacheBusy(
                    f"another preprocessing run is using the cache {self.root}"
                ) from None
            self._wait_for_orphans()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.studies.mkdir(parents=True, exist_ok=True)
            yield
        finally:
            os.close(fd)

    def _wait_for_orphans(self, timeout_s: float = 120.0) -> None:
        # Workers of a killed run hold this lock shared until they notice and exit (well under a
        # second, or after the study they are writing).
        path = self.root / ".workers.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise CacheBusy(
                            f"worker processes of an earlier run still hold {path} after "
                            f"{timeout_s:.0f} s (`fuser {path}` lists them)"
                        ) from None
                    time.sleep(0.1)
        finally:
            os.close(fd)

    def hold_as_worker(self) -> None:
        """Called in each worker process: marks it alive for :meth:`lock` of a later run."""
        global _worker_lock_fd
        if _worker_lock_fd is None:
            _worker_lock_fd = os.open(self.root / ".workers.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(_worker_lock_fd, fcntl.LOCK_SH)

    def write_study(
        self, study_id: str, image: np.ndarray, anatomy: np.ndarray, meta: dict, report: dict
    ) -> None:
        """Write the four files of a study and move the folder into place in one rename."""
        if image.dtype != np.float16 or anatomy.dtype != np.uint8:
            raise TypeError(
                f"expected float16 image and uint8 anatomy, got {image.dtype}, {anatomy.dtype}"
            )
        if image.shape != anatomy.shape:
            raise ValueError(f"image {image.shape} and anatomy {anatomy.shape} shapes differ")
        self.tmp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{study_id}.", dir=self.tmp))
        try:
            np.save(staging / "image.npy", np.ascontiguousarray(image))
            np.save(staging / "anatomy.npy", np.ascontiguousarray(anatomy))
            (staging / "report.json").write_bytes(_json_bytes(report))
            (staging / "meta.json").write_bytes(_json_bytes(meta))
            self._swap_in(staging, self.study_dir(study_id))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _swap_in(self, staging: Path, target: Path) -> None:
        self.studies.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.rename(staging, target)
            return
        # POSIX cannot rename a folder over a non-empty one: move the old one aside first. A kill
        # between the two renames leaves the study absent (redone next run), never half-written.
        old = self.tmp / f"{target.name}.old.{uuid.uuid4().hex}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)

    def update_meta(self, study_id: str, meta: dict) -> None:
        """Replace only ``meta.json`` of a study (atomic file rename), e.g. refreshed file stats."""
        target = self.study_dir(study_id) / "meta.json"
        self.tmp.mkdir(parents=True, exist_ok=True)
        staging = self.tmp / f"meta.{study_id}.{uuid.uuid4().hex}.json"
        staging.write_bytes(_json_bytes(meta))
        os.replace(staging, target)

    def remove_study(self, study_id: str) -> None:
        """Remove a study's folder (its inputs changed and now fail: stale data must not stay)."""
        target = self.study_dir(study_id)
        if target.exists():
            old = self.tmp / f"{study_id}.old.{uuid.uuid4().hex}"
            self.tmp.mkdir(parents=True, exist_ok=True)
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)

    def write_manifest(self, rows: Iterable[tuple[str, str, str, str]]) -> Path:
        """Atomically replace ``manifest.csv`` (``study_id, split, status, reason`` rows)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
        target = self.root / "manifest.csv"
        self.tmp.mkdir(parents=True, exist_ok=True)
        staging = self.tmp / f"manifest.{uuid.uuid4().hex}.csv"
        staging.write_text(buffer.getvalue(), encoding="utf-8")
        os.replace(staging, target)
        return target
