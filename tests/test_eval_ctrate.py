"""`fvlm eval-ctrate` end to end on a CT-RATE-layout folder made from the phantom (chest preset)."""

from __future__ import annotations

import json

import pandas as pd
from eval_fixtures import chest_preprocess_config, tiny_checkpoint

from fvlm.anatomy import load_anatomy_table
from fvlm.cli import main as fvlm_main
from fvlm.evaluation.ctrate import CTRATE_LABELS
from fvlm.phantom import generate_phantom
from fvlm.phantom.ctrate_layout import write_ctrate_like


def test_eval_ctrate_scores_all_18_labels_without_double_rescale(tmp_path):
    phantom = tmp_path / "phantom"
    generate_phantom(phantom, n_studies=8, seed=3, shape=(24, 32, 32), spacing=(12.0, 9.0, 9.0),
                     splits=(0.0, 0.0, 1.0), progress=False)  # fmt: skip
    ctrate = tmp_path / "ctrate"
    write_ctrate_like(phantom, ctrate)
    config = chest_preprocess_config(tmp_path / "chest_small.yaml")
    table = load_anatomy_table("chest")
    ckpt = tiny_checkpoint(tmp_path / "chest.ckpt", len(table))
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
    for key in keys:
        assert results.loc[key, "n_pos"] + results.loc[key, "n_neg"] == 8
        assert results.loc[key, "n_pos"] == labels[key].sum()
    scores = pd.read_csv(out / "fVLM" / "scores.csv", index_col=0)
    assert scores.shape == (8, 18) and scores.notna().all().all()
