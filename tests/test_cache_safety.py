"""Nothing lost, nothing run: failed writes keep good data, and damaged cache files are found.

A file-size limit (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored, in a subprocess) stands in for a full
disk: writes past it fail with ``EFBIG`` exactly as they fail with ``ENOSPC`` on a full one. The
studies are the small synthetic ones of ``test_preprocess_runner``.
"""

from __future__ import annotations

import errno
import resource
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from cache_factory import write_cache
from test_preprocess_runner import _cache_files, _config, write_dataset

from fvlm.cli import main as fvlm_main
from fvlm.data_modules import CachedStudyDataset
from fvlm.preprocess.cache import CacheError, StudyCache, storage_full, verify_cache
from fvlm.preprocess.decomposition import Decomposition
from fvlm.preprocess.runner import run_preprocess


def _snapshot(cache: Path) -> dict[str, bytes]:
    return {name: (cache / name).read_bytes() for name in _cache_files(cache)}


def _preprocess_with_file_size_limit(manifest: Path, cache: Path, limit: int, *extra: str):
    """``fvlm preprocess`` in a process that cannot write files larger than ``limit`` bytes."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [
        sys.executable, "-m", "fvlm.preprocess.cli", "--manifest", str(manifest),
        "--cache", str(cache), "--spacing", "[4, 2, 2]", "--workers", "1", "--progress", "false",
        "--totalseg_version", "v2", *extra,
    ]  # fmt: skip
    return subprocess.run(
        command, preexec_fn=limit_file_size, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """A manifest of 4 studies and a cache of them built by a normal run."""
    folder = tmp_path_factory.mktemp("safety")
    manifest = write_dataset(folder / "data", 4)
    cache = folder / "cache"
    assert run_preprocess(_config(manifest, cache)).exit_code == 0
    return manifest, cache


def _copy(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    subprocess.run(["cp", "-a", str(cache), str(copy)], check=True)
    return copy


def test_full_storage_stops_early_and_keeps_every_study(built, tmp_path):
    manifest, reference = built
    cache = _copy(reference, tmp_path)
    before = _snapshot(cache)
    image_bytes = (cache / "studies" / "s000" / "image.npy").stat().st_size
    # A forced rerun where no image fits: before, the first failure deleted each study (4 -> 0).
    run = _preprocess_with_file_size_limit(manifest, cache, image_bytes // 2, "--force", "true")
    assert run.returncode == 3, run.stderr
    assert "STOPPED EARLY" in run.stdout and "File too large" in run.stdout
    assert "3 studies not reached" in run.stdout  # stopped after the first, not after all four
    assert (
        "failed s000: cache: OSError" in run.stdout and "previous cache entry is kept" in run.stdout
    )
    assert _snapshot(cache) == before  # every study and the manifest byte for byte
    assert not any((cache / ".tmp").iterdir())  # the half-written study was cleared
    # With room again, the same forced rerun rewrites the same bytes.
    assert run_preprocess(_config(manifest, cache, force=True)).counts["ok"] == 4
    assert _snapshot(cache) == before


def test_manifest_that_cannot_be_written_is_reported_and_kept(built, tmp_path):
    manifest, reference = built
    cache = _copy(reference, tmp_path)
    before = _snapshot(cache)
    size = (cache / "manifest.csv").stat().st_size
    # Every study is unchanged (skipped): only the manifest is written, and it does not fit.
    run = _preprocess_with_file_size_limit(manifest, cache, size // 2)
    assert run.returncode == 3, run.stderr
    assert "Traceback" not in run.stderr
    assert "manifest.csv could not be replaced (File too large)" in run.stdout
    assert "4 skipped" in run.stdout
    assert _snapshot(cache) == before


def test_storage_full_is_recognised_through_its_causes():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert storage_full(full) == "No space left on device"
    assert storage_full(OSError(errno.EDQUOT, "quota")) == "Disk quota exceeded"
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("writing study x") from err
    except RuntimeError as wrapped:
        assert storage_full(wrapped) == "No space left on device"
    assert storage_full(OSError(errno.EACCES, "denied")) is None
    assert storage_full(OSError("204800 requested and 176000 written")) is None


class _BrokenDecomposer:
    """The decomposer of a redo that fails (a bug, a crash): the study's redo fails."""

    def decompose(self, findings: str, impression: str) -> Decomposition:
        raise RuntimeError("decomposer crashed")


def test_failed_redo_keeps_the_previous_output_and_its_row(built, tmp_path):
    manifest, reference = built
    cache = _copy(reference, tmp_path)
    before = _snapshot(cache)
    summary = run_preprocess(_config(manifest, cache, force=True), decomposer=_BrokenDecomposer())
    assert summary.counts == {"ok": 0, "skipped": 0, "failed": 4} and summary.exit_code == 1
    assert all(r.kept_previous for r in summary.results)
    assert "decomposer crashed; its previous cache entry is kept" in summary.results[0].reason
    assert _snapshot(cache) == before  # the inputs did not change: the old output is current


