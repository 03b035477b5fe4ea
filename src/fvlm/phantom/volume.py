"""The phantom's anatomy: body wall, organs, vessels, muscles and skeleton, painted in order.

Later structures overwrite earlier ones in both the HU and the label array, which stands in for the
anatomical "who pushes whom": the liver dome carves the lung base, the heart the medial lungs, and
the skeleton (:mod:`fvlm.phantom.skeleton`, painted last) wins over everything. Diseases that
change an organ's shape or density (enlarged spleen or heart, fatty liver, swollen pancreas,
pleural or pericardial fluid, emphysematous lungs) are drawn here, as part of the organ; focal
lesions (cysts, stones, nodules, plaques) come afterwards (:mod:`fvlm.phantom.lesions`).

Label values are TotalSegmentator v2 (``total``) class ids looked up by name. Classes drawn:
lung lobes, trachea, esophagus, heart, aorta, inferior vena cava, liver, gallbladder, spleen,
stomach, pancreas, duodenum, small bowel, colon, kidneys (and kidney cysts), urinary bladder,
vertebrae T1-L5, ribs 1-12 on both sides, sternum, sacrum, hips, spinal cord, autochthon and
iliopsoas muscles. Pathological fluid (pleural, pericardial, peripancreatic) keeps the label of
the organ it belongs to - a deliberate simplification so that an anatomy's mask covers its finding
(TotalSegmentator would leave such fluid unlabelled).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .canvas import Canvas
from .findings import Finding
from .frame import INNER, BodyPlan, Frame
from .geometry import Region, ellipsoid, tube
from .layout import Layout, Organ
from .skeleton import SIDES, paint_skeleton

__all__ = ["LUNG_LOBES", "nominal_span", "paint_anatomy"]

#: Lobe class -> the words a report uses for it.
LUNG_LOBES = {
    "lung_upper_lobe_right": "right upper lobe",
    "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
    "lung_upper_lobe_left": "left upper lobe",
    "lung_lower_lobe_left": "left lower lobe",
}


#: Nominal cranio-caudal span (bottom, top ``t``) of the anatomies that carry phantom diseases,
#: from the painters below (centre +- semi-axis at the middle of the size draws); lungs and heart
#: come from the body plan.
_SPANS = {
    "kidney": (0.26, 0.48),
    "liver": (0.34, 0.60),
    "gallbladder": (0.32, 0.46),
    "pancreas": (0.37, 0.48),
    "spleen": (0.40, 0.58),
    "urinary_bladder": (0.01, 0.14),
    "aorta": (0.16, 0.87),
}


def nominal_span(anatomy: str, plan: BodyPlan) -> tuple[float, float]:
    """Nominal (bottom, top) ``t`` of an anatomy that carries phantom diseases.

    A scan geometry uses it to offer only the diseases of anatomies its field of view images.
    """
    if anatomy == "lung":
        return plan.lung_t - plan.lung_rt, plan.lung_t + plan.lung_rt
    if anatomy == "heart":
        return plan.heart_t - plan.heart_rt, plan.heart_t + plan.heart_rt
    try:
        return _SPANS[anatomy]
    except KeyError:
        raise KeyError(f"the phantom draws no diseases of anatomy {anatomy!r}") from None


def paint_anatomy(
    canvas: Canvas,
    frame: Frame,
    hu: dict[str, float],
    rng: np.random.Generator,
    findings: dict[str, Finding],
) -> Layout:
    """Draw one study's anatomy (with its diffuse diseases) into ``canvas``.

    Args:
        canvas: Empty canvas (air) to paint into.
        frame: The study's body frame.
        hu: The study's attenuation per tissue (:func:`fvlm.phantom.hounsfield.sample_hu`).
        rng: The study's anatomy random stream (sizes, positions, bowel loops).
        findings: The study's diseases by key; shape-changing ones are drawn here.

    Returns:
        The layout (body masks and organ ellipsoids) for the lesion painter.
    """
    texture = _texture(canvas, rng)
    layout = _paint_body(canvas, frame, hu, rng)
    _paint_lungs(canvas, frame, hu, rng, layout, findings)
    _paint_bowel(canvas, frame, hu, rng, layout, texture)
    _paint_upper_abdomen(canvas, frame, hu, rng, layout, findings, texture)
    _paint_retroperitoneum(canvas, frame, hu, rng, layout, findings)
    _paint_mediastinum(canvas, frame, hu, rng, layout, findings)
    _paint_muscles(canvas, frame, hu, rng, layout)
    paint_skeleton(canvas, frame, hu, rng, layout)
    return layout


def _jitter(rng: np.random.Generator, sd: float = 0.02) -> float:
    return float(rng.normal(0.0, sd))


def _texture(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Smooth unit-variance noise: mottled gas/stool in the bowel."""
    field = ndimage.gaussian_filter(rng.standard_normal(canvas.grid.shape).astype(np.float32), 1.2)
    return field / max(float(field.std()), 1e-6)


