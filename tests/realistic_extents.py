"""Anatomy bounding boxes of adult CT scans in millimetres, to measure crop recipes without scans.

Each anatomy is a box placed on a body axis ``z`` (mm, 0 at the diaphragm dome, up positive), from
adult extents: lungs 220-300 mm craniocaudal and 250-350 mm side to side, heart 110-130 mm (one in
four enlarged, 150-175 mm), trachea 120-180 mm, the esophagus from the neck to below the dome, the
aorta from its arch to the iliac bifurcation, abdominal organs as in anatomy atlases. Scans cut
this body like real ones:

* ``chest`` (CT-RATE): from just above the lung apices to 10-80 mm below the lung bases, 250-420 mm;
  the upper abdomen (liver, spleen, stomach, kidneys) and the tubes leaving the chest are cut;
* ``abdomen`` (abdomen-pelvis): from 20-80 mm above the dome (cuts the lung bases) to below the
  bladder;
* ``chest_abdomen_pelvis``: both.

An anatomy that crosses the top or bottom of the scan is clipped and flagged truncated, unless that
face is one of its ``open_ends`` (the aorta leaving a chest scan: its in-scan part is complete, as
preprocessing records it); one wholly outside is absent. Arms are raised (humerus absent), as in
most chest and abdomen protocols.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: name: (bottom z range, craniocaudal size range, centre right of midline, side-to-side size
#: range or "body", anterior fraction of the body depth, front-to-back size range or "body").
EXTENTS: dict[str, tuple] = {
    "lung": ((-50, -20), (220, 300), 0, (250, 350), 0.5, (160, 230)),
    "heart": ((-10, 20), (110, 130), -20, (110, 150), 0.6, (80, 120)),
    "trachea": ((110, 150), (120, 180), 0, (20, 25), 0.55, (18, 25)),
    "esophagus": ((-40, -20), (320, 380), -10, (30, 45), 0.35, (20, 35)),
    "aorta": ((-320, -280), (470, 520), 0, (60, 90), 0.5, (90, 130)),
    "pulmonary_artery": ((80, 100), (50, 80), 0, (90, 130), 0.6, (50, 80)),
    "thoracic_vertebrae": ((-80, -60), (260, 300), 0, (70, 90), 0.2, (70, 100)),
    "rib": ((-130, -100), (280, 330), 0, "body", 0.5, "body"),
    "liver": ((-200, -150), (150, 210), 50, (150, 220), 0.5, (120, 190)),
    "spleen": ((-150, -110), (90, 130), -100, (60, 100), 0.35, (80, 130)),
    "stomach": ((-170, -110), (120, 180), -50, (100, 170), 0.55, (80, 140)),
    "kidney": ((-230, -190), (130, 170), 0, (200, 260), 0.3, (60, 90)),
    "adrenal_gland": ((-100, -80), (40, 60), 0, (110, 150), 0.35, (30, 50)),
    "gallbladder": ((-160, -120), (60, 100), 60, (30, 50), 0.65, (30, 50)),
    "pancreas": ((-150, -120), (40, 80), -10, (140, 200), 0.45, (40, 70)),
    "portal_vein": ((-130, -110), (60, 90), 30, (50, 90), 0.5, (30, 60)),
    "colon": ((-490, -450), (330, 400), 0, (220, 300), 0.5, (130, 200)),
    "small_bowel": ((-420, -360), (200, 280), 0, (180, 260), 0.6, (100, 170)),
    "urinary_bladder": ((-470, -440), (50, 100), 0, (60, 100), 0.55, (50, 90)),
    "inferior_vena_cava": ((-320, -300), (320, 350), 20, (25, 40), 0.4, (25, 40)),
    "iliac_artery": ((-440, -420), (140, 170), 0, (110, 150), 0.4, (50, 80)),
    "iliac_vena": ((-450, -430), (150, 180), 0, (120, 160), 0.35, (50, 80)),
    "lumbar_vertebrae": ((-370, -350), (170, 190), 0, (80, 100), 0.2, (80, 110)),
    "cervical_vertebrae": ((250, 270), (120, 140), 0, (50, 70), 0.2, (60, 80)),
    "sacrum": ((-440, -420), (100, 130), 0, (100, 130), 0.15, (60, 100)),
    "hip": ((-510, -480), (190, 230), 0, (260, 320), 0.4, (150, 200)),
    "femur": ((-850, -800), (420, 460), 0, (300, 360), 0.45, (50, 70)),
    "gluteus": ((-570, -530), (200, 250), 0, (300, 380), 0.15, (150, 220)),
    "iliopsoas": ((-480, -460), (280, 330), 0, (150, 220), 0.3, (80, 140)),
    "autochthon": ((-420, -400), (600, 700), 0, (80, 120), 0.08, (50, 80)),
    "scapula": ((100, 140), (140, 180), 0, "body", 0.2, (100, 150)),
    "clavicula": ((230, 260), (30, 50), 0, (260, 320), 0.7, (60, 100)),
    "face": ((420, 460), (100, 130), 0, (120, 150), 0.8, (80, 110)),
    "brain": ((480, 520), (120, 150), 0, (130, 160), 0.5, (150, 180)),
}

#: Enlarged organs: (share of studies, craniocaudal, side-to-side, front-to-back size ranges).
ENLARGED: dict[str, tuple] = {
    "heart": (0.25, (150, 175), (150, 200), (110, 150)),
    "spleen": (0.15, (150, 200), (100, 140), (110, 150)),
    "liver": (0.15, (220, 260), (200, 250), (170, 220)),
}

_GEOMETRIES = ("chest", "abdomen", "chest_abdomen_pelvis")


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    return rng.uniform(bounds[0], bounds[1], n)


def sample_scans(
    geometry: str,
    names: list[str],
    n: int,
    seed: int = 0,
    open_ends: Mapping[str, Sequence[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` scans of ``geometry``: ``(boxes_mm (n, A, 3, 2), fov_mm (n, 3), truncated (n, A))``.

    Boxes are measured from the scan's first voxel corner along (inferior->superior,
    posterior->anterior, left->right), NaN for an absent anatomy, as
    :meth:`fvlm.crop_validity.StudyBoxes.from_mm` expects. ``open_ends`` maps an anatomy to the
    faces (``inferior``, ``superior``) where a cut leaves it complete (an anatomy table's
    ``open_ends``; default: none).
    """
    if geometry not in _GEOMETRIES:
        raise ValueError(f"geometry must be one of {_GEOMETRIES}, got {geometry!r}")
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.9, 1.1, n)  # body size along z
    width = rng.uniform(280, 420, n)  # body side to side
    depth = width * rng.uniform(0.65, 0.8, n)
    fov = np.clip(width + rng.uniform(10, 60, n), 300, 460)  # square in-plane field of view
    lo = np.full((n, len(names), 3), np.nan)
    hi = np.full((n, len(names), 3), np.nan)
    for j, name in enumerate(names):
        if name not in EXTENTS:  # e.g. the humerus: arms raised, outside the scan
            continue
        bottom, cc, right, lr, front, ap = EXTENTS[name]
        cc_size, lr_size = (
            _uniform(rng, cc, n),
            width - 10 if lr == "body" else _uniform(rng, lr, n),
        )
        ap_size = depth - 10 if ap == "body" else _uniform(rng, ap, n)
        if name in ENLARGED:
            share, cc_big, lr_big, ap_big = ENLARGED[name]
            big = rng.random(n) < share
            cc_size = np.where(big, _uniform(rng, cc_big, n), cc_size)
            lr_size = np.where(big, _uniform(rng, lr_big, n), lr_size)
            ap_size = np.where(big, _uniform(rng, ap_big, n), ap_size)
        lr_size, ap_size = np.minimum(lr_size, width - 10), np.minimum(ap_size, depth - 10)
        z0 = _uniform(rng, bottom, n) * scale
        centre_lr = fov / 2 + right * width / 350
        centre_ap = (fov - depth) / 2 + front * depth
        lo[:, j] = np.stack([z0, centre_ap - ap_size / 2, centre_lr - lr_size / 2], axis=1)
        hi[:, j] = np.stack(
            [z0 + cc_size * scale, centre_ap + ap_size / 2, centre_lr + lr_size / 2], 1
        )
        if name == "lung":
            apex, base = hi[:, j, 0].copy(), lo[:, j, 0].copy()
    if "lung" not in names:
        raise ValueError("the sampler places scans by the lungs: include 'lung' in names")
    cranial = apex + rng.uniform(5, 40, n)
    pelvic = EXTENTS["urinary_bladder"][0][0] * scale - rng.uniform(10, 40, n)
    if geometry == "chest":
        top, low = cranial, base - rng.uniform(10, 80, n)
    elif geometry == "abdomen":
        top, low = rng.uniform(20, 80, n) * scale, pelvic
    else:
        top, low = cranial, pelvic
    lo[..., 0] -= low[:, None]
    hi[..., 0] -= low[:, None]
    length = top - low
    extent = np.stack([length, fov, fov], axis=1)[:, None, :]
    absent = ((hi <= 0) | (lo >= extent)).any(axis=-1)
    open_low, open_high = (
        np.array([face in (open_ends or {}).get(name, ()) for name in names])
        for face in ("inferior", "superior")
    )
    cut = (lo < 0) | (hi > extent)
    cut[..., 0] = ((lo[..., 0] < 0) & ~open_low) | ((hi[..., 0] > length[:, None]) & ~open_high)
    truncated = ~absent & cut.any(axis=-1)
    lo, hi = np.clip(lo, 0, extent), np.clip(hi, 0, extent)
    lo[absent], hi[absent] = np.nan, np.nan
    return np.stack([lo, hi], axis=-1), extent[:, 0, :], truncated
