"""``fvlm evaluate``: zero-shot evaluation of trained checkpoints on a preprocessing cache.

Each checkpoint's network embeds every study of a split as a whole (the volume padded to a
multiple of the patch size, so no anatomy is cut), the prompts of each disease are scored against
the anatomy's embedding (fVLM) or the global embedding (CLIP), and the metrics, tables and plots of
:mod:`fvlm.evaluation` are written. Several checkpoints give one comparison table.

``fvlm eval-ctrate`` and ``fvlm eval-radchestct`` do the same on a published dataset: they read its
layout into a manifest and labels, build (or update) the preprocessing cache, then evaluate.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.data_modules.collate import collate_studies
from fvlm.data_modules.study_dataset import (
    CachedStudyDataset,
    cache_hu_window,
    read_cache_manifest,
)
from fvlm.evaluation import (
    RADCHESTCT_CALCIFICATION_MERGE,
    comparison_table,
    ctrate_label_map,
    ctrate_manifest,
    evaluate_scores,
    merge_max_scores,
    plot_auroc_comparison,
    plot_roc_curves,
    radchestct_manifest,
    write_report,
    zero_shot_scores,
)
from fvlm.evaluation.radchestct import RADCHESTCT_SPACING_MM
from fvlm.lit_modules.contrastive import ContrastiveModule, load_checkpoint
from fvlm.models import GlobalCLIP, load_tokenizer
from fvlm.models.intensity_windows import check_source_window

__all__ = [
    "ctrate_main",
    "embed_studies",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "main",
    "radchestct_main",
]

_THRESHOLDS = ("top-left", "youden")


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
    source = network.vision.config.source_hu_window
    check_source_window(source, cache_hu_window(cache_dir), cache_dir)
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
    score_merges: Mapping[str, Sequence[str]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score one checkpoint: returns (per-disease scores ``(S, K)``, metrics table).

    ``score_merges`` (CT-RATE column -> columns whose maximum scores it, see
    :func:`~fvlm.evaluation.merge_max_scores`) applies a dataset's scoring rule, such as CT-CLIP's
    calcification rule on Rad-ChestCT, before the metrics.
    """
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
    if score_merges:
        scores = merge_max_scores(scores, score_merges, table)
    truth = labels.set_index("study_id").loc[ids, [d.key for d in diseases]]
    results = evaluate_scores(scores, truth, threshold_method=threshold, n_boot=n_boot)
    return scores, results


def evaluate_checkpoints(
    checkpoints: Sequence[Path],
    names: Sequence[str],
    cache_dir: Path,
    labels: pd.DataFrame,
    out: Path,
    split: str = "test",
    anatomy_table: str = "paper",
    benchmark: str | None = None,
    threshold: str = "top-left",
    n_boot: int = 0,
    device: str = "cpu",
    score_merges: Mapping[str, Sequence[str]] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, pd.DataFrame]:
    """Evaluate each checkpoint and write its outputs; the one code path of every eval command.

    Per checkpoint ``out/<name>/``: per-disease CSV, JSON summary (with ``extra``), table, ROC PNG,
    ``scores.csv``, TensorBoard scalars; then ``out/comparison.txt`` (and, with several
    checkpoints, ``out/auroc_comparison.png``).

    Returns:
        name -> the :func:`~fvlm.evaluation.evaluate_scores` table.
    """
    labels = labels.astype({"study_id": str})
    results: dict[str, pd.DataFrame] = {}
    for name, ckpt in zip(names, checkpoints, strict=True):
        scores, table = evaluate_checkpoint(
            ckpt, cache_dir, labels, split, anatomy_table, benchmark, threshold, n_boot, device,
            score_merges,
        )  # fmt: skip
        folder = out / name
        info = {"checkpoint": str(ckpt), "split": split} | dict(extra or {})
        write_report(table, folder, name=name, extra=info)
        truth = labels.set_index("study_id").loc[scores.index, scores.columns]
        plot_roc_curves(
            scores, truth, folder / "roc.png", results=table, title=f"{name} zero-shot ROC"
        )
        scores.to_csv(folder / "scores.csv")
        results[name] = table
    if len(results) > 1:
        plot_auroc_comparison(results, out / "auroc_comparison.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.txt").write_text(comparison_table(results) + "\n")
    return results


