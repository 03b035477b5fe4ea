"""The preprocessing cache on disk: one contract for its writer, the dataset and evaluation.

Layout (fields in ``docs/architecture.md``, "Preprocessing cache")::

    <cache>/manifest.csv                  study_id, split, status (ok|failed), reason
    <cache>/studies/<id>/image.npy        float16 (D, H, W), canonical axes, HU window -> [0, 1]
    <cache>/studies/<id>/anatomy.npy      uint8 (D, H, W) anatomy ids of the table
    <cache>/studies/<id>/meta.json        spacing, shape, decisions, per-anatomy bbox and
                                          field-of-view truncation, input hashes, and size and
                                          CRC-32 of the three other files (``files``)
    <cache>/studies/<id>/report.json      findings, impression, per-anatomy text/normal/source
                                          and decomposer_used (``rules`` where the LLM fell back)

:class:`StudyCache` is the only code that spells this layout out: ``fvlm preprocess`` writes
through it, :class:`~fvlm.data_modules.CachedStudyDataset` and evaluation read through it. It
imports neither Lightning nor torch.

A study folder appears all at once: its files are written into ``<cache>/.tmp/`` and the folder is
renamed into place, so a run killed at any moment leaves each study either complete or absent, and
``manifest.csv`` is replaced atomically too. A failed write (a full disk, a quota, a file-size
limit) leaves the study's previous folder as it was: the old folder is moved aside only once the
new one is complete. ``meta.json`` records the size and CRC-32 of the three other files
(``files``), so :meth:`StudyCache.verify_study` (and ``fvlm verify-cache``) find truncated or
altered files. A lock file keeps two runs off one cache, and a second lock lets a new run wait for
worker processes that a killed run left finishing their last study.

``meta.json`` lists every anatomy of the table (absent ones with ``voxels: 0, bbox: null``).
Studies that are no longer in the input manifest stay on disk but are not listed in
``manifest.csv``, which is what readers go by.
"""

from __future__ import annotations

import csv
import errno
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
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fvlm.anatomy import AnatomyTable

__all__ = [
    "MANIFEST_COLUMNS",
    "STUDY_FILES",
    "CacheBusy",
    "CacheEntry",
    "CacheError",
    "StudyCache",
    "file_fingerprint",
    "storage_full",
    "text_fingerprint",
    "verify_cache",
]

MANIFEST_COLUMNS = ("study_id", "split", "status", "reason")
_REQUIRED_COLUMNS = MANIFEST_COLUMNS[:3]  # ``reason`` is for people, readers need no more
STUDY_FILES = ("image.npy", "anatomy.npy", "meta.json", "report.json")
_ARRAYS = ("image.npy", "anatomy.npy")
_CHECKED_FILES = (*_ARRAYS, "report.json")  # meta.json records these (it cannot record itself)
# The errors that mean "the storage is full", whichever limit was hit: space, quota, file size.
_STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_CHUNK = 1 << 20
UNRECORDED = "meta.json records no file sizes and checksums (written before they were recorded)"
_worker_lock_fd: int | None = None


class CacheBusy(RuntimeError):
    """Another preprocessing run holds the cache."""


class CacheError(ValueError):
    """A cache file that does not follow the contract; the message names the study and file."""


class CacheEntry(NamedTuple):
    """One row of ``manifest.csv``: a study, its split, ``ok`` or ``failed`` and why."""

    study_id: str
    split: str
    status: str
    reason: str = ""


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


