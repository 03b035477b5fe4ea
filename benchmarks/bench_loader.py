"""The training loader on a real-size cache: samples/s, CPU per sample, bytes read per sample.

The cache: ``--studies`` phantom studies on a scanner grid (``benchmarks/real_size.py``) of the
recipe's geometry (``chest``: CT-RATE-like chest scans; ``abdomen``: abdomen-pelvis scans),
preprocessed with the shipped recipe (``configs/preprocess/<recipe>.yaml``, its own spacing and
HU window). Each study is listed ``--copies`` times (hard links, same pages), so that an epoch has
enough batches for every worker; crops are drawn at random, so copies give different samples. The
crop, table and text limit are the training recipe's (``configs/fvlm.yaml``, with
``configs/ctrate.yaml`` on top for chest); the tokenizer is the offline MiniLM one.

Measured, per recipe:

* **samples/s** of the training ``DataLoader`` with 0 and 2 workers, steady state (the first
  batch, i.e. worker start-up, excluded), page cache warm; with 0 workers also the CPU seconds
  per sample (``time.process_time``);
* **bytes read per sample** from storage, cold: before each sample the cache files are dropped
  from the page cache (``os.posix_fadvise(POSIX_FADV_DONTNEED)``, which needs no root and works
  because no process maps them then), and ``read_bytes`` of ``/proc/self/io`` counts what the
  sample made the kernel read, readahead included. It is set against the crop's own bytes (the
  voxels of the crop inside the volume, image + anatomy map, in the cache's dtypes) and against
  the bytes of the 4 KiB pages the crop's rows span (the least a page-granular memory map can
  read);
* where a sample's time goes (warm), by step of ``CachedStudyDataset.__getitem__``.

    python benchmarks/bench_loader.py                  # chest and abdomen, 1-3 min on 2 cores
    python benchmarks/bench_loader.py --quick          # coarse cache and crop: smoke run
    python benchmarks/bench_loader.py --cache C --recipes chest   # an existing cache
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from real_size import phantom_studies, recipe_config  # noqa: E402

from fvlm.config_files import resolve_config  # noqa: E402

PAGE = 4096


@dataclass(frozen=True)
class Recipe:
    """A preprocessing recipe, the training configs layered on it, and the scans it is for."""

    preprocess: str
    training: tuple[str, ...]
    geometry: str


RECIPES = {
    "chest": Recipe("chest", ("fvlm", "ctrate"), "chest"),
    "abdomen": Recipe("abdomen", ("fvlm",), "abdomen"),
}


def training_data(recipe: Recipe) -> dict:
    """The ``data`` section of the recipe's training configs, later files overriding earlier."""
    data: dict = {}
    for name in recipe.training:
        data |= (yaml.safe_load(resolve_config(name).read_text()) or {}).get("data") or {}
    return data


# -- the cache ---------------------------------------------------------------------------------


def build_cache(work: Path, recipe: Recipe, studies: int, copies: int, quick: bool) -> Path:
    """Preprocess ``studies`` phantom studies with the recipe; list each ``copies`` times."""
    from fvlm.preprocess.cache import StudyCache
    from fvlm.preprocess.runner import run_preprocess

    manifest = phantom_studies(work / "phantom", studies, recipe.geometry, quick=quick)
    overrides = {"spacing": (6.0, 6.0, 6.0)} if quick else {}
    config = recipe_config(recipe.preprocess, manifest, work / "cache", **overrides)
    summary = run_preprocess(config)
    if summary.counts["ok"] != studies:
        raise RuntimeError(summary.format())
    shutil.rmtree(work / "phantom")
    cache = StudyCache(config.cache)
    rows = []
    for entry in cache.read_manifest():
        rows.append((entry.study_id, "train", "ok", ""))
        for copy in range(1, copies):
            twin = f"{entry.study_id}-copy{copy}"
            cache.study_dir(twin).mkdir(parents=True)
            for file in cache.study_dir(entry.study_id).iterdir():
                os.link(file, cache.study_dir(twin) / file.name)
            rows.append((twin, "train", "ok", ""))
    cache.write_manifest(rows)
    return config.cache


def make_data(cache: Path, data: dict, batch_size: int, num_workers: int, crop: Iterable[int]):  # noqa: ANN201
    """The training data module of the recipe's settings over ``cache`` (MiniLM tokenizer)."""
    from fvlm.data_modules import CTReportDataModule

    module = CTReportDataModule(
        str(cache),
        anatomy_table=data.get("anatomy_table", "paper"),
        tokenizer="minilm",
        crop_size=tuple(crop),
        batch_size=batch_size,
        num_workers=num_workers,
        max_text_length=data.get("max_text_length", 128),
        pin_memory=False,
        crop_check="off",  # the crop-validity report of a 2-study cache says nothing here
    )
    module.setup("fit")
    return module


# -- throughput --------------------------------------------------------------------------------


