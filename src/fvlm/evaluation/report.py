"""Writing a zero-shot evaluation: CSV, JSON summary, TensorBoard scalars and printed tables.

Every output carries the definitions of its columns and the threshold method, because the same
three letters ("ACC", "F1") mean different things across the CT-CLIP, Merlin and fVLM papers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from fvlm.evaluation.metrics import METRIC_COLUMNS, column_definitions, threshold_column

__all__ = [
    "comparison_table",
    "evaluation_notes",
    "format_table",
    "log_tensorboard",
    "summary_dict",
    "write_report",
]

_TABLE_COLUMNS = ("auroc", "balanced_acc", "sensitivity", "specificity", "precision", "f1_weighted")
# Evaluability counts of :mod:`fvlm.evaluation.evaluability`, when the table carries them.
_COUNT_COLUMNS = ("evaluated", "not_evaluable", "absent", "truncated", "larger_than_crop")
_COUNT_HEADERS = ("evaluated", "not eval.", "absent", "truncated", "> crop")


class ScalarWriter(Protocol):
    """Anything with TensorBoard's ``add_scalar`` (a ``SummaryWriter``, Lightning's experiment)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any:
        """Record one scalar."""


def _number(value: object) -> float | int | bool | None:
    """JSON-safe scalar: NaN and pandas' NA become null, numpy scalars plain Python."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    number = float(value)  # type: ignore[arg-type]
    return None if math.isnan(number) else number


def summary_dict(results: pd.DataFrame, extra: Mapping[str, object] | None = None) -> dict:
    """JSON-ready summary: macro metrics, per-disease AUROC, definitions, threshold method."""
    method = results.attrs.get("threshold_method", "top-left")
    macro = results.loc["macro"] if "macro" in results.index else pd.Series(dtype=float)
    metrics = [
        c for c in results.columns if c in (*METRIC_COLUMNS, "auroc_ci_low", "auroc_ci_high")
    ]
    diseases = [k for k in results.index if k != "macro"]
    counts = [c for c in _COUNT_COLUMNS if c in results.columns]
    summary: dict[str, object] = {
        "threshold_method": method,
        "macro": {c: _number(macro.get(c)) for c in metrics},
        "n_diseases": len(diseases),
        "n_diseases_in_macro": int(results.loc[diseases, "in_macro"].sum()) if diseases else 0,
        "single_class_diseases": [k for k in diseases if not bool(results.loc[k, "in_macro"])],
        "per_disease": {
            k: {c: _number(results.loc[k, c]) for c in (*metrics, "n_pos", "n_neg", *counts)}
            | ({"scored_on": results.loc[k, "scored_on"]} if "scored_on" in results else {})
            for k in diseases
        },
        "definitions": results.attrs.get("definitions")
        or column_definitions(method, int(results.attrs.get("n_boot", 0))),
    }
    if results.attrs.get("evaluation"):
        summary["evaluation"] = dict(results.attrs["evaluation"])
    if counts:
        summary["not_evaluable"] = {
            k: {c: _number(results.loc[k, c]) for c in counts[1:]}
            for k in diseases
            if (_number(results.loc[k, "not_evaluable"]) or 0) > 0
        }
    if results.attrs.get("n_boot"):
        summary["bootstrap"] = {"n_boot": results.attrs["n_boot"], "ci": results.attrs.get("ci")}
    if extra:
        summary["extra"] = dict(extra)
    return summary


def format_table(
    results: pd.DataFrame,
    columns: Sequence[str] = _TABLE_COLUMNS,
    percent: bool = False,
    title: str | None = None,
) -> str:
    """Fixed-width text table of the results, one line per disease, ``macro`` last.

    Args:
        results: an :func:`evaluate_scores` table.
        columns: metric columns to print (plus ``n_pos``/``n_neg`` always).
        percent: print metrics x100 with one decimal (the papers' style) instead of 3 decimals.
        title: optional first line.
    """
    method = results.attrs.get("threshold_method", "top-left")
    cols = [c for c in columns if c in results.columns]
    count_cols = ["n_pos", "n_neg", *(c for c in _COUNT_COLUMNS[1:] if c in results.columns)]
    headers = dict(zip(_COUNT_COLUMNS, _COUNT_HEADERS, strict=True))
    names = [str(k) for k in results.index]
    width = max([len("disease"), *map(len, names)])
    head = f"{'disease':<{width}}  " + "  ".join(f"{c:>12}" for c in cols)
    head += "".join(f"  {headers.get(c, c):>9}" for c in count_cols)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for key, name in zip(results.index, names, strict=True):
        row = results.loc[key]
        cells = "  ".join(f"{_fmt(row[c], percent):>12}" for c in cols)
        counts = "".join(f"  {_fmt_count(row.get(c)):>9}" for c in count_cols)
        if key == "macro":
            lines.append("-" * len(head))
        lines.append(f"{name:<{width}}  {cells}{counts}")
    lines.append(f"threshold: {threshold_column(method)}; ACC = balanced accuracy")
    if len(count_cols) > 2:
        lines.append(_count_legend(results))
    return "\n".join(lines)


def _count_legend(results: pd.DataFrame) -> str:
    rule = (results.attrs.get("evaluation") or {}).get("absent_rule", "not_evaluable")
    absent = "scored as negative" if rule == "negative" else "not evaluable"
    return (
        "studies: not eval. = left out of the disease (truncated, or absent under "
        f"--absent_rule not_evaluable); absent = anatomy not in the scan ({absent}); "
        "> crop = anatomy larger than the training crop, embedded from the crop centred on it"
    )


def evaluation_notes(results: Mapping[str, pd.DataFrame]) -> str:
    """Evaluable studies per disease and forward passes per study, for the printed output.

    The counts are printed once when every method has the same (they are facts of the scans and
    the crop size), else once per method.
    """
    lines: list[str] = []
    groups: list[tuple[list[str], pd.DataFrame, pd.DataFrame]] = []  # names, counts, table
    for name, table in results.items():
        if not all(c in table.columns for c in _COUNT_COLUMNS):
            continue
        counts = table.loc[[k for k in table.index if k != "macro"], list(_COUNT_COLUMNS)]
        same = [group for group in groups if group[1].equals(counts)]
        if same:
            same[0][0].append(name)
        else:
            groups.append(([name], counts, table))
    for names, counts, table in groups:
        title = "Studies per disease" + ("" if len(groups) == 1 else f" ({', '.join(names)})")
        width = max(len("disease"), *(len(str(k)) for k in counts.index))
        head = f"{'disease':<{width}}" + "".join(f"  {h:>9}" for h in _COUNT_HEADERS)
        lines += [title + ":", head, "-" * len(head)]
        for key, row in counts.iterrows():
            cells = "".join(f"  {_fmt_count(row[c]):>9}" for c in _COUNT_COLUMNS)
            lines.append(f"{key:<{width}}{cells}")
        lines.append(_count_legend(table))
    for name, table in results.items():
        passes = (table.attrs.get("evaluation") or {}).get("forward_passes_per_study")
        if passes:
            crop = "x".join(str(c) for c in passes["crop_size"])
            how = "anatomy crop plan" if passes["crop_rule"] == "plan" else "crops tiling the scan"
            lines.append(
                f"forward passes per study, {name}: mean {passes['mean']:.2f}, max "
                f"{passes['max']} ({how}, crop {crop} voxels, {passes['studies']} studies)"
            )
    return "\n".join(lines)


def _fmt(value: object, percent: bool) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    number = float(value)  # type: ignore[arg-type]
    return f"{100 * number:.1f}" if percent else f"{number:.3f}"


def _fmt_count(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(int(value))  # type: ignore[call-overload]


def comparison_table(
    results: Mapping[str, pd.DataFrame],
    metrics: Sequence[str] = ("auroc", "balanced_acc"),
    percent: bool = False,
) -> str:
    """Side-by-side table of several methods (e.g. fVLM vs CLIP): per disease and macro.

    Each method's macro row is its own (mean over its diseases with both classes present). A
    disease a method did not score prints ``-``.
    """
    if not results:
        raise ValueError("results is empty: nothing to compare")
    keys: list[str] = []
    for table in results.values():
        keys += [str(k) for k in table.index if k != "macro" and str(k) not in keys]
    keys.append("macro")
    headers = [f"{name} {metric}" for name in results for metric in metrics]
    width = max(len("disease"), *map(len, keys))
    col_width = max(10, *map(len, headers))
    head = f"{'disease':<{width}}  " + "  ".join(f"{h:>{col_width}}" for h in headers)
    lines = [head, "-" * len(head)]
    for key in keys:
        cells = []
        for table in results.values():
            for metric in metrics:
                if key in table.index and metric in table.columns:
                    cells.append(_fmt(table.loc[key, metric], percent))
                else:
                    cells.append("-")
        if key == "macro":
            lines.append("-" * len(head))
        lines.append(f"{key:<{width}}  " + "  ".join(f"{c:>{col_width}}" for c in cells))
    return "\n".join(lines)


def log_tensorboard(
    results: pd.DataFrame,
    writer: ScalarWriter | str | Path,
    prefix: str = "zero_shot",
    step: int = 0,
    metrics: Sequence[str] = ("auroc", "balanced_acc", "f1_weighted"),
) -> None:
    """Scalars ``<prefix>/<disease key>/<metric>`` and ``<prefix>/macro/<metric>``.

    Args:
        results: an :func:`evaluate_scores` table.
        writer: a TensorBoard writer (e.g. Lightning's ``logger.experiment``) or a log directory,
            in which case a ``SummaryWriter`` is opened and closed here.
        prefix: tag prefix.
        step: global step of the scalars.
        metrics: columns to log; NaN values (single-class diseases) are skipped.
    """
    owned = isinstance(writer, str | Path)
    if owned:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(writer))
    try:
        for key in results.index:
            for metric in metrics:
                if metric not in results.columns:
                    continue
                value = results.loc[key, metric]
                if value is pd.NA or value is None or math.isnan(float(value)):
                    continue
                writer.add_scalar(f"{prefix}/{key}/{metric}", float(value), step)  # type: ignore[union-attr]
    finally:
        if owned:
            writer.close()  # type: ignore[union-attr]


def write_report(
    results: pd.DataFrame,
    out_dir: str | Path,
    name: str = "zero_shot",
    extra: Mapping[str, object] | None = None,
    tensorboard: bool = True,
    prefix: str = "zero_shot",
    step: int = 0,
) -> dict[str, Path]:
    """Write the per-disease CSV, the JSON summary, the printed table and TensorBoard scalars.

    Files: ``<name>_per_disease.csv``, ``<name>_summary.json``, ``<name>_table.txt``.

    Args:
        results: an :func:`evaluate_scores` table.
        out_dir: output folder (created).
        name: file-name stem, e.g. the method (``fvlm``, ``clip``) or benchmark.
        extra: more JSON fields, e.g. checkpoint, dataset, zero-shot fallback counts.
        tensorboard: also write TensorBoard scalars (to ``out_dir/tensorboard/<name>``).
        prefix: their tag prefix (``<prefix>/<disease key>/<metric>``).
        step: their global step.

    Returns:
        ``{"csv": ..., "json": ..., "table": ..., ["tensorboard": ...]}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out / f"{name}_per_disease.csv",
        "json": out / f"{name}_summary.json",
        "table": out / f"{name}_table.txt",
    }
    results.to_csv(paths["csv"], float_format="%.6g")
    paths["json"].write_text(json.dumps(summary_dict(results, extra), indent=2, default=str))
    paths["table"].write_text(format_table(results) + "\n")
    if tensorboard:
        paths["tensorboard"] = out / "tensorboard" / name
        log_tensorboard(results, paths["tensorboard"], prefix=prefix, step=step)
    return paths