def _mottled(texture: np.ndarray, threshold: float, gas: float, content: float) -> np.ndarray:
    """Gas where the texture exceeds ``threshold``, else ``content`` (float32: no 8-byte copy)."""
    return np.where(texture > threshold, np.float32(gas), np.float32(content))


def _paint_body(
    canvas: Canvas, frame: Frame, hu: dict[str, float], rng: np.random.Generator
) -> Layout:
    """Skin, subcutaneous fat, muscle wall and the fat-filled cavities inside it."""
    grid = canvas.grid
    z, y, x = grid.coords(grid.full)
    t = frame.t_of(z)
    belly = 1.0 + rng.uniform(0.0, 0.08) * np.exp(-(((t - 0.3) / 0.12) ** 2))
    rho = np.sqrt((x / frame.a) ** 2 + ((y - frame.yc) / (frame.b * belly)) ** 2)
    voxel = max(grid.spacing[1:])
    wall = max(0.06, 0.9 * voxel / min(frame.a, frame.b))
    if frame.fat_mm is None:  # the demo: the fat is a fraction of the body outline
        skin = max(3.0, 0.8 * voxel) / min(frame.a, frame.b)
        inside = 1.0 - skin - rng.uniform(0.05, 0.15)
        body, subcutaneous = rho <= 1.0, rho <= 1.0 - skin
    else:  # an adult: the fat (mm) lies outside the muscle wall, whatever the frame's size
        skin, inside = max(3.0, 0.8 * voxel), INNER
        width = INNER * frame.a + frame.fat_mm + skin
        depth = INNER * frame.b + frame.fat_mm + skin
        outline = np.sqrt((x / width) ** 2 + ((y - frame.yc) / (depth * belly)) ** 2)
        body, subcutaneous = outline <= 1.0, outline <= 1.0 - skin / min(width, depth)
        del outline
    inner = rho <= inside
    cavity = rho <= inside - wall
    canvas.paint(grid.everywhere(body), hu["skin"], 0)
    canvas.paint(grid.everywhere(subcutaneous), hu["subcutaneous_fat"], 0)
    canvas.paint(grid.everywhere(inner), hu["body_wall"], 0)
    canvas.paint(grid.everywhere(cavity), hu["visceral_fat"], 0)
    return Layout(body=body, inner=inner, cavity=cavity, ring=inside - wall / 2)


