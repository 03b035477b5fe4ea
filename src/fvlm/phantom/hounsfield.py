"""Attenuation (Hounsfield units) of every tissue the phantom draws.

The phantom images a portal-venous phase contrast-enhanced CT, the most common abdominal protocol:
enhancing organs (liver, spleen, kidneys, pancreas, vessels, heart) are brighter than on a
non-contrast scan, which also makes the disease signatures (cysts, hydronephrosis, steatosis,
pericardial fluid) stand out as they do in clinical practice. Each study draws its own values
around the means below, so a model cannot rely on one exact number per organ.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

__all__ = ["HU", "HU_CLIP", "sample_hu"]

#: tissue -> (mean HU, study-to-study standard deviation)
HU: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {
        "air": (-1000.0, 0.0),
        "gas": (-960.0, 10.0),
        "lung": (-850.0, 20.0),
        "lung_emphysema": (-950.0, 8.0),
        "bulla": (-995.0, 3.0),
        "subcutaneous_fat": (-100.0, 8.0),
        "visceral_fat": (-90.0, 8.0),
        "renal_sinus_fat": (-70.0, 8.0),
        "skin": (40.0, 5.0),
        "body_wall": (50.0, 5.0),
        "muscle": (55.0, 5.0),
        "fluid": (8.0, 4.0),
        "cyst": (3.0, 3.0),
        "bile": (10.0, 4.0),
        "urine": (5.0, 3.0),
        "csf": (8.0, 3.0),
        "spinal_cord": (35.0, 4.0),
        "disc": (85.0, 8.0),
        "esophagus": (45.0, 5.0),
        "airway_wall": (40.0, 5.0),
        "stomach": (30.0, 6.0),
        "bowel": (35.0, 6.0),
        "stool": (15.0, 10.0),
        "myocardium": (110.0, 8.0),
        "blood_pool": (175.0, 15.0),
        "aorta": (180.0, 15.0),
        "vena_cava": (130.0, 12.0),
        "liver": (110.0, 8.0),
        "liver_steatosis": (25.0, 6.0),
        "spleen": (120.0, 8.0),
        "kidney": (170.0, 12.0),
        "pancreas": (95.0, 8.0),
        "pancreatitis": (40.0, 6.0),
        "cortical_bone": (520.0, 40.0),
        "cancellous_bone": (230.0, 25.0),
        "rib": (550.0, 40.0),
        "sternum": (450.0, 30.0),
        "sacrum": (380.0, 30.0),
        "nodule": (40.0, 8.0),
        "calcification": (850.0, 80.0),
        "stone": (900.0, 100.0),
    }
)

#: The range a 12-bit CT stores; values are clipped to it before the int16 cast.
HU_CLIP = (-1024.0, 3071.0)


def sample_hu(rng: np.random.Generator) -> dict[str, float]:
    """One study's value for every tissue (mean + one draw of its study-to-study spread)."""
    return {name: float(mean + sd * rng.standard_normal()) for name, (mean, sd) in HU.items()}
