"""End-to-end preprocessing of tiny synthetic studies: cache, resume, crash safety, bad input.

The studies are built here (a body, liver, spleen, kidneys and a vertebra in HU with a
TotalSegmentator v2 label map), stored in RAS, LPS and with NIfTI scl_slope/scl_inter, so that the
test controls every broken-input case exactly. ``test_phantom_end_to_end`` runs the project's
phantom generator as well once it exists.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations
from openai_stub_server import Reply, StubOpenAIServer

from fvlm.anatomy import load_anatomy_table, totalsegmentator_classes
from fvlm.phantom import generate_phantom
from fvlm.preprocess.cache import StudyCache
from fvlm.preprocess.cli import main
from fvlm.preprocess.config import LLMConfig, PreprocessConfig
from fvlm.preprocess.decomposition import Decomposition, RuleDecomposer
from fvlm.preprocess.runner import run_preprocess

V2 = {name: cid for cid, name in totalsegmentator_classes("v2").items()}
SPACING = (4.0, 2.0, 2.0)  # coarse, keeps the tests fast
FINDINGS = (
    "The liver shows a 2 cm hypodense cyst. The spleen is normal in size. Kidneys are normal."
)
IMPRESSION = "Hepatic cyst."


def _study_arrays(seed: int, shape=(40, 36, 20)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU volume and v2 label map in RAS voxel order (x: left->right, y: post->ant, z: inf->sup)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    cx, cy = shape[0] / 2 + rng.uniform(-1, 1), shape[1] / 2 + rng.uniform(-1, 1)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.42 * shape[1])) ** 2 < 1
    hu[body] = 20
    organs = [  # name, centre (fractions of the shape), radii (voxels), HU
        ("liver", (0.68, 0.55, 0.6), (7, 6, 6), 60),  # patient's right: high x in RAS
        ("spleen", (0.30, 0.45, 0.6), (3, 3, 3), 50),
        ("kidney_right", (0.62, 0.30, 0.35), (2.5, 2.5, 3), 35),
        ("kidney_left", (0.38, 0.30, 0.35), (2.5, 2.5, 3), 35),
        ("vertebrae_L1", (0.50, 0.18, 0.4), (2, 2, 2), 700),
    ]
    for name, centre, radii, value in organs:
        c = [f * n + rng.uniform(-0.5, 0.5) for f, n in zip(centre, shape, strict=True)]
        inside = sum(((g - ci) / r) ** 2 for g, ci, r in zip((x, y, z), c, radii, strict=True)) < 1
        hu[inside] = value
        labels[inside] = V2[name]
    hu += rng.normal(0, 5, shape).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [-30.0, -27.0, 100.0 + seed]
    return np.round(hu).astype(np.int16), labels, affine


def _store(data: np.ndarray, affine: np.ndarray, axcodes: str) -> nib.Nifti1Image:
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(tuple(axcodes))
    )
    stored = orientations.apply_orientation(data, transform)
    return nib.Nifti1Image(
        np.ascontiguousarray(stored),
        affine @ orientations.inv_ornt_aff(transform, data.shape),
    )


def write_dataset(folder: Path, n: int, extra_rows: list[dict] | None = None) -> Path:
    """``n`` studies (RAS / LPS / scaled in turn) plus ``extra_rows``; returns the manifest."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        study = f"s{i:03d}"
        hu, labels, affine = _study_arrays(i)
        axcodes = ("RAS", "LPS", "PIR")[i % 3]
        image = _store(hu, affine, axcodes)
        if i % 4 == 3:  # stored raw with scl_slope/scl_inter in the header
            image = nib.Nifti1Image(
                (np.asarray(image.dataobj) + 1024).astype(np.int16), image.affine
            )
            image.header.set_slope_inter(1.0, -1024.0)
        nib.save(image, folder / "images" / f"{study}.nii.gz")
        nib.save(_store(labels, affine, axcodes), folder / "masks" / f"{study}.nii.gz")
        rows.append(
            {
                "study_id": study,
                "image": f"images/{study}.nii.gz",
                "mask": f"masks/{study}.nii.gz",
                "findings": FINDINGS,
                "impression": IMPRESSION,
                "split": "train" if i % 5 else "valid",
            }
        )
    rows += extra_rows or []
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(
            handle, ["study_id", "image", "mask", "findings", "impression", "split"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _config(manifest: Path, cache: Path, **overrides) -> PreprocessConfig:
    # the label maps here are v2 but too small for the version to be detected from them
    values = {"spacing": SPACING, "workers": 1, "progress": False, "totalseg_version": "v2"}
    values |= overrides
    return PreprocessConfig(manifest=manifest, cache=cache, **values)


def _cache_rows(cache: Path) -> dict[str, dict]:
    with (cache / "manifest.csv").open(newline="") as handle:
        return {row["study_id"]: row for row in csv.DictReader(handle)}


def _cache_files(cache: Path) -> list[str]:
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.is_file() and not p.name.startswith(".") and ".tmp" not in p.parts
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), 6)


