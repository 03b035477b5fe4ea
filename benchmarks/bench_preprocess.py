"""``fvlm preprocess`` on real-size CT against a naive nibabel + scipy pass: time and peak memory.

Input: one chest phantom study on a scanner grid, fitted to 512 x 512 x 300 int16 voxels (150
MiB uncompressed; ``benchmarks/real_size.py``), or the studies of ``--manifest``. For each
recipe (``configs/preprocess/abdomen.yaml``: 5 x 1 x 1 mm, ``chest.yaml``: 1.5 x 0.75 x 0.75 mm;
precomputed masks, rule-based reports, one process) both passes do the same work on the same
files: load, reorient to the canonical axes, resample the image (trilinear) and the label map
(nearest), group the label map into the recipe's anatomies, window HU, decompose the report, write
``.npy`` + JSON. The naive pass is nibabel's ``get_fdata`` + ``apply_orientation`` and
``scipy.ndimage.zoom``, study after study. A third pass, ``fvlm, stdlib gzip``, is ``fvlm
preprocess`` decoding ``.nii.gz`` with the standard library's gzip instead of isal's igzip (the
decoder before it, and the fallback where ``isal`` is not installed).

Each pass runs in its own spawned process, ``--repeats`` times (best time kept), so its peak
resident memory is its own: the peak is reset after the imports (``/proc/self/clear_refs``) and
reported as the increase over the process's size at that point, against the uncompressed input
volume. The ratios are measured in one run, so machine load affects both sides alike. A resumed
run (nothing changed) is timed too, and where ``fvlm preprocess``'s time goes, by stage.

    python benchmarks/bench_preprocess.py                     # both recipes, ~1.5 min on 2 cores
    python benchmarks/bench_preprocess.py --quick             # 128 x 128 x 75 smoke run
    python benchmarks/bench_preprocess.py --manifest M --recipes chest --repeats 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_process import run_in_child, status_mib  # noqa: E402
from real_size import REAL_SHAPE, real_size_study, recipe_config, volume_bytes  # noqa: E402

from fvlm.anatomy import AnatomyTable, load_anatomy_table  # noqa: E402
from fvlm.preprocess.config import PreprocessConfig  # noqa: E402
from fvlm.preprocess.decomposition import RuleDecomposer  # noqa: E402
from fvlm.preprocess.manifest import read_manifest  # noqa: E402

#: Targets of the "Performance" issue: speed-up over the naive pass, peak memory / input volume.
TARGET_SPEEDUP = 2.0
TARGET_MEMORY = 3.0
RECIPES = ("abdomen", "chest")


# -- the two passes ----------------------------------------------------------------------------


def naive_pass(config: PreprocessConfig, out: Path, table: AnatomyTable) -> None:
    """One process, study after study: nibabel reorientation and ``scipy.ndimage.zoom``."""
    decomposer = RuleDecomposer(table)
    lut = table.lookup("v2")
    target = orientations.axcodes2ornt(("S", "A", "R"))
    spacing, window = np.array(config.spacing), config.hu_window
    for row in read_manifest(config.manifest).rows:
        image = nib.load(row.image)
        transform = orientations.ornt_transform(orientations.io_orientation(image.affine), target)
        hu = orientations.apply_orientation(image.get_fdata(dtype=np.float32), transform)
        seg = orientations.apply_orientation(np.asanyarray(nib.load(row.mask).dataobj), transform)
        zooms = np.array(image.header.get_zooms()[:3])[[int(a) for a, _ in transform]]
        factors = zooms / spacing
        hu = ndimage.zoom(hu, factors, order=1, mode="nearest", grid_mode=True)
        labels = ndimage.zoom(seg, factors, order=0, mode="nearest", grid_mode=True)
        anatomy = lut[labels]
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


#: ``fvlm.preprocess.runner`` names timed per stage (the runner imports them into its namespace).
RUNNER_STAGES = {
    "file_fingerprint": "input hashes",
    "load_volume": "load image (gzip decode)",
    "decide_rescale": "rescale decision",
    "apply_rescale": "rescale",
    "read_mask": "load mask (beside the image)",
    "detect_totalseg_version": "TotalSegmentator version (beside)",
    "canonicalise": "reorient",
    "truncated_faces": "field-of-view truncation",
    "resample": "resample",
    "window_hu": "HU window",
    "anatomy_stats": "anatomy boxes",
}


def _timed(function: Callable, name: str | Callable[..., str], clock: dict) -> Callable:
    """``function`` adding its wall and CPU time to ``clock[name]``.

    CPU is the calling thread's (``time.thread_time``): the mask is read and grouped in a second
    thread beside the image decode ("beside" stages), so process CPU would count both.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            label = name(*args, **kwargs) if callable(name) else name
            clock[label] += np.array([time.perf_counter() - start, time.thread_time() - cpu])

    return wrapper