def _paint_lungs(
    canvas: Canvas,
    frame: Frame,
    hu: dict[str, float],
    rng: np.random.Generator,
    layout: Layout,
    findings: dict[str, Finding],
) -> None:
    """Five lobes split by oblique (right: also horizontal) fissures; effusion at the base."""
    emphysema = "lung/emphysema" in findings
    effusion = findings.get("lung/pleural_effusion")
    scale, plan = rng.uniform(0.94, 1.06), frame.plan
    for side, sign in SIDES:
        center = frame.point(sign * (0.50 + _jitter(rng)), 0.02 + _jitter(rng), plan.lung_t)
        radii = frame.radii(0.40, 0.80, plan.lung_rt) * scale * rng.uniform(0.96, 1.04)
        region = ellipsoid(canvas.grid, center, radii)
        if region.empty:
            continue
        z, y, _ = canvas.grid.coords(region.box)
        tn = (z - center[0]) / radii[0]
        vn = (y - center[1]) / radii[1]
        lower = np.broadcast_to(tn < -0.3 - 0.6 * vn, region.mask.shape)
        lobes = {f"lung_lower_lobe_{side}": lower}
        if side == "right":
            middle = ~lower & np.broadcast_to(tn < 0.05, region.mask.shape)
            lobes["lung_middle_lobe_right"] = middle
            lobes["lung_upper_lobe_right"] = ~lower & ~middle
        else:
            lobes["lung_upper_lobe_left"] = ~lower
        tissue = hu["lung_emphysema"] if emphysema else hu["lung"]
        for name, lobe in lobes.items():
            canvas.paint(Region(region.box, region.mask & lobe), tissue, name, layout.cavity)
        if effusion is not None and effusion.on(side):
            dependent = (vn + 1) / 2 + 0.5 * (tn + 1) / 2 < effusion.extent
            fluid = Region(region.box, region.mask & dependent)
            canvas.paint(fluid, hu["fluid"], None, layout.cavity)


def _paint_bowel(
    canvas: Canvas,
    frame: Frame,
    hu: dict[str, float],
    rng: np.random.Generator,
    layout: Layout,
    texture: np.ndarray,
) -> None:
    """Small bowel loops (random walks in the mid abdomen) and the colon frame around them."""
    radius = canvas.grid.min_radius(0.08 * frame.scale)
    low, high = np.array([-0.35, 0.0, 0.15]), np.array([0.38, 0.45, 0.32])
    bowel = _mottled(texture, 1.4, hu["gas"], hu["bowel"])
    for _ in range(int(rng.integers(4, 7))):
        point = rng.uniform(low, high)
        walk = [point]
        for _ in range(4):
            point = np.clip(point + rng.normal(0.0, [0.15, 0.12, 0.03]), low, high)
            walk.append(point)
        loop = tube(canvas.grid, frame.path([tuple(p) for p in walk]), radius)
        canvas.paint(loop, bowel, "small_bowel", layout.cavity)
    colon = [
        (0.0, -0.22, -0.02),
        (0.0, -0.20, 0.06),
        (-0.15, -0.02, 0.11),
        (-0.42, 0.05, 0.13),
        (-0.62, -0.08, 0.20),
        (-0.62, -0.05, 0.36),
        (-0.50, 0.22, 0.42),
        (-0.15, 0.55, 0.37),
        (0.20, 0.55, 0.36),
        (0.52, 0.28, 0.36),
        (0.62, -0.05, 0.30),
        (0.58, 0.02, 0.17),
    ]
    colon = [(u + _jitter(rng), v + _jitter(rng), t + _jitter(rng, 0.01)) for u, v, t in colon]
    content = _mottled(texture, 0.3, hu["gas"], hu["stool"])
    region = tube(canvas.grid, frame.path(colon), canvas.grid.min_radius(0.12 * frame.scale))
    canvas.paint(region, content, "colon", layout.cavity)