def storage_full(err: BaseException) -> str | None:
    """The words for a full disk, quota or file-size limit behind ``err`` or its causes, else None.

    numpy's ``tofile`` reports a short write as "N requested and M written" without an errno, so
    the cache writes arrays through Python's file objects, which raise ``ENOSPC``/``EFBIG``.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _STORAGE_FULL:
            return os.strerror(err.errno)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def _crc32(chunks: Iterable[bytes | memoryview]) -> str:
    value = 0
    for chunk in chunks:
        value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _write_checked(path: Path, chunks: Iterable[bytes | memoryview]) -> dict:
    """Write ``chunks`` to ``path``; its ``{"size", "crc32"}`` as ``meta.json`` records it.

    The checksum is taken from the bytes in memory while writing, so no file is read back.
    """
    value, size = 0, 0
    with path.open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            value = zlib.crc32(chunk, value)
            size += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
    return {"size": size, "crc32": f"{value:08x}"}


def _npy_chunks(array: np.ndarray) -> Iterator[bytes | memoryview]:
    """The bytes of ``np.save(array)`` (format 1.0 header, C order) without a copy of the data."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    yield header.getvalue()
    flat = memoryview(array.reshape(-1).view(np.uint8))
    for start in range(0, len(flat), 16 * _CHUNK):
        yield flat[start : start + 16 * _CHUNK]


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(16 * _CHUNK):
            yield chunk


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
    """The cache contract: where each file lives, how it is read, written and checked.

    Readers go by ``manifest.csv``: :meth:`ok_studies` lists what may be used, :meth:`study_meta`,
    :meth:`study_report` and :meth:`open_arrays` read one study (arrays as memory maps, so a crop
    reads only its own pages), and :meth:`bboxes` / :meth:`truncated` turn ``meta.json``'s
    per-anatomy entries into arrays in anatomy-table order. The writer holds :meth:`lock` and
    writes with :meth:`write_study` and :meth:`write_manifest`.

    Args:
        root: The cache folder; created on first write.
        shard: A writer of one shard (``shard-K-of-N``, :mod:`~fvlm.preprocess.shards`): its own
            lock, staging folder and manifest, so N machines fill one cache side by side.
    """

    def __init__(self, root: str | Path, shard: str | None = None) -> None:
        self.root = Path(root)
        self.studies = self.root / "studies"
        suffix = f"-{shard}" if shard else ""
        self.tmp = self.root / f".tmp{suffix}"
        self._lock_name = f".lock{suffix}"
        self._workers_lock_name = f".workers{suffix}.lock"
        self.manifest_path = self.root / (f"manifest.{shard}.csv" if shard else "manifest.csv")

    # -- layout ----------------------------------------------------------------------------------

    def study_dir(self, study_id: str) -> Path:
        """Folder of one study; refuses ids that would leave ``studies/``."""
        if not study_id or study_id in (".", "..") or "/" in study_id or "\\" in study_id:
            raise ValueError(f"study id {study_id!r} is not a safe folder name")
        return self.studies / study_id

    def is_complete(self, study_id: str) -> bool:
        """Whether all four files of the study are there (a user may have deleted some)."""
        folder = self.study_dir(study_id)
        return all((folder / name).is_file() for name in STUDY_FILES)

    def verify_study(self, study_id: str, checksums: bool = True) -> list[str]:
        """What is wrong with a study's files (``[]``: intact), one short phrase per problem.

        Sizes are compared with ``meta.json``'s ``files`` record (a stat: finds truncation);
        ``checksums`` also re-reads each file for its CRC-32 (finds altered bytes).
        """
        folder = self.study_dir(study_id)
        missing = [name for name in STUDY_FILES if not (folder / name).is_file()]
        if missing:
            return [f"missing {', '.join(missing)}"]
        meta = self.read_meta(study_id)
        if meta is None:
            return ["meta.json is unreadable"]
        record = meta.get("files")
        if not isinstance(record, dict) or set(record) != set(_CHECKED_FILES):
            return [UNRECORDED]
        problems = []
        for name in _CHECKED_FILES:
            path, expected = folder / name, record[name]
            size = path.stat().st_size
            if size != expected.get("size"):
                problems.append(f"{name} is {size} bytes, meta.json records {expected.get('size')}")
            elif checksums:
                try:
                    found = _crc32(_file_chunks(path))
                except OSError as err:
                    problems.append(f"{name} cannot be read ({err.strerror or err})")
                    continue
                if found != expected.get("crc32"):
                    problems.append(
                        f"{name} has CRC-32 {found}, meta.json records {expected.get('crc32')}"
                    )
        return problems

    # -- reading ---------------------------------------------------------------------------------

    def read_manifest(self) -> list[CacheEntry]:
        """Rows of ``manifest.csv`` (any status), in the order the writer listed them.

        Raises:
            FileNotFoundError: There is no manifest: the cache was never built.
            CacheError: A column readers need is missing.
        """
        path = self.manifest_path
        if not path.is_file():
            hint = "run `fvlm preprocess` first"
            if any(self.root.glob("manifest.shard-*-of-*.csv")):
                hint = "it was built in shards: run `fvlm merge-shards` first"
            raise FileNotFoundError(f"no cache manifest at {path}; {hint}")
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise CacheError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
            return [
                CacheEntry(row["study_id"], row["split"], row["status"], row.get("reason") or "")
                for row in reader
            ]

    def ok_studies(self, split: str | None = None) -> list[str]:
        """Ids of the ``ok`` studies of ``split`` (every split for ``None``), in manifest order."""
        return [
            row.study_id
            for row in self.read_manifest()
            if row.status == "ok" and (split is None or row.split == split)
        ]

    def read_meta(self, study_id: str) -> dict | None:
        """The study's ``meta.json``, or ``None`` if absent or unreadable (the writer redoes it)."""
        try:
            return json.loads((self.study_dir(study_id) / "meta.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def study_meta(self, study_id: str) -> dict:
        """The ``meta.json`` of a study the manifest lists as ok.

        Raises:
            CacheError: Missing or unreadable, naming the file.
        """
        return self._read_json(study_id, "meta.json")

    def study_report(self, study_id: str) -> dict:
        """The ``report.json`` of a study (raises :class:`CacheError` naming the file)."""
        return self._read_json(study_id, "report.json")

    def _read_json(self, study_id: str, name: str) -> dict:
        path = self.study_dir(study_id) / name
        try:
            value = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise CacheError(
                f"study {study_id!r}: cannot read {path} ({type(err).__name__}: {err}); "
                "rerun `fvlm preprocess` on this cache"
            ) from err
        if not isinstance(value, dict):
            raise CacheError(f"study {study_id!r}: {path} is not a JSON object")
        return value

    def open_arrays(self, study_id: str, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``image`` and ``anatomy`` of a study as read-only memory maps, shapes checked.

        Nothing is read yet: slicing a memory map reads only the pages of the slice, which is
        what keeps a training crop's cost independent of the scan's size.

        Raises:
            CacheError: A file is missing or unreadable, or the shapes disagree with each other
                or with ``meta['shape']``.
        """
        folder = self.study_dir(study_id)
        try:
            image = np.load(folder / "image.npy", mmap_mode="r")
            anatomy = np.load(folder / "anatomy.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise CacheError(f"study {study_id!r}: cannot read {folder}: {err}") from err
        if image.ndim != 3 or image.shape != anatomy.shape:
            raise CacheError(
                f"study {study_id!r}: image {image.shape} and anatomy {anatomy.shape} must be the "
                "same 3D shape"
            )
        if meta is not None and "shape" in meta and tuple(meta["shape"]) != image.shape:
            raise CacheError(
                f"study {study_id!r}: meta.json shape {meta['shape']} != image {image.shape}"
            )
        return image, anatomy

    def hu_window(self) -> tuple[float, float] | None:
        """The HU window the cache mapped to [0, 1] (of its first ``ok`` study; ``None``: none)."""
        for study_id in self.ok_studies():
            window = self.study_meta(study_id).get("hu_window")
            return None if window is None else (float(window[0]), float(window[1]))
        return None

    # -- per-anatomy fields of meta.json -----------------------------------------------------------

    @staticmethod
    def anatomy_entries(meta: dict, table: AnatomyTable, study_id: str) -> list[dict]:
        """``meta['anatomies']`` in table order (``{}`` for an anatomy the meta does not list).

        Raises:
            CacheError: The meta names anatomies the table lacks (a cache of another table).
        """
        entries = meta.get("anatomies") or {}
        StudyCache.check_names(entries, table, study_id, "meta.json")
        return [entries.get(name) or {} for name in table.names]

    @staticmethod
    def check_names(entries: dict, table: AnatomyTable, study_id: str, where: str) -> None:
        """Refuse per-anatomy entries (of ``meta.json`` or ``report.json``) the table lacks."""
        unknown = sorted(set(entries) - set(table.names))
        if unknown:
            raise CacheError(
                f"study {study_id!r}: {where} names anatomies {unknown[:5]} that the anatomy "
                f"table {table.name!r} lacks; was the cache written with another table?"
            )

    @classmethod
    def bboxes(cls, meta: dict, table: AnatomyTable, study_id: str) -> np.ndarray:
        """``(A, 3, 2)`` half-open boxes on the cache grid in table order (all zero: absent)."""
        boxes = np.zeros((len(table), 3, 2), dtype=np.int64)
        for i, entry in enumerate(cls.anatomy_entries(meta, table, study_id)):
            if entry.get("bbox") is not None and (entry.get("voxels") or 0) > 0:
                box = np.asarray(entry["bbox"])
                if box.shape != (3, 2):
                    raise CacheError(
                        f"study {study_id!r}: bbox of {table.names[i]!r} must be "
                        f"[[d0, d1], [h0, h1], [w0, w1]], got {entry['bbox']!r}"
                    )
                boxes[i] = box
        return boxes

    @classmethod
    def truncated(cls, meta: dict, table: AnatomyTable, study_id: str) -> np.ndarray:
        """``(A,)`` bool: the anatomy is cut by the scan's field of view (never valid).

        A cache written before truncation was recorded has no such field: nothing is truncated.
        """
        entries = cls.anatomy_entries(meta, table, study_id)
        return np.array([bool(entry.get("truncated", False)) for entry in entries], dtype=bool)

    @staticmethod
    def anatomy_presence(meta: dict) -> dict[str, bool]:
        """``{name: complete}`` for the anatomies present in a study (complete: not truncated)."""
        return {
            name: not entry.get("truncated", False)
            for name, entry in (meta.get("anatomies") or {}).items()
            if entry and (entry.get("voxels") or 0) > 0
        }

    # -- writing ---------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the cache for one run; clears what killed runs left in ``.tmp``.

        Raises:
            CacheBusy: Another run holds the lock (the message names the cache).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / self._lock_name, os.O_RDWR | os.O_CREAT, 0o644)
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
        path = self.root / self._workers_lock_name
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
            _worker_lock_fd = os.open(
                self.root / self._workers_lock_name, os.O_RDWR | os.O_CREAT, 0o644
            )
            fcntl.flock(_worker_lock_fd, fcntl.LOCK_SH)

    def write_study(
        self, study_id: str, image: np.ndarray, anatomy: np.ndarray, meta: dict, report: dict
    ) -> dict:
        """Write the four files of a study and move the folder into place in one rename.

        Returns:
            The ``meta`` as written: with ``files``, the size and CRC-32 of the other files.
        """
        if image.dtype != np.float16 or anatomy.dtype != np.uint8:
            raise TypeError(
                f"expected float16 image and uint8 anatomy, got {image.dtype}, {anatomy.dtype}"
            )
        if image.shape != anatomy.shape:
            raise ValueError(f"image {image.shape} and anatomy {anatomy.shape} shapes differ")

        def arrays(staging: Path) -> dict:
            return {
                name: _write_checked(staging / name, _npy_chunks(array))
                for name, array in zip(_ARRAYS, (image, anatomy), strict=True)
            }

        return self._write_folder(study_id, arrays, meta, report)

    def rewrite_report(self, study_id: str, meta: dict, report: dict) -> dict:
        """Replace a study's ``report.json`` (and ``meta``), keeping its arrays (hard-linked).

        For a report decomposed again (an LLM fallback healed) without redoing the image. The
        folder is swapped as in :meth:`write_study`; ``meta['files']`` must describe the arrays
        (check them with :meth:`verify_study` first). Returns the ``meta`` as written.
        """
        source = self.study_dir(study_id)

        def arrays(staging: Path) -> dict:
            for name in _ARRAYS:
                try:
                    os.link(source / name, staging / name)
                except OSError:  # a file system without hard links
                    shutil.copyfile(source / name, staging / name)
            return {name: meta["files"][name] for name in _ARRAYS}

        return self._write_folder(study_id, arrays, meta, report)

    def _write_folder(
        self, study_id: str, arrays: Callable[[Path], dict], meta: dict, report: dict
    ) -> dict:
        target = self.study_dir(study_id)
        self.tmp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{study_id}.", dir=self.tmp))
        try:
            files = arrays(staging)
            files["report.json"] = _write_checked(staging / "report.json", [_json_bytes(report)])
            meta = meta | {"files": {name: files[name] for name in _CHECKED_FILES}}
            _write_checked(staging / "meta.json", [_json_bytes(meta)])
            self._swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return meta

    def _swap_in(self, staging: Path, target: Path) -> None:
        self.studies.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.rename(staging, target)
            return
        # POSIX cannot rename a folder over a non-empty one: move the old one aside first. A kill
        # between the two renames leaves the study absent (redone next run), never half-written;
        # a failed second rename puts the old folder back.
        old = self.tmp / f"{target.name}.old.{uuid.uuid4().hex}"
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def record_files(self, study_id: str) -> dict | None:
        """Record sizes and checksums for a study written before they were (``None``: damaged).

        The files are taken as they are if they are whole: both arrays open with ``meta.json``'s
        shape (a truncated array does not) and ``report.json`` parses. Returns the new meta.
        """
        meta = self.read_meta(study_id)
        try:
            self.open_arrays(study_id, meta)
            self.study_report(study_id)
        except CacheError:
            return None
        folder = self.study_dir(study_id)
        files = {
            name: {
                "size": (folder / name).stat().st_size,
                "crc32": _crc32(_file_chunks(folder / name)),
            }
            for name in _CHECKED_FILES
        }
        meta = (meta or {}) | {"files": files}
        self.update_meta(study_id, meta)
        return meta

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
        target = self.manifest_path
        self.tmp.mkdir(parents=True, exist_ok=True)
        staging = self.tmp / f"manifest.{uuid.uuid4().hex}.csv"
        try:
            with staging.open("w", encoding="utf-8", newline="") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())  # on disk before it replaces the old one
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        return target


def verify_cache(cache: Path, checksums: bool = True) -> int:
    """Check every study ``manifest.csv`` lists as ok against its ``meta.json`` record.

    Prints one line per damaged study (truncated, altered or missing files) and a summary; a
    damaged study is redone by the next ``fvlm preprocess`` run on the same manifest. Exit
    status: 0 all intact, 1 some damaged, 2 no readable cache.

    Args:
        cache: The preprocessing cache folder.
        checksums: Re-read every file for its CRC-32 (finds altered bytes); ``false`` compares
            sizes only (finds truncation, reads nothing).
    """
    store = StudyCache(cache)
    studies = store.ok_studies()
    damaged = 0
    for study_id in studies:
        if problems := store.verify_study(study_id, checksums):
            damaged += 1
            print(f"damaged {study_id}: {'; '.join(problems)}")
    how = "sizes and CRC-32" if checksums else "sizes"
    print(
        f"verify-cache: {len(studies)} ok studies in {store.root}, {how} checked: "
        f"{len(studies) - damaged} intact, {damaged} damaged"
        + ("; rerun `fvlm preprocess` to redo them" if damaged else "")
    )
    return 1 if damaged else 0