def _print_results(results: Mapping[str, pd.DataFrame], out: Path) -> None:
    print(comparison_table(results))
    print(f"\nOutputs in {out}/ (per-disease CSV, JSON summary, ROC PNG, TensorBoard scalars)")


def _names(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[str]:
    names = ns.name or [p.stem for p in ns.ckpt]
    if len(names) != len(ns.ckpt):
        parser.error("give one --name per --ckpt (or none)")
    return names


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
    parser.add_argument("--threshold", default="top-left", choices=_THRESHOLDS)
    parser.add_argument("--bootstrap", type=int, default=0, help="AUROC bootstrap resamples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder")
    ns = parser.parse_args(args)
    names = _names(parser, ns)
    labels = pd.read_csv(ns.labels, dtype={"study_id": str})
    results = evaluate_checkpoints(
        ns.ckpt, names, ns.cache, labels, ns.out, ns.split, ns.anatomy_table, ns.benchmark,
        ns.threshold, ns.bootstrap, ns.device,
    )  # fmt: skip
    _print_results(results, ns.out)
    return 0


def _dataset_parser(
    prog: str, description: str, dataset: str, slug: str
) -> argparse.ArgumentParser:
    """The options every published-dataset command shares (``--split`` is each one's own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--root", required=True, type=Path, help=f"{dataset} folder")
    parser.add_argument("--ckpt", action="append", required=True, type=Path, help="checkpoint")
    parser.add_argument("--name", action="append", help="display name per --ckpt")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(f"data/cache/{slug}"),
        help=f"preprocessing cache, built or updated (default: data/cache/{slug})",
    )
    parser.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="precomputed TotalSegmentator maps named like the volumes (default: <root>/totalseg "
        "if it exists, else TotalSegmentator runs)",
    )
    parser.add_argument(
        "--preprocess-config", type=Path, default=Path("configs/preprocess/chest.yaml")
    )
    parser.add_argument("--workers", type=int, default=2, help="preprocessing worker processes")
    parser.add_argument("--threshold", default="top-left", choices=_THRESHOLDS)
    parser.add_argument("--bootstrap", type=int, default=0, help="AUROC bootstrap resamples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(f"runs/eval-{slug}"),
        help=f"output folder (default: runs/eval-{slug})",
    )
    return parser


def _mask_dir(ns: argparse.Namespace) -> Path | None:
    if ns.masks is not None:
        return ns.masks
    default = ns.root / "totalseg"
    return default if default.is_dir() else None


def _build_cache(
    ns: argparse.Namespace,
    manifest: pd.DataFrame,
    labels: pd.DataFrame,
    prog: str,
    options: Sequence[str] = (),
) -> int:
    """Write the dataset's manifest and labels to ``<cache>/inputs`` and preprocess them.

    Returns the preprocessing exit code; 0 or 1 (some studies failed, the rest are usable) let the
    evaluation go on.
    """
    from fvlm.preprocess.cli import main as preprocess_main

    inputs = ns.cache / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    manifest.drop(columns=["xy_spacing", "z_spacing"], errors="ignore").to_csv(
        inputs / "manifest.csv", index=False
    )
    labels.to_csv(inputs / "labels.csv", index=False)
    segmenter = "precomputed" if "mask" in manifest.columns else "totalsegmentator"
    code = preprocess_main(
        ["--config", str(ns.preprocess_config), "--manifest", str(inputs / "manifest.csv"),
         "--cache", str(ns.cache), "--workers", str(ns.workers), "--segmenter", segmenter,
         *options]
    )  # fmt: skip
    if code == 1:
        print(f"{prog}: some studies failed preprocessing (see {ns.cache}/manifest.csv)")
    elif code:
        print(f"{prog}: preprocessing did not run (exit code {code}); nothing evaluated")
    return code


def ctrate_main(args: list[str] | None = None) -> int:
    """``fvlm eval-ctrate --root CTRATE --ckpt C``: preprocess CT-RATE's valid split and score it.

    All 18 labels are scored: 16 on their anatomy's embedding, ``Medical material`` and
    ``Lymphadenopathy`` (no single anatomy) on the whole-scan embedding (chest preset).
    """
    prog = "fvlm eval-ctrate"
    parser = _dataset_parser(
        prog,
        "CT-RATE zero-shot evaluation: reads the published layout (dataset/valid, "
        "radiology_text_reports, multi_abnormality_labels, metadata), builds/updates the "
        "preprocessing cache and scores all 18 abnormality labels.",
        "CT-RATE",
        "ctrate",
    )
    parser.add_argument("--split", default="valid", choices=["valid", "train"])
    ns = parser.parse_args(args)
    names = _names(parser, ns)
    manifest, labels = ctrate_manifest(ns.root, ns.split, table="chest", mask_dir=_mask_dir(ns))
    code = _build_cache(ns, manifest, labels, prog)
    if code not in (0, 1):
        return code
    results = evaluate_checkpoints(
        ns.ckpt, names, ns.cache, labels, ns.out, ns.split, "chest", "ctrate", ns.threshold,
        ns.bootstrap, ns.device, extra={"dataset": "CT-RATE"},
    )  # fmt: skip
    _print_results(results, ns.out)
    return 0


def radchestct_main(args: list[str] | None = None) -> int:
    """``fvlm eval-radchestct --root RADCHESTCT --ckpt C``: Rad-ChestCT as external test set.

    Reads the release's ``.npz`` volumes and ``img*_Abnormality_and_Location_Labels.csv``, maps
    the labels to CT-RATE's 18 (:data:`~fvlm.evaluation.RADCHESTCT_TO_CTRATE`) and scores them as
    ``eval-ctrate`` does, with CT-CLIP's rule that the calcification label is scored by the
    maximum of the arterial-wall and coronary-artery-wall calcification scores. Labels without a
    Rad-ChestCT column stay in every output, with no positives or negatives, and are listed as
    not evaluable. The release has no reports, so the cache is built without them.
    """
    prog = "fvlm eval-radchestct"
    parser = _dataset_parser(
        prog,
        "Rad-ChestCT external zero-shot evaluation: reads the published .npz volumes and "
        "abnormality-and-location labels, maps them to CT-RATE's 18 labels, builds/updates the "
        "preprocessing cache and scores them (calcification: max of the two calcification "
        "scores, as CT-CLIP).",
        "Rad-ChestCT",
        "radchestct",
    )
    parser.add_argument(
        "--split",
        default="all",
        choices=["all", "test", "valid", "train"],
        help="label file(s) to read (default: all present); also the cache split evaluated",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        default=RADCHESTCT_SPACING_MM,
        help="isotropic voxel size (mm) where CT_Scan_Metadata_Complete_35747.csv gives none",
    )
    ns = parser.parse_args(args)
    names = _names(parser, ns)
    manifest, labels = radchestct_manifest(
        ns.root, ns.split, table="chest", spacing=ns.spacing, mask_dir=_mask_dir(ns)
    )
    if manifest.empty:
        parser.error(f"no Rad-ChestCT volume of a labelled study found under {ns.root}")
    not_evaluable = list(labels.attrs.get("unmapped", []))
    key_of = ctrate_label_map("chest")
    merges = {
        key_of[target]: [key_of[s] for s in sources]
        for target, sources in RADCHESTCT_CALCIFICATION_MERGE.items()
    }
    code = _build_cache(
        ns, manifest.assign(split=ns.split), labels, prog, ["--require_report", "false"]
    )
    if code not in (0, 1):
        return code
    results = evaluate_checkpoints(
        ns.ckpt, names, ns.cache, labels, ns.out, ns.split, "chest", "ctrate", ns.threshold,
        ns.bootstrap, ns.device, score_merges=RADCHESTCT_CALCIFICATION_MERGE,
        extra={"dataset": "Rad-ChestCT", "not_evaluable": not_evaluable, "scored_by_max": merges},
    )  # fmt: skip
    _print_results(results, ns.out)
    if not_evaluable:
        print(
            "not evaluable on Rad-ChestCT (no label column; n_pos = n_neg = 0): "
            + ", ".join(not_evaluable)
        )
    return 0
