"""Apply an external slope/intercept only when the data are not already in Hounsfield units.

DICOM-derived metadata (e.g. CT-RATE's ``RescaleSlope``/``RescaleIntercept`` columns) describe the
stored values of the original DICOM. Some NIfTI conversions keep those raw values, others (CT-RATE
v2) already hold HU; applying the rescale to HU data shifts air from -1000 to about -2000 HU and
silently ruins every window - the bug of the public fVLM and CT-CLIP preprocessing on CT-RATE v2.

The decision looks at where air sits. Every CT holds some air or gas (outside the body, lungs,
bowel), and in HU air is about -1000, while raw scanner values put air near ``-intercept / slope``
(about 0 for the common intercept -1024). We take a low percentile of the values as the air level,
ignoring padding outside the reconstruction circle (values below -1500 as stored, e.g. -2000,
-3024 or -32768), and keep whichever interpretation puts air closer to -1000 HU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

__all__ = ["AIR_HU", "RescaleDecision", "RescalePolicy", "apply_rescale", "decide_rescale"]

AIR_HU = -1000.0
RescalePolicy = Literal["auto", "always", "never"]
_PADDING_BELOW = -1500.0  # stored values below this are padding, not tissue or air
_AIR_PERCENTILE = 0.5  # percent of the non-padding voxels taken as the air level
_MAX_SAMPLES = 1_000_000
_FAR_FROM_AIR = 300.0  # HU; air further than this from -1000 earns a warning in meta.json


@dataclass(frozen=True)
class RescaleDecision:
    """Whether the external rescale was applied, and the numbers that decided it (meta.json)."""

    policy: RescalePolicy
    slope: float | None
    intercept: float | None
    applied: bool
    air_as_stored: float | None
    air_if_rescaled: float | None
    reason: str
    warning: str | None = None

    def to_json(self) -> dict:
        """Plain dict for ``meta.json``."""
        return asdict(self)


def _air_level(data: np.ndarray) -> float | None:
    """A low percentile of the non-padding values: air, in whatever units the data are stored."""
    flat = np.asarray(data).ravel(order="K")  # no copy for nibabel's Fortran-ordered arrays
    step = max(1, flat.size // _MAX_SAMPLES)
    sample = flat[::step].astype(np.float32)
    sample = sample[sample >= _PADDING_BELOW]
    if sample.size == 0:
        return None
    return float(np.percentile(sample, _AIR_PERCENTILE))


def decide_rescale(
    data: np.ndarray,
    slope: float | None,
    intercept: float | None,
    policy: RescalePolicy = "auto",
) -> RescaleDecision:
    """Decide whether ``slope * data + intercept`` is needed to get HU.

    Args:
        data: The volume as stored (after the NIfTI header's own scaling, which is part of the
            file format and always applied).
        slope: External rescale slope, or ``None`` when the study has no such metadata.
        intercept: External rescale intercept, or ``None``.
        policy: ``auto`` detects from the air level; ``always``/``never`` override it (for
            datasets whose convention is known), and the air levels are still recorded.

    Raises:
        ValueError: Unknown policy, or a slope that is not positive.
    """
    if policy not in ("auto", "always", "never"):
        raise ValueError(f"rescale policy must be 'auto', 'always' or 'never', got {policy!r}")
    air = _air_level(data)
    if slope is None and intercept is None:
        return RescaleDecision(
            policy, None, None, False, air, None, "no external slope/intercept", _warning(air)
        )
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    if not slope > 0:
        raise ValueError(f"rescale slope must be positive, got {slope}")
    rescaled = None if air is None else slope * air + intercept
    if slope == 1.0 and intercept == 0.0:
        applied, reason = False, "slope 1 and intercept 0: nothing to do"
    elif policy != "auto":
        applied, reason = policy == "always", f"policy {policy!r}"
    elif air is None:
        applied, reason = False, "no non-padding voxels to judge by; left as stored"
    else:
        applied = abs(rescaled - AIR_HU) < abs(air - AIR_HU)
        verdict = "raw values, rescaled" if applied else "already HU, not rescaled"
        reason = (
            f"air level {air:.0f} as stored vs {rescaled:.0f} if rescaled "
            f"(target {AIR_HU:.0f} HU): {verdict}"
        )
    final_air = rescaled if applied else air
    return RescaleDecision(
        policy, slope, intercept, applied, air, rescaled, reason, _warning(final_air)
    )


def _warning(air_hu: float | None) -> str | None:
    if air_hu is None or abs(air_hu - AIR_HU) <= _FAR_FROM_AIR:
        return None
    return f"air level {air_hu:.0f} HU is far from {AIR_HU:.0f}: check the input's units"


def apply_rescale(data: np.ndarray, decision: RescaleDecision) -> np.ndarray:
    """Return the data in HU according to ``decision`` (float32 if rescaled, else unchanged)."""
    if not decision.applied:
        return data
    out = np.asarray(data, dtype=np.float32) * np.float32(decision.slope)
    out += np.float32(decision.intercept)
    return out