def test_end_to_end_cache_content(dataset, tmp_path, paper_table):
    cache = tmp_path / "cache"
    summary = run_preprocess(_config(dataset, cache))
    assert summary.counts == {"ok": 6, "skipped": 0, "failed": 0}, summary.format()
    assert summary.exit_code == 0
    rows = _cache_rows(cache)
    assert list(rows) == [f"s{i:03d}" for i in range(6)]
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert rows["s000"]["split"] == "valid" and rows["s001"]["split"] == "train"
    for study in rows:
        folder = cache / "studies" / study
        image = np.load(folder / "image.npy", mmap_mode="r")
        anatomy = np.load(folder / "anatomy.npy", mmap_mode="r")
        meta = json.loads((folder / "meta.json").read_text())
        report = json.loads((folder / "report.json").read_text())
        assert image.dtype == np.float16 and anatomy.dtype == np.uint8
        assert image.shape == anatomy.shape == tuple(meta["shape"])
        # 40 x 36 x 20 voxels of 1.5 x 1.5 x 3 mm in RAS -> (60 / 4, 54 / 2, 60 / 2) canonical
        assert image.shape == (15, 27, 30)
        assert meta["spacing"] == list(SPACING)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert meta["table"] == "paper" and meta["orientation"]["canonical_axcodes"] == "SAR"
        assert set(np.unique(anatomy)) <= {0, *paper_table.ids}
        for name, stats in meta["anatomies"].items():
            where = np.argwhere(np.asarray(anatomy) == paper_table[name].id)
            assert stats["voxels"] == len(where)
            if len(where):
                assert stats["bbox"] == [
                    [int(lo), int(hi) + 1]
                    for lo, hi in zip(where.min(0), where.max(0), strict=True)
                ]
            else:
                assert stats["bbox"] is None
        for name in ("liver", "spleen", "kidney", "lumbar_vertebrae"):
            assert meta["anatomies"][name]["voxels"] > 0, name
        # canonical axis 2 grows towards the patient's right: liver right of spleen
        liver, spleen = meta["anatomies"]["liver"]["bbox"], meta["anatomies"]["spleen"]["bbox"]
        assert liver[2][0] > spleen[2][1] - 3
        assert np.mean(liver[2]) > np.mean(spleen[2])
        assert meta["config_hash"] and meta["inputs"]["image"]["sha256"]
        assert report["anatomies"]["liver"]["normal"] is False
        assert "cyst" in report["anatomies"]["liver"]["text"]
        assert report["anatomies"]["spleen"]["normal"] is True
        assert report["anatomies"]["pancreas"]["source"] == "default"
    scaled = json.loads((cache / "studies" / "s003" / "meta.json").read_text())
    assert scaled["rescale"]["nifti_scl_inter"] == -1024.0
    assert scaled["rescale"]["air_as_stored"] == pytest.approx(-1000, abs=30)


def test_orientation_of_the_file_does_not_change_the_cache(tmp_path):
    # the same scan stored RAS, LPS and PIR gives byte-identical arrays
    hu, labels, affine = _study_arrays(7)
    rows = []
    for axcodes in ("RAS", "LPS", "PIR"):
        nib.save(_store(hu, affine, axcodes), tmp_path / f"{axcodes}.nii.gz")
        nib.save(_store(labels, affine, axcodes), tmp_path / f"{axcodes}_seg.nii.gz")
        rows.append([axcodes, f"{axcodes}.nii.gz", f"{axcodes}_seg.nii.gz", FINDINGS, IMPRESSION])
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["study_id", "image", "mask", "findings", "impression"], *rows]
        )
    assert run_preprocess(_config(manifest, tmp_path / "cache")).exit_code == 0
    studies = tmp_path / "cache" / "studies"
    for name in ("image.npy", "anatomy.npy"):
        assert filecmp.cmp(studies / "RAS" / name, studies / "LPS" / name, shallow=False)
        assert filecmp.cmp(studies / "RAS" / name, studies / "PIR" / name, shallow=False)