def test_every_write_records_sizes_and_checksums(built):
    _, cache = built
    meta = StudyCache(cache).study_meta("s001")
    folder = cache / "studies" / "s001"
    assert set(meta["files"]) == {"image.npy", "anatomy.npy", "report.json"}
    for name, record in meta["files"].items():
        assert record["size"] == (folder / name).stat().st_size
        assert len(record["crc32"]) == 8
    # np.load reads the arrays the cache writes without numpy's own writer
    image = np.load(folder / "image.npy")
    assert image.dtype == np.float16 and list(image.shape) == meta["shape"]


def _damage(cache: Path) -> None:
    """Truncate one study's image, flip one byte of another's anatomy map (same size)."""
    image = cache / "studies" / "s001" / "image.npy"
    image.write_bytes(image.read_bytes()[:-1000])
    anatomy = cache / "studies" / "s002" / "anatomy.npy"
    data = bytearray(anatomy.read_bytes())
    data[-7] ^= 0x01
    anatomy.write_bytes(bytes(data))


def test_verify_finds_truncated_and_altered_files(built, tmp_path, capsys):
    manifest, reference = built
    cache = _copy(reference, tmp_path)
    _damage(cache)
    store = StudyCache(cache)
    assert store.verify_study("s000") == []
    (truncated,) = store.verify_study("s001")
    assert "image.npy is" in truncated and "bytes, meta.json records" in truncated
    (altered,) = store.verify_study("s002")
    assert "anatomy.npy has CRC-32" in altered
    assert store.verify_study("s002", checksums=False) == []  # sizes alone cannot see it

    assert verify_cache(cache) == 1
    out = capsys.readouterr().out
    assert "damaged s001: image.npy" in out and "damaged s002: anatomy.npy" in out
    assert "4 ok studies" in out and "2 intact, 2 damaged" in out
    assert fvlm_main(["verify-cache", "--cache", str(cache), "--checksums", "false"]) == 1
    assert "3 intact, 1 damaged" in capsys.readouterr().out
    assert fvlm_main(["verify-cache", "--cache", str(reference)]) == 0
    assert fvlm_main(["verify-cache", "--cache", str(tmp_path / "none")]) == 2

    # A rerun redoes exactly the damaged studies (by size only: the truncated one) ...
    size_only = run_preprocess(_config(manifest, cache, verify="size"))
    assert size_only.counts == {"ok": 1, "skipped": 3, "failed": 0}
    checked = run_preprocess(_config(manifest, cache))
    assert checked.counts == {"ok": 1, "skipped": 3, "failed": 0}
    # ... back to the bytes of the undamaged cache.
    assert _snapshot(cache) == _snapshot(reference)


def test_dataset_names_an_unreadable_study_and_can_skip_it(tmp_path, paper_table):
    cache = write_cache(tmp_path / "cache", n_train=3, n_val=0, shape=(8, 12, 12))
    image = cache / "studies" / "train_001" / "image.npy"
    image.write_bytes(image.read_bytes()[:200])
    strict = CachedStudyDataset(cache, "train", paper_table, (8, 8, 8), train=False)
    assert strict[0]["study_id"] == "train_000"
    with pytest.raises(CacheError, match=r"study 'train_001'.*skip_unreadable"):
        strict[1]
    lenient = CachedStudyDataset(
        cache, "train", paper_table, (8, 8, 8), train=False, skip_unreadable=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = [lenient[i]["study_id"] for i in range(len(lenient))]
    assert ids == ["train_000", "train_002", "train_002"]  # the next readable study instead
    assert [str(w.message) for w in caught if "train_001" in str(w.message)][:1]
    assert list(lenient.unreadable) == ["train_001"]


def test_a_cache_written_before_checksums_is_adopted_not_redone(built, tmp_path):
    manifest, reference = built
    cache = _copy(reference, tmp_path)
    store = StudyCache(cache)
    for study_id in ("s000", "s001"):
        meta = store.study_meta(study_id)
        del meta["files"]
        store.update_meta(study_id, meta)
    image = cache / "studies" / "s001" / "image.npy"
    image.write_bytes(image.read_bytes()[:-1000])  # an old study that is truncated
    assert store.verify_study("s000") == [
        "meta.json records no file sizes and checksums (written before they were recorded)"
    ]
    summary = run_preprocess(_config(manifest, cache))
    # the whole one gets its record, the truncated one (its array no longer opens) is redone
    assert summary.counts == {"ok": 1, "skipped": 3, "failed": 0}
    assert [r.study_id for r in summary.results if r.status == "ok"] == ["s001"]
    assert _snapshot(cache) == _snapshot(reference)
