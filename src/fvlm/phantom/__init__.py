"""Synthetic CT phantom: studies that look like CT to the whole pipeline, with known diseases.

Volumes in Hounsfield units with a correct affine (some stored in other orientations or with HU
rescaling), TotalSegmentator v2 label maps, reports whose impression names exactly the drawn
diseases, and 0/1 labels - the project's own benchmark for fine-grained vs global CLIP.
"""

from __future__ import annotations

from .generate import generate_phantom
from .study import PhantomStudy, synthesize_study

__all__ = ["PhantomStudy", "generate_phantom", "synthesize_study"]
