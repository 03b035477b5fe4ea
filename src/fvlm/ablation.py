"""``fvlm ablation``: the paper's ablations (Tab. 4, Tab. 5) and Tab. 1's reference rows at once.

Each row of :data:`ROWS` is a training module and the options it names, written as a YAML overlay of
a base config (the demo's, ``configs/demo.yaml``); a run is ``fvlm fit --config BASE --config
<run>/row.yaml`` in a subprocess (its own seed, threads and memory) followed by the zero-shot
evaluation of its last checkpoint on the test split
(:func:`fvlm.evaluation.run.evaluate_checkpoints`, the code path of ``fvlm evaluate``). Every row
trains for the same number of epochs on the same loader, so each trained network takes the same
number of optimiser updates (co-teaching trains each of its two networks on the whole epoch, as the
paper does); ``steps_per_network`` in the results shows it. Tab. 5's
"baseline" and "CoT" columns are Tab. 4's FGA + FNCN and FGA + FNCN + CoT rows: each configuration
is trained once.

Per-disease metrics are appended to ``<out>/results.csv`` as runs finish. A second call skips the
runs found there and resumes an interrupted fit from its ``last.ckpt``, so an interrupted ablation
costs at most the epoch in progress. The tables (``tables.md``, printed), the per-disease AUROC
(``per_disease.csv``), a bar chart (``ablation.png``), Fig. 10's parameter distance of momentum and
co-teaching runs (``label_correction_distance.png``, from their TensorBoard logs) and, with
``data_fractions``, Fig. 5's scaling curve (``scaling.png``) are rebuilt after every run.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from fvlm.config_files import resolve_config
from fvlm.evaluation.zero_shot import Protocol

__all__ = [
    "PAPER",
    "ROWS",
    "TABLES",
    "AblationRow",
    "RunSpec",
    "ablation",
    "budget_estimate",
    "format_tables",
    "plan_runs",
    "row_overlay",
    "subset_cache",
]

_MODULES = "fvlm.lit_modules"


@dataclass(frozen=True)
class AblationRow:
    """One configuration of the ablation.

    Attributes:
        label: The paper's name of the row.
        model: ``class_path`` of the training module.
        options: The module options this row sets (everything else comes from the base config).
        cost: Training time of one epoch relative to a single fine-grained network (budget).
        burn_in: The row's label correction starts after ``burn_in_epochs`` (the option is set).
        seeded_pair: Co-teaching: the two networks' seeds derive from the run's seed.
        trainer: Trainer options the row must change: co-teaching steps its two optimisers
            itself (manual optimisation), which Lightning's automatic gradient clipping refuses.
        networks: Trained networks (co-teaching: 2); the checkpoint's optimiser steps are theirs
            together.
    """

    label: str
    model: str
    options: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 1.0
    burn_in: bool = False
    seeded_pair: bool = False
    trainer: Mapping[str, Any] = field(default_factory=dict)
    networks: int = 1


_PLAIN = {"fncn": False, "identical_text_positive": False}
# FNCN: normal-normal pairs are positives, and so are identical descriptions (the default
# "{anatomy} shows no significant abnormalities." texts), both off in the FGA-only rows so that
# they contrast instance against instance as the paper's row does.
_FNCN = {"fncn": True, "identical_text_positive": True}
# Lightning clips gradients only under automatic optimisation; co-teaching steps its optimisers
# itself, so the base config's trainer.gradient_clip_val moves to the module's own option.
_MANUAL = {"gradient_clip_val": None}

ROWS: dict[str, AblationRow] = {
    "clip": AblationRow("CLIP", f"{_MODULES}.GlobalCLIPModule", _PLAIN, cost=0.95),
    "fga": AblationRow(
        "FGA", f"{_MODULES}.FineGrainedCLIPModule", {**_PLAIN, "label_correction": "none"}
    ),
    "fga_fncn": AblationRow(
        "FGA+FNCN", f"{_MODULES}.FineGrainedCLIPModule", {**_FNCN, "label_correction": "none"}
    ),
    "fga_cot": AblationRow(
        "FGA+CoT",
        f"{_MODULES}.CoTeachingModule",
        {**_PLAIN, "alpha": 0.5},
        cost=2.5,
        burn_in=True,
        seeded_pair=True,
        trainer=_MANUAL,
        networks=2,
    ),
    "fga_fncn_cot": AblationRow(
        "FGA+FNCN+CoT",
        f"{_MODULES}.CoTeachingModule",
        {**_FNCN, "alpha": 0.5},
        cost=2.5,
        burn_in=True,
        seeded_pair=True,
        trainer=_MANUAL,
        networks=2,
    ),
    "fga_fncn_self": AblationRow(
        "FGA+FNCN, self",
        f"{_MODULES}.FineGrainedCLIPModule",
        {**_FNCN, "label_correction": "self", "alpha": 0.5},
        burn_in=True,
    ),
    "fga_fncn_momentum": AblationRow(
        "FGA+FNCN, momentum",
        f"{_MODULES}.FineGrainedCLIPModule",
        {**_FNCN, "label_correction": "momentum", "alpha": 0.5},
        cost=1.3,
        burn_in=True,
    ),
    "supervised": AblationRow(
        "Supervised",
        f"{_MODULES}.supervised.SupervisedModule",
        {"benchmark": "phantom"},
        cost=0.8,
    ),
}
"""Every configuration; the keys are the ``rows`` option's values."""