def test_rerun_skips_unchanged_and_redoes_changed(dataset, tmp_path):
    cache = tmp_path / "cache"
    run_preprocess(_config(dataset, cache))
    before = {p: (cache / p).read_bytes() for p in _cache_files(cache)}
    again = run_preprocess(_config(dataset, cache))
    assert again.counts == {"ok": 0, "skipped": 6, "failed": 0}
    assert {p: (cache / p).read_bytes() for p in _cache_files(cache)} == before
    # workers and progress are not part of the settings' hash
    assert run_preprocess(_config(dataset, cache, workers=2)).counts["skipped"] == 6
    # a changed setting redoes everything
    assert run_preprocess(_config(dataset, cache, hu_window=(-1000, 1000))).counts["ok"] == 6
    # a touched but unchanged file is re-hashed, found equal and skipped
    image = dataset.parent / "images" / "s002.nii.gz"
    os.utime(image, ns=(time.time_ns(), time.time_ns()))
    assert run_preprocess(_config(dataset, cache, hu_window=(-1000, 1000))).counts["skipped"] == 6
    # a study with a file deleted from the cache is redone
    (cache / "studies" / "s001" / "image.npy").unlink()
    redo = run_preprocess(_config(dataset, cache, hu_window=(-1000, 1000)))
    assert redo.counts == {"ok": 1, "skipped": 5, "failed": 0}


def test_parallel_workers_give_the_same_cache(dataset, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run_preprocess(_config(dataset, serial))
    summary = run_preprocess(_config(dataset, parallel, workers=2))
    assert summary.counts["ok"] == 6
    files = _cache_files(serial)
    assert files == _cache_files(parallel)
    for name in files:
        assert filecmp.cmp(serial / name, parallel / name, shallow=False), name


def test_killed_run_resumes_to_identical_cache(tmp_path):
    manifest = write_dataset(tmp_path / "data", 24)
    reference = tmp_path / "reference"
    assert run_preprocess(_config(manifest, reference)).exit_code == 0

    cache = tmp_path / "cache"
    command = [
        sys.executable, "-m", "fvlm.preprocess.cli", "--manifest", str(manifest),
        "--cache", str(cache), "--spacing", "[4, 2, 2]", "--workers", "2", "--progress", "false",
        "--totalseg_version", "v2",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    studies = cache / "studies"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if studies.is_dir() and any(studies.iterdir()):
            break
        time.sleep(0.002)
    finished_alone = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not finished_alone, process.stderr.read().decode()
    done = [p.name for p in studies.iterdir()]
    print("studies done before the kill:", len(done))
    assert 1 <= len(done) < 24, done

    summary = run_preprocess(_config(manifest, cache))
    assert summary.exit_code == 0
    assert summary.counts["skipped"] >= 1 and summary.counts["ok"] <= 24 - 1
    files = _cache_files(reference)
    assert files == _cache_files(cache)
    for name in files:
        assert filecmp.cmp(reference / name, cache / name, shallow=False), name
    assert not any((cache / ".tmp").iterdir())


def test_broken_inputs_fail_alone(tmp_path, capsys):
    data = tmp_path / "data"
    extra = [
        {"study_id": "bad_gz", "image": "images/bad_gz.nii.gz", "mask": "masks/s000.nii.gz"},
        {"study_id": "truncated", "image": "images/truncated.nii.gz", "mask": "masks/s001.nii.gz"},
        {"study_id": "mask_shape", "image": "images/s000.nii.gz", "mask": "masks/small.nii.gz"},
        {"study_id": "mask_affine", "image": "images/s000.nii.gz", "mask": "masks/shifted.nii.gz"},
        {"study_id": "empty_report", "image": "images/s001.nii.gz", "mask": "masks/s001.nii.gz",
         "findings": " ", "impression": ""},
        {"study_id": "missing", "image": "images/nowhere.nii.gz", "mask": "masks/s001.nii.gz"},
        {"study_id": "../escape", "image": "images/s001.nii.gz", "mask": "masks/s001.nii.gz"},
    ]  # fmt: skip
    for row in extra:
        row.setdefault("findings", FINDINGS)
        row.setdefault("impression", IMPRESSION)
    manifest = write_dataset(data, 2, extra)
    (data / "images" / "bad_gz.nii.gz").write_bytes(os.urandom(2048))
    whole = (data / "images" / "s001.nii.gz").read_bytes()
    (data / "images" / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    seg = nib.load(data / "masks" / "s000.nii.gz")
    nib.save(
        nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), seg.affine), data / "masks" / "small.nii.gz"
    )
    shifted = seg.affine.copy()
    shifted[0, 3] += 1.5
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), shifted), data / "masks" / "shifted.nii.gz")
    with manifest.open("a") as handle:  # a row with too few fields, then a good one
        handle.write("short_row,images/s000.nii.gz\n")
        handle.write(f"late,images/s000.nii.gz,masks/s000.nii.gz,{FINDINGS},{IMPRESSION},test\n")

    cache = tmp_path / "cache"
    code = main(["--manifest", str(manifest), "--cache", str(cache), "--spacing", "[4, 2, 2]",
                 "--workers", "1", "--progress", "false", "--totalseg_version", "v2"])  # fmt: skip
    assert code == 1
    rows = _cache_rows(cache)
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {"s000", "s001", "late"}
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "failed"}
    assert "bad_gz.nii.gz" in reasons["bad_gz"]
    assert "truncated.nii.gz" in reasons["truncated"]
    assert "small.nii.gz" in reasons["mask_shape"] and "shape" in reasons["mask_shape"]
    assert "shifted.nii.gz" in reasons["mask_affine"] and "affine" in reasons["mask_affine"]
    assert "empty report" in reasons["empty_report"]
    assert "nowhere.nii.gz" in reasons["missing"]
    assert "safe folder name" in reasons["../escape"]
    assert "expected 6 fields, got 2" in reasons["short_row"]
    assert all("\n" not in reason for reason in reasons.values())
    studies = {p.name for p in (cache / "studies").iterdir()}
    assert studies == {"s000", "s001", "late"}
    out = capsys.readouterr().out
    assert "3 processed ok" in out and "8 failed" in out and "failed bad_gz:" in out

    # a rerun retries the failures only, and a fixed input then succeeds
    (data / "images" / "bad_gz.nii.gz").write_bytes((data / "images" / "s000.nii.gz").read_bytes())
    summary = run_preprocess(_config(manifest, cache))
    assert summary.counts == {"ok": 1, "skipped": 3, "failed": 7}


