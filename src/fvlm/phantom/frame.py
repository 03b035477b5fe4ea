"""The body frame: anatomy is placed in coordinates relative to the patient's body.

``u`` runs from the patient's left (-1) to right (+1) edge of the body, ``v`` from the back (-1)
to the front (+1), ``t`` from the bottom (0) to the top (1) of the trunk. Placing organs in these
units rather than in millimetres makes them follow each study's body size.

Two kinds of frame exist. The demo geometry squeezes a whole trunk, pelvis to lung apices, into its
field of view (40 x 64 x 80 voxels of 8 x 5 x 5 mm: 320 mm cranio-caudally), so ``t`` spans the
field of view. The adult geometries (:mod:`fvlm.phantom.geometries`) place an adult-sized trunk
(pelvic floor to the top of T1, about 490 mm) and scan only a window of it, so that organs have
their real extents in millimetres and the field of view cuts some of them, as in real scans; their
:class:`BodyPlan` gives the few organs whose real size the squeezed demo cannot show (lungs, heart,
airway) in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import Grid

__all__ = ["ADULT_LUNG_MM", "BodyPlan", "DEMO_PLAN", "Frame", "INNER", "REFERENCE_SCALE_MM"]

#: sqrt(LR x AP semi-axes) of the average default body; lesion sizes in mm are quoted for it.
REFERENCE_SCALE_MM = 133.0
#: Normalised body radius of the outside of the muscle wall of an adult frame (the demo's average:
#: 1 - skin - subcutaneous fat); the fat of an adult is added outside it, in millimetres.
INNER = 0.88
#: Cranio-caudal semi-axis (mm) of an adult lung before the per-study scale draws (0.90-1.10).
ADULT_LUNG_MM = 132.5
_ADULT_HEART_MM = 60.0  # cranio-caudal semi-axis: a 120 mm heart, 110-130 mm after the size draw
_ADULT_LUNG_APEX = 1.03  # t of the lung apex: a little above the top of T1


@dataclass(frozen=True)
class BodyPlan:
    """Positions and cranio-caudal sizes (in ``t`` units) of the organs that differ by geometry.

    Attributes:
        lung_t: Centre of the lungs.
        lung_rt: Cranio-caudal semi-axis of the lungs.
        heart_t: Centre of a normal heart.
        heart_rt: Cranio-caudal semi-axis of a normal heart.
        heart_growth: Cranio-caudal growth of an enlarged heart per unit of enlargement.
        heart_lift: Share of that growth by which the heart's centre rises (1: it grows upwards
            from the diaphragm; 0: about its centre).
        airway_top: Where the trachea and the esophagus start (above 1: in the neck).
        carina: Where the trachea ends.
    """

    lung_t: float = 0.79
    lung_rt: float = 0.29
    heart_t: float = 0.63
    heart_rt: float = 0.12
    heart_growth: float = 0.6
    heart_lift: float = 0.0
    airway_top: float = 1.02
    carina: float = 0.84

    @classmethod
    def adult(cls, length: float) -> BodyPlan:
        """The plan of an adult trunk of ``length`` mm: lungs, heart and airway in millimetres.

        An enlarged heart grows 1.3x its enlargement cranio-caudally, so that even a mild
        cardiomegaly (x1.28) of the smallest heart measures over 150 mm, and it grows mostly
        upwards, away from the diaphragm.
        """
        lung_rt = ADULT_LUNG_MM / length
        return cls(
            lung_t=_ADULT_LUNG_APEX - lung_rt,
            lung_rt=lung_rt,
            heart_t=0.65,
            heart_rt=_ADULT_HEART_MM / length,
            heart_growth=1.3,
            heart_lift=0.5,
            airway_top=1.25,
            carina=0.80,
        )


#: The demo geometry's plan (the trunk squeezed into the field of view).
DEMO_PLAN = BodyPlan()


@dataclass(frozen=True)
class Frame:
    """One study's body: semi-axes ``a`` (left-right) and ``b`` (front-back) in mm.

    Attributes:
        grid: The voxel grid.
        a: Left-right semi-axis of the body frame (mm).
        b: Anterior-posterior semi-axis of the body frame (mm).
        yc: Anterior-posterior position of the body centre (mm).
        length: Cranio-caudal length (mm) that ``t`` from 0 to 1 spans; None: the field of view.
        bottom: Height ``z`` (mm) of ``t = 0``; None: the bottom of the field of view.
        fat_mm: Subcutaneous fat (mm) outside the muscle wall at :data:`INNER`; None: the demo's
            body, whose outline is ``a``, ``b`` and whose fat is a drawn fraction of it.
        plan: Where the organs that differ by geometry go.
    """

    grid: Grid
    a: float
    b: float
    yc: float
    length: float | None = None
    bottom: float | None = None
    fat_mm: float | None = None
    plan: BodyPlan = field(default=DEMO_PLAN)

    @classmethod
    def sample(cls, grid: Grid, rng: np.random.Generator) -> Frame:
        """A demo body of random size (70-84 % of the width, 60-74 % of the depth of the FOV)."""
        _, depth, width = grid.extent
        return cls(
            grid=grid,
            a=float(width / 2 * rng.uniform(0.70, 0.84)),
            b=float(depth / 2 * rng.uniform(0.60, 0.74)),
            yc=float(depth / 2 * rng.uniform(-0.06, 0.0)),
        )

    @property
    def height(self) -> float:
        """Cranio-caudal length (mm) of the trunk that ``t`` spans."""
        return float(self.grid.extent[0]) if self.length is None else self.length

    @property
    def base(self) -> float:
        """Height ``z`` (mm) of ``t = 0``."""
        return -self.height / 2 if self.bottom is None else self.bottom

    @property
    def scale(self) -> float:
        """Geometric mean of the body's semi-axes (mm); the unit of tube radii."""
        return float(np.sqrt(self.a * self.b))

    def mm(self, size: float) -> float:
        """A size quoted in mm for the reference body, scaled to this body."""
        return size * self.scale / REFERENCE_SCALE_MM

    def z(self, t: float) -> float:
        """Height (mm) of body coordinate ``t``."""
        return self.base + t * self.height

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
        return (np.asarray(z) - self.base) / self.height
