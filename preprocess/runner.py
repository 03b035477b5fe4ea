"""The ``make preprocess`` pipeline: manifest -> per-study cache, in parallel, resumable.

Per study: load the volume (NIfTI, or ``.npz`` as the Rad-ChestCT release stores it), apply an
external rescale only if the data are not HU yet, take the TotalSegmentator label map (precomputed
or run here) and group it into the table's anatomies on the source grid, canonicalise image and
anatomy map together, record which anatomies the field of view truncates (on the original grid),
resample (trilinear / nearest) on one grid, window HU, decompose the report, write the study
atomically through :class:`~fvlm.preprocess.cache.StudyCache`. A study is skipped when its
input hashes and the settings' hash match its ``meta.json`` and its cache files pass
:meth:`~fvlm.preprocess.cache.StudyCache.verify_study`; with the LLM decomposer, a study whose
report fell back to the rules for some anatomy is decomposed again (its arrays are kept).

A failure costs only its study: it is listed as failed with a one-line reason naming the file, and
the run goes on. Its previous output is removed only when its inputs or settings changed (it would
pass for current); a failed write, or a failed redo of an unchanged study, leaves the previous
output and its ``manifest.csv`` row as they were. A full disk, quota or file-size limit stops the
run early (no study after it could be written either). Exit codes: :data:`EXIT_CODES`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import textwrap
import threading
import time
from collections import Counter, deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from fvlm.anatomy import AnatomyTable, load_anatomy_table

from .cache import (
    UNRECORDED,
    CacheEntry,
    CacheError,
    StudyCache,
    file_fingerprint,
    storage_full,
    text_fingerprint,
)
from .config import PreprocessConfig
from .decomposition import Decomposer, Decomposition, build_decomposer
from .dicom import folder_fingerprint
from .manifest import Manifest, ManifestError, ManifestRow, read_manifest
from .rescale import apply_rescale, decide_rescale
from .segmentation import (
    MaskFile,
    anatomy_stats,
    check_mask_grid,
    check_totalsegmentator,
    detect_totalseg_version,
    read_mask,
    run_totalsegmentator,
)
from .truncation import truncated_faces
from .volume import Volume, canonicalise, load_volume, resample, window_hu

__all__ = ["EXIT_CODES", "RunSummary", "StudyProcessor", "StudyResult", "run_preprocess"]

Status = Literal["ok", "failed", "skipped"]
_REASON_CHARS = 400
EXIT_FAILED, EXIT_STORAGE, EXIT_FALLBACK = 1, 3, 4
EXIT_CODES = {
    0: "every study ok",
    EXIT_FAILED: "some studies failed (the others are in the cache)",
    2: "nothing was done (bad options, manifest, anatomy table, TotalSegmentator, cache in use)",
    EXIT_STORAGE: "stopped early: the cache could not be written (disk full, quota, file-size "
    "limit) or manifest.csv not replaced; previous cache entries are kept",
    EXIT_FALLBACK: "with fail_on_fallback: the LLM decomposer fell back to the rules somewhere",
    130: "interrupted",
}


@dataclass
class StudyResult:
    """What happened to one study; ``skipped`` studies are ``ok`` in the cache manifest."""

    line: int
    study_id: str
    split: str
    status: Status
    reason: str = ""
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    anatomies: dict[str, bool] = field(default_factory=dict)  # present anatomy -> complete
    fallback: int = 0  # anatomies the LLM decomposer left to the rules
    storage_full: str | None = None  # the words for a full disk / quota / file-size limit
    kept_previous: bool = False  # failed, but the previous output and manifest row stay


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _error_text(err: BaseException) -> str:
    message = str(err) or repr(err)
    return f"{type(err).__name__}: {message}"


class StudyProcessor:
    """Turns one manifest row into one cache entry; shipped to each worker process (picklable).

    Args:
        config: The run's settings.
        table: The anatomy table masks are grouped into and reports decomposed by.
        decomposer: The report decomposer (rules or LLM).
    """

    def __init__(self, config: PreprocessConfig, table: AnatomyTable, decomposer: Decomposer):
        self.config = config
        self.table = table
        self.decomposer = decomposer
        shard = config.shard_spec
        self.cache = StudyCache(config.cache, shard=shard.name if shard else None)
        self.settings = config.settings(table)
        self.config_hash = config.fingerprint(table)
        # The cores left to each worker process: a study's image and mask decode side by side
        # and its resampling is split across them (all 1 when workers fill the machine).
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = max(1, (cpus or 1) // config.workers)

    # -- resumability ----------------------------------------------------------------------------

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.config.manifest.parent))
        except ValueError:
            return str(path)

    def _inputs(self, row: ManifestRow, previous: dict | None) -> dict:
        before = (previous or {}).get("inputs") or {}
        fingerprint = folder_fingerprint if row.image.is_dir() else file_fingerprint  # DICOM
        inputs: dict = {
            "image": {"path": self._relative(row.image)}
            | fingerprint(row.image, before.get("image")),
            "mask": None,
            "report_sha256": text_fingerprint(row.findings, row.impression),
            "rescale": [row.rescale_slope, row.rescale_intercept],
        }
        if row.npz_spacing is not None:  # the geometry of a header-less volume is an input too
            inputs["npz_spacing"] = row.npz_spacing
        if row.dicom_series is not None:  # so is the series picked from a DICOM folder
            inputs["dicom_series"] = row.dicom_series
        if row.geometry is not None:  # so is the metadata geometry of an identity-affine one
            inputs["metadata_geometry"] = row.geometry.to_json()
        if self.config.segmenter == "precomputed" and row.mask is not None:
            inputs["mask"] = {"path": self._relative(row.mask)} | file_fingerprint(
                row.mask, before.get("mask")
            )
        return inputs

    @staticmethod
    def _content(inputs: dict) -> tuple:
        files = [inputs.get(k) or {} for k in ("image", "mask")]
        return (
            *(f.get("sha256") for f in files),
            inputs.get("report_sha256"),
            tuple(inputs.get("rescale") or ()),
            inputs.get("npz_spacing"),
            inputs.get("dicom_series"),
            inputs.get("metadata_geometry"),
        )

    def quick_unchanged(self, row: ManifestRow) -> dict | None:
        """The cached ``meta.json`` if unchanged by file size and mtime alone (no reading)."""
        if self.config.force or row.error is not None or row.image is None:
            return None
        if self.config.verify == "checksum":
            return None  # re-reading the files is the workers' job, in parallel
        meta = self.cache.read_meta(row.study_id)
        if not meta or meta.get("config_hash") != self.config_hash:
            return None
        if self.cache.verify_study(row.study_id, checksums=False) or self._fell_back(row.study_id):
            return None
        before = meta.get("inputs") or {}
        try:
            files = [(row.image, before.get("image"))]
            if self.config.segmenter == "precomputed":
                if row.mask is None:
                    return None
                files.append((row.mask, before.get("mask")))
            for path, recorded in files:
                stat = path.stat()
                if not recorded or (recorded.get("size"), recorded.get("mtime_ns")) != (
                    stat.st_size,
                    stat.st_mtime_ns,
                ):
                    return None
        except OSError:
            return None
        same_report = before.get("report_sha256") == text_fingerprint(row.findings, row.impression)
        same_rescale = before.get("rescale") == [row.rescale_slope, row.rescale_intercept]
        same_geometry = (
            before.get("npz_spacing") == row.npz_spacing
            and before.get("dicom_series") == row.dicom_series
            and before.get("metadata_geometry") == (row.geometry and row.geometry.to_json())
        )
        return meta if same_report and same_rescale and same_geometry else None

    def _current(self, study_id: str, previous: dict | None, inputs: dict) -> bool:
        """Whether the cached study was made from these inputs and settings and is intact.

        A study written before sizes and checksums were recorded gets them now, if it is whole.
        """
        if (
            previous is None
            or previous.get("config_hash") != self.config_hash
            or self._content(previous.get("inputs") or {}) != self._content(inputs)
        ):
            return False
        problems = self.cache.verify_study(study_id, self.config.verify == "checksum")
        if problems == [UNRECORDED]:
            return self.cache.record_files(study_id) is not None
        return not problems

    def _fell_back(self, study_id: str) -> bool:
        """With the LLM configured: some anatomy of the cached report came from the rules."""
        if self.config.decomposer != "llm":
            return False
        try:
            entries = self.cache.study_report(study_id).get("anatomies") or {}
        except CacheError:
            return True
        return any(e.get("decomposer_used") == "rules" for e in entries.values())

    # -- one study -------------------------------------------------------------------------------

    def process(self, row: ManifestRow) -> StudyResult:
        """Process (or skip) one study; never raises for a bad study, only for a broken cache."""
        start = time.perf_counter()
        result = StudyResult(row.line, row.study_id, row.split, "ok")
        stage = "manifest"
        previous, inputs = None, None
        try:
            if row.error is not None:
                raise _StudyError(row.error)
            if self.config.require_report and not row.findings and not row.impression:
                raise _StudyError("empty report (findings and impression are both empty)")
            if self.config.segmenter == "precomputed" and row.mask is None:
                raise _StudyError("no mask given (segmenter 'precomputed' needs the mask column)")
            stage = f"inputs {self._relative(row.image)}"
            previous = self.cache.read_meta(row.study_id)
            inputs = self._inputs(row, previous)
            stage = "cache"
            if not self.config.force and self._current(row.study_id, previous, inputs):
                self._keep(row, previous, inputs, result)
                return result
            stage = f"inputs {self._relative(row.image)}"
            image, anatomy, meta, report, decomposition = self._build(row, inputs, result)
            stage = "cache"
            meta = self.cache.write_study(row.study_id, image, anatomy, meta, report)
            self._record(result, meta, decomposition)
        except _StudyError as err:
            result.status, result.reason = "failed", _one_line(str(err))
        except Exception as err:  # one bad study must not stop the run
            result.status = "failed"
            result.reason = _one_line(f"{getattr(err, 'stage', stage)}: {_error_text(err)}")
            result.storage_full = storage_full(err)
        finally:
            result.seconds = time.perf_counter() - start
        if result.status == "failed" and row.error is None:
            self._after_failure(row, result, stage, previous, inputs)
        return result

    def _keep(self, row: ManifestRow, previous: dict, inputs: dict, result: StudyResult) -> None:
        """An unchanged, intact study: skipped, or its report decomposed again (LLM fallback)."""
        previous = self.cache.read_meta(row.study_id) or previous  # with ``files`` if just recorded
        meta = previous | {"inputs": inputs}
        if self._fell_back(row.study_id):
            with _stage(f"report of {row.study_id}"):
                decomposition = self.decomposer.decompose(row.findings, row.impression)
            report = self._report(row, decomposition)
            if report != self.cache.study_report(row.study_id):
                meta = self.cache.rewrite_report(row.study_id, meta, report)
                self._record(result, meta, decomposition)
                return
            result.fallback = len(decomposition.fallback)
        if previous.get("inputs") != inputs:  # same content, new stat: remember it
            self.cache.update_meta(row.study_id, meta)
        result.status = "skipped"
        result.anatomies = self.cache.anatomy_presence(meta)

    def _record(self, result: StudyResult, meta: dict, decomposition: Decomposition) -> None:
        result.anatomies = self.cache.anatomy_presence(meta)
        result.outcomes = Counter(decomposition.outcomes)
        result.sources = Counter(d.source for d in decomposition.anatomies.values())
        result.fallback = len(decomposition.fallback)

    def _after_failure(
        self,
        row: ManifestRow,
        result: StudyResult,
        stage: str,
        previous: dict | None,
        inputs: dict | None,
    ) -> None:
        """Keep the previous output unless the study's inputs or settings changed since."""
        try:
            if not self.cache.study_dir(row.study_id).exists():
                return
            if (
                result.storage_full
                or stage == "cache"
                or (inputs is not None and self._current(row.study_id, previous, inputs))
            ):
                result.kept_previous = True
                result.reason = _one_line(f"{result.reason}; its previous cache entry is kept")
            else:  # its inputs changed and now fail: the old output must not pass for current
                self.cache.remove_study(row.study_id)
        except OSError as err:
            result.reason = _one_line(f"{result.reason}; stale output not removed: {err}")

    def _build(
        self, row: ManifestRow, inputs: dict, result: StudyResult
    ) -> tuple[np.ndarray, np.ndarray, dict, dict, Decomposition]:
        """The four cache files of one study (image, anatomy, meta, report) + its decomposition."""
        config = self.config
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fvlm-mask") as pool:
            # A precomputed mask is decoded and grouped while the image decodes (both release
            # the GIL); its grid is checked against the image once both are read.
            mask = None
            if config.segmenter == "precomputed":
                read = pool.submit(read_mask, row.mask)
                mask = (read, pool.submit(self._group_mask, row, read))
            with _stage(f"image {self._relative(row.image)}"):
                loaded = load_volume(
                    row.image, row.npz_spacing, row.geometry, config.geometry_rule, row.dicom_series
                )
                decision = decide_rescale(
                    loaded.volume.data, row.rescale_slope, row.rescale_intercept, config.rescale
                )
                hu = Volume(apply_rescale(loaded.volume.data, decision), loaded.volume.affine)
            if decision.warning:
                result.warnings.append(f"{row.study_id}: {decision.warning}")
            if loaded.geometry.get("warning"):
                result.warnings.append(f"{row.study_id}: {loaded.geometry['warning']}")
            grouped, segmentation = self._anatomy_map(row, hu, mask)
            mask = read = None  # the futures hold the source-grid label map: let it go
        with _stage(f"resampling {self._relative(row.image)}"):
            # Views, not copies: the resampling reads any layout, and a copy would hold the
            # source grid twice at the peak.
            canonical, orientation = canonicalise(hu, contiguous=False)
            canonical_anatomy, _ = canonicalise(Volume(grouped, hu.affine), contiguous=False)
            # Each source-grid array is freed once read for the last time, before resampling
            # allocates its outputs: a lower peak (only the file's metadata of ``loaded`` is
            # used below).
            loaded = replace(loaded, volume=Volume(np.empty((0, 0, 0)), hu.affine))
            del hu, grouped
            cut = truncated_faces(
                canonical_anatomy.data, canonical_anatomy.spacing, config.truncation_margin_mm
            )
            # The label map first: its source grid is gone before the image's resampling
            # allocates (the peak).
            anatomy = resample(canonical_anatomy, config.spacing, "nearest").data
            del canonical_anatomy
            volume = resample(canonical, config.spacing, "linear", threads=self.threads)
            del canonical
            image = window_hu(volume.data, config.hu_window).astype(np.float16)
        with _stage(f"report of {row.study_id}"):
            decomposition = self.decomposer.decompose(row.findings, row.impression)
        meta = {
            "study_id": row.study_id,
            "shape": [int(n) for n in image.shape],
            "spacing": [round(s, 6) for s in volume.spacing],
            "affine": np.round(volume.affine, 6).tolist(),
            "hu_window": list(config.hu_window),
            "table": self.table.name,
            "orientation": orientation,
            "geometry": loaded.geometry,
            "rescale": decision.to_json()
            | {
                "nifti_scl_slope": loaded.scl_slope,
                "nifti_scl_inter": loaded.scl_inter,
                "stored_dtype": loaded.stored_dtype,
            },
            "segmentation": segmentation,
            "anatomies": _with_truncation(anatomy_stats(anatomy, self.table), cut, self.table),
            "inputs": inputs,
            "config_hash": self.config_hash,
            "settings": self.settings,
        }
        report = self._report(row, decomposition)
        return image, anatomy.astype(np.uint8, copy=False), meta, report, decomposition

    def _report(self, row: ManifestRow, decomposition: Decomposition) -> dict:
        """``report.json``: sections and, per anatomy, text, normal, source and decomposer used."""
        kind = self.config.decomposer
        return {
            "study_id": row.study_id,
            "findings": row.findings,
            "impression": row.impression,
            "decomposer": kind,
            "anatomies": {
                name: {
                    "text": d.text,
                    "normal": bool(d.normal),
                    "normal_source": d.normal_source,
                    "source": d.source,
                    "decomposer_used": "rules" if name in decomposition.fallback else kind,
                }
                for name, d in decomposition.anatomies.items()
            },
        }

    def _group_mask(self, row: ManifestRow, read: Future[MaskFile]) -> tuple[np.ndarray, str, str]:
        """Grouped anatomy ids of a precomputed mask, with its TotalSegmentator version.

        The map is grouped in place: the read's class ids are not needed afterwards.
        """
        labels = read.result().labels
        version, why = detect_totalseg_version(labels, self.config.totalseg_version, row.mask)
        return self.table.group(labels, version, in_place=True), version, why

    def _anatomy_map(
        self,
        row: ManifestRow,
        hu: Volume,
        mask: tuple[Future[MaskFile], Future[tuple[np.ndarray, str, str]]] | None,
    ) -> tuple[np.ndarray, dict]:
        """Grouped anatomy ids on the source grid, and how they were obtained (for meta).

        ``mask``: the pending read and grouping of a precomputed mask (see :meth:`_build`).
        """
        config = self.config
        if mask is not None:
            with _stage(f"mask {self._relative(row.mask)}"):
                read, grouping = mask
                check_mask_grid(read.result(), hu)  # a wrong grid is the error to report first
                grouped, version, why = grouping.result()
        else:
            with _stage(f"TotalSegmentator on {self._relative(row.image)}"):
                image = nib.Nifti1Image(np.asarray(hu.data, dtype=np.float32), hu.affine)
                labels = run_totalsegmentator(image, config.totalseg_fast, config.totalseg_device)
                version, why = "v2", "TotalSegmentator 2, task 'total'"
                grouped = self.table.group(labels, version)
        record = {"segmenter": config.segmenter, "totalseg_version": version, "version_reason": why}
        return grouped, record


