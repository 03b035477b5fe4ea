"""``fvlm predict`` on a real-size scan (512 x 512 x 300, CPU), segmentation excluded.

One chest phantom study on a scanner grid (:mod:`real_size`, with its precomputed TotalSegmentator
map) goes through the model's recipe. Reported, from a spawned process each (own peak memory):

* one scan, split into model loading, preprocessing (read, canonicalise, resample, window, write
  the cache), encoding (the planned crops through the network), scoring (the prompts of every
  disease through the text tower, once per loaded model, and the zero-shot scores) and
  heatmaps (top 3 findings: NIfTI on the input grid + PNG, and the summary page), with the peak
  resident memory above the process's start;
* the batch path (``predict`` on N scans: the model loaded once, crops of all scans batched)
  against the one-scan path (a fresh model load and ``predict`` per scan, as N separate commands
  would do), in scans per second.

The model is a pretrained folder (default ``runs/demo/pretrained``, written by ``make demo``); its
recipe decides the preprocessing grid (the demo: 8 x 5 x 5 mm). Usage::

    python benchmarks/bench_predict.py [--model DIR] [--n 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_process import run_in_child, status_mib  # noqa: E402
from real_size import real_size_study, volume_bytes  # noqa: E402


def one_scan_child(spec: dict, results: Any) -> None:
    """Spawned: one scan, stage by stage, and the peak memory."""
    import pandas as pd

    from fvlm.predict import _top, collect_scans, load_model
    from fvlm.pretrained import nifti_reference, write_heatmaps

    base = status_mib("VmRSS")
    clock: dict[str, list[float]] = {}

    def lap(stage: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.perf_counter(), time.process_time())
        clock[stage] = [now[0] - since[0], now[1] - since[1]]
        return now

    start = (time.perf_counter(), time.process_time())
    model = load_model(spec["model"])
    start = lap("load model", start)
    scan = collect_scans(spec["image"], spec["mask"])
    work = Path(spec["work"])
    summary = model.preprocess(scan, work / "cache")
    assert summary.counts["ok"] == 1, summary.format()
    start = lap("preprocessing", start)
    emb = model.scan_embeddings(model.embed_cache(work / "cache"), work / "cache")
    start = lap("encoding", start)
    scores = model.score(emb)
    start = lap("scoring", start)
    rows = scores.drop(columns="study_id")
    by_key = {d.key: d for d in model.diseases()}
    findings = [by_key[k] for k in _top(rows, 3)["key"]]
    maps = write_heatmaps(
        model, work / "cache", emb[0].study_id, findings, work / "heatmaps",
        nifti_reference(scan[0].image),
    )  # fmt: skip
    from fvlm.predict import _summary_page

    heat = next(iter(maps.values()))[0] if maps else None
    _summary_page(model, emb[0], rows, work / "cache", work / "summary.png", heat)
    lap("heatmaps", start)
    assert isinstance(rows, pd.DataFrame)
    results.put({"stages": clock, "peak_mib": status_mib("VmHWM") - base, "heatmaps": len(maps)})


def paths_child(spec: dict, results: Any) -> None:
    """Spawned: N scans through one ``predict`` call, then N one-scan load + ``predict`` calls."""
    from fvlm.predict import predict

    work, n = Path(spec["work"]), spec["n"]
    common = {"heatmaps": False, "progress": False}
    start = time.perf_counter()
    code = predict(spec["model"], spec["scans"], work / "batch", mask=spec["masks"], **common)
    batch = time.perf_counter() - start
    assert code == 0
    start = time.perf_counter()
    for i in range(n):
        image = Path(spec["scans"]) / f"scan{i}.nii.gz"
        mask = Path(spec["masks"]) / f"scan{i}.nii.gz"
        assert predict(spec["model"], str(image), work / f"one{i}", mask=str(mask), **common) == 0
    single = time.perf_counter() - start
    results.put({"batch_scans_per_s": n / batch, "one_scan_scans_per_s": n / single})


def main(argv: list[str] | None = None) -> None:
    """Build the real-size scan, run both measurements, print and return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/pretrained")
    parser.add_argument("--n", type=int, default=3, help="scans of the batch-vs-one comparison")
    parser.add_argument("--quick", action="store_true", help="128 x 128 x 75 smoke size")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not Path(args.model).is_dir():
        raise SystemExit(f"{args.model}: no pretrained folder (run `make demo` or fvlm export)")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        manifest = real_size_study(root / "data", quick=args.quick)
        study = manifest.parent
        image = next((study / "images").iterdir())
        mask = study / "masks" / image.name
        scans, masks = root / "scans", root / "masks"
        scans.mkdir()
        masks.mkdir()
        for i in range(args.n):
            (scans / f"scan{i}.nii.gz").symlink_to(image)
            (masks / f"scan{i}.nii.gz").symlink_to(mask)
        spec = {"model": args.model, "image": str(image), "mask": str(mask), "work": str(root)}
        one = run_in_child(one_scan_child, (spec,), "one scan")
        spec |= {"scans": str(scans), "masks": str(masks), "n": args.n}
        paths = run_in_child(paths_child, (spec,), "batch vs one-scan paths")
        import nibabel as nib

        shape = nib.load(image).shape
        input_mib = volume_bytes(manifest) / 2**20
    numbers = {"shape": list(shape), "input_mib": round(input_mib, 1), **one, **paths}
    stages = one["stages"]
    print(f"fvlm predict, one {shape} scan ({input_mib:.0f} MiB int16), CPU, no segmentation:")
    for stage, (wall, cpu) in stages.items():
        print(f"  {stage:<14} {wall:7.2f} s wall, {cpu:7.2f} s CPU")
    print(f"  peak memory    {one['peak_mib']:7.0f} MiB above the process start")
    print(
        f"  {args.n} scans: batch path {paths['batch_scans_per_s']:.3f} scans/s, one-scan path "
        f"{paths['one_scan_scans_per_s']:.3f} scans/s "
        f"({paths['batch_scans_per_s'] / paths['one_scan_scans_per_s']:.2f}x)"
    )
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