TABLES: dict[str, list[str]] = {
    "Tab. 4 (modules)": ["clip", "fga", "fga_fncn", "fga_cot", "fga_fncn_cot"],
    "Tab. 5 (label correction of FGA+FNCN)": [
        "fga_fncn",
        "fga_fncn_self",
        "fga_fncn_momentum",
        "fga_fncn_cot",
    ],
    "Tab. 1 (reference rows)": ["supervised", "clip", "fga_fncn_cot"],
}
"""The printed tables and their rows, in the paper's order."""

_TAB5_NAMES = {
    "fga_fncn": "none (baseline)",
    "fga_fncn_self": "self",
    "fga_fncn_momentum": "momentum",
    "fga_fncn_cot": "co-teaching",
}
PAPER: dict[str, dict[str, tuple[float, float]]] = {
    "Tab. 4 (modules)": {
        "clip": (70.9, 69.3),
        "fga": (76.0, 74.0),
        "fga_fncn": (78.7, 75.3),
        "fga_cot": (77.5, 74.6),
        "fga_fncn_cot": (79.8, 75.9),
    },
    "Tab. 5 (label correction of FGA+FNCN)": {
        "fga_fncn": (78.7, 75.3),
        "fga_fncn_self": (73.3, 71.4),
        "fga_fncn_momentum": (78.8, 75.5),
        "fga_fncn_cot": (79.8, 75.9),
    },
    "Tab. 1 (reference rows)": {
        "supervised": (73.3, 69.1),
        "clip": (68.4, 66.7),
        "fga_fncn_cot": (81.3, 76.2),
    },
}
"""The paper's (AUC, ACC) in percent: MedVL-CT69K validation (Tab. 4/5) and test set (Tab. 1)."""

#: Rows of Fig. 5's data-scaling curves.
SCALING_ROWS = ("clip", "fga_fncn_cot")
_RESULT_KEYS = ["row", "seed", "fraction", "epochs"]


@dataclass(frozen=True)
class RunSpec:
    """One training run: a row, a seed and a fraction of the training studies."""

    row: str
    seed: int
    fraction: float = 1.0

    @property
    def name(self) -> str:
        """Folder name, e.g. ``fga_fncn-s0`` or ``clip-s0-f25``."""
        suffix = "" if self.fraction >= 1.0 else f"-f{round(100 * self.fraction)}"
        return f"{self.row}-s{self.seed}{suffix}"