def _with_truncation(
    stats: dict[str, dict], cut: dict[int, list[str]], table: AnatomyTable
) -> dict[str, dict]:
    """Add ``truncated`` and ``truncated_faces`` (field of view, original grid) to each anatomy.

    ``truncated_faces`` lists every face the mask reaches; ``truncated`` ignores the anatomy's
    ``open_ends`` (the aorta leaving a chest scan at its last slice is still complete).
    """
    for name, entry in stats.items():
        faces = cut.get(entry["id"], [])
        closed = [face for face in faces if face not in table[name].open_ends]
        entry |= {"truncated": bool(closed), "truncated_faces": faces}
    return stats


class _StudyError(Exception):
    """A study-level problem whose message is already the reason to report."""


@contextmanager
def _stage(name: str) -> Iterator[None]:
    """Tag an exception with the step (and file) it came from, for a reason that names it."""
    try:
        yield
    except Exception as err:
        if not hasattr(err, "stage"):
            try:
                err.stage = name
            except AttributeError:  # exceptions with __slots__ keep the outer stage
                pass
        raise


# -- the run -----------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """The outcome of a run, in manifest order, with counts for the final report."""

    results: list[StudyResult]
    seconds: float
    manifest_path: Path
    stopped: str | None = None  # why the run stopped early (storage full, manifest not written)
    not_reached: int = 0  # studies not attempted because the run stopped early
    fail_on_fallback: bool = False

    @property
    def counts(self) -> dict[str, int]:
        """Studies per status (``ok`` = processed now, ``skipped`` = unchanged, ``failed``)."""
        found = Counter(r.status for r in self.results)
        return {status: found[status] for status in ("ok", "skipped", "failed")}

    @property
    def outcomes(self) -> Counter:
        """Decomposition outcome counts summed over the processed studies."""
        return sum((r.outcomes for r in self.results), Counter())

    @property
    def sources(self) -> Counter:
        """How the per-anatomy texts were obtained (llm / rules / default), summed."""
        return sum((r.sources for r in self.results), Counter())

    @property
    def anatomy_counts(self) -> dict[str, tuple[int, int]]:
        """Per anatomy, ``(present, complete)`` study counts over the ok and skipped studies.

        Complete means present and not truncated by the scan's field of view: only those can
        ever be valid in the loss, so a low ratio warns before any training starts.
        """
        counts: dict[str, list[int]] = {}
        for result in self.results:
            for name, complete in result.anatomies.items():
                entry = counts.setdefault(name, [0, 0])
                entry[0] += 1
                entry[1] += int(complete)
        return {name: (present, complete) for name, (present, complete) in counts.items()}

    @property
    def fallback_studies(self) -> int:
        """Studies with anatomies the LLM decomposer left to the rules (asked again next run)."""
        return sum(r.fallback > 0 for r in self.results)

    @property
    def exit_code(self) -> int:
        """3 stopped early, else 1 if a study failed, else 4 for fallbacks if asked, else 0."""
        if self.stopped:
            return EXIT_STORAGE
        if any(r.status == "failed" for r in self.results):
            return EXIT_FAILED
        return EXIT_FALLBACK if self.fail_on_fallback and self.fallback_studies else 0

    def format(self, max_failures: int = 20) -> str:
        """Human-readable end-of-run report."""
        status = self.counts
        processed = [r for r in self.results if r.status == "ok"]
        lines = [
            f"preprocess: {len(self.results)} studies in {self.seconds:.1f} s: "
            f"{status['ok']} processed ok, {status['skipped']} skipped (unchanged), "
            f"{status['failed']} failed -> {self.manifest_path}"
        ]
        if self.stopped:
            lines.insert(0, f"preprocess: STOPPED EARLY: {self.stopped}")
            if self.not_reached:
                lines.append(
                    f"  {self.not_reached} studies not reached: their cache entries and "
                    "manifest rows are as the previous run left them"
                )
        if processed:
            per_study = sum(r.seconds for r in processed) / len(processed)
            lines.append(
                f"  time per processed study: {per_study:.3f} s (in its worker); "
                f"throughput {len(processed) / max(self.seconds, 1e-9):.2f} studies/s"
            )
        if self.sources or self.outcomes:
            lines.append(
                "  report decomposition: anatomy texts by source "
                + _counts(self.sources)
                + "; outcomes "
                + _counts(self.outcomes)
            )
        if fell_back := [r for r in self.results if r.fallback]:
            lines.append(
                f"  LLM fallback: {len(fell_back)} studies have "
                f"{sum(r.fallback for r in fell_back)} anatomy texts from the keyword rules (LLM "
                "unusable or unparseable); the next run"
                " with the LLM configured asks again"
            )
        if anatomies := self.anatomy_counts:
            usable = status["ok"] + status["skipped"]
            lines.append(
                f"  anatomies in {usable} studies, present/complete (complete = not truncated "
                "by the field of view):"
            )
            pairs = ", ".join(f"{n} {p}/{c}" for n, (p, c) in anatomies.items())
            lines.extend(
                textwrap.wrap(pairs, width=100, initial_indent="    ", subsequent_indent="    ")
            )
        failed = [r for r in self.results if r.status == "failed"]
        for result in failed[:max_failures]:
            lines.append(f"  failed {result.study_id}: {result.reason}")
        if len(failed) > max_failures:
            lines.append(f"  ... and {len(failed) - max_failures} more failures (see manifest)")
        warnings = [w for r in self.results for w in r.warnings]
        for warning in warnings[:max_failures]:
            lines.append(f"  warning {warning}")
        return "\n".join(lines)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items())) or "none"


