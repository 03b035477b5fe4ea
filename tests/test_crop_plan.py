"""Evaluation crop plan: few crops of the training size, each anatomy whole in its crop."""

from __future__ import annotations

import numpy as np
from realistic_extents import sample_scans

from fvlm.anatomy import load_anatomy_table
from fvlm.crop import crop_valid
from fvlm.crop_validity import StudyBoxes
from fvlm.evaluation.crop_plan import plan_crops


def test_hand_case() -> None:
    boxes = np.array(
        [
            [[0, 4], [0, 4], [0, 4]],  # a and b fit one crop together
            [[4, 8], [2, 6], [2, 6]],
            [[30, 36], [0, 4], [0, 4]],  # far away: a second crop
            [[0, 40], [0, 2], [0, 2]],  # larger than the crop
            [[10, 12], [0, 2], [0, 2]],  # cut by the field of view
            [[0, 0], [0, 0], [0, 0]],  # absent
        ]
    )
    complete = [True, True, True, True, False, True]
    plan = plan_crops((40, 8, 8), (10, 8, 8), boxes, complete)
    assert plan.forward_passes == 3
    assert plan.crop_of[0] == plan.crop_of[1] != plan.crop_of[2]
    assert plan.crop_of[4] == -1 and plan.crop_of[5] == -1
    assert plan.larger_than_crop.tolist() == [False, False, False, True, False, False]
    for a in range(3):
        assert crop_valid(boxes, plan.starts[plan.crop_of[a]], (10, 8, 8))[a]
    # The larger anatomy's crop is centred on it: [15, 25) of [0, 40).
    assert plan.starts[plan.crop_of[3]].tolist() == [15, 0, 0]
    # Shared crops are centred among the starts holding all their anatomies: a, b need 0..0.
    assert plan.starts[plan.crop_of[0]].tolist() == [0, 0, 0]
    assert plan.starts[plan.crop_of[2]].tolist() == [28, 0, 0]  # starts 26..30, centre 28


def test_nothing_to_embed() -> None:
    plan = plan_crops((8, 8, 8), (4, 4, 4), np.zeros((3, 3, 2), int))
    assert plan.forward_passes == 0 and plan.crop_of.tolist() == [-1, -1, -1]


def test_realistic_chest_scans() -> None:
    table = load_anatomy_table("chest")
    boxes, fov, truncated = sample_scans("chest", table.names, 100, seed=2)
    passes = {}
    for name, spacing, crop in (
        ("today", (1.5, 0.75, 0.75), (96, 384, 384)),
        ("proposed", (3.0, 1.0, 1.0), (144, 288, 384)),
    ):
        studies = StudyBoxes.from_mm(boxes, fov, spacing, table.names, truncated)
        counts = []
        for i in range(len(fov)):
            plan = plan_crops(studies.shapes[i], crop, studies.bboxes[i], studies.complete[i])
            counts.append(plan.forward_passes)
            whole = ~plan.larger_than_crop & (plan.crop_of >= 0)
            assert (plan.crop_of >= 0).tolist() == studies.complete[i].tolist()
            for a in np.flatnonzero(whole):
                assert crop_valid(studies.bboxes[i], plan.starts[plan.crop_of[a]], crop)[a]
        passes[name] = np.mean(counts)
    assert passes["proposed"] <= 1.1  # one forward pass holds the whole chest
    assert passes["today"] >= 3.0
