"""The body frame: anatomy is placed in coordinates relative to the patient's body.

``u`` runs from the patient's left (-1) to right (+1) edge of the body, ``v`` from the back (-1)
to the front (+1), ``t`` from the bottom (0) to the top (1) of the field of view. Placing organs
in these units rather than in millimetres makes them follow each study's body size and fill any
field of view: the default grid (40 x 64 x 80 voxels of 8 x 5 x 5 mm) gives an adult-sized
trunk from the pelvis to the lung apices, compressed cranio-caudally to fit 320 mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import Grid

__all__ = ["Frame", "REFERENCE_SCALE_MM"]

#: sqrt(LR x AP semi-axes) of the average default body; lesion sizes in mm are quoted for it.
REFERENCE_SCALE_MM = 133.0


@dataclass(frozen=True)
class Frame:
    """One study's body: semi-axes ``a`` (left-right) and ``b`` (front-back) in mm.

    Attributes:
        grid: The voxel grid.
        a: Left-right semi-axis of the body outline (mm).
        b: Anterior-posterior semi-axis of the body outline (mm).
        yc: Anterior-posterior position of the body centre (mm).
    """

    grid: Grid
    a: float
    b: float
    yc: float

    @classmethod
    def sample(cls, grid: Grid, rng: np.random.Generator) -> Frame:
        """A body of random size (about 70-84 % of the width, 60-74 % of the depth of the FOV)."""
        _, depth, width = grid.extent
        return cls(
            grid=grid,
            a=float(width / 2 * rng.uniform(0.70, 0.84)),
            b=float(depth / 2 * rng.uniform(0.60, 0.74)),
            yc=float(depth / 2 * rng.uniform(-0.06, 0.0)),
        )

    @property
    def height(self) -> float:
        """Cranio-caudal extent of the field of view (mm)."""
        return float(self.grid.extent[0])

    @property
    def scale(self) -> float:
        """Geometric mean of the body's semi-axes (mm); the unit of tube radii."""
        return float(np.sqrt(self.a * self.b))

    def mm(self, size: float) -> float:
        """A size quoted in mm for the reference body, scaled to this body."""
        return size * self.scale / REFERENCE_SCALE_MM

    def z(self, t: float) -> float:
        """Height (mm) of body coordinate ``t``."""
        return -self.height / 2 + t * self.height

    def point(self, u: float, v: float, t: float) -> np.ndarray:
        """Body coordinates -> canonical ``(z, y, x)`` mm."""
        return np.array([self.z(t), self.yc + v * self.b, u * self.a])

    def path(self, uvt: list[tuple[float, float, float]]) -> np.ndarray:
        """A polyline given in body coordinates, as ``(N, 3)`` mm."""
        return np.stack([self.point(*p) for p in uvt])

    def radii(self, ru: float, rv: float, rt: float) -> np.ndarray:
        """Semi-axes given in body units -> ``(z, y, x)`` mm."""
        return np.array([rt * self.height, rv * self.b, ru * self.a])

    def t_of(self, z: np.ndarray) -> np.ndarray:
        """Height(s) (mm) -> body coordinate ``t``."""
        return (np.asarray(z) + self.height / 2) / self.height