def _paint_upper_abdomen(
    canvas: Canvas,
    frame: Frame,
    hu: dict[str, float],
    rng: np.random.Generator,
    layout: Layout,
    findings: dict[str, Finding],
    texture: np.ndarray,
) -> None:
    """Stomach, duodenum, pancreas, liver, gallbladder and spleen."""
    grid, cavity = canvas.grid, layout.cavity
    # Stomach: fluid-filled with a gas cap where the supine patient's stomach is highest (front).
    center = frame.point(-0.36 + _jitter(rng), 0.28 + _jitter(rng), 0.49 + _jitter(rng, 0.01))
    radii = frame.radii(0.22, 0.28, 0.08) * rng.uniform(0.85, 1.15)
    stomach = ellipsoid(grid, center, radii, angle=-0.3)
    canvas.paint(stomach, hu["stomach"], "stomach", cavity)
    _, y, _ = grid.coords(stomach.box)
    cap = stomach.mask & ((y - center[1]) / radii[1] > rng.uniform(0.2, 0.6))
    canvas.paint(Region(stomach.box, cap), hu["gas"], None, cavity, over=["stomach"])
    # Duodenum: the C-loop around the pancreatic head.
    loop = [
        (0.06, 0.32, 0.45),
        (0.22, 0.18, 0.44),
        (0.30, 0.02, 0.40),
        (0.29, 0.02, 0.33),
        (0.05, 0.10, 0.31),
        (-0.14, 0.12, 0.35),
    ]
    duodenum = tube(grid, frame.path(loop), canvas.grid.min_radius(0.075 * frame.scale))
    content = _mottled(texture, 1.2, hu["gas"], hu["bowel"])
    canvas.paint(duodenum, content, "duodenum", cavity)
    # Pancreas: head, neck, body, tail towards the splenic hilum.
    path = frame.path(
        [(0.14, 0.05, 0.40), (0.02, 0.12, 0.42), (-0.20, 0.04, 0.43), (-0.44, -0.16, 0.45)]
    )
    widths = np.array([0.11, 0.085, 0.085, 0.07]) * frame.scale * rng.uniform(0.9, 1.1)
    widths = np.maximum(widths, canvas.grid.min_radius(0.0))
    if "pancreas/pancreatitis" in findings:
        swelling = findings["pancreas/pancreatitis"].extent
        canvas.paint(
            tube(grid, path, widths * swelling * 1.45),
            hu["fluid"],
            "pancreas",
            cavity,
            over=["", "small_bowel"],
        )
        canvas.paint(tube(grid, path, widths * swelling), hu["pancreatitis"], "pancreas", cavity)
    else:
        canvas.paint(tube(grid, path, widths), hu["pancreas"], "pancreas", cavity)
    # Liver: the right lobe plus the left lobe reaching across the midline in front.
    liver_hu = hu["liver_steatosis"] if "liver/steatosis" in findings else hu["liver"]
    size = rng.uniform(0.9, 1.1)
    right = frame.point(0.42 + _jitter(rng), 0.0 + _jitter(rng), 0.47 + _jitter(rng, 0.01))
    canvas.paint(
        ellipsoid(grid, right, frame.radii(0.42, 0.66, 0.13) * size), liver_hu, "liver", cavity
    )
    left = frame.point(0.05 + _jitter(rng), 0.30, 0.50)
    canvas.paint(
        ellipsoid(grid, left, frame.radii(0.24, 0.28, 0.07) * size), liver_hu, "liver", cavity
    )
    layout.organs["liver"] = Organ(right, frame.radii(0.42, 0.66, 0.13) * size)
    # Gallbladder under the liver.
    center = frame.point(0.28 + _jitter(rng), 0.42 + _jitter(rng), 0.39)
    radii = frame.radii(0.10, 0.17, 0.07) * rng.uniform(0.85, 1.15)
    radii = np.maximum(radii, np.array(grid.spacing) * 1.05)
    canvas.paint(ellipsoid(grid, center, radii, angle=0.35), hu["bile"], "gallbladder", cavity)
    layout.organs["gallbladder"] = Organ(center, radii, 0.35)
    # Spleen, posterolateral on the left; splenomegaly grows it forwards and downwards.
    enlarge = findings["spleen/splenomegaly"].extent if "spleen/splenomegaly" in findings else 1.0
    center = frame.point(
        -0.60 + _jitter(rng) + 0.05 * (enlarge - 1),
        -0.35 + _jitter(rng) + 0.25 * (enlarge - 1),
        0.49 + _jitter(rng, 0.01) - 0.06 * (enlarge - 1),
    )
    radii = frame.radii(0.16, 0.32, 0.09) * rng.uniform(0.9, 1.1) * enlarge
    canvas.paint(ellipsoid(grid, center, radii, angle=0.6), hu["spleen"], "spleen", cavity)
    layout.organs["spleen"] = Organ(center, radii, 0.6)


