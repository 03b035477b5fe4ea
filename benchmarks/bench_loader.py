"""The training loader on a real-size cache: samples/s, CPU per sample, bytes read per sample.

The cache: ``--studies`` phantom studies on a scanner grid (``benchmarks/real_size.py``) of the
recipe's geometry (``chest``: CT-RATE-like chest scans; ``abdomen``: abdomen-pelvis scans),
preprocessed with the shipped recipe (``configs/preprocess/<recipe>.yaml``, its own spacing and
HU window). Each study is listed ``--copies`` times (hard links, same pages), so that an epoch has
enough batches for every worker; crops are drawn at random, so copies give different samples. The
crop, table and text limit are the training recipe's (``configs/fvlm.yaml``, with
``configs/ctrate.yaml`` on top for chest); the tokenizer is the offline MiniLM one.

Two read paths are measured in the same process, on the same cache and draws:

* ``float32 on CPU``: the crop read through the memory map and converted to float32 and padded
  on the CPU while copying (``fvlm.crop.crop_array``, what the loader did before);
* ``float16, device``: today's loader (``fvlm.data_modules.crop_read``): the crop's rows read
  with ``preadv`` in the cache dtype, padding left to the device (``finish_crops``, timed apart
  on the CPU: what a CPU-only run pays for it, a GPU pays instead on a GPU machine).

Measured, per recipe and path:

* **samples/s** of the training ``DataLoader`` with 0 and 2 workers, steady state (the first
  batch, i.e. worker start-up, excluded), page cache warm; with 0 workers also the CPU seconds
  per sample (``time.process_time``), loading and collation;
* **bytes read per sample** from storage, cold: before each sample the cache files are dropped
  from the page cache (``os.posix_fadvise(POSIX_FADV_DONTNEED)``, which needs no root and works
  because no process maps them then), and ``read_bytes`` of ``/proc/self/io`` counts what the
  sample made the kernel read, readahead included. It is set against the crop's own bytes (the
  voxels of the crop inside the volume, image + anatomy map, in the cache's dtypes) and against
  the bytes of the 4 KiB pages the crop's rows span (the least a page-granular read can get);
* where a sample's time goes (warm), by step of ``CachedStudyDataset.__getitem__``.

    python benchmarks/bench_loader.py                  # chest and abdomen, 2-4 min on 2 cores
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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

from fvlm import crop  # noqa: E402
from fvlm.config_files import resolve_config  # noqa: E402
from fvlm.data_modules.collate import finish_crops  # noqa: E402

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


# -- the two read paths ------------------------------------------------------------------------

PATHS = ("float32 on CPU", "float16, device")


@contextmanager
def read_path(dataset: Any, path: str) -> Iterator[None]:
    """Serve ``dataset``'s crops through ``path``: today's reader, or the float32 CPU copy.

    The float32 path is the reader as it was: ``crop_array`` allocates the float32 crop, fills
    it with the padding, converts the memory-mapped float16 voxels into it; the anatomy map is
    copied likewise. Its extent is the whole crop, so ``finish_crops`` has nothing left to pad.
    """
    if path == PATHS[1]:
        yield
        return

    def read_crop(
        image: np.ndarray, labels: np.ndarray, start: Any, flip: Any = (), out: Any = None
    ) -> tuple:
        size = dataset.crop_size
        out = crop.crop_array(image, start, size, pad_value=0.0, dtype=np.float32, flip=flip)
        anatomy = crop.crop_array(labels, start, size, pad_value=0, flip=flip)
        whole = np.array([[0, c] for c in size], dtype=np.int64)
        return out, anatomy if dataset._lut_is_identity else dataset._lut[anatomy], whole

    dataset.read_crop = read_crop
    try:
        yield
    finally:
        del dataset.read_crop


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


def warm_page_cache(dataset: Any) -> None:
    """Read the cache's ``.npy`` files once, so both paths start from a warm page cache.

    The cold-read measurement drops them; without this the path timed after it would pay the
    storage reads the other did not.
    """
    inodes = set()
    for path in sorted(dataset.cache.studies.glob("*/*.npy")):
        if path.stat().st_ino not in inodes:
            inodes.add(path.stat().st_ino)
            with open(path, "rb") as handle:
                while handle.read(2**24):
                    pass


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
) -> tuple[dict[str, float], float, float, float]:
    """Seconds per sample: by step of ``__getitem__`` (warm), its total, collation, finishing.

    Finishing (``finish_crops``: float32 and padding) runs on the CPU here; in training it runs
    on the accelerator, after the batch's transfer.
    """
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

    def crop_label(array: np.ndarray, *args: Any, **kwargs: Any) -> str:
        return "crop image" if array.dtype.kind == "f" else "crop anatomy map"

    patches = {
        (study_dataset, "read_crop_window"): timed(study_dataset.read_crop_window, crop_label),
        (crop, "crop_array"): timed(crop.crop_array, crop_label),
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
        with dataset.batched(samples):  # as the loader reads a batch
            for i in range(samples):
                torch.manual_seed(1000 + i)
                items.append(dataset[i % len(dataset)])
        total = (time.perf_counter() - start) / samples
    finally:
        for (owner, name), function in saved.items():
            if owner in (study_dataset, crop):
                setattr(owner, name, function)
            else:
                delattr(owner, name)
    start = time.perf_counter()
    batch = collate(items)
    collated = time.perf_counter()
    finish_crops(batch)
    return (
        {k: v / samples for k, v in clock.items()},
        total,
        (collated - start) / samples,
        (time.perf_counter() - collated) / samples,
    )


# -- main --------------------------------------------------------------------------------------


def run_recipe(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Build (or take) the cache and measure both read paths for one recipe."""
    recipe = RECIPES[name]
    data = training_data(recipe)
    size = (8, 24, 24) if args.quick else tuple(int(c) for c in data["crop_size"])
    start = time.perf_counter()
    cache = args.cache or build_cache(work / name, recipe, args.studies, args.copies, args.quick)
    result: dict[str, Any] = {"crop": size, "setup_s": time.perf_counter() - start, "paths": {}}
    for path in PATHS:
        measured: dict[str, Any] = {"rates": {}}
        for workers in (0, 2):
            module = make_data(cache, data, args.batch_size, workers, size)
            dataset = module.datasets["train"]
            with read_path(dataset, path):  # workers fork after this: they inherit the path
                warm_page_cache(dataset)
                loader = module.train_dataloader()
                rate, cpu = loader_throughput(loader, args.batches)
                measured["rates"][workers] = rate
                if workers:
                    continue
                measured["cpu"] = cpu
                result["table"] = dataset.table.name
                result["shape"] = dataset.cache.study_meta(dataset.study_ids[0])["shape"]
                measured["bytes"] = cold_reads(dataset, args.samples)
                warm_page_cache(dataset)
                (
                    measured["profile"],
                    measured["per_sample"],
                    measured["collate"],
                    measured["finish"],
                ) = sample_profile(dataset, args.samples, loader.collate_fn)
        result["paths"][path] = measured
    return result