def _resample_label(*args: Any, **kwargs: Any) -> str:
    how = args[2] if len(args) > 2 else kwargs.get("interpolation")
    return f"resample ({'image' if how == 'linear' else 'labels'})"


def instrument_runner(clock: dict) -> None:
    """Time ``fvlm preprocess``'s stages into ``clock`` (label -> [wall, CPU] s), wrapped."""
    from fvlm.preprocess import runner
    from fvlm.preprocess.cache import StudyCache

    for attribute, label in RUNNER_STAGES.items():
        function = getattr(runner, attribute, None)
        if function is None:  # the runner no longer calls it: its time falls under "other"
            continue
        if attribute == "resample":
            label = _resample_label
        setattr(runner, attribute, _timed(function, label, clock))
    AnatomyTable.group = _timed(AnatomyTable.group, "group labels (beside the image)", clock)
    RuleDecomposer.decompose = _timed(RuleDecomposer.decompose, "report decomposition", clock)
    StudyCache.write_study = _timed(StudyCache.write_study, "write cache", clock)


# -- one pass per process ----------------------------------------------------------------------


def _reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current size; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure_child(spec: dict, results: Any) -> None:
    """Spawned process: run one side ``repeats`` times on a fresh output; report time and peak."""
    from fvlm.preprocess.runner import run_preprocess

    work, n = Path(spec["work"]), spec["n_studies"]
    config = recipe_config(spec["recipe"], Path(spec["manifest"]), work / "cache-0")
    table = load_anatomy_table(config.anatomy_table)
    clock: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(2))
    if spec["side"] == "fvlm, stdlib gzip":  # the decoder fvlm used before isal's igzip
        from fvlm.preprocess import volume

        volume._gzip = gzip
    if spec["side"] != "naive":
        instrument_runner(clock)
    peak_reset = _reset_peak()
    base = status_mib("VmRSS")
    times, cpu, stages, resumed = [], [], {}, None
    for repeat in range(spec["repeats"]):
        cache = work / f"cache-{repeat}"
        clock.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        if spec["side"] == "naive":
            naive_pass(config, cache, table)
        else:
            summary = run_preprocess(
                recipe_config(spec["recipe"], config.manifest, cache), table=table
            )
            assert summary.counts["ok"] == n, summary.format()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        if times[-1] == min(times):
            stages = {k: (v / n).tolist() for k, v in clock.items()}
            stages["total"] = [times[-1] / n, cpu[-1] / n]
        if repeat < spec["repeats"] - 1:
            shutil.rmtree(cache, ignore_errors=True)
    if spec["side"] != "naive":
        start = time.perf_counter()
        again = run_preprocess(recipe_config(spec["recipe"], config.manifest, cache), table=table)
        resumed = time.perf_counter() - start
        assert again.counts["skipped"] == n, again.format()
    results.put(
        {
            "seconds": min(times) / n,
            "times": [t / n for t in times],
            "cpu": min(cpu) / n,
            "peak_mib": status_mib("VmHWM") - base,
            "peak_from_start": not peak_reset,
            "base_mib": base,
            "stages": stages,
            "resumed": resumed,
        }
    )


def measure(side: str, recipe: str, manifest: Path, work: Path, n: int, repeats: int) -> dict:
    """Run :func:`measure_child` in a spawned process and return what it reports."""
    spec = {
        "side": side,
        "recipe": recipe,
        "manifest": str(manifest),
        "work": str(work),
        "n_studies": n,
        "repeats": repeats,
    }
    result = run_in_child(measure_child, (spec,), f"{side} {recipe}")
    shutil.rmtree(work, ignore_errors=True)
    return result


# -- report ------------------------------------------------------------------------------------


