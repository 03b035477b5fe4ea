"""The evaluation subcommands: ``fvlm evaluate``, ``fvlm eval-ctrate``, ``fvlm eval-radchestct``.

Their typed signatures are the command-line options (``fvlm.cli``). ``eval-ctrate`` and
``eval-radchestct`` read a published dataset's layout into a manifest and labels, build (or
update) the preprocessing cache with the preprocessing library, then evaluate like ``evaluate``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml

from fvlm.config_files import resolve_config
from fvlm.evaluation.ctrate import ctrate_label_map, ctrate_manifest
from fvlm.evaluation.evaluability import AbsentRule
from fvlm.evaluation.metrics import ThresholdMethod
from fvlm.evaluation.radchestct import (
    RADCHESTCT_CALCIFICATION_MERGE,
    RADCHESTCT_SPACING_MM,
    radchestct_manifest,
)
from fvlm.evaluation.run import evaluate_checkpoints, print_results
from fvlm.evaluation.zero_shot import Protocol
from fvlm.preprocess.cache import CacheBusy
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.runner import run_preprocess
from fvlm.preprocess.segmentation import TotalSegmentatorUnavailable

__all__ = ["build_dataset_cache", "eval_ctrate", "eval_radchestct", "evaluate"]


def _checkpoints(
    ckpt: Sequence[Path] | Path, name: Sequence[str] | str | None
) -> tuple[list[Path], list[str]]:
    """Checkpoints and one display name each (default: the file stem)."""
    paths = [Path(ckpt)] if isinstance(ckpt, str | Path) else [Path(c) for c in ckpt]
    names = [name] if isinstance(name, str) else list(name or (p.stem for p in paths))
    if len(names) != len(paths):
        raise ValueError(f"give one name per checkpoint (or none): {names} for {len(paths)}")
    return paths, names


def evaluate(
    ckpt: list[Path] | Path,
    cache: Path,
    labels: Path,
    name: list[str] | str | None = None,
    split: str = "test",
    anatomy_table: str = "paper",
    benchmark: str | None = None,
    threshold: ThresholdMethod = "top-left",
    bootstrap: int = 0,
    device: str = "cpu",
    out: Path = Path("runs/eval"),
    batch_size: int = 4,
    num_workers: int = 0,
    absent_rule: AbsentRule = "not_evaluable",
    protocol: Protocol = "ours",
    retrieval: bool = True,
    linear_probe: bool = True,
    tsne: bool = True,
) -> int:
    """Zero-shot evaluation of one or more checkpoints on a preprocessing cache.

    Metrics: AUROC; balanced accuracy, sensitivity, specificity, precision and weighted F1 at a
    ROC-chosen threshold. Several checkpoints (``--ckpt [a.ckpt,b.ckpt] --name [fVLM,CLIP]``, or
    ``--ckpt+ a.ckpt --ckpt+ b.ckpt``) give one comparison table. Each network sees crops of its
    training size: fVLM a few planned crops per scan that hold every complete anatomy whole,
    CLIP crops tiling the scan. A study whose anatomy is truncated by the field of view or absent
    is left out of that anatomy's diseases (counted in the outputs).

    Args:
        ckpt: Checkpoint file, or a list of them.
        cache: Preprocessing cache (``fvlm preprocess``).
        labels: CSV with ``study_id`` and one 0/1 column per disease key.
        name: Display name per checkpoint (default: the file name without suffix).
        split: Cache split to evaluate.
        anatomy_table: Anatomy table the models were trained with: preset or YAML file.
        benchmark: Only the diseases of this set of the table (``phantom``, ``ctrate``, ...).
        threshold: Operating point on the ROC: closest to the top-left corner, or Youden's J.
        bootstrap: AUROC bootstrap resamples for confidence intervals (0: none).
        device: Torch device of the networks.
        out: Output folder.
        batch_size: Crops per forward pass of the evaluation.
        num_workers: Worker processes reading evaluation crops.
        absent_rule: A study without the disease's anatomy: ``not_evaluable`` (left out of the
            disease) or ``negative`` (scored as the disease's most confident negative; only
            where the scans' field of view covers the anatomy's region).
        protocol: Prompts: ``ours`` (several templates per side, the negatives describing the
            normal anatomy), ``fvlm`` (the authors' "X." / "Not x.") or ``ctclip`` ("X is
            present." / "X is not present."). A supervised-baseline checkpoint is scored by its
            own head.
        retrieval: Image-to-text and text-to-image Recall@1/5/10 per anatomy and whole scan
            (``<out>/<name>/retrieval.csv``).
        linear_probe: Logistic regression on the frozen embeddings, AUROC per disease at 1, 5,
            10 and 100 % of the training labels (``<out>/<name>/linear_probe.csv``,
            ``<out>/linear_probe_fewshot.png``).
        tsne: t-SNE maps of the embeddings coloured by disease, models side by side
            (``<out>/tsne.png``).
    """
    paths, names = _checkpoints(ckpt, name)
    try:
        table = pd.read_csv(labels, dtype={"study_id": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{labels}: not a readable CSV ({err})") from err
    results = evaluate_checkpoints(
        paths, names, cache, table, out, split, anatomy_table, benchmark, threshold, bootstrap,
        device, batch_size=batch_size, num_workers=num_workers, absent_rule=absent_rule,
        protocol=protocol, retrieval=retrieval, probe=linear_probe, tsne=tsne,
    )  # fmt: skip
    print_results(results, out)
    return 0


def build_dataset_cache(
    manifest: pd.DataFrame,
    labels: pd.DataFrame,
    cache: Path,
    preprocess_config: str | Path,
    workers: int,
    **overrides: object,
) -> int:
    """Write a dataset's manifest and labels to ``<cache>/inputs`` and preprocess them.

    Settings come from ``preprocess_config`` (a packaged name such as ``chest``, or a YAML file),
    then the paths, ``workers``, the segmenter (``precomputed`` when the manifest has masks) and
    ``overrides``. Returns the preprocessing exit code: 0 or 1 (some studies failed, the rest are
    usable) let the evaluation go on; 2 when nothing could run (the reason is printed).
    """
    inputs = cache / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    manifest.drop(columns=["xy_spacing", "z_spacing"], errors="ignore").to_csv(
        inputs / "manifest.csv", index=False
    )
    labels.to_csv(inputs / "labels.csv", index=False)
    path = resolve_config(preprocess_config, "preprocess")
    settings = yaml.safe_load(path.read_text()) or {}
    settings |= {
        "manifest": inputs / "manifest.csv",
        "cache": cache,
        "workers": workers,
        "segmenter": "precomputed" if "mask" in manifest.columns else "totalsegmentator",
        **overrides,
    }
    try:
        config = PreprocessConfig(**settings)
    except TypeError as err:  # an unknown key in the YAML file
        raise ValueError(f"{path}: not a preprocessing config ({err})") from None
    try:
        summary = run_preprocess(config)
    except (TotalSegmentatorUnavailable, CacheBusy) as err:
        print(f"preprocessing did not run, nothing evaluated: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    if summary.exit_code == 1:
        print(f"some studies failed preprocessing (see {cache}/manifest.csv)")
    return summary.exit_code


def _dataset_evaluation(
    manifest: pd.DataFrame,
    labels: pd.DataFrame,
    ckpt: list[Path] | Path,
    name: list[str] | str | None,
    split: str,
    cache: Path,
    preprocess_config: str,
    workers: int,
    threshold: ThresholdMethod,
    bootstrap: int,
    device: str,
    out: Path,
    extra: Mapping[str, object],
    score_merges: Mapping[str, Sequence[str]] | None = None,
    require_report: bool = True,
    batch_size: int = 4,
    num_workers: int = 0,
    absent_rule: AbsentRule = "not_evaluable",
) -> int:
    """Preprocess a chest dataset, then score CT-RATE's 18 labels; the exit status."""
    paths, names = _checkpoints(ckpt, name)
    code = build_dataset_cache(
        manifest, labels, cache, preprocess_config, workers, require_report=require_report
    )
    if code not in (0, 1):
        return code
    results = evaluate_checkpoints(
        paths, names, cache, labels, out, split, "chest", "ctrate", threshold, bootstrap, device,
        score_merges=score_merges, extra=extra, batch_size=batch_size, num_workers=num_workers,
        absent_rule=absent_rule,
    )  # fmt: skip
    print_results(results, out)
    return 0


def _mask_dir(root: Path, masks: Path | None) -> Path | None:
    """``masks``, else ``<root>/totalseg`` if it exists, else none (TotalSegmentator runs)."""
    if masks is not None:
        return masks
    default = root / "totalseg"
    return default if default.is_dir() else None


def eval_ctrate(
    root: Path,
    ckpt: list[Path] | Path,
    name: list[str] | str | None = None,
    split: Literal["valid", "train"] = "valid",
    cache: Path = Path("data/cache/ctrate"),
    masks: Path | None = None,
    preprocess_config: str = "chest",
    workers: int = 2,
    threshold: ThresholdMethod = "top-left",
    bootstrap: int = 0,
    device: str = "cpu",
    out: Path = Path("runs/eval-ctrate"),
    batch_size: int = 4,
    num_workers: int = 0,
    absent_rule: AbsentRule = "not_evaluable",
) -> int:
    """CT-RATE zero-shot evaluation of all 18 abnormality labels.

    Reads the published layout (``dataset/<split>``, ``radiology_text_reports``,
    ``multi_abnormality_labels``, ``metadata``), builds or updates the preprocessing cache and
    scores 16 labels on their anatomy's embedding; ``Medical material`` and ``Lymphadenopathy``
    (no single anatomy) on the whole-scan embedding (``chest`` anatomy table).

    Args:
        root: CT-RATE folder.
        ckpt: Checkpoint file, or a list of them.
        name: Display name per checkpoint (default: the file name without suffix).
        split: CT-RATE split, also the cache split evaluated.
        cache: Preprocessing cache, built or updated.
        masks: Precomputed TotalSegmentator maps named like the volumes (default:
            ``<root>/totalseg`` if it exists, else TotalSegmentator runs and needs its weights).
        preprocess_config: Preprocessing settings: a packaged name (``chest``) or a YAML file.
        workers: Preprocessing worker processes.
        threshold: Operating point on the ROC: closest to the top-left corner, or Youden's J.
        bootstrap: AUROC bootstrap resamples for confidence intervals (0: none).
        device: Torch device of the networks.
        out: Output folder.
        batch_size: Crops per forward pass of the evaluation.
        num_workers: Worker processes reading evaluation crops.
        absent_rule: A study without the disease's anatomy: ``not_evaluable`` (left out of the
            disease) or ``negative`` (scored as the disease's most confident negative; only
            where the scans' field of view covers the anatomy's region).
    """
    manifest, labels = ctrate_manifest(root, split, table="chest", mask_dir=_mask_dir(root, masks))
    return _dataset_evaluation(
        manifest, labels, ckpt, name, split, cache, preprocess_config, workers, threshold,
        bootstrap, device, out, {"dataset": "CT-RATE"}, batch_size=batch_size,
        num_workers=num_workers, absent_rule=absent_rule,
    )  # fmt: skip


def eval_radchestct(
    root: Path,
    ckpt: list[Path] | Path,
    name: list[str] | str | None = None,
    split: Literal["all", "test", "valid", "train"] = "all",
    spacing: float = RADCHESTCT_SPACING_MM,
    cache: Path = Path("data/cache/radchestct"),
    masks: Path | None = None,
    preprocess_config: str = "chest",
    workers: int = 2,
    threshold: ThresholdMethod = "top-left",
    bootstrap: int = 0,
    device: str = "cpu",
    out: Path = Path("runs/eval-radchestct"),
    batch_size: int = 4,
    num_workers: int = 0,
    absent_rule: AbsentRule = "not_evaluable",
) -> int:
    """Rad-ChestCT as external test set, scored on CT-RATE's 18 labels.

    Reads the release's ``.npz`` volumes and ``img*_Abnormality_and_Location_Labels.csv``, maps
    the labels to CT-RATE's (``fvlm.evaluation.RADCHESTCT_TO_CTRATE``) and scores them as
    ``eval-ctrate`` does, with CT-CLIP's rule that the calcification label is scored by the
    maximum of the arterial-wall and coronary-artery-wall calcification scores. Labels without a
    Rad-ChestCT column stay in every output, with no positives or negatives, and are listed as
    not evaluable. The release has no reports, so the cache is built without them.

    Args:
        root: Rad-ChestCT folder.
        ckpt: Checkpoint file, or a list of them.
        name: Display name per checkpoint (default: the file name without suffix).
        split: Label file(s) to read (``all``: every one present); also the cache split.
        spacing: Isotropic voxel size (mm) where ``CT_Scan_Metadata_Complete_35747.csv`` gives
            none.
        cache: Preprocessing cache, built or updated.
        masks: Precomputed TotalSegmentator maps named like the volumes (default:
            ``<root>/totalseg`` if it exists, else TotalSegmentator runs and needs its weights).
        preprocess_config: Preprocessing settings: a packaged name (``chest``) or a YAML file.
        workers: Preprocessing worker processes.
        threshold: Operating point on the ROC: closest to the top-left corner, or Youden's J.
        bootstrap: AUROC bootstrap resamples for confidence intervals (0: none).
        device: Torch device of the networks.
        out: Output folder.
        batch_size: Crops per forward pass of the evaluation.
        num_workers: Worker processes reading evaluation crops.
        absent_rule: A study without the disease's anatomy: ``not_evaluable`` (left out of the
            disease) or ``negative`` (scored as the disease's most confident negative; only
            where the scans' field of view covers the anatomy's region).
    """
    manifest, labels = radchestct_manifest(
        root, split, table="chest", spacing=spacing, mask_dir=_mask_dir(root, masks)
    )
    if manifest.empty:
        raise ValueError(f"no Rad-ChestCT volume of a labelled study found under {root}")
    not_evaluable = list(labels.attrs.get("unmapped", []))
    key_of = ctrate_label_map("chest")
    merges = {
        key_of[target]: [key_of[s] for s in sources]
        for target, sources in RADCHESTCT_CALCIFICATION_MERGE.items()
    }
    extra = {"dataset": "Rad-ChestCT", "not_evaluable": not_evaluable, "scored_by_max": merges}
    code = _dataset_evaluation(
        manifest.assign(split=split), labels, ckpt, name, split, cache, preprocess_config,
        workers, threshold, bootstrap, device, out, extra,
        score_merges=RADCHESTCT_CALCIFICATION_MERGE, require_report=False,
        batch_size=batch_size, num_workers=num_workers, absent_rule=absent_rule,
    )  # fmt: skip
    if code == 0 and not_evaluable:
        print(
            "not evaluable on Rad-ChestCT (no label column; n_pos = n_neg = 0): "
            + ", ".join(not_evaluable)
        )
    return code
