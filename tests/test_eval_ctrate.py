"""`fvlm eval-ctrate` end to end on a CT-RATE-layout folder made from the phantom (chest preset).

The phantom's chest geometry has real millimetre extents (lungs whole, the upper abdomen cut), on a
coarse grid larger than the tiny model's crop, so evaluation runs on planned crops.
"""

from __future__ import annotations

import json

import pandas as pd
from eval_fixtures import chest_preprocess_config, tiny_checkpoint

from fvlm.anatomy import load_anatomy_table
from fvlm.cli import main as fvlm_main
from fvlm.evaluation.ctrate import CTRATE_LABELS
from fvlm.phantom import generate_phantom
from fvlm.phantom.ctrate_layout import write_ctrate_like

SPACING = (10.0, 12.0, 12.0)


def test_eval_ctrate_scores_all_18_labels_without_double_rescale(tmp_path, tiny_bert, capsys):
    phantom = tmp_path / "phantom"
    generate_phantom(phantom, n_studies=8, seed=3, geometry="chest", spacing=SPACING,
                     splits=(0.0, 0.0, 1.0), progress=False)  # fmt: skip
    ctrate = tmp_path / "ctrate"
    write_ctrate_like(phantom, ctrate)
    config = chest_preprocess_config(tmp_path / "chest_small.yaml", spacing=SPACING)
    table = load_anatomy_table("chest")
    ckpt = tiny_checkpoint(tmp_path / "chest.ckpt", len(table), tiny_bert())
    out = tmp_path / "eval"
    code = fvlm_main([
        "eval-ctrate", "--root", str(ctrate), "--ckpt", str(ckpt), "--name", "fVLM",
        "--cache", str(tmp_path / "cache"), "--preprocess_config", str(config),
        "--workers", "1", "--out", str(out),
    ])  # fmt: skip
    assert code in (None, 0)

    # Every study preprocessed; the stale metadata intercept was detected, not applied twice.
    cache_manifest = pd.read_csv(tmp_path / "cache" / "manifest.csv")
    assert (cache_manifest["status"] == "ok").all() and len(cache_manifest) == 8
    for study in cache_manifest["study_id"]:
        meta = json.loads((tmp_path / "cache" / "studies" / study / "meta.json").read_text())
        assert meta["rescale"]["applied"] is False, meta["rescale"]
        assert meta["table"] == "chest"

    # All 18 CT-RATE labels are scored (2 of them on the whole-scan embedding) + the macro row.
    results = pd.read_csv(out / "fVLM" / "fVLM_per_disease.csv", index_col=0)
    keys = {d.key for d in table.diseases("ctrate")}
    assert len(keys) == 18 == len(CTRATE_LABELS)
    assert set(results.index) == keys | {"macro"}
    labels = pd.read_csv(tmp_path / "cache" / "inputs" / "labels.csv")
    scores = pd.read_csv(out / "fVLM" / "scores.csv", index_col=0)
    assert scores.shape == (8, 18)
    for key in keys:
        row = results.loc[key]
        # Every study is either scored and counted in n_pos/n_neg, or not evaluable and NaN.
        assert row["n_pos"] + row["n_neg"] == row["evaluated"] == 8 - row["not_evaluable"]
        assert row["not_evaluable"] == scores[key].isna().sum()
        evaluated = scores.index[scores[key].notna()]
        assert row["n_pos"] == labels.set_index("study_id").loc[evaluated, key].sum()
    # Lungs, heart, aorta, esophagus and trachea are whole in a chest scan: every label counts.
    assert (results.loc[sorted(keys), "not_evaluable"] == 0).all()
    assert scores.notna().all().all()
    # The volumes are larger than the crop (8 x 16 x 16): several crops per study.
    summary = json.loads((out / "fVLM" / "fVLM_summary.json").read_text())
    passes = summary["evaluation"]["forward_passes_per_study"]
    assert passes["crop_size"] == [8, 16, 16] and passes["crop_rule"] == "plan"
    assert 1 < passes["mean"] <= passes["max"]
    printed = capsys.readouterr().out
    assert "forward passes per study, fVLM: mean" in printed and "Studies per disease" in printed
