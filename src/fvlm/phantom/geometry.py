"""Voxel grid and vectorised shape primitives of the phantom.

Every shape is evaluated only inside its own bounding box, so painting a few hundred structures
(24 ribs, 17 vertebrae, bowel loops, ...) into a volume costs milliseconds. Coordinates are in
millimetres, in the canonical voxel order ``(z, y, x)``: axis 0 inferior->superior, axis 1
posterior->anterior, axis 2 patient left->right (nibabel axis codes ``("S", "A", "R")``), with the
origin at the centre of the volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["Box", "Grid", "Region", "checked_spacing", "ellipsoid", "tube"]

Box = tuple[slice, slice, slice]


def checked_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """A voxel size (mm) from user input, with a clear ``ValueError`` if it is not 3 positives."""
    try:
        sizes = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three numbers (mm), got {spacing!r}") from None
    if len(sizes) != 3 or not all(np.isfinite(s) and s > 0 for s in sizes):
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing!r}")
    return sizes  # type: ignore[return-value]


@dataclass(frozen=True)
class Grid:
    """A canonical voxel grid: ``shape`` voxels of ``spacing`` mm, centred on the origin."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def checked(
        cls, shape: Sequence[int], spacing: Sequence[float], min_shape: Sequence[int]
    ) -> Grid:
        """A grid from user input, with a clear ``ValueError`` for a bad shape or spacing."""
        values = tuple(shape)
        if len(values) != 3 or not all(
            isinstance(n, int | np.integer) and not isinstance(n, bool) for n in values
        ):
            raise ValueError(f"shape must be three integers (D, H, W), got {shape!r}")
        if any(n < m for n, m in zip(values, min_shape, strict=True)):
            raise ValueError(
                f"shape {tuple(map(int, values))} is too small: at least {tuple(min_shape)} voxels "
                "are needed (D inferior->superior, H posterior->anterior, W left->right)"
            )
        return cls(tuple(int(n) for n in values), checked_spacing(spacing))  # type: ignore[arg-type]

    @cached_property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates (mm) along each axis."""
        return tuple(  # type: ignore[return-value]
            ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32)
            for n, s in zip(self.shape, self.spacing, strict=True)
        )

    @property
    def extent(self) -> np.ndarray:
        """Field of view (mm) along each axis."""
        return np.asarray(self.shape, float) * np.asarray(self.spacing, float)

    @property
    def affine(self) -> np.ndarray:
        """Voxel -> RAS+ world (mm) affine of the canonical array (axis codes ``S, A, R``)."""
        dz, dy, dx = self.spacing
        affine = np.zeros((4, 4))
        affine[0, 2] = dx  # world x (towards the patient's right) follows axis 2
        affine[1, 1] = dy  # world y (anterior) follows axis 1
        affine[2, 0] = dz  # world z (superior) follows axis 0
        affine[3, 3] = 1.0
        centre = (np.asarray(self.shape) - 1) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
        return affine

    @property
    def full(self) -> Box:
        """The box of the whole grid."""
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))

    def everywhere(self, mask: np.ndarray) -> Region:
        """A full-volume mask as a region (for shapes computed on the whole grid)."""
        return Region(self.full, mask)

    def min_radius(self, radius: float, voxels: float = 0.75) -> float:
        """``radius`` (mm), but at least ``voxels`` in-plane voxels: thin tubes never vanish."""
        return max(radius, voxels * max(self.spacing[1:]))

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Box | None:
        """Index slices of the voxels whose centres lie in ``[lo, hi]`` (mm); None if none do."""
        slices = []
        for axis in range(3):
            n, s = self.shape[axis], self.spacing[axis]
            first = max(int(np.ceil(lo[axis] / s + (n - 1) / 2.0)), 0)
            last = min(int(np.floor(hi[axis] / s + (n - 1) / 2.0)), n - 1)
            if first > last:
                return None
            slices.append(slice(first, last + 1))
        return tuple(slices)  # type: ignore[return-value]

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable ``(z, y, x)`` coordinate arrays of a box (shapes ``(n,1,1)`` etc.)."""
        z, y, x = (axis[sl] for axis, sl in zip(self.axes, box, strict=True))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def snap(self, point: Sequence[float]) -> np.ndarray:
        """The centre (mm) of the voxel nearest to ``point``, clipped into the grid.

        Small lesions are centred on a voxel so that they always cover at least that voxel,
        whatever the spacing.
        """
        index = self.index(point)
        return np.array([axis[i] for axis, i in zip(self.axes, index, strict=True)], float)

    def index(self, point: Sequence[float]) -> tuple[int, int, int]:
        """Index of the voxel nearest to ``point`` (mm), clipped into the grid."""
        return tuple(  # type: ignore[return-value]
            int(np.clip(np.rint(p / s + (n - 1) / 2.0), 0, n - 1))
            for p, s, n in zip(point, self.spacing, self.shape, strict=True)
        )

    def point(self, index: Sequence[int]) -> np.ndarray:
        """Centre (mm) of voxel ``index``."""
        return np.array([axis[i] for axis, i in zip(self.axes, index, strict=True)], float)


