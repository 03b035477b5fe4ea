"""What the anatomy painter leaves for later stages: body masks and organ ellipsoids."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Layout", "Organ"]


@dataclass(frozen=True)
class Organ:
    """An ellipsoidal organ as drawn (mm, canonical ``(z, y, x)``), for lesions placed later."""

    center: np.ndarray
    radii: np.ndarray
    angle: float = 0.0


@dataclass
class Layout:
    """What later stages need to know about the drawn anatomy.

    Attributes:
        body: Voxels inside the skin.
        inner: Voxels inside the subcutaneous fat (muscle wall, cavity, spine).
        cavity: Voxels inside the muscle wall (thoracic and abdominal cavities).
        ring: Normalised body radius of the middle of the muscle wall, where the ribs run.
        organs: Ellipsoidal organs by name (``kidney_left``, ``heart``, ...).
    """

    body: np.ndarray
    inner: np.ndarray
    cavity: np.ndarray
    ring: float
    organs: dict[str, Organ] = field(default_factory=dict)
