"""Anatomies truncated by the scan's field of view, found on the original grid (Sec. 3.2).

The paper aligns only structurally complete anatomies: a partial organ may miss the very finding
its text describes. The crop can truncate an anatomy (:func:`fvlm.crop.crop_valid` handles that),
but so can the scan itself: a lung whose apex lies above the first slice is partial in every crop.
An anatomy is *truncated by the field of view* when its mask comes within ``margin_mm`` of a face
of the ORIGINAL scan, measured before resampling (which would blur the boundary by up to half an
output voxel).

Only the slabs within the margin of the six faces are read, so the cost is a few slices of the
label map, not a pass over it. The gap of a voxel ``i`` (0-based) from the low face is ``i * s``
mm (``s`` the voxel size along that axis); from the high face ``(n - 1 - i) * s``. The anatomy is
truncated at a face when some voxel's gap is at most ``margin_mm``: with margin 0 only a mask that
touches the face counts, one voxel further in does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["FACES", "truncated_faces"]

#: Face names of the canonical axes ``("S", "A", "R")``: (low face, high face) per axis.
FACES: tuple[tuple[str, str], ...] = (
    ("inferior", "superior"),
    ("posterior", "anterior"),
    ("left", "right"),
)
_ROUNDING = 1e-6  # a margin that is an exact multiple of the spacing includes that voxel


def truncated_faces(
    anatomy: np.ndarray, spacing: Sequence[float], margin_mm: float
) -> dict[int, list[str]]:
    """Faces of the scan each anatomy id comes within ``margin_mm`` of.

    Args:
        anatomy: Grouped anatomy ids (non-negative integers, 0 = background) on the original
            grid, in canonical axes (so that the faces have their anatomical names).
        spacing: Voxel size (mm) along each array axis.
        margin_mm: Largest gap (mm) between the mask and a face that still counts as cut.

    Returns:
        ``{anatomy id: [face, ...]}`` for the ids that reach a face, faces in :data:`FACES`
        order; ids that reach none are left out.
    """
    if anatomy.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"expected a 3D map and 3 spacings, got {anatomy.shape}, {spacing}")
    if not margin_mm >= 0 or min(spacing) <= 0:
        raise ValueError(f"margin must be >= 0 and spacing positive, got {margin_mm}, {spacing}")
    faces: dict[int, list[str]] = {}
    for axis, (low_face, high_face) in enumerate(FACES):
        n = anatomy.shape[axis]
        depth = min(n, math.floor(margin_mm / float(spacing[axis]) + _ROUNDING) + 1)
        for face, index in ((low_face, slice(0, depth)), (high_face, slice(n - depth, n))):
            slab = anatomy[(slice(None),) * axis + (index,)]
            found = np.flatnonzero(np.bincount(slab.ravel())) if slab.size else ()
            for value in found:
                if value:  # 0 is background
                    faces.setdefault(int(value), []).append(face)
    return faces
