"""The skeleton: vertebrae T1-L5 with discs and spinal canal, 12 rib pairs, sternum, sacrum, hips.

Seventeen vertebrae share the cranio-caudal field of view (a lumbar vertebra is 1.3 thoracic ones
high). On coarse grids a vertebral body fills its whole level (no visible disc) so that every
vertebra keeps at least one slice; ribs and processes are never thinner than about a voxel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .canvas import Canvas
from .frame import Frame
from .geometry import Grid, Region, ellipsoid, tube
from .layout import Layout

__all__ = ["SIDES", "SPINE", "paint_skeleton"]

#: Vertebrae from the bottom of the field of view to the top.
SPINE = tuple(f"vertebrae_L{i}" for i in range(5, 0, -1)) + tuple(
    f"vertebrae_T{i}" for i in range(12, 0, -1)
)
#: Sides with the sign of their x coordinate (x grows towards the patient's right).
SIDES = (("right", 1.0), ("left", -1.0))
_LUMBAR_HEIGHT = 1.3  # a lumbar vertebra is 1.3 thoracic vertebrae high


def _cross_section(
    canvas: Canvas, frame: Frame, hu: dict[str, float], lumbar: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Axial cross-section of a vertebra: (bone mask, bone HU, body mask, spinal canal mask)."""
    grid = canvas.grid
    _, y, x = grid.axes
    u = (x / frame.a)[None, :]
    v = ((y - frame.yc) / frame.b)[:, None]
    du = 1.05 * grid.spacing[2] / frame.a
    dv = 1.05 * grid.spacing[1] / frame.b
    ru, rv = (0.13, 0.16) if lumbar else (0.10, 0.14)
    ru, rv, vb = max(ru, du), max(rv, dv), -0.40
    body = (u / ru) ** 2 + ((v - vb) / rv) ** 2 <= 1.0
    cortex = body & ~ndimage.binary_erosion(body)
    cu, cv = max(frame.mm(8.0) / frame.a, 0.8 * du), max(frame.mm(8.0) / frame.b, 0.8 * dv)
    vc = vb - rv - cv - 0.01
    canal = (u / cu) ** 2 + ((v - vc) / cv) ** 2 <= 1.0
    arch = (u / (cu + max(0.06, du))) ** 2 + ((v - vc) / (cv + max(0.06, dv))) ** 2 <= 1.0
    spinous = (np.abs(u) <= max(0.025, 0.5 * du)) & (v <= vc - cv) & (v >= vc - cv - 0.20)
    transverse = (np.abs(u) <= (0.22 if lumbar else 0.19)) & (np.abs(v - vc) <= max(0.035, dv / 2))
    posterior = (arch | spinous | transverse) & ~canal
    bone = (body | posterior) & ~canal
    values = np.where(body & ~cortex, hu["cancellous_bone"], hu["cortical_bone"])
    return bone, values.astype(np.float32), body, canal


def _slab(grid: Grid, level: np.ndarray, section: np.ndarray) -> Region:
    """An axial ``section`` repeated over the slices of ``level`` (``(D, 1, 1)``, contiguous).

    Only the slab's slices are evaluated: 17 vertebrae cost no more than one full volume.
    """
    rows = np.flatnonzero(level[:, 0, 0])
    if len(rows) == 0:
        return Region((slice(0, 0),) * 3, np.zeros((0, 0, 0), bool))  # type: ignore[arg-type]
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
    return Region(box, level[box[0]] & section[None])  # type: ignore[arg-type]