def loader_throughput(loader: Iterable, batches: int) -> tuple[float, float]:
    """Steady-state samples/s of ``loader`` and CPU s/sample of this process (0 workers: all).

    The clock starts once the first batch is out (worker start-up excluded); epochs are chained
    until ``batches`` more batches have come.
    """
    seen, samples, start, cpu = -1, 0, 0.0, 0.0
    while seen < batches:
        for batch in loader:
            if seen < 0:
                start, cpu = time.perf_counter(), time.process_time()
            else:
                samples += len(batch["study_id"])
            seen += 1
            if seen == batches:
                break
    elapsed = time.perf_counter() - start
    return samples / elapsed, (time.process_time() - cpu) / samples


# -- bytes read --------------------------------------------------------------------------------


def _read_bytes() -> int:
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise KeyError("read_bytes")


def _drop_from_page_cache(paths: Iterable[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def span_pages(array: np.memmap, start: np.ndarray, crop: tuple[int, ...]) -> tuple[int, int]:
    """Bytes of the crop inside ``array`` and of the file pages its rows span (C order)."""
    shape = np.array(array.shape)
    lo = np.clip(start, 0, shape)
    hi = np.clip(np.asarray(start) + crop, 0, shape)
    if np.any(hi <= lo):
        return 0, 0
    item = array.dtype.itemsize
    z, y = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    first = array.offset + ((z.ravel() * shape[1] + y.ravel()) * shape[2] + lo[2]) * item
    last = first + (hi[2] - lo[2]) * item - 1
    counts = last // PAGE - first // PAGE + 1
    pages = np.unique(np.repeat(first // PAGE, counts) + _ramp(counts))
    return int(np.prod(hi - lo)) * item, int(pages.size) * PAGE


def _ramp(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1]) - np.repeat(ends - counts, counts)


def cold_reads(dataset: Any, samples: int) -> dict:
    """Mean bytes read from storage per sample (cold page cache), crop bytes and page span."""
    starts: list[np.ndarray] = []
    choose = dataset.choose_crop

    def recording(*args: Any, **kwargs: Any) -> np.ndarray:
        starts.append(np.asarray(choose(*args, **kwargs)))
        return starts[-1]

    dataset.choose_crop = recording
    files = sorted(dataset.cache.studies.glob("*/*.npy"))
    read = crop_bytes = span = 0
    try:
        for i in range(samples):
            index = i % len(dataset)
            _drop_from_page_cache(files)
            torch.manual_seed(i)
            before = _read_bytes()
            dataset[index]
            read += _read_bytes() - before
            for array in dataset.cache.open_arrays(dataset.study_ids[index]):
                own, pages = span_pages(array, starts[-1], dataset.crop_size)
                crop_bytes, span = crop_bytes + own, span + pages
            del array  # no mapping may hold the pages the next drop must remove
    finally:
        del dataset.choose_crop
    sizes = {f.stat().st_ino: f.stat().st_size for f in files}  # copies share inodes
    return {
        "read": read / samples,
        "crop": crop_bytes / samples,
        "span": span / samples,
        "files": sum(sizes.values()) / (len(sizes) / 2),  # image + anatomy of one study
    }


# -- where a sample's time goes ----------------------------------------------------------------


def sample_profile(
    dataset: Any, samples: int, collate: Callable
) -> tuple[dict[str, float], float, float]:
    """Seconds per sample by step of ``__getitem__`` (warm), its total, and collation's share."""
    from fvlm.data_modules import study_dataset

    clock: dict[str, float] = defaultdict(float)

    def timed(function: Callable, label: Callable[..., str] | str) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                clock[label(*args, **kwargs) if callable(label) else label] += (
                    time.perf_counter() - start
                )

        return wrapper

    crop_array = study_dataset.crop_array
    patches = {
        (study_dataset, "crop_array"): timed(
            crop_array,
            lambda *a, **k: (
                "crop image (copy, float16 -> float32, pad)"
                if k.get("dtype") is not None
                else "crop anatomy map"
            ),
        ),
        (dataset, "_tokenize"): timed(dataset._tokenize, "tokenise texts and report"),
        (dataset, "choose_crop"): timed(dataset.choose_crop, "choose crop"),
        (dataset.cache, "study_meta"): timed(dataset.cache.study_meta, "read meta.json"),
        (dataset.cache, "study_report"): timed(dataset.cache.study_report, "read report.json"),
        (dataset.cache, "open_arrays"): timed(dataset.cache.open_arrays, "open memory maps"),
    }
    saved = {key: getattr(*key) for key in patches}
    for (owner, name), function in patches.items():
        setattr(owner, name, function)
    try:
        dataset[0]  # warm: tokenizer, page cache
        clock.clear()
        items = []
        start = time.perf_counter()
        for i in range(samples):
            torch.manual_seed(1000 + i)
            items.append(dataset[i % len(dataset)])
        total = (time.perf_counter() - start) / samples
    finally:
        for (owner, name), function in saved.items():
            if owner is study_dataset:
                setattr(owner, name, function)
            else:
                delattr(owner, name)
    start = time.perf_counter()
    collate(items)
    return (
        {k: v / samples for k, v in clock.items()},
        total,
        (time.perf_counter() - start) / samples,
    )


# -- main --------------------------------------------------------------------------------------


def run_recipe(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Build (or take) the cache and measure everything for one recipe."""
    recipe = RECIPES[name]
    data = training_data(recipe)
    crop = (8, 24, 24) if args.quick else tuple(int(c) for c in data["crop_size"])
    start = time.perf_counter()
    cache = args.cache or build_cache(work / name, recipe, args.studies, args.copies, args.quick)
    setup_s = time.perf_counter() - start
    result: dict[str, Any] = {"crop": crop, "setup_s": setup_s, "rates": {}, "table": None}
    for workers in (0, 2):
        module = make_data(cache, data, args.batch_size, workers, crop)
        loader = module.train_dataloader()
        rate, cpu = loader_throughput(loader, args.batches)
        result["rates"][workers] = rate
        if workers == 0:
            result["cpu"] = cpu
            dataset = module.datasets["train"]
            result["table"] = dataset.table.name
            result["shape"] = dataset.cache.study_meta(dataset.study_ids[0])["shape"]
            result["bytes"] = cold_reads(dataset, args.samples)
            result["profile"], result["per_sample"], result["collate"] = sample_profile(
                dataset, args.samples, loader.collate_fn
            )
    return result


def report(results: dict[str, dict], batch_size: int) -> str:
    """The table and per-sample profiles, as printed."""
    mib = 2**20
    lines = [
        f"{'recipe':<9}{'crop':>14}{'cache study':>16}{'0 workers':>11}{'2 workers':>11}"
        f"{'CPU ms':>8}{'read MiB':>10}{'crop MiB':>10}{'read/crop':>11}{'pages/crop':>12}",
        f"{'':<9}{'':>14}{'':>16}{'samples/s':>11}{'samples/s':>11}{'/sample':>8}"
        f"{'/sample':>10}{'':>10}",
    ]
    for name, r in results.items():
        b = r["bytes"]
        lines.append(
            f"{name:<9}{'x'.join(map(str, r['crop'])):>14}{'x'.join(map(str, r['shape'])):>16}"
            f"{r['rates'][0]:>11.1f}{r['rates'][2]:>11.1f}{r['cpu'] * 1e3:>8.0f}"
            f"{b['read'] / mib:>10.1f}{b['crop'] / mib:>10.1f}{b['read'] / b['crop']:>10.2f}x"
            f"{b['span'] / b['crop']:>11.2f}x"
        )
    legend = (
        f"batch {batch_size}; read = bytes the kernel read per sample from a cold page cache "
        "(readahead included); crop = the crop's voxels inside the volume (image float16 + "
        "anatomy uint8); pages = 4 KiB pages its rows span; a whole study is "
        + ", ".join(f"{n} {r['bytes']['files'] / mib:.0f} MiB" for n, r in results.items())
    )
    lines += [
        "",
        *textwrap.wrap(legend, 100),
        "",
        "where a sample's time goes (0 workers, warm page cache, ms per sample)",
    ]
    for name, r in results.items():
        total = r["per_sample"]
        steps = r["profile"] | {
            "other (crop validity, texts, tensors)": total - sum(r["profile"].values())
        }
        lines.append(
            f"  {name}: total {total * 1e3:.0f} ms in __getitem__, then "
            f"{r['collate'] * 1e3:.0f} ms per sample to collate a batch"
        )
        for label, seconds in sorted(steps.items(), key=lambda item: -item[1]):
            lines.append(f"    {label:<44}{seconds * 1e3:7.1f} ms {100 * seconds / total:5.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--cache", type=Path, help="an existing cache of the (single) recipe")
    parser.add_argument("--studies", type=int, default=1, help="distinct phantom studies")
    parser.add_argument("--copies", type=int, default=8, help="listings of each study")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per setting")
    parser.add_argument("--samples", type=int, default=6, help="samples for bytes and profile")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="6 mm cache, 8 x 24 x 24 crop")
    args = parser.parse_args(argv)
    if min(args.studies, args.copies, args.batch_size, args.batches, args.samples) < 1:
        parser.error("--studies, --copies, --batch-size, --batches, --samples must be >= 1")
    if args.cache is not None and len(args.recipes) != 1:
        parser.error("--cache needs exactly one --recipes value (the recipe it was built with)")
    if args.quick:
        args.batches, args.samples = min(args.batches, 3), min(args.samples, 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    total = time.perf_counter()
    print(
        f"fvlm loader benchmark: {args.studies} {'study' if args.studies == 1 else 'studies'} "
        f"x {args.copies} listings per recipe, "
        f"batch {args.batch_size}, {args.batches} timed batches, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="fvlm-bench-loader-") as tmp:
        for name in args.recipes:
            results[name] = run_recipe(name, args, Path(tmp))
            r = results[name]
            print(
                f"  {name}: cache made in {r['setup_s']:.0f} s (table {r['table']}); "
                f"{r['rates'][0]:.1f} / {r['rates'][2]:.1f} samples/s with 0 / 2 workers",
                flush=True,
            )
    print()
    print(report(results, args.batch_size))
    print(f"\ntotal {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
