"""Focal disease signatures painted into the finished anatomy.

Each lesion is placed inside (or, for an exophytic renal cyst, on) its organ's drawn voxels and is
never smaller than about one voxel in every direction, centred on a voxel, so it survives coarse
grids and resampling to ~(8, 5, 5) mm. Sizes are quoted for the reference body and scale with the
study's body; the returned findings carry the size as drawn, which the report then states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from scipy import ndimage

from .canvas import Canvas
from .findings import Finding
from .frame import Frame
from .geometry import ellipsoid
from .layout import Layout
from .volume import LUNG_LOBES

__all__ = ["paint_lesions"]

_LUNG = tuple(LUNG_LOBES)


def _pick(mask: np.ndarray, rng: np.random.Generator, erode: int = 0) -> tuple[int, int, int]:
    """A random voxel of ``mask``, preferably ``erode`` voxels away from its edge."""
    for iterations in range(erode, 0, -1):
        eroded = ndimage.binary_erosion(mask, iterations=iterations)
        if eroded.any():
            mask = eroded
            break
    candidates = np.argwhere(mask)
    if len(candidates) == 0:
        raise RuntimeError("the organ a lesion belongs to was not drawn (grid too small?)")
    i, j, k = candidates[rng.integers(len(candidates))]
    return int(i), int(j), int(k)


def _nearest(canvas: Canvas, mask: np.ndarray, point: np.ndarray) -> tuple[int, int, int]:
    """The voxel of ``mask`` closest (in mm) to ``point``."""
    candidates = np.argwhere(mask)
    if len(candidates) == 0:
        raise RuntimeError("the organ a lesion belongs to was not drawn (grid too small?)")
    centres = np.stack([axis[candidates[:, i]] for i, axis in enumerate(canvas.grid.axes)], 1)
    i, j, k = candidates[np.argmin(((centres - point) ** 2).sum(1))]
    return int(i), int(j), int(k)


def _sphere(
    canvas: Canvas,
    index: tuple[int, int, int],
    diameter: float,
    hu: float,
    over: list[str],
    label: str | None = None,
    within: np.ndarray | None = None,
) -> float:
    """A ball centred on voxel ``index``, at least about one voxel in radius along every axis.

    Returns:
        The diameter drawn (mm), i.e. ``diameter`` unless the grid forced it larger.
    """
    spacing = np.asarray(canvas.grid.spacing)
    radii = np.maximum(diameter / 2, 1.05 * spacing)
    center = canvas.grid.point(index)
    canvas.paint(ellipsoid(canvas.grid, center, radii), hu, label, within, over=over)
    return float(2 * radii[1:].max())


def _emphysema(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """Bullae: round air spaces in the already darkened lungs."""
    lungs = canvas.mask_of(*_LUNG) & (canvas.hu < -600)
    for _ in range(int(rng.integers(6, 13))):
        _sphere(canvas, _pick(lungs, rng), frame.mm(rng.uniform(14.0, 26.0)), hu["bulla"], _LUNG)
    return finding


def _nodule(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """A solid soft-tissue ball in the chosen lobe, away from its edge and from any effusion."""
    lobe = canvas.mask_of(finding.site) & (canvas.hu < -600)
    size = _sphere(canvas, _pick(lobe, rng, 2), frame.mm(finding.size_mm), hu["nodule"], _LUNG)
    return replace(finding, size_mm=size)


def _liver_cyst(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """A round fluid-density lesion well inside the liver."""
    liver = canvas.mask_of("liver")
    size = _sphere(canvas, _pick(liver, rng, 2), frame.mm(finding.size_mm), hu["cyst"], ["liver"])
    return replace(finding, size_mm=size)


def _sides(finding: Finding) -> list[tuple[str, float]]:
    return [(side, sign) for side, sign in (("right", 1.0), ("left", -1.0)) if finding.on(side)]


def _hydronephrosis(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """A dilated, fluid-filled renal pelvis and calyces replacing the renal sinus fat."""
    for side, sign in _sides(finding):
        kidney = layout.organs[f"kidney_{side}"]
        name = f"kidney_{side}"
        medial = np.array([0.0, 0.0, -sign * kidney.radii[2]])
        for offset, scale in ((0.25, finding.extent), (0.95, 0.33)):
            center = kidney.center + offset * medial
            region = ellipsoid(canvas.grid, center, kidney.radii * scale, kidney.angle)
            canvas.paint(region, hu["fluid"], name, layout.cavity, over=[name, ""])
    return finding


def _renal_cyst(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """A round fluid lesion at a pole or the lateral border, bulging out of the kidney."""
    side, sign = _sides(finding)[0]
    kidney = layout.organs[f"kidney_{side}"]
    direction = {
        "upper pole": np.array([1.0, 0.0, 0.0]),
        "lower pole": np.array([-1.0, 0.0, 0.0]),
        "interpolar region": np.array([0.0, 0.0, sign]),
    }[finding.site]
    target = kidney.center + 0.75 * direction * kidney.radii
    index = canvas.grid.index(target)
    diameter = 2 * finding.extent * float(np.mean(kidney.radii))
    kidney_name = f"kidney_{side}"
    size = _sphere(
        canvas,
        index,
        diameter,
        hu["cyst"],
        [kidney_name, ""],
        label=f"kidney_cyst_{side}",
        within=layout.cavity,
    )
    return replace(finding, size_mm=size)


def _renal_calculus(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """A dense stone in the collecting system (pelvis, lower pole or mid kidney)."""
    side, sign = _sides(finding)[0]
    kidney = layout.organs[f"kidney_{side}"]
    offset = {
        "renal pelvis": np.array([0.0, 0.0, -sign * 0.3]),
        "lower pole": np.array([-0.5, 0.0, 0.0]),
        "interpolar region": np.array([0.0, 0.0, 0.1 * sign]),
    }[finding.site]
    name = f"kidney_{side}"
    index = _nearest(canvas, canvas.mask_of(name), kidney.center + offset * kidney.radii)
    size = _sphere(canvas, index, frame.mm(finding.size_mm), hu["stone"], [name])
    return replace(finding, size_mm=size)


def _dependent_stones(
    canvas: Canvas, frame: Frame, organ: str, finding: Finding, hu: float, rng: np.random.Generator
) -> Finding:
    """Stones lying in the back (dependent, the patient is supine) of a fluid-filled organ."""
    mask = canvas.mask_of(organ)
    y = canvas.grid.axes[1][None, :, None]
    back = mask & (y <= np.quantile(np.broadcast_to(y, mask.shape)[mask], 0.35))
    largest = 0.0
    for i in range(finding.count):
        diameter = frame.mm(finding.size_mm) * (1.0 if i == 0 else rng.uniform(0.6, 0.9))
        largest = max(largest, _sphere(canvas, _pick(back, rng), diameter, hu, [organ]))
    return replace(finding, size_mm=largest)


def _gallstone(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """Calcified gallstones in the dependent gallbladder."""
    return _dependent_stones(canvas, frame, "gallbladder", finding, hu["stone"] * 0.8, rng)


def _bladder_stone(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """Dense calculi in the dependent urinary bladder."""
    return _dependent_stones(canvas, frame, "urinary_bladder", finding, hu["stone"], rng)


def _aortic_calcification(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    finding: Finding,
    hu: dict[str, float],
    rng: np.random.Generator,
) -> Finding:
    """Bright plaques on the aortic wall (its outermost voxels)."""
    aorta = canvas.mask_of("aorta")
    wall = aorta & ~ndimage.binary_erosion(aorta)
    for _ in range(finding.count):
        _sphere(canvas, _pick(wall, rng), frame.mm(5.0), hu["calcification"], ["aorta"])
    return finding


_Painter = Callable[..., Finding]
#: Focal lesions in drawing order (a stone may sit in a dilated pelvis, so hydronephrosis first).
_LESIONS: dict[str, _Painter] = {
    "lung/emphysema": _emphysema,
    "lung/nodule": _nodule,
    "liver/cyst": _liver_cyst,
    "kidney/hydronephrosis": _hydronephrosis,
    "kidney/cyst": _renal_cyst,
    "kidney/calculi": _renal_calculus,
    "gallbladder/gallstone": _gallstone,
    "urinary_bladder/stones": _bladder_stone,
    "aorta/calcification": _aortic_calcification,
}


def paint_lesions(
    canvas: Canvas,
    frame: Frame,
    layout: Layout,
    findings: dict[str, Finding],
    hu: dict[str, float],
    rng: np.random.Generator,
) -> dict[str, Finding]:
    """Draw every focal lesion of ``findings``; return the findings with sizes as drawn."""
    drawn = dict(findings)
    for key, painter in _LESIONS.items():
        if key in findings:
            drawn[key] = painter(canvas, frame, layout, findings[key], hu, rng)
    return drawn