def paint_skeleton(
    canvas: Canvas, frame: Frame, hu: dict[str, float], rng: np.random.Generator, layout: Layout
) -> None:
    """Vertebrae T1-L5 with discs and spinal canal, 12 rib pairs, sternum, sacrum and hips."""
    grid = canvas.grid
    dz = grid.spacing[0]
    bottom, top = 0.12 + rng.normal(0.0, 0.008), 0.995
    unit = (top - bottom) / (5 * _LUMBAR_HEIGHT + 12)
    heights = [_LUMBAR_HEIGHT * unit] * 5 + [unit] * 12
    edges = bottom + np.concatenate([[0.0], np.cumsum(heights)])
    sections = {lumbar: _cross_section(canvas, frame, hu, lumbar) for lumbar in (True, False)}
    zs = grid.axes[0][:, None, None]
    inner = layout.inner
    # Discs fill the gaps between vertebral bodies; vertebrae are drawn over them.
    span = (zs >= frame.z(edges[0])) & (zs <= frame.z(edges[-1]))
    canvas.paint(canvas.grid.everywhere(span & sections[False][2][None]), hu["disc"], 0, inner)
    for i, name in enumerate(SPINE):
        bone, values, _, canal = sections[i < 5]
        z0, z1 = frame.z(edges[i]), frame.z(edges[i + 1])
        length = max(0.85 * (z1 - z0), min(z1 - z0, 1.05 * dz))
        mid = (z0 + z1) / 2
        level = (zs >= mid - length / 2) & (zs <= mid + length / 2)
        values = np.broadcast_to(values, grid.shape)
        canvas.paint(_slab(grid, level, bone), values, name, inner)
        segment = _slab(grid, (zs >= z0) & (zs < z1), canal)
        if i >= 4:  # the cord ends at L1; below it the canal holds CSF
            canvas.paint(segment, hu["spinal_cord"], "spinal_cord", inner)
        else:
            canvas.paint(segment, hu["csf"], 0, inner)
    _paint_ribs(canvas, frame, hu, edges, layout)
    _paint_pelvis(canvas, frame, hu, rng, layout)


def _paint_ribs(
    canvas: Canvas, frame: Frame, hu: dict[str, float], edges: np.ndarray, layout: Layout
) -> None:
    """Rib k leaves vertebra Tk at the back and runs inside the chest wall, sloping downwards."""
    grid = canvas.grid
    radius = canvas.grid.min_radius(frame.mm(4.5))
    ring = layout.ring
    reach = {1: 2.3, 8: 2.45, 9: 2.3, 10: 2.1, 11: 1.7, 12: 1.35}  # end angle (rad from the back)
    for k in range(1, 13):
        index = SPINE.index(f"vertebrae_T{k}")
        t0 = (edges[index] + edges[index + 1]) / 2
        drop = 1.8 * (edges[index + 1] - edges[index])
        phi = np.linspace(0.45, reach.get(k, 2.65), 12)
        for side, sign in SIDES:
            uvt = [(sign * 0.20, -0.62, t0)] + [
                (
                    sign * ring * np.sin(p),
                    -ring * np.cos(p),
                    t0 - drop * (p - 0.45) / (np.pi - 0.45),
                )
                for p in phi
            ]
            region = tube(grid, frame.path(uvt), radius)
            canvas.paint(region, hu["rib"], f"rib_{side}_{k}", layout.inner)
    # Sternum: anterior midline, inside the chest wall.
    lo = frame.point(-0.07, ring - 0.05, 0.60)
    hi = frame.point(0.07, ring + 0.06, 0.93)
    box = grid.box(np.minimum(lo, hi), np.maximum(lo, hi))
    if box is not None:
        mask = np.ones(tuple(s.stop - s.start for s in box), bool)
        canvas.paint(Region(box, mask), hu["sternum"], "sternum", layout.inner)


def _paint_pelvis(
    canvas: Canvas, frame: Frame, hu: dict[str, float], rng: np.random.Generator, layout: Layout
) -> None:
    """Sacrum below L5 and the iliac wings (hips), cortical shell around marrow."""
    grid = canvas.grid
    center = frame.point(0.0, -0.50, 0.05)
    canvas.paint(
        ellipsoid(grid, center, frame.radii(0.22, 0.12, 0.07)), hu["sacrum"], "sacrum", layout.inner
    )
    shell = max(frame.mm(3.0), 0.75 * max(grid.spacing[1:]))
    for side, sign in SIDES:
        center = frame.point(sign * (0.52 + rng.normal(0.0, 0.01)), -0.20, 0.07)
        radii = frame.radii(0.06, 0.34, 0.09)
        radii = np.maximum(radii, 1.05 * np.asarray(grid.spacing))
        name = f"hip_{side}"
        canvas.paint(
            ellipsoid(grid, center, radii, sign * 0.6), hu["cortical_bone"], name, layout.inner
        )
        canvas.paint(
            ellipsoid(grid, center, np.maximum(radii - shell, 1e-3), sign * 0.6),
            hu["cancellous_bone"],
            None,
            layout.inner,
            over=[name],
        )
