"""How a study is stored on disk: voxel orientation and HU rescaling of the NIfTI file.

Real archives mix conventions, and readers that ignore them silently train on flipped or
mis-scaled volumes (the CT-CLIP and fVLM reference code do both). So most phantom files are stored
as NIfTI converters usually write them - voxel axes (R, A, S) - but about one in four uses another
orientation (LPS, LAS, the canonical (S, A, R) itself, or a flipped permutation), and about one in
four stores ``HU + 1024`` with ``scl_inter = -1024``. The affine is always exact, so reorienting by
it (and applying the scaling, as nibabel's ``get_fdata`` does) recovers the canonical HU array.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

__all__ = ["CANONICAL_AXCODES", "RESCALE_OFFSET", "Storage", "to_nifti"]

#: Axis codes of the phantom's (and the preprocessing cache's) canonical arrays.
CANONICAL_AXCODES = ("S", "A", "R")
#: Offset of rescaled files: stored value = HU + 1024, read back with scl_inter = -1024.
RESCALE_OFFSET = 1024
_USUAL = ("R", "A", "S")
_OTHERS = (("L", "P", "S"), ("L", "A", "S"), ("S", "A", "R"), ("I", "P", "L"))


@dataclass(frozen=True)
class Storage:
    """Orientation (nibabel axis codes of the stored voxel axes) and HU rescaling of one study."""

    axcodes: tuple[str, str, str] = _USUAL
    rescaled: bool = False

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Storage:
        """(R, A, S) with probability 3/4, else another orientation; rescaled with 1/4."""
        if rng.random() < 0.75:
            axcodes = _USUAL
        else:
            axcodes = _OTHERS[int(rng.integers(len(_OTHERS)))]
        return cls(axcodes=axcodes, rescaled=bool(rng.random() < 0.25))

    @property
    def name(self) -> str:
        """Short description, e.g. ``LPS+rescaled``."""
        return "".join(self.axcodes) + ("+rescaled" if self.rescaled else "")


def _reorient(array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, ...]) -> tuple:
    """The canonical array and its affine, re-expressed with stored axes ``axcodes``."""
    transform = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), axcodes2ornt(axcodes))
    stored = np.ascontiguousarray(apply_orientation(array, transform))
    return stored, affine @ inv_ornt_aff(transform, array.shape)


def to_nifti(
    array: np.ndarray, affine: np.ndarray, storage: Storage, is_image: bool
) -> nib.Nifti1Image:
    """A NIfTI image of a canonical array, stored as ``storage`` says.

    Args:
        array: Canonical (S, A, R) array: int16 HU for an image, uint8 class ids for a mask.
        affine: Voxel -> RAS+ affine of the canonical array.
        storage: Orientation and rescaling; masks follow the orientation but are never rescaled.
        is_image: Whether ``array`` is the CT (int16 HU) rather than the label map (uint8).

    Returns:
        The image, with qform and sform both set (scanner-anatomical) and units in mm.
    """
    stored, stored_affine = _reorient(array, affine, storage.axcodes)
    if is_image:
        rescale = storage.rescaled
        data = (stored.astype(np.int32) + RESCALE_OFFSET if rescale else stored).astype(np.int16)
    else:
        data = stored.astype(np.uint8)
    image = nib.Nifti1Image(data, stored_affine)
    header = image.header
    header.set_data_dtype(data.dtype)
    header.set_qform(stored_affine, code=1)
    header.set_sform(stored_affine, code=1)
    header.set_xyzt_units("mm", "sec")
    if is_image:
        header.set_slope_inter(1.0, -float(RESCALE_OFFSET) if storage.rescaled else 0.0)
        header["descrip"] = b"fvlm phantom CT (HU)"
    else:
        header["descrip"] = b"fvlm phantom TotalSegmentator v2 total"
    return image
