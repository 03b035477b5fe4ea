"""The phantom report-generation comparison, reduced: every (encoder, mode) row runs and scores.

Needs the demo's phantom cache and its fVLM / CLIP checkpoints (``make train-demo``); skipped
without them. Slow (minutes on 2 cores): deselected by default, run by ``make test-slow``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from fvlm.lit_modules.report_generation import report_demo

CACHE = Path("data/cache/phantom")
LABELS = Path("data/phantom/labels.csv")
CHECKPOINTS = {
    "clip": Path("runs/demo/clip/checkpoints/last.ckpt"),
    "fvlm": Path("runs/demo/fvlm/checkpoints/last.ckpt"),
}

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    not (CACHE.is_dir() and LABELS.is_file() and all(p.is_file() for p in CHECKPOINTS.values())),
    reason="needs the demo phantom cache and checkpoints (make preprocess train-demo)",
)
def test_reduced_report_demo_prints_the_table(tmp_path) -> None:
    table = report_demo(
        cache_dir=str(CACHE),
        labels=str(LABELS),
        encoders=["random", *(f"{k}={v}" for k, v in CHECKPOINTS.items())],
        out_dir=str(tmp_path),
        overrides=[
            "--trainer.max_epochs=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=4",
            "--model.init_args.max_new_tokens=96",
        ],
    )
    rows = {
        (cells[0], cells[1]): [float(c) for c in cells[2:]]
        for line in table.splitlines()
        if (cells := [c.strip() for c in line.strip("|").split("|")])[0]
        in ("random", "clip", "fvlm")
    }
    assert set(rows) == {(e, m) for e in ("random", "clip", "fvlm") for m in ("whole", "anatomy")}
    for values in rows.values():
        acc, bleu1 = values[0], values[2]
        assert 0.0 <= acc <= 1.0 and 0.0 <= bleu1 <= 1.0 and not math.isnan(values[5])
    f1 = float(re.search(r"F1 ([0-9.]+)", table).group(1))
    assert f1 > 0.5  # the clinical classifier's own F1 on held-out phantom reports
    assert rows[("fvlm", "anatomy")][0] >= rows[("random", "anatomy")][0]
    assert (tmp_path / "table.md").read_text().strip() == table.strip()