_PROCESSOR: StudyProcessor | None = None
_ORPHAN_POLL_S = 0.25


def _init_worker(processor: StudyProcessor, parent: int) -> None:
    global _PROCESSOR
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    processor.cache.hold_as_worker()
    _PROCESSOR = processor


def _exit_with_parent(parent: int) -> None:
    # A pool worker blocks on its task queue forever once the main process is gone (SIGKILL,
    # OOM killer), so it watches for being orphaned and exits; a study it was writing is left in
    # the cache's .tmp/ (cleared by the next run) and never appears half-written. ``parent`` is
    # the main process's pid, passed in: a worker that starts after the main died exits at once.
    while os.getppid() == parent:
        time.sleep(_ORPHAN_POLL_S)
    os._exit(1)


def _work(row: ManifestRow) -> StudyResult:
    assert _PROCESSOR is not None
    return _PROCESSOR.process(row)


def _context() -> mp.context.BaseContext:
    # spawn: a worker's parent is this process, so it can tell when it is orphaned (forkserver
    # workers are children of the server, which they keep alive), and no fork happens after
    # OpenMP/BLAS threads exist here (which can deadlock).
    return mp.get_context("spawn")


def _execute(
    processor: StudyProcessor, rows: Sequence[ManifestRow], workers: int, stop: threading.Event
) -> Iterator[StudyResult]:
    """Results in completion order: in this process for one worker, else in a process pool.

    Once ``stop`` is set no further study starts; those in flight finish and are yielded.
    """
    if workers <= 1 or len(rows) <= 1:
        for row in rows:
            if stop.is_set():
                return
            yield processor.process(row)
        return
    pending = deque(rows)
    while pending and not stop.is_set():
        suspects = deque((yield from _pool_pass(processor, pending, workers, stop)))
        # A worker died (killed by the OS, e.g. out of memory, or a crash in native code): the
        # studies that were in flight are retried one at a time to find the one that kills it.
        while suspects and not stop.is_set():
            yield from _pool_pass(processor, suspects, 1, stop, isolate=True)