def report(results: dict[str, dict], batch_size: int) -> str:
    """The table, the ratios against the targets and per-sample profiles, as printed."""
    mib = 2**20
    lines = [
        f"{'recipe':<9}{'path':<17}{'crop':>14}{'0 workers':>11}{'2 workers':>11}"
        f"{'CPU ms':>8}{'finish':>8}{'read MiB':>10}{'crop MiB':>10}{'read/crop':>11}"
        f"{'pages/crop':>12}",
        f"{'':<9}{'':<17}{'':>14}{'samples/s':>11}{'samples/s':>11}{'/sample':>8}"
        f"{'ms':>8}{'/sample':>10}",
    ]
    for name, r in results.items():
        for path, m in r["paths"].items():
            b = m["bytes"]
            lines.append(
                f"{name:<9}{path:<17}{'x'.join(map(str, r['crop'])):>14}"
                f"{m['rates'][0]:>11.1f}{m['rates'][2]:>11.1f}{m['cpu'] * 1e3:>8.0f}"
                f"{m['finish'] * 1e3:>8.0f}{b['read'] / mib:>10.1f}{b['crop'] / mib:>10.1f}"
                f"{b['read'] / b['crop']:>10.2f}x{b['span'] / b['crop']:>11.2f}x"
            )
    legend = (
        f"batch {batch_size}; CPU ms = loading and collating a sample (0 workers); finish = "
        "float32 conversion and padding of a sample (finish_crops) timed on this CPU, done on "
        "the accelerator in training; read = bytes the kernel read per sample from a cold page "
        "cache (readahead included); crop = the crop's voxels inside the volume (image float16 "
        "+ anatomy uint8); pages = 4 KiB pages its rows span; cache studies "
        + ", ".join(
            f"{n} {'x'.join(map(str, r['shape']))} "
            f"({r['paths'][PATHS[0]]['bytes']['files'] / mib:.0f} MiB)"
            for n, r in results.items()
        )
    )
    lines += [
        "",
        *textwrap.wrap(legend, 100),
        "",
        "ratios (targets: CPU >= 3x lower, read <= 1.2x the crop)",
    ]
    for name, r in results.items():
        before, after = (r["paths"][p] for p in PATHS)
        cpu = before["cpu"] / after["cpu"]
        read = after["bytes"]["read"] / after["bytes"]["crop"]
        lines.append(
            f"  {name:<8} CPU per sample {cpu:.2f}x lower: {'met' if cpu >= 3 else 'MISSED'}; "
            f"read {read:.2f}x the crop: {'met' if read <= 1.2 else 'MISSED'}; samples/s "
            f"{after['rates'][0] / before['rates'][0]:.2f}x (0 workers), "
            f"{after['rates'][2] / before['rates'][2]:.2f}x (2 workers)"
        )
    lines += ["", "where a sample's time goes (0 workers, warm page cache, ms per sample)"]
    for name, r in results.items():
        for path, m in r["paths"].items():
            total = m["per_sample"]
            steps = m["profile"] | {
                "other (crop validity, texts, tensors)": total - sum(m["profile"].values())
            }
            lines.append(
                f"  {name}, {path}: total {total * 1e3:.0f} ms in __getitem__, then "
                f"{m['collate'] * 1e3:.0f} ms per sample to collate a batch"
            )
            for label, seconds in sorted(steps.items(), key=lambda item: -item[1]):
                lines.append(
                    f"    {label:<44}{seconds * 1e3:7.1f} ms {100 * seconds / total:5.1f} %"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--cache", type=Path, help="an existing cache of the (single) recipe")
    parser.add_argument("--studies", type=int, default=1, help="distinct phantom studies")
    parser.add_argument("--copies", type=int, default=8, help="listings of each study")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
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
            rates = "; ".join(
                f"{path} {m['rates'][0]:.1f} / {m['rates'][2]:.1f}"
                for path, m in r["paths"].items()
            )
            print(
                f"  {name}: cache made in {r['setup_s']:.0f} s (table {r['table']}); samples/s "
                f"with 0 / 2 workers: {rates}",
                flush=True,
            )
    print()
    print(report(results, args.batch_size))
    print(f"\ntotal {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
