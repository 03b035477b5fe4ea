"""Scan geometries: which part of which body a phantom study images, on what voxel grid.

Real scans are not the demo's: a CT-RATE chest scan is 512 x 512 voxels of 0.6-0.9 mm in-plane
and a few hundred slices of 1-5 mm, covering 250-420 mm from above the lung apices into the upper
abdomen, so the liver, spleen, stomach and kidneys leave through its bottom face; an abdomen-pelvis
scan starts at the diaphragm and cuts the lung bases and the heart. Models, crops and truncation
rules that never meet such scans break on them. Each geometry here draws an adult (trunk length,
lean body size, subcutaneous fat; one in five is a large patient) and a scan window over the
adult's trunk in millimetres, then a voxel grid over that window:

* ``demo``: today's small phantom, the whole trunk squeezed into one fixed grid (default
  40 x 64 x 80 voxels of 8 x 5 x 5 mm); every organ fits inside the field of view.
* ``chest``: CT-RATE-like; lungs whole, top 25-50 mm above the nominal lung apex, bottom 25-70 mm
  below the lung bases or further (250-420 mm drawn), into the upper abdomen.
* ``abdomen``: abdomen-pelvis; from around the liver dome (-8 to +50 mm) to 0-50 mm below the
  pelvic floor: the lung bases and the heart are cut at the top, the liver dome sometimes, the
  hip bones sometimes at the bottom.
* ``chest_abdomen_pelvis``: the chest scan's top and the abdomen scan's bottom.

The adult grids are scanner-like (``spacing=None``: 512 x 512 in-plane over a 300-450 mm field of
view, slices of 1-5 mm) or use one given ``spacing`` with the same millimetre extents, e.g.
``(6, 6, 6)`` for fast tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from fvlm.anatomy import AnatomyTable

from .frame import INNER, BodyPlan, Frame
from .geometry import Grid, checked_spacing
from .volume import nominal_span

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "FACES",
    "GEOMETRIES",
    "Geometry",
    "MIN_SHAPE",
    "Patient",
    "ScanGeometry",
    "cut_by_field_of_view",
    "images",
]

#: A phantom scan geometry (see the module docstring).
Geometry = Literal["demo", "chest", "abdomen", "chest_abdomen_pelvis"]
GEOMETRIES: tuple[str, ...] = get_args(Geometry)
#: Faces of a canonical ``(S, A, R)`` volume: (axis 0 low, high), (axis 1 ...), (axis 2 ...).
FACES = ("inferior", "superior", "posterior", "anterior", "left", "right")

DEFAULT_SHAPE = (40, 64, 80)
DEFAULT_SPACING = (8.0, 5.0, 5.0)
#: Below this the vertebrae (17 levels along axis 0) and thin tubes no longer fit the grid.
MIN_SHAPE = (24, 24, 24)
#: Smallest field of view (mm) an adult geometry draws (cranio-caudal, in-plane), for the check
#: of a given spacing against :data:`MIN_SHAPE`.
_MIN_FOV_MM = (250.0, 300.0, 300.0)
_IN_PLANE_VOXELS = 512
#: Slice spacing (mm) -> probability: chest scans are mostly thin, abdominal ones often 5 mm.
_SLICES = {
    "chest": {1.0: 0.45, 1.25: 0.1, 1.5: 0.3, 2.0: 0.05, 3.0: 0.05, 5.0: 0.05},
    "abdomen": {1.0: 0.15, 1.25: 0.1, 1.5: 0.15, 2.0: 0.15, 2.5: 0.1, 3.0: 0.1, 5.0: 0.25},
}
_LIVER_DOME_T = 0.60  # nominal top of the liver (volume.py: right lobe at t 0.47 +- 0.13)


@dataclass(frozen=True)
class Patient:
    """An adult: trunk length and body size in millimetres.

    Attributes:
        length: Pelvic floor to the top of T1 (mm); the span of the body coordinate ``t``.
        a: Left-right semi-axis of the lean body frame (mm); the muscle wall's outside is at
            :data:`~fvlm.phantom.frame.INNER` of it.
        b: Anterior-posterior semi-axis of the lean body frame (mm).
        yc: Anterior-posterior offset of the body centre from the scanner's centre (mm).
        fat_mm: Subcutaneous fat outside the muscle wall (mm).
        large: A large patient (bigger frame, 45-100 mm of fat).
    """

    length: float
    a: float
    b: float
    yc: float
    fat_mm: float
    large: bool

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Patient:
        """One adult; one in five is large (frame x1.04-1.15, fat 45-100 mm instead of 8-35)."""
        large = bool(rng.random() < 0.2)
        size = rng.uniform(1.04, 1.15) if large else rng.uniform(0.92, 1.05)
        return cls(
            length=float(rng.uniform(455.0, 525.0)),
            a=float(175.0 * size * rng.uniform(0.96, 1.04)),
            b=float(118.0 * size * rng.uniform(0.95, 1.05)),
            yc=float(rng.uniform(-15.0, 5.0)),
            fat_mm=float(rng.uniform(45.0, 100.0) if large else rng.uniform(8.0, 35.0)),
            large=large,
        )

    @property
    def width(self) -> float:
        """Left-right extent of the skin outline (mm)."""
        return 2 * (INNER * self.a + self.fat_mm + 3.0)


def _window(name: str, patient: Patient, plan: BodyPlan, rng: np.random.Generator) -> tuple:
    """The scanned (bottom, top) in mm above the pelvic floor.

    A chest scan holds the lungs and the heart whole: its margins exceed their drawn size
    variation (lungs +-13 mm; the bottom of the heart -5 mm by its size, -18 mm by an enlarged
    heart, -18 mm by a pericardial effusion).
    """
    length = patient.length
    lung_bottom, lung_top = (np.array(nominal_span("lung", plan)) * length).tolist()
    heart_bottom = nominal_span("heart", plan)[0] * length - 50.0
    top = lung_top + rng.uniform(25.0, 50.0)
    if name == "abdomen":
        top = _LIVER_DOME_T * length + rng.uniform(-8.0, 50.0)
    if name == "chest":  # just below the lung bases; one in five scans far into the abdomen
        long = rng.random() < 0.2
        bottom = min(lung_bottom - rng.uniform(15.0, 55.0), heart_bottom)
        bottom = min(bottom, top - rng.uniform(360.0, 420.0) * long)
    else:
        bottom = -rng.uniform(5.0, 70.0)
    return float(bottom), float(top)


@dataclass(frozen=True)
class ScanGeometry:
    """A checked geometry and grid option: draws each study's grid and body frame.

    Attributes:
        name: The geometry.
        shape: The demo's grid (voxels); None for the adult geometries.
        spacing: The demo's voxel size, or an adult geometry's fixed voxel size (mm); None:
            scanner-like spacing drawn per study.
    """

    name: Geometry
    shape: tuple[int, int, int] | None
    spacing: tuple[float, float, float] | None

    @classmethod
    def checked(
        cls,
        name: str,
        shape: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> ScanGeometry:
        """The geometry of user input, with a clear ``ValueError`` for a bad combination."""
        if name not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {list(GEOMETRIES)}, got {name!r}")
        if name == "demo":
            grid = Grid.checked(
                DEFAULT_SHAPE if shape is None else shape,
                DEFAULT_SPACING if spacing is None else spacing,
                MIN_SHAPE,
            )
            return cls("demo", grid.shape, grid.spacing)
        if shape is not None:
            raise ValueError(
                f"shape applies to the demo geometry only; geometry {name!r} has its field of "
                "view in mm: give a spacing (e.g. 6 6 6) for a coarser grid"
            )
        if spacing is None:
            return cls(name, None, None)  # type: ignore[arg-type]
        fov = np.asarray(_MIN_FOV_MM)
        checked = checked_spacing(spacing)
        if np.any(fov / np.asarray(checked) < np.asarray(MIN_SHAPE)):
            raise ValueError(
                f"spacing {tuple(checked)} mm is too coarse for geometry {name!r}: its smallest "
                f"field of view ({' x '.join(f'{f:g}' for f in fov)} mm) needs at least "
                f"{MIN_SHAPE} voxels"
            )
        return cls(name, None, checked)  # type: ignore[arg-type]

    @property
    def grid(self) -> Grid:
        """The demo's fixed grid."""
        if self.shape is None or self.spacing is None:
            raise ValueError(f"geometry {self.name!r} draws a grid per study")
        return Grid(self.shape, self.spacing)

    def adult_frame(self, rng: np.random.Generator) -> Frame | None:
        """One study's adult body frame and grid (``frame.grid``); None for the demo.

        The demo draws its body from the study's anatomy stream instead (:meth:`Frame.sample`),
        so demo studies stay as they were before the adult geometries existed.

        Args:
            rng: The study's own stream for the patient, the scan window and the grid.
        """
        if self.name == "demo":
            return None
        patient = Patient.sample(rng)
        plan = BodyPlan.adult(patient.length)
        bottom, top = _window(self.name, patient, plan, rng)
        fov = float(np.clip(patient.width + rng.uniform(10.0, 50.0), 300.0, 450.0))
        grid = self._grid(top - bottom, fov, rng)
        return Frame(
            grid=grid,
            a=patient.a,
            b=patient.b,
            yc=patient.yc,
            length=patient.length,
            bottom=-(bottom + top) / 2,  # the grid is centred on the scan window's middle
            fat_mm=patient.fat_mm,
            plan=plan,
        )

    def _grid(self, height: float, fov: float, rng: np.random.Generator) -> Grid:
        """A grid over ``height`` x ``fov`` x ``fov`` mm: scanner-like or of the fixed spacing."""
        if self.spacing is None:
            slices = _SLICES["chest" if self.name == "chest" else "abdomen"]
            dz = float(rng.choice(list(slices), p=list(slices.values())))
            spacing = (dz, fov / _IN_PLANE_VOXELS, fov / _IN_PLANE_VOXELS)
        else:
            spacing = self.spacing
        extent = (height, fov, fov)
        shape = tuple(max(int(round(e / s)), 1) for e, s in zip(extent, spacing, strict=True))
        return Grid.checked(shape, spacing, MIN_SHAPE)


def images(frame: Frame, anatomy: str) -> bool:
    """Whether the frame's field of view holds at least half of ``anatomy``'s nominal span.

    Only such anatomies get diseases in an adult geometry: a report describes what was scanned.
    """
    bottom, top = nominal_span(anatomy, frame.plan)
    half = frame.grid.extent[0] / 2
    low, high = frame.t_of(-half), frame.t_of(half)
    return (min(top, high) - max(bottom, low)) >= 0.5 * (top - bottom)


def cut_by_field_of_view(anatomy_map: np.ndarray, table: AnatomyTable) -> dict[str, list[str]]:
    """The faces of the volume each anatomy touches: ``{name: ["superior", ...]}`` (cut ones only).

    Args:
        anatomy_map: Canonical ``(S, A, R)`` map of the table's anatomy ids.
        table: The anatomy table of the ids.
    """
    faces = {}
    for axis in range(3):
        for side, index in enumerate((0, -1)):
            face = np.take(anatomy_map, index, axis=axis)
            faces[FACES[2 * axis + side]] = set(np.unique(face).tolist())
    return {
        anatomy.name: [face for face in FACES if anatomy.id in faces[face]]
        for anatomy in table.anatomies
        if any(anatomy.id in ids for ids in faces.values())
    }
