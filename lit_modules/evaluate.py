"""``fvlm evaluate``: zero-shot evaluation of trained checkpoints on a preprocessing cache.

Each checkpoint's network embeds every study of a split as a whole (the volume padded to a
multiple of the patch size, so no anatomy is cut), the prompts of each disease are scored against
the anatomy's embedding (fVLM) or the global embedding (CLIP), and the metrics, tables and plots of
:mod:`fvlm.evaluation` are written. Several checkpoints give one comparison table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.data_modules.collate import collate_studies
from fvlm.data_modules.study_dataset import CachedStudyDataset, read_cache_manifest
from fvlm.evaluation import (
    comparison_table,
    evaluate_scores,
    plot_auroc_comparison,
    plot_roc_curves,
    write_report,
    zero_shot_scores,
)
from fvlm.lit_modules.contrastive import ContrastiveModule, load_checkpoint
from fvlm.models import GlobalCLIP, load_tokenizer

__all__ = ["embed_studies", "evaluate_checkpoint", "main"]


def whole_volume_crop(cache_dir: Path, split: str, patch_size: tuple[int, ...]) -> tuple[int, ...]:
    """Smallest crop holding every study of ``split``, rounded up to whole patches."""
    largest = [0, 0, 0]
    for row in read_cache_manifest(cache_dir):
        if row.get("status") != "ok" or row.get("split") != split:
            continue
        meta = json.loads((cache_dir / "studies" / row["study_id"] / "meta.json").read_text())
        largest = [max(a, int(b)) for a, b in zip(largest, meta["shape"], strict=True)]
    if not any(largest):
        raise ValueError(f"no study with status ok and split {split!r} in {cache_dir}")
    return tuple(math.ceil(s / p) * p for s, p in zip(largest, patch_size, strict=True))


@torch.no_grad()
def embed_studies(
    module: ContrastiveModule,
    cache_dir: Path,
    split: str,
    table: AnatomyTable,
    batch_size: int = 2,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embeddings ``(S, A, E)`` (``(S, 1, E)`` for CLIP), presence ``(S, A)`` and study ids."""
    network = module.network.eval()
    crop = whole_volume_crop(cache_dir, split, network.vision.patch_size)
    dataset = CachedStudyDataset(
        cache_dir, split, table, crop, train=False, tokenizer=module.hparams.text_model
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_studies
    )
    embeddings, present, ids = [], [], []
    for batch in tqdm(loader, desc=f"embed {split}", unit="batch"):
        image = batch["image"].to(module.device)
        anatomy = batch["anatomy"].to(module.device)
        if isinstance(network, GlobalCLIP):
            emb = network.encode_image(image)
            seen = torch.ones(emb.shape[:2], dtype=torch.bool)
        else:
            emb, seen = network.encode_image_with_presence(image, anatomy)
        embeddings.append(emb.float().cpu())
        present.append(seen.cpu() & batch["valid"])
        ids.extend(batch["study_id"])
    return torch.cat(embeddings), torch.cat(present), ids


