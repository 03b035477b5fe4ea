"""A disease as drawn in one study: where, how large, how severe.

The volume painter reads these parameters and the report writer words them, so that a report's
"moderate right pleural effusion" or "14 mm calculus in the left kidney" is what the image shows.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Finding"]


@dataclass(frozen=True)
class Finding:
    """One disease of a study (a phantom disease key of the anatomy table plus its parameters).

    Attributes:
        key: Disease key, e.g. ``kidney/calculi``.
        side: ``left``, ``right`` or ``both`` for paired organs (lungs, kidneys), else None.
        size_mm: Lesion diameter or fluid thickness (mm) as drawn, when the disease has one.
        grade: Severity word (``small``/``moderate``/``large``, ``mild``/``severe``), if any.
        site: Where in the organ (``right lower lobe``, ``lower pole``), if reported.
        count: Number of lesions (stones, calcified plaques).
        extent: Geometry parameter of the painter (effusion level, organ scale factor, ...).
    """

    key: str
    side: str | None = None
    size_mm: float | None = None
    grade: str | None = None
    site: str | None = None
    count: int = 1
    extent: float = 0.0

    @property
    def anatomy(self) -> str:
        """Anatomy name of the table (the part of the key before the slash)."""
        return self.key.split("/", 1)[0]

    @property
    def disease(self) -> str:
        """Disease name (the part of the key after the slash)."""
        return self.key.split("/", 1)[1]

    def on(self, side: str) -> bool:
        """Whether a sided finding involves ``side`` (``left`` or ``right``)."""
        return self.side in (side, "both")
