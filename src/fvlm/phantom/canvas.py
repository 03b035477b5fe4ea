"""The two arrays a study is painted into: attenuation (HU) and the TotalSegmentator label map.

Painting a shape writes both at once, so the mask always covers exactly what the image shows:
a later structure overwrites an earlier one in both arrays (the heart carves the lungs, the
vertebrae carve the aorta's edge), and a change of attenuation alone (gas in the stomach, a cyst
in the liver) keeps the label underneath.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from .geometry import Grid, Region

__all__ = ["Canvas"]


class Canvas:
    """HU (float32) and label (uint8, TotalSegmentator v2 ids) arrays on one grid.

    Args:
        grid: The canonical voxel grid.
        class_ids: TotalSegmentator class name -> id (the authority for label values).
        background: HU of empty space (air).
    """

    def __init__(self, grid: Grid, class_ids: Mapping[str, int], background: float) -> None:
        self.grid = grid
        self.class_ids = dict(class_ids)
        self.hu = np.full(grid.shape, background, np.float32)
        self.labels = np.zeros(grid.shape, np.uint8)

    def label_id(self, name: str) -> int:
        """TotalSegmentator v2 id of class ``name``."""
        try:
            return self.class_ids[name]
        except KeyError:
            raise KeyError(f"unknown TotalSegmentator v2 class {name!r}") from None

    def mask_of(self, *names: str) -> np.ndarray:
        """Full-volume mask of the voxels currently labelled with any of ``names``."""
        return np.isin(self.labels, [self.label_id(n) for n in names])

    def paint(
        self,
        region: Region,
        hu: float | np.ndarray,
        label: str | int | None = None,
        within: np.ndarray | None = None,
        over: Collection[str] | None = None,
    ) -> None:
        """Write ``hu`` (and ``label``) into the voxels of ``region``.

        Args:
            region: The shape's footprint.
            hu: Attenuation; a scalar or an array the shape of the full volume (sampled inside).
            label: Class name to write, 0 to clear the label (unlabelled tissue such as fat), or
                None to keep the labels underneath (a change of attenuation only).
            within: Full-volume mask the painting is restricted to (e.g. the body cavity).
            over: Class names the painting is restricted to (plus unlabelled voxels when the
                list contains ``""``), so that a lesion never leaves its organ.
        """
        if region.empty:
            return
        box, mask = region.box, region.mask
        if within is not None:
            mask = mask & within[box]
        if over is not None:
            ids = [0 if name == "" else self.label_id(name) for name in over]
            mask = mask & np.isin(self.labels[box], ids)
        values = hu[box][mask] if isinstance(hu, np.ndarray) else np.float32(hu)
        self.hu[box][mask] = values
        if label is not None:
            self.labels[box][mask] = label if isinstance(label, int) else self.label_id(label)