def plan_runs(
    rows: Sequence[str], seeds: Sequence[int], data_fractions: Sequence[float] = ()
) -> list[RunSpec]:
    """The runs of an ablation: every row x seed, plus Fig. 5's reduced-data runs."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; choose from {sorted(ROWS)}")
    if not seeds:
        raise ValueError("give at least one seed")
    bad = [f for f in data_fractions if not 0.0 < f <= 1.0]
    if bad:
        raise ValueError(f"data_fractions must lie in (0, 1], got {bad}")
    runs = [RunSpec(row, seed) for row in dict.fromkeys(rows) for seed in seeds]
    for fraction in sorted({f for f in data_fractions if f < 1.0}):
        runs += [RunSpec(row, seed, fraction) for row in SCALING_ROWS for seed in seeds]
    return list(dict.fromkeys(runs))


def row_overlay(
    spec: RunSpec,
    run_dir: Path,
    epochs: int,
    burn_in_epochs: int,
    cache: Path,
    labels: Path,
    anatomy_table: str,
    gradient_clip_val: float | None = None,
) -> dict[str, Any]:
    """The YAML overlay of one run: the row's module and options, the schedule and the run folder.

    The base config keeps everything else (towers, data, optimiser); a later ``--config`` wins.
    A row that steps its optimisers itself gets the base trainer's ``gradient_clip_val`` as a
    model option, so every row clips alike.
    """
    row = ROWS[spec.row]
    options: dict[str, Any] = dict(row.options)
    if "gradient_clip_val" in row.trainer and gradient_clip_val is not None:
        options["gradient_clip_val"] = gradient_clip_val
    if row.burn_in:
        options["burn_in_epochs"] = burn_in_epochs
    if row.seeded_pair:
        options["seeds"] = [2 * spec.seed, 2 * spec.seed + 1]
    if spec.row == "supervised":
        options["anatomy_table"] = anatomy_table
    run_dir = Path(run_dir)
    return {
        "seed_everything": spec.seed,
        "trainer": {
            **row.trainer,
            "max_epochs": epochs,
            "default_root_dir": str(run_dir),
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": "tensorboard", "version": 0},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run_dir / "checkpoints"),
                        "save_last": True,
                        "every_n_epochs": 1,
                        "save_top_k": 0,
                    },
                }
            ],
        },
        "model": {"class_path": row.model, "init_args": options},
        "data": {
            "cache_dir": str(cache),
            "labels": str(labels),
            "seed": spec.seed,
            "anatomy_table": anatomy_table,
        },  # fmt: skip
    }


def subset_cache(cache: Path, fraction: float, folder: Path, seed: int = 0) -> Path:
    """A view of ``cache`` whose training split keeps ``fraction`` of the studies (Fig. 5).

    The view's ``manifest.csv`` marks the other training studies ``unused``; its ``studies`` is a
    link to the cache's, so nothing is copied. The kept studies are the first of one seeded
    permutation, so the 25 % subset lies inside the 50 % one.
    """
    cache = Path(cache).resolve()
    manifest = pd.read_csv(cache / "manifest.csv", dtype=str, keep_default_na=False)
    if "split" not in manifest.columns:
        raise ValueError(f"{cache}/manifest.csv: no 'split' column (run fvlm preprocess)")
    train = manifest.index[(manifest["split"] == "train") & (manifest["status"] == "ok")]
    keep = max(2, round(fraction * len(train)))
    order = np.random.default_rng(seed).permutation(len(train))
    dropped = train[np.sort(order[keep:])]
    view = Path(folder) / f"train{round(100 * fraction)}"
    view.mkdir(parents=True, exist_ok=True)
    link = view / "studies"
    if not link.exists():
        link.symlink_to(cache / "studies", target_is_directory=True)
    manifest.loc[dropped, "split"] = "unused"
    manifest.to_csv(view / "manifest.csv", index=False)
    return view


def _last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def _checkpoint_progress(path: Path) -> tuple[int, int]:
    """(epochs completed, optimiser steps) of a Lightning checkpoint; (0, 0) when absent."""
    if not path.is_file():
        return 0, 0
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    done = int(loops.get("epoch_progress", {}).get("current", {}).get("completed", 0))
    return done, int(checkpoint.get("global_step", 0))


def _die_with_parent() -> None:
    """SIGTERM the ``fvlm fit`` child once the ablation process dies (Linux ``prctl``).

    So a killed ablation leaves no training running; elsewhere a no-op.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fit(base: Path, overlay: Path, run_dir: Path, resume: Path | None) -> None:
    """``fvlm fit`` in a subprocess; its output goes to ``<run>/fit.log``."""
    command = [
        sys.executable, "-c", "import sys; from fvlm.cli import main; sys.exit(main())",
        "fit", "--config", str(base), "--config", str(overlay),
    ]  # fmt: skip
    if resume is not None:
        command += ["--ckpt_path", str(resume)]
    log = run_dir / "fit.log"
    with log.open("a") as stream:
        code = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        ).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"fvlm fit failed for {run_dir.name} (exit {code}); {log}:\n{tail}")


def _finished(results: pd.DataFrame, spec: RunSpec, epochs: int) -> bool:
    if results.empty:
        return False
    match = (
        (results["row"] == spec.row)
        & (results["seed"] == spec.seed)
        & np.isclose(results["fraction"], spec.fraction)
        & (results["epochs"] == epochs)
        & (results["disease"] == "macro")
    )
    return bool(match.any())