class _FlakyDecomposer:
    """Rules, except that one report makes it raise (e.g. a decomposer bug on odd text)."""

    def __init__(self) -> None:
        self.rules = RuleDecomposer(load_anatomy_table("paper"))

    def decompose(self, findings: str, impression: str) -> Decomposition:
        if "poison" in findings:
            raise RuntimeError("cannot parse this report")
        result = self.rules.decompose(findings, impression)
        result.outcomes["fake"] += 1
        return result


def test_decomposer_failure_and_outcome_counts(tmp_path):
    extra = [{"study_id": "poison", "image": "images/s000.nii.gz", "mask": "masks/s000.nii.gz",
              "findings": "poison pill", "impression": ""}]  # fmt: skip
    manifest = write_dataset(tmp_path / "data", 2, extra)
    summary = run_preprocess(_config(manifest, tmp_path / "cache"), decomposer=_FlakyDecomposer())
    assert summary.counts == {"ok": 2, "skipped": 0, "failed": 1}
    failed = [r for r in summary.results if r.status == "failed"][0]
    assert failed.study_id == "poison" and "cannot parse this report" in failed.reason
    assert summary.outcomes["fake"] == 2
    assert summary.sources == Counter({"default": 2 * 32, "rules": 2 * 3})
    assert "outcomes default 64, fake 2, " in summary.format()  # the rules' own counts follow


def test_bad_manifest_and_options_fail_before_any_study(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("study_id,image,findings\nx,y.nii.gz,z\n")
    assert main(["--manifest", str(manifest), "--cache", str(tmp_path / "c")]) == 2
    assert "lacks required column(s) impression" in capsys.readouterr().err
    manifest.write_text("study_id,image,findings,impression\nx,y.nii.gz,z,w\n")
    assert main(["--manifest", str(manifest), "--cache", str(tmp_path / "c")]) == 2
    assert "no 'mask' column" in capsys.readouterr().err
    assert main(["--manifest", str(tmp_path / "nope.csv"), "--cache", str(tmp_path / "c")]) == 2
    with pytest.raises(SystemExit):
        main(["--manifest", str(manifest), "--cache", "c", "--segmenter", "magic"])
    with pytest.raises(ValueError, match="hu_window"):
        PreprocessConfig(manifest=manifest, cache=tmp_path, hu_window=(400, -300))


def test_config_file_and_help(tmp_path, capsys):
    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--spacing", "--hu_window", "--segmenter", "--totalseg_version", "--workers",
                   "--decomposer", "--llm.base_url", "--rescale", "--config"):  # fmt: skip
        assert option in help_text
    for name in ("phantom", "abdomen", "chest"):
        path = repo / "configs" / "preprocess" / f"{name}.yaml"
        with pytest.raises(SystemExit):
            main(["--config", str(path), "--manifest", "m.csv", "--cache", "c", "--print_config"])
        printed = capsys.readouterr().out
        assert "spacing" in printed and "hu_window" in printed, name
    chest = (repo / "configs" / "preprocess" / "chest.yaml").read_text()
    assert "0.75" in chest and "-1000" in chest


