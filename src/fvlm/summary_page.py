"""A one-page PNG per scan: what the model found, where it looked, and what it could not see.

Usage::

    import pandas as pd
    from fvlm.summary_page import save_summary_page

    probabilities = pd.DataFrame(
        {"anatomy": ["kidney", "liver"], "finding": ["cyst", "steatosis"],
         "probability": [0.91, 0.12]}
    )
    save_summary_page(
        "out/summary.png", image, labels, spacing=(5.0, 1.0, 1.0), hu_window=(-300, 400),
        probabilities=probabilities, validity={"kidney": "whole", "lung": "truncated"},
        anatomy_names={3: "kidney", 5: "liver"}, heat=heatmap.heat, heat_title="kidney: cyst",
    )

The page takes plain data (arrays on the cache grid, a probability table, a status per anatomy),
so any caller (``fvlm predict``, a notebook) can draw it: the CT through the hottest voxel of the
top finding's heat (or the middle of the scan) with anatomy outlines, that heat, a bar chart of the
most probable (anatomy, finding) rows, and each anatomy's validity: ``whole`` (scored),
``larger_than_crop`` (scored from its central part), ``truncated`` (cut by the field of view, not
scored) or ``absent``. Slices are drawn by :func:`fvlm.heatmap.draw_slice`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fvlm.evaluation.evaluability import AnatomyStatus
from fvlm.heatmap import draw_slice, hottest_voxel, save_figure

__all__ = ["PROBABILITY_COLUMNS", "save_summary_page", "validity_names"]

PROBABILITY_COLUMNS = ("anatomy", "finding", "probability")
_STATUS_ORDER = [s.name.lower() for s in AnatomyStatus]


def validity_names(validity: Mapping[str, str | int | AnatomyStatus]) -> dict[str, str]:
    """``{anatomy: status name}`` from status names or :class:`AnatomyStatus` values."""
    names = {}
    for anatomy, status in validity.items():
        if isinstance(status, str):
            name = status.strip().lower().replace(" ", "_")
        else:
            try:
                name = AnatomyStatus(int(status)).name.lower()
            except ValueError:
                name = str(status)
        if name not in _STATUS_ORDER:
            raise ValueError(f"anatomy {anatomy!r}: unknown status {status!r}; use {_STATUS_ORDER}")
        names[anatomy] = name
    return names


def _top_rows(probabilities: pd.DataFrame, top: int) -> pd.DataFrame:
    missing = [c for c in PROBABILITY_COLUMNS if c not in probabilities.columns]
    if missing:
        raise ValueError(
            f"probabilities lack columns {missing} (need {list(PROBABILITY_COLUMNS)}, "
            f"got {list(probabilities.columns)})"
        )
    scored = probabilities.dropna(subset=["probability"])
    return scored.sort_values("probability", ascending=False, kind="stable").head(top)


def _bar_chart(ax: Axes, rows: pd.DataFrame, unscored: int) -> None:
    names = [f"{a}: {f}" for a, f in zip(rows["anatomy"], rows["finding"], strict=True)]
    values = rows["probability"].to_numpy(dtype=float)
    colours = ["tab:red" if v >= 0.5 else "tab:gray" for v in values]
    positions = np.arange(len(values))[::-1]
    ax.barh(positions, values, color=colours)
    ax.set_yticks(positions, [textwrap.shorten(n, 48) for n in names], fontsize=8)
    for y, v in zip(positions, values, strict=True):
        ax.text(min(v, 0.88) + 0.01, y, f"{v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.axvline(0.5, color="black", linewidth=0.5, linestyle=":")
    note = f"; {unscored} not scored (anatomy not valid)" if unscored else ""
    ax.set_title(f"Top {len(values)} findings by probability{note}", fontsize=10)
    ax.set_xlabel("probability")


def _validity_text(ax: Axes, validity: dict[str, str]) -> None:
    ax.axis("off")
    lines = []
    for status in _STATUS_ORDER:
        members = sorted(a for a, s in validity.items() if s == status)
        if members:
            head = f"{status.replace('_', ' ')} ({len(members)}): "
            lines += textwrap.wrap(head + ", ".join(members), 60, subsequent_indent="    ")
    ax.text(0.0, 1.0, "\n".join(lines) or "no anatomy", va="top", fontsize=8, family="monospace")
    ax.set_title("Anatomy validity", fontsize=10, loc="left")


def save_summary_page(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    hu_window: tuple[float, float],
    probabilities: pd.DataFrame,
    validity: Mapping[str, str | int | AnatomyStatus],
    anatomy_names: Mapping[int, str] | None = None,
    heat: np.ndarray | None = None,
    heat_title: str = "",
    title: str = "",
    top: int = 10,
    window: tuple[float, float] | None = None,
) -> Path:
    """Draw the one-page summary of a scan and write it as PNG.

    Args:
        path: PNG to write.
        image: ``(D, H, W)`` cache image, [0, 1] over ``hu_window`` (canonical axes).
        labels: ``(D, H, W)`` anatomy ids, same grid (0: background).
        spacing: Voxel size (mm) per axis.
        hu_window: The HU range ``image`` maps to [0, 1].
        probabilities: Rows with columns ``anatomy``, ``finding``, ``probability`` (NaN: not
            scored); the ``top`` most probable are charted.
        validity: Status of each anatomy (names or :class:`AnatomyStatus` values).
        anatomy_names: ``{id: name}`` for the outline legend (default: no legend).
        heat: Optional ``(D, H, W)`` heat of the top finding (NaN outside its anatomy); slices
            go through its hottest voxel, else through the middle of the scan.
        heat_title: What the heat shows, e.g. ``"kidney: renal cyst"``.
        title: Page title, e.g. the study id.
        top: Rows in the bar chart.
        window: Display window in HU (default: ``hu_window``).

    Raises:
        ValueError: Arrays of different shapes, missing probability columns, unknown statuses.
    """
    if np.shape(image) != np.shape(labels) or np.ndim(image) != 3:
        raise ValueError(
            f"image {np.shape(image)} and labels {np.shape(labels)} must be one 3D grid"
        )
    if heat is not None and np.shape(heat) != np.shape(image):
        raise ValueError(f"heat {np.shape(heat)} is not on the image grid {np.shape(image)}")
    rows = _top_rows(probabilities, top)
    unscored = int(probabilities["probability"].isna().sum())
    states = validity_names(validity)
    window = hu_window if window is None else window
    centre = hottest_voxel(heat) if heat is not None else tuple(n // 2 for n in np.shape(image))

    fig = Figure(figsize=(15, 10))
    grid = fig.add_gridspec(2, 3, height_ratios=(1.15, 1.0), hspace=0.25, wspace=0.15)
    for column, plane in enumerate(("axial", "coronal")):
        ax = fig.add_subplot(grid[0, column])
        index = centre[0] if plane == "axial" else centre[1]
        draw_slice(ax, image, plane, index, spacing, window, hu_window, labels=labels)
        ax.set_title(f"{plane}, slice {index}, anatomy outlines", fontsize=10)
    ax = fig.add_subplot(grid[0, 2])
    if heat is None:
        ax.axis("off")
        ax.text(0.5, 0.5, "no heatmap", ha="center", va="center")
    else:
        shown = draw_slice(ax, image, "axial", centre[0], spacing, window, hu_window, heat=heat)
        fig.colorbar(shown, ax=ax, shrink=0.7, label="heat")
        ax.set_title(textwrap.shorten(f"heat: {heat_title}", 60), fontsize=10)
    _bar_chart(fig.add_subplot(grid[1, :2]), rows, unscored)
    _validity_text(fig.add_subplot(grid[1, 2]), states)
    if anatomy_names:
        shown_ids = sorted(
            int(i)
            for i in np.union1d(np.unique(labels[centre[0]]), np.unique(labels[:, centre[1]]))
            if i and int(i) in anatomy_names
        )
        handles = [
            Patch(color=colormaps["tab20"](i % 20), label=anatomy_names[i]) for i in shown_ids
        ]
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10),
                       fontsize=8, bbox_to_anchor=(0.5, -0.01), frameon=False)  # fmt: skip
    fig.suptitle(title or "Scan summary", fontsize=13)
    return save_figure(fig, path, dpi=90)