def read_results(path: Path) -> pd.DataFrame:
    """The results CSV (empty frame when absent)."""
    if not Path(path).is_file():
        return pd.DataFrame(columns=[*_RESULT_KEYS, "disease"])
    return pd.read_csv(path)


def append_results(path: Path, frame: pd.DataFrame) -> None:
    """Add one run's rows to the CSV, replaced atomically (an interrupt leaves the old file)."""
    path = Path(path)
    frames = [read_results(path), frame] if path.is_file() else [frame]
    temporary = path.with_suffix(".csv.tmp")
    pd.concat(frames, ignore_index=True).to_csv(temporary, index=False)
    temporary.replace(path)


def run_results(
    spec: RunSpec, epochs: int, table: pd.DataFrame, train_s: float, eval_s: float, steps: int
) -> pd.DataFrame:
    """One run's per-disease metrics (and ``macro``) as rows of the results CSV."""
    frame = table.reset_index().rename(columns={table.index.name or "index": "disease"})
    frame = frame[["disease", "auroc", "balanced_acc", "acc", "n_pos", "n_neg"]]
    info = {
        "row": spec.row,
        "label": ROWS[spec.row].label,
        "seed": spec.seed,
        "fraction": spec.fraction,
        "epochs": epochs,
        "steps_per_network": steps // ROWS[spec.row].networks,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
    }
    return frame.assign(**info)[[*info, *frame.columns]]