def test_phantom_end_to_end(tmp_path, capsys):
    folder = tmp_path / "phantom"
    manifest = generate_phantom(
        folder, n_studies=8, seed=1, shape=(24, 32, 32), spacing=(8.0, 5.0, 5.0), progress=False
    )
    cache = tmp_path / "cache"
    demo = Path(__file__).resolve().parents[1] / "configs" / "preprocess" / "phantom.yaml"
    args = ["--config", str(demo), "--manifest", str(manifest), "--cache", str(cache),
            "--workers", "1", "--progress", "false"]  # fmt: skip
    assert main(args) == 0
    assert "8 processed ok" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 processed ok, 8 skipped" in capsys.readouterr().out
    with (folder / "labels.csv").open(newline="") as handle:
        labels = list(csv.DictReader(handle))
    storage = Counter()
    for row in labels:
        study = cache / "studies" / row["study_id"]
        meta = json.loads((study / "meta.json").read_text())
        report = json.loads((study / "report.json").read_text())
        assert meta["shape"] == [24, 32, 32]
        assert meta["rescale"]["warning"] is None
        assert meta["rescale"]["air_as_stored"] == pytest.approx(-1000, abs=50)
        storage[meta["orientation"]["source_axcodes"], meta["rescale"]["nifti_scl_inter"]] += 1
        assert meta["anatomies"]["liver"]["voxels"] > 0
        # the impression names exactly the drawn diseases, so their anatomies are not normal
        for key, value in row.items():
            anatomy = key.split("/")[0]
            if value == "1" and anatomy in report["anatomies"]:
                assert report["anatomies"][anatomy]["normal"] is False, (row["study_id"], key)
    assert len(storage) > 1, storage  # the phantom varies orientation and header scaling


class _KillerDecomposer:
    """Rules, but the worker process dies on one report, as under the kernel's OOM killer."""

    def __init__(self) -> None:
        self.rules = RuleDecomposer(load_anatomy_table("paper"))

    def decompose(self, findings: str, impression: str) -> Decomposition:
        if "poison" in findings:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.rules.decompose(findings, impression)


def test_a_worker_killed_by_one_study_costs_only_that_study(tmp_path):
    extra = [{"study_id": "poison", "image": "images/s000.nii.gz", "mask": "masks/s000.nii.gz",
              "findings": "poison pill", "impression": ""}]  # fmt: skip
    manifest = write_dataset(tmp_path / "data", 5, extra)
    config = _config(manifest, tmp_path / "cache", workers=2)
    summary = run_preprocess(config, decomposer=_KillerDecomposer())
    assert summary.counts == {"ok": 5, "skipped": 0, "failed": 1}, summary.format()
    failed = [r for r in summary.results if r.status == "failed"][0]
    assert failed.study_id == "poison" and "worker process died" in failed.reason
    assert _cache_rows(tmp_path / "cache")["poison"]["status"] == "failed"


def test_manifest_rows_are_parsed_one_by_one(tmp_path):
    from fvlm.preprocess.manifest import read_manifest

    text = (
        "\ufeffstudy_id,image,mask,findings,impression,RescaleSlope,RescaleIntercept\n"
        'a,img/a.nii.gz,/abs/a_seg.nii.gz,"Liver cyst.\nSpleen normal.",Cyst.,1,-1024\n'
        "\n"
        "b,img/b.nii.gz,,Normal.,,,\n"
        "a,img/a2.nii.gz,,Dup.,,,\n"
        "c,img/c.nii.gz,,Bad slope.,,one,0\n"
        "d,img/d.nii.gz,,Nul \x00 byte.,,,\n"
    ).encode() + b"e,img/e.nii.gz,,Latin-1 \xe9,,,\n"
    path = tmp_path / "m.csv"
    path.write_bytes(text)
    manifest = read_manifest(path)
    rows = {row.study_id: row for row in manifest.rows}
    assert manifest.has_masks and manifest.columns[0] == "study_id"
    a = manifest.rows[0]
    assert a.study_id == "a" and a.error is None
    assert a.image == tmp_path / "img" / "a.nii.gz" and a.mask == Path("/abs/a_seg.nii.gz")
    assert a.findings == "Liver cyst.\nSpleen normal." and a.split == ""
    assert (a.rescale_slope, a.rescale_intercept) == (1.0, -1024.0)
    assert rows["b"].mask is None and rows["b"].rescale_slope is None and rows["b"].error is None
    assert "duplicate study_id (first: line 2)" in manifest.rows[2].error
    assert "could not convert string to float: 'one'" in rows["c"].error
    assert rows["d"].error is None  # a NUL is just a character (csv accepts it since 3.11)
    assert manifest.rows[-1].error == "line 9: not valid UTF-8"


def _oracle(request) -> Reply:
    """A correct model: Yes when the label is in the section; its sentences when asked."""
    prompt = request.prompt
    section = prompt.split("\n\nYou are a professional radiologist")[0].lower()
    label = re.search(r"anatomy \(([^)]+)\)", prompt).group(1)
    if "is mentioned in this CT image report" in prompt:
        return Reply("Yes" if label.lower() in section else "No")
    found = [s for s in re.split(r"(?<=\.)\s+", section) if label.lower() in s]
    return Reply(f"**{label}**: {' '.join(found) or section}")  # asked: it is mentioned


