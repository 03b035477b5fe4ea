"""Throughput of ``fvlm preprocess`` against a naive single-process nibabel + scipy.ndimage pass.

Both passes read the same studies, reorient, resample (trilinear image, nearest labels), window,
group the anatomy map, decompose the report with the same rules, and write ``.npy`` + JSON; the
naive one does it study after study in one process with ``scipy.ndimage.zoom``. The ratio is
measured in one run, so machine load affects both sides alike. A resumed run (nothing changed) is
timed too.

    python benchmarks/bench_preprocess.py                      # phantom studies, paper spacing
    python benchmarks/bench_preprocess.py --manifest data/phantom/manifest.csv --workers 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

from fvlm.anatomy import load_anatomy_table, totalsegmentator_classes
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.decomposition import RuleDecomposer
from fvlm.preprocess.manifest import read_manifest
from fvlm.preprocess.runner import run_preprocess


def _phantom(folder: Path, n: int, seed: int) -> Path:
    try:
        from fvlm.phantom import generate_phantom
    except ImportError:
        generate_phantom = None
    if generate_phantom is not None:
        return generate_phantom(folder, n_studies=n, seed=seed)
    return _stand_in(folder, n, seed)


def _stand_in(folder: Path, n: int, seed: int) -> Path:
    """Simple HU studies (body, liver, spleen, kidneys) when ``fvlm.phantom`` is not installed."""
    ids = {name: cid for cid, name in totalsegmentator_classes("v2").items()}
    shape, zooms = (256, 256, 64), (1.5, 1.5, 3.0)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        hu = np.full(shape, -1000.0, np.float32)
        seg = np.zeros(shape, np.uint8)
        body = ((grid[0] - 128) / 110) ** 2 + ((grid[1] - 128) / 90) ** 2 < 1
        hu[body] = 30
        for name, centre, radii, value in [
            ("liver", (170, 140, 36), (45, 40, 22), 60),
            ("spleen", (80, 120, 40), (18, 20, 12), 50),
            ("kidney_right", (160, 90, 24), (14, 16, 14), 35),
            ("kidney_left", (96, 90, 24), (14, 16, 14), 35),
        ]:
            c = np.array(centre) + rng.uniform(-5, 5, 3)
            inside = sum(((g - ci) / r) ** 2 for g, ci, r in zip(grid, c, radii, strict=True)) < 1
            hu[inside], seg[inside] = value, ids[name]
        hu += rng.normal(0, 10, shape).astype(np.float32)
        affine = np.diag([*zooms, 1.0])
        nib.save(
            nib.Nifti1Image(hu.astype(np.int16), affine), folder / "images" / f"b{i:03d}.nii.gz"
        )
        nib.save(nib.Nifti1Image(seg, affine), folder / "masks" / f"b{i:03d}.nii.gz")
        rows.append(
            [
                f"b{i:03d}",
                f"images/b{i:03d}.nii.gz",
                f"masks/b{i:03d}.nii.gz",
                "The liver shows a small cyst. The spleen is normal.",
                "Hepatic cyst.",
            ]
        )
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["study_id", "image", "mask", "findings", "impression"], *rows]
        )
    return manifest


def _naive(manifest: Path, out: Path, spacing, window, table) -> list[float]:
    """One process, study after study: nibabel reorientation and scipy.ndimage.zoom."""
    decomposer = RuleDecomposer(table)
    lut = table.lookup("v2")
    target = orientations.axcodes2ornt(("S", "A", "R"))
    times = []
    for row in read_manifest(manifest).rows:
        start = time.perf_counter()
        image = nib.load(row.image)
        transform = orientations.ornt_transform(orientations.io_orientation(image.affine), target)
        hu = orientations.apply_orientation(image.get_fdata(dtype=np.float32), transform)
        seg = orientations.apply_orientation(np.asanyarray(nib.load(row.mask).dataobj), transform)
        zooms = np.array(image.header.get_zooms()[:3])[[int(a) for a, _ in transform]]
        factors = zooms / np.array(spacing)
        hu = ndimage.zoom(hu, factors, order=1, mode="nearest", grid_mode=True)
        anatomy = lut[ndimage.zoom(seg, factors, order=0, mode="nearest", grid_mode=True)]
        image16 = np.clip((hu - window[0]) / (window[1] - window[0]), 0, 1).astype(np.float16)
        boxes = ndimage.find_objects(anatomy)
        decomposition = decomposer.decompose(row.findings, row.impression)
        folder = out / row.study_id
        folder.mkdir(parents=True)
        np.save(folder / "image.npy", image16)
        np.save(folder / "anatomy.npy", anatomy)
        meta = {"shape": list(image16.shape), "boxes": [str(b) for b in boxes]}
        (folder / "meta.json").write_text(json.dumps(meta))
        report = {k: v.text for k, v in decomposition.anatomies.items()}
        (folder / "report.json").write_text(json.dumps(report))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, help="existing manifest (default: make phantom)")
    parser.add_argument("--n-studies", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--spacing", type=float, nargs=3, default=(5.0, 1.0, 1.0))
    parser.add_argument("--window", type=float, nargs=2, default=(-300.0, 400.0))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fvlm-bench-preprocess-"))
    try:
        manifest = args.manifest or _phantom(work / "data", args.n_studies, args.seed)
        n = len(read_manifest(manifest).rows)
        table = load_anatomy_table("paper")
        config = PreprocessConfig(
            manifest=manifest,
            cache=work / "cache",
            spacing=tuple(args.spacing),
            hu_window=tuple(args.window),
            workers=args.workers,
            progress=False,
        )
        _naive(manifest, work / "warmup", args.spacing, args.window, table)  # page cache, imports
        start = time.perf_counter()
        naive_times = _naive(manifest, work / "naive", args.spacing, args.window, table)
        naive_s = time.perf_counter() - start
        start = time.perf_counter()
        summary = run_preprocess(config, table=table)
        pipeline_s = time.perf_counter() - start
        start = time.perf_counter()
        resumed = run_preprocess(config, table=table)
        resumed_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    assert summary.counts["ok"] == n and resumed.counts["skipped"] == n, summary.format()
    worker_times = [r.seconds for r in summary.results]
    print(
        f"studies: {n}, target spacing {tuple(args.spacing)} mm, workers {args.workers}, "
        f"cpus {os.cpu_count()}"
    )
    print(
        f"naive (1 process, nibabel + scipy.ndimage): {n / naive_s:7.2f} studies/s, "
        f"{statistics.mean(naive_times):.3f} s/study"
    )
    print(
        f"fvlm preprocess (fresh cache):             {n / pipeline_s:7.2f} studies/s, "
        f"{statistics.mean(worker_times):.3f} s/study in a worker, "
        f"{pipeline_s:.2f} s wall incl. worker start"
    )
    print(
        f"fvlm preprocess (resumed, all unchanged):  {n / resumed_s:7.2f} studies/s, "
        f"{resumed_s:.2f} s wall"
    )
    print(
        f"ratio pipeline / naive throughput: {naive_s / pipeline_s:.2f}x; "
        f"single-study cost ratio (worker vs naive): "
        f"{statistics.mean(naive_times) / statistics.mean(worker_times):.2f}x"
    )


if __name__ == "__main__":
    main()