def _mean_spread(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    text = f"{100 * values.mean():.1f}"
    if len(values) > 1:  # half the range: with two seeds, the distance of each from the mean
        text += f" ± {50 * (values.max() - values.min()):.1f}"
    return text


def format_tables(results: pd.DataFrame, epochs: int | None = None) -> str:
    """The paper's tables (macro AUROC and balanced ACC in %, mean ± half-range over seeds)."""
    macro = results[(results["disease"] == "macro") & np.isclose(results["fraction"], 1.0)]
    if epochs is not None:
        macro = macro[macro["epochs"] == epochs]
    blocks = []
    for title, rows in TABLES.items():
        lines = [f"{title}", "", "| row | AUC | ACC | seeds | paper AUC | paper ACC |"]
        lines.append("|---|---|---|---|---|---|")
        for row in rows:
            part = macro[macro["row"] == row]
            paper = PAPER[title].get(row)
            name = _TAB5_NAMES[row] if title.startswith("Tab. 5") else ROWS[row].label
            lines.append(
                f"| {name} | {_mean_spread(part['auroc'])} | {_mean_spread(part['balanced_acc'])} "
                f"| {part['seed'].nunique()} | {paper[0] if paper else '-'} "
                f"| {paper[1] if paper else '-'} |"
            )
        blocks.append("\n".join(lines))
    notes = (
        "AUC: macro AUROC over the phantom's diseases; ACC: macro balanced accuracy at the ROC "
        "point closest to (0, 1) (the paper's 'ACC'); ± half the range over seeds. Paper: "
        "MedVL-CT69K validation set (Tab. 4/5), test set (Tab. 1)."
    )
    return "\n\n".join([*blocks, notes])


def per_disease_table(results: pd.DataFrame) -> pd.DataFrame:
    """AUROC per disease (rows) and configuration (columns), mean over seeds, full data."""
    full = results[np.isclose(results["fraction"], 1.0)]
    return full.pivot_table(index="disease", columns="label", values="auroc", aggfunc="mean")


def plot_ablation(results: pd.DataFrame, path: Path) -> Path | None:
    """Bar chart of macro AUROC per configuration (error bars: half-range over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    macro = results[(results["disease"] == "macro") & np.isclose(results["fraction"], 1.0)]
    if macro.empty:
        return None
    order = [r for r in ROWS if r in set(macro["row"])]
    grouped = macro.groupby("row")["auroc"]
    mean = grouped.mean().reindex(order)
    spread = ((grouped.max() - grouped.min()) / 2).reindex(order)
    fig = Figure(figsize=(1.2 * len(order) + 2, 3.5))
    ax = fig.add_subplot()
    ax.bar([ROWS[r].label for r in order], mean.to_numpy(), yerr=spread.to_numpy(), capsize=3)
    ax.set_ylabel("macro AUROC (test)")
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_title("Ablation on the phantom")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_scaling(results: pd.DataFrame, path: Path) -> Path | None:
    """Fig. 5: macro AUROC against the fraction of training studies, CLIP and fVLM."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    macro = results[(results["disease"] == "macro") & results["row"].isin(SCALING_ROWS)]
    if macro["fraction"].nunique() < 2:
        return None
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.add_subplot()
    for row in SCALING_ROWS:
        curve = macro[macro["row"] == row].groupby("fraction")["auroc"].mean()
        ax.plot(100 * curve.index, curve.to_numpy(), marker="o", label=ROWS[row].label)
    ax.set_xlabel("training studies (%)")
    ax.set_ylabel("macro AUROC (test)")
    ax.legend()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


#: Fig. 10: rows whose label-correction model is another network, and the logged distance.
DISTANCE_ROWS = ("fga_fncn_momentum", "fga_fncn_cot", "fga_cot")
DISTANCE_TAG = "train/param_distance"


def read_distances(runs_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per run folder, ``(step, value)`` of ``train/param_distance`` from its TensorBoard log.

    The training modules log the parameter distance between the trained network and its
    label-correction model once per epoch (paper Fig. 10); rows that do not log it are absent.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for folder in sorted(Path(runs_dir).glob("*")):
        if not folder.name.startswith(DISTANCE_ROWS):
            continue
        logs = folder / "tensorboard" / "version_0"  # the logger of row_overlay
        events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
        events.Reload()
        if DISTANCE_TAG in events.Tags().get("scalars", []):
            curves[folder.name] = [(e.step, e.value) for e in events.Scalars(DISTANCE_TAG)]
    return curves


def plot_distances(curves: Mapping[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """Fig. 10: distance between the training network and its label-correction model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        return None
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for name, points in curves.items():
        ax.plot(range(1, len(points) + 1), [v for _, v in points], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("relative parameter distance")
    ax.set_title("Training network vs label-correction model")
    ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def budget_estimate(
    runs: Sequence[RunSpec],
    epochs: int,
    seconds_per_epoch: float,
    eval_seconds: float,
    results: pd.DataFrame | None = None,
) -> float:
    """Seconds the pending runs should take: cost x epochs x seconds per epoch, plus evaluation.

    ``seconds_per_epoch`` is one fine-grained network's epoch on the full training split; where
    runs have finished, their measured ``train_s`` replaces it (per unit of cost and epoch).
    """
    if results is not None and not results.empty and "train_s" in results:
        done = results[(results["disease"] == "macro") & results["train_s"].notna()]
        units = sum(
            ROWS[r].cost * e * f
            for r, e, f in zip(done["row"], done["epochs"], done["fraction"], strict=True)
            if r in ROWS
        )
        if units > 0:
            seconds_per_epoch = float(done["train_s"].sum()) / units
            eval_seconds = float(done["eval_s"].mean())
    return sum(
        ROWS[run.row].cost * epochs * run.fraction * seconds_per_epoch + eval_seconds
        for run in runs
    )


def _write_outputs(results: pd.DataFrame, out: Path, epochs: int) -> str:
    text = format_tables(results, epochs)
    (out / "tables.md").write_text(text + "\n")
    per_disease_table(results).to_csv(out / "per_disease.csv", float_format="%.4f")
    plot_ablation(results, out / "ablation.png")
    plot_scaling(results, out / "scaling.png")
    plot_distances(read_distances(out / "runs"), out / "label_correction_distance.png")
    return text


def ablation(
    rows: list[str] = list(ROWS),  # noqa: B006 - jsonargparse needs a plain default
    seeds: list[int] = [0],  # noqa: B006
    epochs: int = 20,
    burn_in_epochs: int = 5,
    data_fractions: list[float] = [],  # noqa: B006
    base_config: str = "demo",
    cache: Path = Path("data/cache/phantom"),
    labels: Path = Path("data/phantom/labels.csv"),
    anatomy_table: str = "paper",
    benchmark: str | None = "phantom",
    split: str = "test",
    protocol: Protocol = "ours",
    out: Path = Path("runs/ablation"),
    seconds_per_epoch: float = 11.0,
    eval_seconds: float = 60.0,
    dry_run: bool = False,
) -> int:
    """Train and evaluate the paper's ablation rows on a cache; print Tab. 4, Tab. 5 and Tab. 1.

    Rows: ``clip``, ``fga``, ``fga_fncn``, ``fga_cot``, ``fga_fncn_cot`` (Tab. 4),
    ``fga_fncn_self``, ``fga_fncn_momentum`` (Tab. 5, with ``fga_fncn`` and ``fga_fncn_cot``) and
    ``supervised`` (Tab. 1). Finished runs found in ``<out>/results.csv`` are skipped.

    Args:
        rows: Configurations to train (default: all).
        seeds: Seeds per row (two give the spread; the budget doubles).
        epochs: Epochs of every run (same optimiser updates per trained network in every row).
        burn_in_epochs: Epochs before label correction starts (self, momentum, co-teaching).
        data_fractions: Fig. 5: also train CLIP and FGA+FNCN+CoT on these fractions of the
            training studies (e.g. ``[0.25, 0.5]``; 1.0 is the main runs).
        base_config: The config every row overlays (packaged name or path).
        cache: Preprocessing cache (train, val and ``split``).
        labels: Disease labels CSV (supervised training, validation AUROC, evaluation).
        anatomy_table: The cache's anatomy table.
        benchmark: Diseases evaluated (a set of the table).
        split: Cache split evaluated.
        protocol: Prompts of the zero-shot evaluation (``fvlm evaluate --protocol``).
        out: Output folder (runs, results.csv, tables, plots).
        seconds_per_epoch: One fine-grained network's epoch on the whole training split, for the
            budget printed before the runs (measured runs replace it).
        eval_seconds: One evaluation, for the same estimate.
        dry_run: Print the plan and the budget only.
    """
    from fvlm.evaluation.run import evaluate_checkpoints

    base = resolve_config(base_config)
    clip = (yaml.safe_load(Path(base).read_text()).get("trainer") or {}).get("gradient_clip_val")
    runs = plan_runs(rows, seeds, data_fractions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.csv"
    results = read_results(results_path)
    pending = [r for r in runs if not _finished(results, r, epochs)]
    estimate = budget_estimate(pending, epochs, seconds_per_epoch, eval_seconds, results)
    print(
        f"ablation: {len(runs)} runs ({len(runs) - len(pending)} finished), {epochs} epochs each; "
        f"estimated {estimate / 60:.0f} min for the {len(pending)} pending: "
        + ", ".join(r.name for r in pending)
    )
    if burn_in_epochs >= epochs and any(ROWS[r.row].burn_in for r in pending):
        print(
            f"warning: burn_in_epochs {burn_in_epochs} >= epochs {epochs}: the label-correction "
            "rows (self, momentum, co-teaching) will train without label correction"
        )
    if dry_run:
        return 0
    label_frame = pd.read_csv(labels, dtype={"study_id": str})
    for index, spec in enumerate(pending, 1):
        run_dir = out / "runs" / f"{spec.name}-e{epochs}"
        run_dir.mkdir(parents=True, exist_ok=True)
        run_cache = cache if spec.fraction >= 1.0 else subset_cache(cache, spec.fraction, out)
        overlay = row_overlay(
            spec, run_dir, epochs, burn_in_epochs, run_cache, labels, anatomy_table, clip
        )
        (run_dir / "row.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
        start = time.perf_counter()
        done, _ = _checkpoint_progress(_last_checkpoint(run_dir))
        if done < epochs:
            print(f"[{index}/{len(pending)}] {spec.name}: fit ({done}/{epochs} epochs done)")
            resume = _last_checkpoint(run_dir) if done else None
            _fit(base, run_dir / "row.yaml", run_dir, resume)
        # A fit resumed from an earlier call has no comparable wall time (NaN, not in budgets).
        train_s = time.perf_counter() - start if done == 0 else float("nan")
        _, steps = _checkpoint_progress(_last_checkpoint(run_dir))
        start = time.perf_counter()
        evaluated = evaluate_checkpoints(
            [_last_checkpoint(run_dir)], [spec.name], cache, label_frame, run_dir / "eval",
            split, anatomy_table, benchmark, protocol=protocol,
        )  # fmt: skip
        eval_s = time.perf_counter() - start
        table = evaluated[spec.name]
        append_results(results_path, run_results(spec, epochs, table, train_s, eval_s, steps))
        macro = table.loc["macro"]
        print(
            f"[{index}/{len(pending)}] {spec.name}: macro AUROC {macro['auroc']:.3f}, balanced "
            f"ACC {macro['balanced_acc']:.3f} (fit {train_s:.0f} s, eval {eval_s:.0f} s)"
        )
        _write_outputs(read_results(results_path), out, epochs)
    results = read_results(results_path)
    if results.empty:
        return 0
    print(_write_outputs(results, out, epochs))
    print(f"\nOutputs in {out}/ (results.csv, tables.md, per_disease.csv, ablation.png)")
    return 0