def test_llm_decomposer_in_worker_processes(tmp_path, monkeypatch):
    # The paper's LLM decomposition through the parallel runner: the decomposer is pickled into
    # spawned workers, talks to an OpenAI-protocol stub on 127.0.0.1, and its answer cache (by
    # default inside the preprocessing cache) makes a forced rerun ask nothing again.
    oracle = _oracle
    monkeypatch.setenv("FVLM_TEST_LLM_KEY", "sk-test")
    manifest = write_dataset(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    with StubOpenAIServer(oracle) as server:
        llm = LLMConfig(base_url=server.base_url, model="stub", api_key_env="FVLM_TEST_LLM_KEY",
                        timeout_s=5.0, max_concurrency=4)  # fmt: skip
        config = _config(manifest, cache, decomposer="llm", llm=llm, workers=2)
        assert config.llm.cache_dir == cache / "llm_answers"
        summary = run_preprocess(config)
        assert summary.counts["ok"] == 3, summary.format()
        asked = len(server.requests)
        assert asked >= 2 * 35  # a mention prompt per anatomy and section (same text: cached)
        again = run_preprocess(_config(manifest, cache, decomposer="llm", llm=llm, force=True))
        assert again.counts["ok"] == 3 and len(server.requests) == asked
    assert summary.sources["llm"] >= 3 and "llm" in summary.format()
    report = json.loads((cache / "studies" / "s000" / "report.json").read_text())
    assert report["decomposer"] == "llm"
    assert report["anatomies"]["liver"]["source"] == "llm"
    assert report["anatomies"]["liver"]["normal"] is False  # "Hepatic cyst." (string matching)
    assert any((cache / "llm_answers").rglob("*.json"))
    assert _cache_rows(cache)["s000"]["status"] == "ok"


def test_llm_fallbacks_are_recorded_visible_and_healed_on_the_next_run(tmp_path):
    manifest = write_dataset(tmp_path / "data", 2)
    cache = tmp_path / "cache"
    server_ok = False

    def flaky(request) -> Reply:  # a mistyped model at first (404), then a working server
        return _oracle(request) if server_ok else Reply(status=404)

    with StubOpenAIServer(flaky) as server:
        llm = LLMConfig(base_url=server.base_url, model="stub", timeout_s=5.0, max_concurrency=4)
        config = _config(manifest, cache, decomposer="llm", llm=llm, fail_on_fallback=True)
        down = run_preprocess(config)
        assert down.counts["ok"] == 2 and down.fallback_studies == 2
        assert down.exit_code == 4  # every study is ok, but the LLM was never used
        assert "LLM fallback: 2 studies have 70 anatomy texts from the keyword rules" in (
            down.format()
        )
        report = json.loads((cache / "studies" / "s000" / "report.json").read_text())
        assert {e["decomposer_used"] for e in report["anatomies"].values()} == {"rules"}
        assert report["anatomies"]["liver"]["source"] == "rules"
        image = cache / "studies" / "s000" / "image.npy"
        inode, before = image.stat().st_ino, image.read_bytes()

        server_ok = True
        healed = run_preprocess(config)
        assert healed.counts == {"ok": 2, "skipped": 0, "failed": 0}, healed.format()
        assert healed.fallback_studies == 0 and healed.exit_code == 0
        report = json.loads((cache / "studies" / "s000" / "report.json").read_text())
        assert {e["decomposer_used"] for e in report["anatomies"].values()} == {"llm"}
        assert report["anatomies"]["liver"]["source"] == "llm"
        # the report was decomposed again; the arrays were kept, not recomputed or copied
        assert image.stat().st_ino == inode and image.read_bytes() == before
        assert StudyCache(cache).verify_study("s000") == []

        asked = len(server.requests)
        assert run_preprocess(config).counts["skipped"] == 2 and len(server.requests) == asked


def test_stray_quote_and_huge_report_fail_their_own_rows(tmp_path):
    from fvlm.preprocess.manifest import read_manifest

    limit = csv.field_size_limit()
    huge = "Liver normal. " * 180_000  # 2.5 MB
    text = (
        "study_id,image,findings,impression\n"
        'a,a.nii.gz,"Liver cyst 2 cm.,Cyst.\n'  # a stray quote opens a field ...
        'b,b.nii.gz,"Normal.",Normal.\n'  # ... closed in the next row: 4 fields, b swallowed
        'c,c.nii.gz,"Spleen, 1 cm.\n'  # unclosed to the end of the file
        "d,d.nii.gz,Normal.,Normal.\n"
    )
    path = tmp_path / "m.csv"
    path.write_text(text)
    a, c = read_manifest(path).rows
    assert a.study_id == "a" and a.error.startswith("lines 2-3: a quoted field opened on line 2")
    assert "stray" in a.error
    assert c.study_id == "c" and c.error.startswith("lines 4-5:")
    assert "expected 4 fields, got 3" in c.error
    path.write_text(f"study_id,image,findings,impression\ne,e.nii.gz,{huge},Fine.\n")
    (e,) = read_manifest(path).rows
    assert e.study_id == "e"
    assert "column 'findings' of study 'e' is 2,520,000 characters" in e.error
    assert csv.field_size_limit() == limit  # the reader's limit is restored
    # a quoted multi-line report is still one good row
    path.write_text('study_id,image,findings,impression\nf,f.nii.gz,"Liver, 2 cm.\nSpleen.",x\n')
    (f,) = read_manifest(path).rows
    assert f.error is None and f.findings == "Liver, 2 cm.\nSpleen."


# -- field-of-view truncation ----------------------------------------------------------------------


def test_truncated_faces_in_millimetres():
    from fvlm.preprocess.truncation import FACES, truncated_faces

    anatomy = np.zeros((10, 8, 6), dtype=np.uint8)
    anatomy[7:10, 2:5, 2:4] = 1  # touches the superior face (last index of axis 0)
    anatomy[3:5, 1:7, 2:4] = 2  # 1 voxel (1.5 mm) from posterior/anterior, 2 (1.6 mm) from L/R
    anatomy[3:5, 3:4, 0:2] = 3  # touches the left face
    spacing = (3.0, 1.5, 0.8)
    assert truncated_faces(anatomy, spacing, 0.0) == {1: ["superior"], 3: ["left"]}
    assert 2 not in truncated_faces(anatomy, spacing, 1.49)
    assert truncated_faces(anatomy, spacing, 1.5)[2] == ["posterior", "anterior"]
    assert truncated_faces(anatomy, spacing, 1.6)[2] == ["posterior", "anterior", "left", "right"]
    # a margin beyond the volume reaches every face, each listed once
    assert truncated_faces(anatomy, spacing, 100.0)[1] == [f for pair in FACES for f in pair]
    with pytest.raises(ValueError, match="margin"):
        truncated_faces(anatomy, spacing, -1.0)


def _cut_at_top(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A study whose liver runs up to the last (superior) slice: cut by the field of view."""
    hu, labels, affine = _study_arrays(seed)
    liver = labels == V2["liver"]
    column = liver.any(axis=2)  # the liver's (x, y) footprint, extended up to the top
    top = np.zeros_like(liver)
    top[..., 12:] = column[..., None]
    labels[top] = V2["liver"]
    hu[top] = 60
    return hu, labels, affine


def _write_studies(folder: Path, studies: dict) -> Path:
    rows = []
    for study, (hu, labels, affine, axcodes) in studies.items():
        nib.save(_store(hu, affine, axcodes), folder / f"{study}.nii.gz")
        nib.save(_store(labels, affine, axcodes), folder / f"{study}_seg.nii.gz")
        rows.append([study, f"{study}.nii.gz", f"{study}_seg.nii.gz", FINDINGS, IMPRESSION])
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["study_id", "image", "mask", "findings", "impression"], *rows]
        )
    return manifest


def test_field_of_view_truncation_in_meta_and_summary(tmp_path, paper_table):
    studies = {"whole": (*_study_arrays(1), "RAS")}  # liver top 2 slices (6 mm) below the face
    studies |= {f"cut_{ax}": (*_cut_at_top(1), ax) for ax in ("RAS", "LPS", "PIR")}
    studies["near"] = (*_study_arrays(0), "LPS")  # liver top 1 slice (3 mm) below the face
    manifest = _write_studies(tmp_path, studies)

    def liver(cache: Path, study: str) -> dict:
        return StudyCache(cache).study_meta(study)["anatomies"]["liver"]

    summary = run_preprocess(_config(manifest, tmp_path / "c3", truncation_margin_mm=3.0))
    assert summary.exit_code == 0, summary.format()
    for ax in ("RAS", "LPS", "PIR"):  # the face is named the same however the file is stored
        entry = liver(tmp_path / "c3", f"cut_{ax}")
        assert entry["truncated"] is True and entry["truncated_faces"] == ["superior"], ax
        assert entry["bbox"][0][1] == StudyCache(tmp_path / "c3").study_meta("whole")["shape"][0]
    assert liver(tmp_path / "c3", "near")["truncated_faces"] == ["superior"]  # 3 mm <= 3 mm
    assert liver(tmp_path / "c3", "whole")["truncated"] is False
    meta = StudyCache(tmp_path / "c3").study_meta("cut_LPS")
    assert meta["settings"]["truncation_margin_mm"] == 3.0
    truncated = StudyCache.truncated(meta, paper_table, "cut_LPS")
    assert [paper_table.names[i] for i in np.flatnonzero(truncated)] == ["liver"]
    # per anatomy: present in all 5 studies, complete in 1 (whole); spleen complete everywhere
    assert summary.anatomy_counts["liver"] == (5, 1)
    assert summary.anatomy_counts["spleen"] == (5, 5)
    assert "liver 5/1" in summary.format() and "spleen 5/5" in summary.format()
    # a rerun skips every study and still reports the counts (read from meta.json)
    again = run_preprocess(_config(manifest, tmp_path / "c3", truncation_margin_mm=3.0))
    assert again.counts["skipped"] == 5 and again.anatomy_counts == summary.anatomy_counts

    # margin 0: only a mask touching the face is cut; one voxel (3 mm) inside is complete
    zero = run_preprocess(_config(manifest, tmp_path / "c0", truncation_margin_mm=0.0))
    assert liver(tmp_path / "c0", "near")["truncated"] is False
    assert liver(tmp_path / "c0", "cut_PIR")["truncated_faces"] == ["superior"]
    assert zero.anatomy_counts["liver"] == (5, 2)
    # the margin enters the settings' hash: changing it redoes the studies
    assert summary.exit_code == zero.exit_code == 0
    changed = run_preprocess(_config(manifest, tmp_path / "c0", truncation_margin_mm=2.9))
    assert changed.counts["ok"] == 5 and liver(tmp_path / "c0", "near")["truncated"] is False
    with pytest.raises(ValueError, match="truncation_margin_mm"):
        _config(manifest, tmp_path / "c", truncation_margin_mm=-1.0)


def test_open_ends_do_not_make_an_anatomy_incomplete(paper_table):
    """The aorta leaving the scan at its last slice is complete; the liver or a side face is not."""
    from fvlm.preprocess.runner import _with_truncation

    assert paper_table["aorta"].open_ends == ("inferior", "superior")
    assert paper_table["liver"].open_ends == ()
    stats = {name: {"id": paper_table[name].id} for name in ("aorta", "liver", "esophagus")}
    cut = {
        paper_table["aorta"].id: ["inferior", "superior"],
        paper_table["liver"].id: ["superior"],
        paper_table["esophagus"].id: ["superior", "left"],  # cut in-plane too: truncated
    }
    out = _with_truncation(stats, cut, paper_table)
    assert out["aorta"] == {
        "id": paper_table["aorta"].id,
        "truncated": False,
        "truncated_faces": ["inferior", "superior"],
    }
    assert out["liver"]["truncated"] is True and out["esophagus"]["truncated"] is True


def test_open_ends_are_validated(tmp_path):
    from fvlm.anatomy import AnatomyTableError

    text = (Path(__file__).parents[1] / "src/fvlm/anatomy_presets/chest.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("open_ends: [inferior, superior]", "open_ends: [anterior]", 1))
    with pytest.raises(AnatomyTableError, match="open_ends"):
        load_anatomy_table(bad)


def test_shards_written_apart_merge_into_the_cache_of_one_run(dataset, tmp_path, capsys):
    from fvlm.cli import main as fvlm_main
    from fvlm.preprocess.shards import Shard

    whole, shared = tmp_path / "whole", tmp_path / "shared"
    run_preprocess(_config(dataset, whole))
    ids = list(_cache_rows(whole))
    owners = [[k for k in (1, 2, 3) if Shard(k, 3).holds(i)] for i in ids]
    assert all(len(o) == 1 for o in owners)  # each study in exactly one shard
    assert len({o[0] for o in owners}) > 1  # and the studies are spread
    for k in (1, 2):
        summary = run_preprocess(_config(dataset, shared, shard=f"{k}/3"))
        assert {r.study_id for r in summary.results} == {
            i for i, o in zip(ids, owners, strict=True) if o == [k]
        }
    merge = ["merge-shards", "--manifest", str(dataset), "--cache", str(shared)]
    assert fvlm_main(merge) == 2  # shard 3/3 has not run
    assert "3/3 have not finished" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="merge-shards"):
        StudyCache(shared).read_manifest()
    run_preprocess(_config(dataset, shared, shard="3/3"))
    assert fvlm_main(merge) == 0
    assert _cache_rows(shared) == _cache_rows(whole)  # same rows, same order
    studies = [f for f in _cache_files(whole) if f.startswith("studies/")]
    assert studies == [f for f in _cache_files(shared) if f.startswith("studies/")]
    for name in studies:
        if name.endswith(".npy"):
            assert filecmp.cmp(whole / name, shared / name, shallow=False), name
    with pytest.raises(ValueError, match="K/N"):
        _config(dataset, shared, shard="4/3")