def _paint_retroperitoneum(
    canvas: Canvas,
    frame: Frame,
    hu: dict[str, float],
    rng: np.random.Generator,
    layout: Layout,
    findings: dict[str, Finding],
) -> None:
    """Kidneys (with renal sinus fat at the hilum), inferior vena cava and urinary bladder."""
    grid, cavity = canvas.grid, layout.cavity
    hydro = findings.get("kidney/hydronephrosis")
    scale = rng.uniform(0.9, 1.1)
    for side, sign in SIDES:
        center = frame.point(
            sign * (0.40 + _jitter(rng)),
            -0.31 + _jitter(rng),
            (0.36 if side == "right" else 0.38) + _jitter(rng, 0.01),
        )
        radii = frame.radii(0.16, 0.22, 0.10) * scale * rng.uniform(0.95, 1.05)
        if hydro is not None and hydro.on(side):
            radii = radii * 1.12
        angle = -sign * 0.4  # the hilum faces forwards and medially
        name = f"kidney_{side}"
        canvas.paint(ellipsoid(grid, center, radii, angle), hu["kidney"], name, cavity)
        sinus = center + np.array([0.0, 0.1 * radii[1], -sign * 0.55 * radii[2]])
        canvas.paint(
            ellipsoid(grid, sinus, radii * 0.42, angle),
            hu["renal_sinus_fat"],
            0,
            cavity,
            over=[name],
        )
        layout.organs[name] = Organ(center, radii, angle)
    ivc = [(0.10, -0.10, 0.15), (0.12, -0.08, 0.35), (0.16, 0.00, 0.47), (0.10, 0.18, 0.56)]
    ivc = [(u + _jitter(rng, 0.01), v + _jitter(rng, 0.01), t) for u, v, t in ivc]
    region = tube(grid, frame.path(ivc), canvas.grid.min_radius(0.08 * frame.scale))
    canvas.paint(region, hu["vena_cava"], "inferior_vena_cava", cavity)
    center = frame.point(_jitter(rng), 0.32 + _jitter(rng), 0.075)
    radii = frame.radii(0.20, 0.28, 0.065) * rng.uniform(0.75, 1.15)
    canvas.paint(ellipsoid(grid, center, radii), hu["urine"], "urinary_bladder", cavity)
    layout.organs["urinary_bladder"] = Organ(center, radii)


