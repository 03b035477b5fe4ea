"""Which diseases a study has, and their parameters (side, size, severity).

Every disease of the anatomy table marked ``phantom`` must be one the phantom can draw
(:data:`DRAWABLE`). A study gets 0-4 of them (uniformly chosen), about 16 % prevalence each, so a
test split of a few dozen studies still holds positives for every disease.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .findings import Finding
from .volume import LUNG_LOBES

__all__ = ["DISEASE_COUNT_PROBS", "DRAWABLE", "plan_findings", "sample_disease_keys"]

#: P(a study has 0, 1, 2, 3, 4 diseases); mean 2.4 -> 16 % prevalence each over 15 diseases.
DISEASE_COUNT_PROBS = (0.10, 0.15, 0.25, 0.25, 0.25)


def _side(rng: np.random.Generator, both: float = 0.0) -> str:
    return str(rng.choice(["left", "right", "both"], p=[(1 - both) / 2, (1 - both) / 2, both]))


def _emphysema(rng: np.random.Generator) -> Finding:
    return Finding("lung/emphysema", side="both", grade=str(rng.choice(["moderate", "severe"])))


def _pleural_effusion(rng: np.random.Generator) -> Finding:
    level = float(rng.uniform(0.40, 0.55))
    grade = "small" if level < 0.45 else "moderate" if level < 0.50 else "large"
    return Finding("lung/pleural_effusion", side=_side(rng, 0.2), grade=grade, extent=level)


def _nodule(rng: np.random.Generator) -> Finding:
    lobe = str(rng.choice(list(LUNG_LOBES)))
    return Finding(
        "lung/nodule",
        side="right" if lobe.endswith("right") else "left",
        size_mm=float(rng.uniform(12.0, 20.0)),
        site=lobe,
    )


def _cardiomegaly(rng: np.random.Generator) -> Finding:
    scale = float(rng.uniform(1.28, 1.42))
    return Finding("heart/cardiomegaly", grade="mild" if scale < 1.34 else "moderate", extent=scale)


def _pericardial_effusion(rng: np.random.Generator) -> Finding:
    rim = float(rng.uniform(10.0, 18.0))
    grade = "small" if rim < 13 else "moderate"
    return Finding("heart/pericardial_effusion", size_mm=rim, grade=grade)


def _renal_cyst(rng: np.random.Generator) -> Finding:
    site = str(rng.choice(["upper pole", "lower pole", "interpolar region"]))
    return Finding("kidney/cyst", side=_side(rng), site=site, extent=float(rng.uniform(0.5, 0.65)))


def _hydronephrosis(rng: np.random.Generator) -> Finding:
    extent = float(rng.uniform(0.52, 0.70))
    grade = "mild" if extent < 0.58 else "moderate" if extent < 0.64 else "severe"
    return Finding("kidney/hydronephrosis", side=_side(rng, 0.15), grade=grade, extent=extent)


def _renal_calculus(rng: np.random.Generator) -> Finding:
    site = str(rng.choice(["lower pole", "renal pelvis", "interpolar region"]))
    return Finding(
        "kidney/calculi", side=_side(rng), site=site, size_mm=float(rng.uniform(10.0, 15.0))
    )


def _steatosis(rng: np.random.Generator) -> Finding:
    return Finding("liver/steatosis", grade=str(rng.choice(["moderate", "severe"])))


def _liver_cyst(rng: np.random.Generator) -> Finding:
    site = str(
        rng.choice(["segment II", "segment IV", "segment VI", "segment VII", "segment VIII"])
    )
    return Finding("liver/cyst", size_mm=float(rng.uniform(20.0, 36.0)), site=site)


def _gallstone(rng: np.random.Generator) -> Finding:
    return Finding(
        "gallbladder/gallstone",
        size_mm=float(rng.uniform(10.0, 16.0)),
        count=int(rng.integers(1, 4)),
    )


def _pancreatitis(rng: np.random.Generator) -> Finding:
    return Finding("pancreas/pancreatitis", extent=float(rng.uniform(1.6, 1.9)))


def _splenomegaly(rng: np.random.Generator) -> Finding:
    scale = float(rng.uniform(1.35, 1.5))
    grade = "moderate" if scale < 1.42 else "marked"
    return Finding("spleen/splenomegaly", grade=grade, extent=scale)


def _bladder_stone(rng: np.random.Generator) -> Finding:
    return Finding(
        "urinary_bladder/stones",
        size_mm=float(rng.uniform(14.0, 24.0)),
        count=int(rng.choice([1, 1, 2])),
    )


def _aortic_calcification(rng: np.random.Generator) -> Finding:
    count = int(rng.integers(6, 13))
    return Finding(
        "aorta/calcification", count=count, grade="scattered" if count < 9 else "extensive"
    )


#: Disease key -> planner of its parameters. The phantom can draw exactly these.
DRAWABLE: dict[str, Callable[[np.random.Generator], Finding]] = {
    "lung/emphysema": _emphysema,
    "lung/pleural_effusion": _pleural_effusion,
    "lung/nodule": _nodule,
    "heart/cardiomegaly": _cardiomegaly,
    "heart/pericardial_effusion": _pericardial_effusion,
    "kidney/cyst": _renal_cyst,
    "kidney/hydronephrosis": _hydronephrosis,
    "kidney/calculi": _renal_calculus,
    "liver/steatosis": _steatosis,
    "liver/cyst": _liver_cyst,
    "gallbladder/gallstone": _gallstone,
    "pancreas/pancreatitis": _pancreatitis,
    "spleen/splenomegaly": _splenomegaly,
    "urinary_bladder/stones": _bladder_stone,
    "aorta/calcification": _aortic_calcification,
}


def sample_disease_keys(rng: np.random.Generator, available: Sequence[str]) -> list[str]:
    """Draw 0-4 distinct diseases (:data:`DISEASE_COUNT_PROBS`) from ``available``, table order."""
    count = min(int(rng.choice(len(DISEASE_COUNT_PROBS), p=DISEASE_COUNT_PROBS)), len(available))
    chosen = set(rng.choice(len(available), size=count, replace=False).tolist())
    return [key for i, key in enumerate(available) if i in chosen]


def plan_findings(keys: Sequence[str], rng: np.random.Generator) -> dict[str, Finding]:
    """Side, size and severity of each disease, before anything is drawn."""
    unknown = [key for key in keys if key not in DRAWABLE]
    if unknown:
        raise ValueError(
            f"the phantom cannot draw disease(s) {unknown}; it draws {sorted(DRAWABLE)}"
        )
    return {key: DRAWABLE[key](rng) for key in keys}
