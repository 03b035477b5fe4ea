"""The one-page scan summary: drawn from plain data, non-blank, and strict about its input."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from fvlm.evaluation.evaluability import AnatomyStatus
from fvlm.summary_page import save_summary_page, validity_names

SHAPE = (6, 20, 24)


def _scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image in [0, 1], two labelled organs, and a heat that peaks at voxel (3, 8, 6)."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[(((grid - (3, 8, 6)) / (2, 4, 4)) ** 2).sum(-1) < 1] = 5
    labels[(((grid - (3, 12, 17)) / (2, 3, 3)) ** 2).sum(-1) < 1] = 7
    image = np.where(labels > 0, 0.55, 0.4).astype(np.float32)
    heat = np.where(labels == 5, -np.abs(grid - (3, 8, 6)).sum(-1) / 10.0, np.nan)
    return image, labels, heat.astype(np.float32)


PROBABILITIES = pd.DataFrame({
    "anatomy": ["liver", "liver", "spleen", "kidney"],
    "finding": ["steatosis", "cyst", "splenomegaly", "cyst"],
    "probability": [0.82, 0.31, 0.64, np.nan],
})  # fmt: skip


@pytest.mark.parametrize("with_heat", [True, False])
def test_summary_page_is_written_and_not_blank(tmp_path, with_heat):
    image, labels, heat = _scan()
    path = save_summary_page(
        tmp_path / "out" / "summary.png", image, labels, (5.0, 1.5, 1.5), (-300.0, 400.0),
        PROBABILITIES, {"liver": "whole", "spleen": 0, "kidney": AnatomyStatus.ABSENT},
        anatomy_names={5: "liver", 7: "spleen"}, heat=heat if with_heat else None,
        heat_title="liver: steatosis", title="study s000",
    )  # fmt: skip
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    assert pixels[..., :3].var() > 1e-3


def test_validity_names_accept_names_and_statuses():
    states = validity_names(
        {"a": "whole", "b": 1, "c": AnatomyStatus.TRUNCATED, "d": "Larger than crop", "e": 3}
    )
    assert states == {
        "a": "whole", "b": "larger_than_crop", "c": "truncated", "d": "larger_than_crop",
        "e": "absent",
    }  # fmt: skip
    with pytest.raises(ValueError, match="anatomy 'x': unknown status 'missing'"):
        validity_names({"x": "missing"})
    with pytest.raises(ValueError, match="anatomy 'y': unknown status 9"):
        validity_names({"y": 9})


def test_bad_input_is_refused(tmp_path):
    image, labels, heat = _scan()
    args = ((5.0, 1.5, 1.5), (-300.0, 400.0))
    with pytest.raises(ValueError, match=r"lack columns \['probability'\]"):
        save_summary_page(
            tmp_path / "a.png", image, labels, *args, PROBABILITIES.drop(columns="probability"), {}
        )
    with pytest.raises(ValueError, match="must be one 3D grid"):
        save_summary_page(tmp_path / "b.png", image, labels[:3], *args, PROBABILITIES, {})
    with pytest.raises(ValueError, match="is not on the image grid"):
        save_summary_page(
            tmp_path / "c.png", image, labels, *args, PROBABILITIES, {}, heat=heat[:, :5]
        )
    assert not any(tmp_path.iterdir())
