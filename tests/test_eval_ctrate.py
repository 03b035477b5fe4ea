"""`fvlm eval-ctrate` end to end on a CT-RATE-layout folder made from the phantom (chest preset)."""

from __future__ import annotations

import json

import pandas as pd
import torch
import yaml
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from fvlm.anatomy import load_anatomy_table
from fvlm.cli import main as fvlm_main
from fvlm.evaluation.ctrate import CTRATE_LABELS, write_ctrate_like
from fvlm.lit_modules import FineGrainedCLIPModule
from fvlm.models import VisionConfig
from fvlm.phantom import generate_phantom

VISION = VisionConfig.vit_tiny(img_size=(8, 16, 16), patch_size=(8, 16, 16), hidden_size=16)
TEXT = {
    "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 32, "max_position_embeddings": 128,
}  # fmt: skip


def tiny_checkpoint(path, num_anatomies: int):
    """A chest-table checkpoint after one optimisation step (weights are not the point here)."""
    module = FineGrainedCLIPModule(
        num_anatomies=num_anatomies, vision=VISION, text_config=TEXT, embed_dim=8
    )
    b, a = 2, num_anatomies
    anatomy = torch.zeros(b, 8, 16, 16, dtype=torch.uint8)
    anatomy[:, :, :8] = 1
    anatomy[:, :, 8:] = 2
    batch = {
        "image": torch.rand(b, 1, 8, 16, 16),
        "anatomy": anatomy,
        "valid": torch.ones(b, a, dtype=torch.bool),
        "normal": torch.zeros(b, a, dtype=torch.bool),
        "text_input_ids": torch.randint(5, 100, (b, a, 4)),
        "text_attention_mask": torch.ones(b, a, 4, dtype=torch.long),
    }
    trainer = Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(path)
    return path


def test_eval_ctrate_scores_all_18_labels_without_double_rescale(tmp_path):
    phantom = tmp_path / "phantom"
    generate_phantom(phantom, n_studies=8, seed=3, shape=(24, 32, 32), spacing=(12.0, 9.0, 9.0),
                     splits=(0.0, 0.0, 1.0), progress=False)  # fmt: skip
    ctrate = tmp_path / "ctrate"
    write_ctrate_like(phantom, ctrate)
    config = tmp_path / "chest_small.yaml"
    config.write_text(yaml.safe_dump({
        "spacing": [12.0, 9.0, 9.0], "hu_window": [-1000.0, 1000.0], "anatomy_table": "chest",
        "segmenter": "precomputed", "rescale": "auto", "decomposer": "rules", "workers": 1,
    }))  # fmt: skip
    table = load_anatomy_table("chest")
    ckpt = tiny_checkpoint(tmp_path / "chest.ckpt", len(table))
    out = tmp_path / "eval"
    code = fvlm_main([
        "eval-ctrate", "--root", str(ctrate), "--ckpt", str(ckpt), "--name", "fVLM",
        "--cache", str(tmp_path / "cache"), "--preprocess-config", str(config),
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