@dataclass(frozen=True)
class Region:
    """A boolean mask over a box of the grid: the footprint of one shape."""

    box: Box
    mask: np.ndarray

    @property
    def empty(self) -> bool:
        """Whether the shape covers no voxel centre."""
        return not self.mask.any()


_EMPTY = Region((slice(0, 0), slice(0, 0), slice(0, 0)), np.zeros((0, 0, 0), bool))


def ellipsoid(
    grid: Grid,
    center: Sequence[float],
    radii: Sequence[float],
    angle: float = 0.0,
) -> Region:
    """Solid ellipsoid; ``radii`` along (z, y, x) mm, rotated by ``angle`` (rad) in the axial plane.

    A positive angle turns the y (anterior) semi-axis towards +x (the patient's right).
    """
    cz, cy, cx = (float(c) for c in center)
    rz, ry, rx = (float(r) for r in radii)
    reach = max(ry, rx)
    box = grid.box((cz - rz, cy - reach, cx - reach), (cz + rz, cy + reach, cx + reach))
    if box is None:
        return _EMPTY
    z, y, x = grid.coords(box)
    dz, dy, dx = z - cz, y - cy, x - cx
    if angle:
        cos, sin = np.cos(angle), np.sin(angle)
        dy, dx = dy * cos + dx * sin, dx * cos - dy * sin
    mask = (dz / rz) ** 2 + (dy / ry) ** 2 + (dx / rx) ** 2 <= 1.0
    return Region(box, mask)


def tube(grid: Grid, points: np.ndarray, radii: Sequence[float] | float) -> Region:
    """Union of capsules along a polyline: ``points`` ``(N, 3)`` mm, radius per point.

    The radius is interpolated linearly along each segment, so tubes can taper (the aorta) or
    widen (the psoas). Each segment is evaluated in its own bounding box only.
    """
    points = np.asarray(points, float)
    radii = np.broadcast_to(np.asarray(radii, float), (len(points),))
    reach = radii.max()
    box = grid.box(points.min(0) - reach, points.max(0) + reach)
    if box is None:
        return _EMPTY
    mask = np.zeros(tuple(sl.stop - sl.start for sl in box), bool)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:], strict=True):
        r = max(ra, rb)
        seg = grid.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
        if seg is None:
            continue
        z, y, x = grid.coords(seg)
        d = b - a
        length2 = float(d @ d) or 1e-9
        pz, py, px = z - a[0], y - a[1], x - a[2]
        s = np.clip((pz * d[0] + py * d[1] + px * d[2]) / length2, 0.0, 1.0)
        dist2 = (pz - s * d[0]) ** 2 + (py - s * d[1]) ** 2 + (px - s * d[2]) ** 2
        inside = dist2 <= (ra + s * (rb - ra)) ** 2
        local = tuple(
            slice(sl.start - outer.start, sl.stop - outer.start)
            for sl, outer in zip(seg, box, strict=True)
        )
        mask[local] |= inside
    return Region(box, mask)