def _pool_pass(
    processor: StudyProcessor,
    pending: deque,
    workers: int,
    stop: threading.Event,
    isolate: bool = False,
) -> Generator[StudyResult, None, list[ManifestRow]]:
    """Run rows from ``pending`` until done or the pool breaks; return the rows in flight then.

    With ``isolate`` one row is in flight at a time, so a broken pool names its culprit: that
    study fails and the pass ends (the caller starts a fresh pool for the rest).
    """
    in_flight: dict[Future, ManifestRow] = {}
    limit = 1 if isolate else 2 * workers
    pool = ProcessPoolExecutor(
        min(workers, len(pending)),
        mp_context=_context(),
        initializer=_init_worker,
        initargs=(processor, os.getpid()),
    )
    try:
        while in_flight or (pending and not stop.is_set()):
            while pending and len(in_flight) < limit and not stop.is_set():
                row = pending.popleft()
                in_flight[pool.submit(_work, row)] = row
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                row = in_flight.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    if not isolate:
                        return [row, *in_flight.values()]
                    yield StudyResult(
                        row.line,
                        row.study_id,
                        row.split,
                        "failed",
                        "worker process died while processing this study (killed by the "
                        "operating system, e.g. out of memory, or crashed)",
                    )
                    return []
        return []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_preprocess(
    config: PreprocessConfig,
    decomposer: Decomposer | None = None,
    table: AnatomyTable | None = None,
) -> RunSummary:
    """Build or update the cache described by ``config``.

    Args:
        config: Settings (manifest and cache paths included).
        decomposer: Report decomposer; built from ``config`` when omitted (tests pass their own).
        table: Anatomy table; loaded from ``config.anatomy_table`` when omitted.

    Raises:
        ManifestError, AnatomyTableError, TotalSegmentatorUnavailable, CacheBusy: Problems that
            would fail every study are raised before any study is touched.
    """
    start = time.perf_counter()
    table = table or load_anatomy_table(config.anatomy_table)
    manifest: Manifest = read_manifest(config.manifest)
    if (shard := config.shard_spec) is not None:
        manifest = replace(
            manifest, rows=[row for row in manifest.rows if shard.holds(row.study_id)]
        )
    if config.segmenter == "precomputed" and not manifest.has_masks:
        raise ManifestError(
            f"manifest {config.manifest} has no 'mask' column, which segmenter 'precomputed' "
            "needs; add precomputed TotalSegmentator masks or use segmenter 'totalsegmentator'"
        )
    if config.segmenter == "totalsegmentator":
        check_totalsegmentator(config.totalseg_fast)
    decomposer = decomposer or build_decomposer(config.decomposer, table, config.llm)
    processor = StudyProcessor(config, table, decomposer)
    cache = processor.cache
    results: dict[int, StudyResult] = {}
    stop, stopped = threading.Event(), None
    with cache.lock():
        todo = []
        for row in manifest.rows:
            if (meta := processor.quick_unchanged(row)) is not None:
                results[row.line] = StudyResult(
                    row.line,
                    row.study_id,
                    row.split,
                    "skipped",
                    anatomies=StudyCache.anatomy_presence(meta),
                )
            elif row.error is not None:
                results[row.line] = processor.process(row)
            else:
                todo.append(row)
        bar = tqdm(
            total=len(manifest.rows),
            initial=len(results),
            desc="preprocess",
            unit="study",
            disable=not config.progress,
            dynamic_ncols=True,
        )
        with bar:
            for result in _execute(processor, todo, config.workers, stop):
                results[result.line] = result
                bar.update(1)
                if result.status == "failed" and config.progress:
                    bar.write(f"failed {result.study_id}: {result.reason}")
                if result.storage_full and not stop.is_set():
                    stop.set()
                    stopped = (
                        f"the cache's storage is full ({result.storage_full}) while writing "
                        f"study {result.study_id} to {cache.root}; no study after it was started "
                        "and every previous cache entry is kept: free space (or raise the quota "
                        "or file-size limit) and rerun"
                    )
        ordered = [results[row.line] for row in manifest.rows if row.line in results]
        try:
            path = cache.write_manifest(_manifest_rows(manifest, results, _previous_rows(cache)))
        except OSError as err:
            path = cache.manifest_path
            why = storage_full(err) or err.strerror or str(err)
            stopped = (stopped + "; " if stopped else "") + (
                f"{path} could not be replaced ({why}): it still lists what the previous run "
                "left, which is still in the cache"
            )
    return RunSummary(
        ordered,
        time.perf_counter() - start,
        path,
        stopped=stopped,
        not_reached=len(manifest.rows) - len(ordered),
        fail_on_fallback=config.fail_on_fallback,
    )


def _previous_rows(cache: StudyCache) -> dict[str, CacheEntry]:
    """The rows of the cache's current ``manifest.csv`` by study id (none if unreadable)."""
    try:
        return {entry.study_id: entry for entry in cache.read_manifest()}
    except (OSError, CacheError):
        return {}


def _manifest_rows(
    manifest: Manifest, results: dict[int, StudyResult], previous: dict[str, CacheEntry]
) -> list[tuple[str, str, str, str]]:
    """The rows of the new ``manifest.csv``.

    A failed attempt that kept its output, or a study the run did not reach, keeps its previous row.
    """
    rows = []
    for row in manifest.rows:
        result = results.get(row.line)
        if result is None or result.kept_previous:
            if (entry := previous.get(row.study_id)) is not None:
                rows.append(tuple(entry))
                continue
            if result is None:
                continue
        assert result is not None
        status = "failed" if result.status == "failed" else "ok"
        rows.append((result.study_id, result.split, status, result.reason))
    return rows
