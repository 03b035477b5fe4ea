"""Evaluation cost of fvlm, measured in one run (``make bench``): crop plan vs whole-scan padding.

On phantom scans larger than the training crop (``chest_abdomen_pelvis`` geometry at 8 x 5 x 5 mm,
preprocessed by ``fvlm preprocess``'s library), one untrained demo-sized fVLM network embeds every
study twice:

* **crop plan** (what ``fvlm evaluate`` does): the few crops of the training size per scan that
  hold every complete anatomy whole (:func:`fvlm.evaluation.crop_plan.plan_crops`), batched
  across studies, read crop-only from the memory-mapped cache, no text tokenised;
* **whole scan, padded** (what evaluation did before): every scan padded to the split's largest,
  rounded up to whole patches, one forward pass each with the position embeddings stretched to
  that grid, through the training dataset (which tokenised each study's texts too).

It prints forward passes and tokens per study, studies per second of each, and their ratios. The
CLIP baseline's forward passes (crops tiling the scan) are printed for reference. Usage::

    python benchmarks/bench_eval.py [--studies 8] [--batch-size 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fvlm.anatomy import AnatomyTable, load_anatomy_table  # noqa: E402
from fvlm.checkpoint import TrainedNetwork  # noqa: E402
from fvlm.config_files import resolve_config  # noqa: E402
from fvlm.data_modules.collate import collate_studies  # noqa: E402
from fvlm.data_modules.study_dataset import CachedStudyDataset  # noqa: E402
from fvlm.evaluation.crop_plan import tile_crops  # noqa: E402
from fvlm.evaluation.embedding import PlannedCrops, embed_studies  # noqa: E402
from fvlm.models import FineGrainedCLIP, VisionConfig  # noqa: E402
from fvlm.models.vision import grid_of  # noqa: E402
from fvlm.phantom import generate_phantom  # noqa: E402
from fvlm.preprocess.cache import StudyCache  # noqa: E402
from fvlm.preprocess.config import PreprocessConfig  # noqa: E402
from fvlm.preprocess.runner import run_preprocess  # noqa: E402

SPLIT = "test"
SPACING = (8.0, 5.0, 5.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="phantom studies evaluated")
    parser.add_argument("--batch-size", type=int, default=4, help="crops (or scans) per batch")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (best is kept)")
    parser.add_argument(
        "--crop",
        type=int,
        nargs=3,
        action="append",
        help="training crop(s) in voxels, patch 4x8x8 (default: the demo's 40 64 80 and the "
        "training benchmark's 16 48 48)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_cache(root: Path, studies: int, seed: int) -> Path:
    """Phantom chest-abdomen-pelvis scans through the preprocessing library (phantom recipe)."""
    manifest = generate_phantom(
        root / "phantom", n_studies=studies, seed=seed, geometry="chest_abdomen_pelvis",
        spacing=SPACING, splits=(0.0, 0.0, 1.0), progress=False,
    )  # fmt: skip
    settings = yaml.safe_load(resolve_config("phantom", "preprocess").read_text())
    settings |= {"manifest": manifest, "cache": root / "cache", "spacing": SPACING,
                 "workers": 1, "progress": False}  # fmt: skip
    summary = run_preprocess(PreprocessConfig(**settings))
    if summary.exit_code != 0:
        raise SystemExit(f"preprocessing failed:\n{summary.format()}")
    return root / "cache"


def whole_scan_crop(cache: Path, patch: tuple[int, ...]) -> tuple[int, int, int]:
    """The old evaluation's crop: the split's largest scan, rounded up to whole patches."""
    store = StudyCache(cache)
    shapes = np.array([store.study_meta(s)["shape"] for s in store.ok_studies(SPLIT)])
    return tuple(math.ceil(n / p) * p for n, p in zip(shapes.max(0), patch, strict=True))


@torch.no_grad()
def embed_whole_scans(
    network: FineGrainedCLIP, cache: Path, table: AnatomyTable, batch_size: int, device: str
) -> torch.Tensor:
    """The old evaluation: each scan padded to the largest, one forward pass, texts tokenised."""
    crop = whole_scan_crop(cache, network.vision.patch_size)
    dataset = CachedStudyDataset(cache, SPLIT, table, crop, train=False, tokenizer="minilm")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_studies)
    out = []
    for batch in loader:
        image, anatomy = batch["image"].to(device), batch["anatomy"].to(device)
        out.append(network.encode_image_with_presence(image, anatomy)[0].cpu())
    return torch.cat(out)


def best_time(function: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one untimed warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(
    cache: Path,
    table: AnatomyTable,
    crop: tuple[int, int, int],
    args: argparse.Namespace,
    device: str,
) -> None:
    """Time both evaluations of one network whose training crop is ``crop``; print the rows."""
    vision = VisionConfig.vit_tiny(img_size=crop, patch_size=(4, 8, 8), hidden_size=64)
    torch.manual_seed(args.seed)
    network = FineGrainedCLIP(len(table), vision=vision, embed_dim=128).to(device).eval()
    trained = TrainedNetwork(network, {"text_model": "minilm"}, "fine_grained")
    store = StudyCache(cache)
    shapes = np.array([store.study_meta(s)["shape"] for s in store.ok_studies(SPLIT)])
    crops = PlannedCrops(cache, SPLIT, table, crop)
    passes = crops.forward_passes()
    tiles = [len(tile_crops(shape, crop)) for shape in shapes]
    whole = whole_scan_crop(cache, network.vision.patch_size)
    tokens_crop = math.prod(grid_of(crop, network.vision.patch_size))
    tokens_whole = math.prod(grid_of(whole, network.vision.patch_size))
    counts = np.bincount(crops.status.ravel(), minlength=4)
    t_plan = best_time(
        lambda: embed_studies(
            trained, cache, SPLIT, table, batch_size=args.batch_size, progress=False
        ),
        args.repeats,
    )
    t_whole = best_time(
        lambda: embed_whole_scans(network, cache, table, args.batch_size, device), args.repeats
    )
    n = len(shapes)
    size_mm = (np.asarray(crop) * SPACING).round().tolist()
    print(f"\ntraining crop {list(crop)} voxels = {size_mm} mm ({tokens_crop} tokens)")
    print(f"  anatomies per scan (paper table, {len(table)}): whole in a crop "
          f"{counts[0] / n:.1f}, larger than the crop {counts[1] / n:.1f}, truncated by the field "
          f"of view {counts[2] / n:.1f}, absent {counts[3] / n:.1f}")  # fmt: skip
    print(f"  {'':<28}{'passes/study':>14}{'max':>6}{'tokens/study':>14}{'studies/s':>11}")
    rows = (
        ("crop plan (fVLM)", passes.mean(), passes.max(), passes.mean() * tokens_crop, n / t_plan),
        ("whole scan padded (before)", 1.0, 1, tokens_whole, n / t_whole),
    )
    for name, mean, most, tokens, rate in rows:
        print(f"  {name:<28}{mean:>14.2f}{most:>6}{tokens:>14.0f}{rate:>11.2f}")
    print(f"  CLIP, crops tiling the scan: {np.mean(tiles):.2f} passes/study (max {max(tiles)})")
    print(f"  whole-scan grid {list(whole)} = {tokens_whole} tokens, position embeddings "
          f"stretched from {tokens_crop}")  # fmt: skip
    print(f"  ratio studies/s crop plan / whole scan: {t_whole / t_plan:.2f}x; tokens per study "
          f"{passes.mean() * tokens_crop / tokens_whole:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    table = load_anatomy_table("paper")
    crop_sizes = [tuple(c) for c in args.crop or ((40, 64, 80), (16, 48, 48))]
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        cache = build_cache(Path(tmp), args.studies, args.seed)
        store = StudyCache(cache)
        shapes = np.array([store.study_meta(s)["shape"] for s in store.ok_studies(SPLIT)])
        mm = shapes * np.asarray(SPACING)
        print(f"bench_eval: {len(shapes)} phantom chest-abdomen-pelvis scans at {SPACING} mm, "
              f"device {device}, torch threads {torch.get_num_threads()}, batch "
              f"{args.batch_size}")  # fmt: skip
        print(f"  scans: {shapes.min(0).tolist()}..{shapes.max(0).tolist()} voxels "
              f"({mm.min(0).round().tolist()}..{mm.max(0).round().tolist()} mm)")  # fmt: skip
        for crop in crop_sizes:
            measure(cache, table, crop, args, device)


if __name__ == "__main__":
    main()