def report(results: dict[str, dict[str, dict]], input_mib: float) -> str:
    """The table, the ratios against the targets, and the stage profile, as printed."""
    lines = [
        f"{'recipe':<9}{'pass':<19}{'s/study':>9}{'CPU s':>7}{'runs (s)':>14}{'peak MiB':>10}"
        f"{'peak/input':>12}"
    ]
    for recipe, sides in results.items():
        for side, r in sides.items():
            runs = " ".join(f"{t:.2f}" for t in r["times"])
            name = {"naive": "naive nib+scipy", "fvlm": "fvlm preprocess"}.get(side, side)
            lines.append(
                f"{recipe:<9}{name:<19}{r['seconds']:>9.2f}{r['cpu']:>7.2f}{runs:>14}"
                f"{r['peak_mib']:>10.0f}{r['peak_mib'] / input_mib:>11.2f}x"
            )
    lines += ["", f"ratios (targets: speed-up >= {TARGET_SPEEDUP:g}x, peak < "
              f"{TARGET_MEMORY:g}x the input volume of {input_mib:.0f} MiB)"]  # fmt: skip
    for recipe, sides in results.items():
        naive, fvlm = sides["naive"], sides["fvlm"]
        speed = naive["seconds"] / fvlm["seconds"]
        speed_cpu = naive["cpu"] / fvlm["cpu"]
        memory = fvlm["peak_mib"] / input_mib
        lines += [
            f"  {recipe:<8} speed-up (naive / fvlm) {speed:.2f}x wall, {speed_cpu:.2f}x CPU: "
            + ("met" if speed >= TARGET_SPEEDUP else "MISSED"),
            f"  {'':<8} fvlm peak {memory:.2f}x the input: "
            + ("met" if memory < TARGET_MEMORY else "MISSED")
            + f" (naive {naive['peak_mib'] / input_mib:.2f}x); resumed run {fvlm['resumed']:.2f} s",
        ]
        if "fvlm, stdlib gzip" in sides:
            stdlib = sides["fvlm, stdlib gzip"]
            lines.append(
                f"  {'':<8} isal's igzip over stdlib gzip (fvlm / fvlm, stdlib gzip): "
                f"{stdlib['seconds'] / fvlm['seconds']:.2f}x wall, "
                f"{stdlib['cpu'] / fvlm['cpu']:.2f}x CPU; naive / fvlm with stdlib gzip "
                f"{naive['seconds'] / stdlib['seconds']:.2f}x wall"
            )
    lines += [
        "",
        "where fvlm preprocess's time goes (s per study, best run; wall, then the calling "
        "thread's CPU; 'beside' stages run in a second thread during the image decode, and the "
        "image resampling's slabs in threads of their own, so stages do not add up to the total)",
    ]
    for recipe, sides in results.items():
        stages = dict(sides["fvlm"]["stages"])
        wall, cpu = stages.pop("total")
        serial = [v for k, v in stages.items() if "beside" not in k]
        stages["other (manifest, astype, meta, ...)"] = [
            wall - sum(v[0] for v in serial),
            float("nan"),  # process CPU minus thread CPU would mean nothing
        ]
        lines.append(f"  {recipe}: total {wall:.2f} s wall, {cpu:.2f} s CPU (all threads)")
        for label, (w, c) in sorted(stages.items(), key=lambda item: -item[1][0]):
            if w >= 0.005:
                used = "      -" if math.isnan(c) else f"{c:7.2f} s CPU"
                lines.append(f"    {label:<40}{w:7.2f} s {100 * w / wall:5.1f} %{used}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, help="existing studies (default: one made here)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=2, help="runs per pass (best kept)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed of the made study")
    parser.add_argument(
        "--quick", action="store_true", help=f"128 x 128 x 75 voxels instead of {REAL_SHAPE}"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    repeats = 1 if args.quick else args.repeats

    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fvlm-bench-preprocess-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        manifest = args.manifest or real_size_study(work / "data", args.quick, args.seed)
        setup_s = time.perf_counter() - start
        n = len(read_manifest(manifest).rows)
        input_mib = volume_bytes(manifest) / 2**20
        first = nib.load(read_manifest(manifest).rows[0].image)
        header = (
            f"fvlm preprocessing benchmark: {n} {'study' if n == 1 else 'studies'} of "
            f"{' x '.join(map(str, first.shape))} {first.get_data_dtype()} "
            f"({input_mib:.0f} MiB uncompressed, zooms "
            f"{' x '.join(f'{z:.2f}' for z in first.header.get_zooms()[:3])} mm, "
            f"{''.join(nib.aff2axcodes(first.affine))}); one process per pass, best of {repeats}; "
            f"{os.cpu_count()} CPUs; input made in {setup_s:.0f} s"
        )
        print("\n".join(textwrap.wrap(header, 100)), flush=True)
        results: dict[str, dict[str, dict]] = {}
        for recipe in args.recipes:
            config = recipe_config(recipe, manifest, work / "x")
            print(
                f"  {recipe}: {config.spacing} mm, HU {config.hu_window}, table "
                f"{config.anatomy_table}",
                flush=True,
            )
            results[recipe] = {}
            for side in ("naive", "fvlm, stdlib gzip", "fvlm"):
                folder = work / f"{recipe}-{side.replace(', ', '-').replace(' ', '-')}"
                result = measure(side, recipe, manifest, folder, n, repeats)
                results[recipe][side] = result
                print(f"    {side}: {result['seconds']:.2f} s/study", flush=True)
        print()
        print(report(results, input_mib))
        if any(side["peak_from_start"] for sides in results.values() for side in sides.values()):
            print("(peak RSS could not be reset here: peaks include the imports)")
    print(f"\ntotal {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