def evaluate_checkpoint(
    checkpoint: Path,
    cache_dir: Path,
    labels: pd.DataFrame,
    split: str = "test",
    anatomy_table: str = "paper",
    benchmark: str | None = None,
    threshold: str = "top-left",
    n_boot: int = 0,
    device: str = "cpu",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score one checkpoint: returns (per-disease scores ``(S, K)``, metrics table)."""
    module = load_checkpoint(checkpoint, map_location=device)
    table = load_anatomy_table(anatomy_table)
    emb, present, ids = embed_studies(module, cache_dir, split, table)
    diseases = [d for d in table.diseases(benchmark) if d.key in labels.columns]
    if not diseases:
        raise ValueError("no disease of the anatomy table has a column in the labels file")
    tokenizer = load_tokenizer(module.hparams.text_model)
    network = module.network

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return network.encode_text(
            tokens["input_ids"].to(module.device), tokens["attention_mask"].to(module.device)
        ).cpu()

    mode = "global" if isinstance(network, GlobalCLIP) else "fine"
    with torch.no_grad():
        scale = float(network.logit_scale())
        scores = zero_shot_scores(
            emb, present, encode, scale, table, diseases, mode=mode, study_ids=ids,
            output="logit",
        )  # fmt: skip
    truth = labels.set_index("study_id").loc[ids, [d.key for d in diseases]]
    results = evaluate_scores(scores, truth, threshold_method=threshold, n_boot=n_boot)
    return scores, results


def main(args: list[str] | None = None) -> int:
    """``fvlm evaluate --ckpt A.ckpt --name fVLM [--ckpt B.ckpt --name CLIP] ...``."""
    parser = argparse.ArgumentParser(
        prog="fvlm evaluate",
        description="Zero-shot evaluation (AUROC; balanced ACC, sensitivity, specificity, "
        "precision, weighted F1 at a ROC-chosen threshold) of one or more checkpoints.",
    )
    parser.add_argument("--ckpt", action="append", required=True, type=Path, help="checkpoint")
    parser.add_argument("--name", action="append", help="display name per --ckpt")
    parser.add_argument("--cache", required=True, type=Path, help="preprocessing cache")
    parser.add_argument("--labels", required=True, type=Path, help="CSV: study_id + disease keys")
    parser.add_argument("--split", default="test", help="cache split to evaluate (default: test)")
    parser.add_argument("--anatomy-table", default="paper", help="preset or YAML (default: paper)")
    parser.add_argument("--benchmark", default=None, help="only diseases of this set (phantom, …)")
    parser.add_argument("--threshold", default="top-left", choices=["top-left", "youden"])
    parser.add_argument("--bootstrap", type=int, default=0, help="AUROC bootstrap resamples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder")
    ns = parser.parse_args(args)
    names = ns.name or [p.stem for p in ns.ckpt]
    if len(names) != len(ns.ckpt):
        parser.error("give one --name per --ckpt (or none)")
    labels = pd.read_csv(ns.labels, dtype={"study_id": str})
    results: dict[str, pd.DataFrame] = {}
    for name, ckpt in zip(names, ns.ckpt, strict=True):
        scores, table = evaluate_checkpoint(
            ckpt, ns.cache, labels, ns.split, ns.anatomy_table, ns.benchmark, ns.threshold,
            ns.bootstrap, ns.device,
        )  # fmt: skip
        out = ns.out / name
        write_report(table, out, name=name, extra={"checkpoint": str(ckpt), "split": ns.split})
        truth = labels.set_index("study_id").loc[scores.index, scores.columns]
        plot_roc_curves(
            scores, truth, out / "roc.png", results=table, title=f"{name} zero-shot ROC"
        )
        scores.to_csv(out / "scores.csv")
        results[name] = table
    if len(results) > 1:
        plot_auroc_comparison(results, ns.out / "auroc_comparison.png")
    text = comparison_table(results)
    (ns.out).mkdir(parents=True, exist_ok=True)
    (ns.out / "comparison.txt").write_text(text + "\n")
    print(text)
    print(f"\nOutputs in {ns.out}/ (per-disease CSV, JSON summary, ROC PNG, TensorBoard scalars)")
    return 0


def ctrate_main(args: list[str] | None = None) -> int:
    """``fvlm eval-ctrate --root CTRATE --ckpt C``: preprocess CT-RATE's valid split and score it.

    All 18 labels are scored: 16 on their anatomy's embedding, ``Medical material`` and
    ``Lymphadenopathy`` (no single anatomy) on the whole-scan embedding (chest preset).
    """
    parser = argparse.ArgumentParser(
        prog="fvlm eval-ctrate",
        description="CT-RATE zero-shot evaluation: reads the published layout (dataset/valid, "
        "radiology_text_reports, multi_abnormality_labels, metadata), builds/updates the "
        "preprocessing cache and scores all 18 abnormality labels.",
    )
    parser.add_argument("--root", required=True, type=Path, help="CT-RATE folder")
    parser.add_argument("--ckpt", action="append", required=True, type=Path)
    parser.add_argument("--name", action="append", help="display name per --ckpt")
    parser.add_argument("--cache", type=Path, default=Path("data/cache/ctrate"))
    parser.add_argument("--split", default="valid", choices=["valid", "train"])
    parser.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="precomputed TotalSegmentator maps named like the volumes (default: <root>/totalseg)",
    )
    parser.add_argument(
        "--preprocess-config", type=Path, default=Path("configs/preprocess/chest.yaml")
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/eval-ctrate"))
    ns = parser.parse_args(args)
    from fvlm.evaluation.ctrate import ctrate_manifest
    from fvlm.preprocess.cli import main as preprocess_main

    masks = ns.masks or (ns.root / "totalseg" if (ns.root / "totalseg").is_dir() else None)
    manifest, labels = ctrate_manifest(ns.root, ns.split, table="chest", mask_dir=masks)
    inputs = ns.cache / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    manifest.drop(columns=["xy_spacing", "z_spacing"], errors="ignore").to_csv(
        inputs / "manifest.csv", index=False
    )
    labels.to_csv(inputs / "labels.csv", index=False)
    segmenter = ["--segmenter", "precomputed"] if masks else ["--segmenter", "totalsegmentator"]
    code = preprocess_main(
        ["--config", str(ns.preprocess_config), "--manifest", str(inputs / "manifest.csv"),
         "--cache", str(ns.cache), "--workers", str(ns.workers), *segmenter]
    )  # fmt: skip
    if code:
        print(f"eval-ctrate: some studies failed preprocessing (see {ns.cache}/manifest.csv)")
    evaluate_args = ["--cache", str(ns.cache), "--labels", str(inputs / "labels.csv"),
                     "--split", ns.split, "--anatomy-table", "chest", "--benchmark", "ctrate",
                     "--out", str(ns.out)]  # fmt: skip
    for i, ckpt in enumerate(ns.ckpt):
        evaluate_args += ["--ckpt", str(ckpt)]
        if ns.name:
            evaluate_args += ["--name", ns.name[i]]
    return main(evaluate_args)