def _paint_mediastinum(
    canvas: Canvas,
    frame: Frame,
    hu: dict[str, float],
    rng: np.random.Generator,
    layout: Layout,
    findings: dict[str, Finding],
) -> None:
    """Heart (myocardium around a contrast-filled blood pool), aorta, esophagus and trachea."""
    grid, cavity, plan = canvas.grid, layout.cavity, frame.plan
    enlarge = findings["heart/cardiomegaly"].extent if "heart/cardiomegaly" in findings else 1.0
    u = -0.08 + _jitter(rng) - 0.1 * (enlarge - 1)
    center = frame.point(u, 0.30 + _jitter(rng), plan.heart_t)
    normal = frame.radii(0.37, 0.40, plan.heart_rt) * rng.uniform(0.92, 1.08)
    radii = normal * np.array([1.0 + plan.heart_growth * (enlarge - 1), enlarge, enlarge])
    center[0] += plan.heart_lift * (radii[0] - normal[0])  # an adult's heart grows upwards
    angle = -0.5  # the apex points forwards and to the patient's left
    effusion = findings.get("heart/pericardial_effusion")
    if effusion is not None:
        rim = max(effusion.size_mm or 0.0, 1.05 * max(grid.spacing))
        sac = ellipsoid(grid, center, radii + rim, angle)
        canvas.paint(sac, hu["fluid"], "heart", cavity)
    canvas.paint(ellipsoid(grid, center, radii, angle), hu["myocardium"], "heart", cavity)
    canvas.paint(ellipsoid(grid, center, radii * 0.72, angle), hu["blood_pool"], "heart", cavity)
    layout.organs["heart"] = Organ(center, radii, angle)
    # Aorta: root at the top of the heart, arch, descending aorta left of the spine.
    root_t = min(frame.t_of(center[0] + 0.7 * radii[0]), 0.78)  # below the arch
    aorta = [
        (-0.02, 0.28, float(root_t)),
        (0.04, 0.22, 0.80),
        (0.00, 0.10, 0.87),
        (-0.10, -0.08, 0.87),
        (-0.14, -0.17, 0.80),
        (-0.12, -0.15, 0.55),
        (-0.08, -0.10, 0.35),
        (-0.05, -0.08, 0.16),
    ]
    aorta = [(u + _jitter(rng, 0.01), v + _jitter(rng, 0.01), t) for u, v, t in aorta]
    widths = np.array([0.10, 0.10, 0.10, 0.095, 0.09, 0.085, 0.075, 0.07]) * frame.scale
    widths = np.maximum(widths * rng.uniform(0.9, 1.1), canvas.grid.min_radius(0.0))
    canvas.paint(tube(grid, frame.path(aorta), widths), hu["aorta"], "aorta", cavity)
    esophagus = [
        (0.02, -0.12, plan.airway_top),
        (0.02, -0.13, 0.80),
        (-0.03, -0.10, 0.62),
        (-0.12, 0.00, 0.53),
        (-0.25, 0.15, 0.50),
    ]
    region = tube(grid, frame.path(esophagus), canvas.grid.min_radius(0.055 * frame.scale))
    canvas.paint(region, hu["esophagus"], "esophagus", cavity)
    trachea = frame.path([(0.0, 0.10, plan.airway_top), (0.0, 0.08, plan.carina)])
    outer = canvas.grid.min_radius(0.09 * frame.scale)
    canvas.paint(tube(grid, trachea, outer), hu["airway_wall"], "trachea", cavity)
    canvas.paint(tube(grid, trachea, outer - frame.mm(2.5)), hu["air"], "trachea", cavity)


def _paint_muscles(
    canvas: Canvas, frame: Frame, hu: dict[str, float], rng: np.random.Generator, layout: Layout
) -> None:
    """Paraspinal (autochthon) muscles along the whole spine, iliopsoas from L1 to the pelvis."""
    grid = canvas.grid
    z, y, x = grid.coords(grid.full)
    t = frame.t_of(z)
    u, v = x / frame.a, (y - frame.yc) / frame.b
    taper = 1.1 - 0.35 * t
    bulk = rng.uniform(0.85, 1.15)
    for side, sign in SIDES:
        shape = ((u - sign * 0.14) / (0.11 * bulk * taper)) ** 2 + (
            (v + 0.72) / (0.16 * taper)
        ) ** 2 <= 1.0
        canvas.paint(grid.everywhere(shape), hu["muscle"], f"autochthon_{side}", layout.inner)
        psoas = [
            (sign * 0.12, -0.33, 0.42),
            (sign * 0.17, -0.28, 0.30),
            (sign * 0.22, -0.18, 0.16),
            (sign * 0.32, -0.05, 0.02),
        ]
        widths = np.array([0.03, 0.09, 0.13, 0.12]) * frame.scale * bulk
        widths = np.maximum(widths, canvas.grid.min_radius(0.0))
        region = tube(grid, frame.path(psoas), widths)
        canvas.paint(region, hu["muscle"], f"iliopsoas_{side}", layout.inner)
