"""The pretrained folder (safetensors + JSON, never pickle), ``fvlm export`` and the ``FVLM`` API.

A tiny phantom is preprocessed into a cache; a tiny checkpoint stands for the model trained on it.
The API must preprocess a user's scan exactly as that cache was made: its embedding of a cached
study equals the evaluation's embedding of the cached copy, bit for bit.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from eval_fixtures import tiny_checkpoint

from fvlm import FVLM, cli
from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import load_network
from fvlm.evaluation.embedding import embed_studies
from fvlm.phantom import generate_phantom
from fvlm.preprocess.cache import StudyCache
from fvlm.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Scan,
    _table_from_dict,
    parse_query,
    table_to_dict,
)

TINY = {"shape": [24, 32, 32], "spacing": [12.0, 9.0, 9.0], "progress": False}


@dataclass(frozen=True)
class Trained:
    """A phantom, its preprocessing cache, a tiny checkpoint and its exported folder."""

    phantom: Path
    manifest: pd.DataFrame
    cache: Path
    ckpt: Path
    folder: Path

    def scan(self, index: int) -> tuple[str, Path, Path]:
        """Study id, image and mask of the phantom's ``index``-th study."""
        row = self.manifest.iloc[index]
        return row["study_id"], self.phantom / row["image"], self.phantom / row["mask"]


def make_trained(root: Path, tiny_bert: dict, n_studies: int = 3) -> Trained:
    """Build the fixture (also used by tests/test_predict.py)."""
    phantom = root / "phantom"
    manifest = generate_phantom(phantom, n_studies=n_studies, splits=(0.0, 0.0, 1.0), **TINY)
    cache = root / "cache"
    code = cli.main([
        "preprocess", "--config", "phantom", "--manifest", str(manifest), "--cache", str(cache),
        "--spacing", "[12, 9, 9]", "--progress", "false", "--workers", "1",
    ])  # fmt: skip
    assert code == 0
    table = load_anatomy_table("paper")
    ckpt = tiny_checkpoint(root / "tiny.ckpt", len(table), tiny_bert)
    folder = root / "pretrained"
    code = cli.main(["export", "--ckpt", str(ckpt), "--out", str(folder), "--cache", str(cache)])
    assert code == 0
    return Trained(phantom, pd.read_csv(manifest), cache, ckpt, folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> Trained:
    return make_trained(tmp_path_factory.mktemp("pretrained"), tiny_bert())


def test_folder_holds_only_safetensors_json_and_tokenizer_text(trained):
    files = sorted(p.relative_to(trained.folder).as_posix() for p in trained.folder.rglob("*"))
    assert CONFIG_NAME in files and WEIGHTS_NAME in files
    for name in files:
        path = trained.folder / name
        if path.is_dir() or name == WEIGHTS_NAME:
            continue
        assert path.suffix in (".json", ".txt"), name  # no .bin/.pt/.pkl anywhere
        assert not path.read_bytes().startswith(b"\x80"), name  # no pickle protocol header
    config = json.loads((trained.folder / CONFIG_NAME).read_text())
    assert config["crop_size"] == [8, 16, 16] and config["network"]["kind"] == "fine_grained"
    assert config["preprocessing"]["spacing"] == [12.0, 9.0, 9.0]
    assert config["preprocessing"]["hu_window"] == [-1000.0, 1000.0]
    assert len(config["anatomy_table"]["anatomies"]) == 35  # the full table, not a preset name
    assert config["network"]["options"]["vision"]["init_from"] is None


def test_export_equals_load_network_and_loading_never_unpickles(trained, monkeypatch):
    reference = load_network(trained.ckpt).network.state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained folder must load without unpickling")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    model = FVLM.from_pretrained(trained.folder)
    loaded = model.network.state_dict()
    assert loaded.keys() == reference.keys()
    assert max(float((loaded[k] - reference[k]).abs().max()) for k in reference) == 0.0
    assert not model.network.training


def test_embedding_of_a_scan_equals_the_training_cache_and_survives_a_round_trip(trained, tmp_path):
    """A scan through the API = the same scan through `fvlm preprocess` + evaluation."""
    model = FVLM.from_pretrained(trained.folder)
    study_id, image, mask = trained.scan(0)
    emb = model.embed(image, mask)
    cached = embed_studies(
        load_network(trained.ckpt), trained.cache, "test", model.table, progress=False
    )
    row = cached.study_ids.index(study_id)
    assert emb.embeddings.shape == (35, 8) and emb.anatomies == model.table.names
    np.testing.assert_array_equal(emb.valid, cached.valid[row].numpy())
    # Crops of three studies share the evaluation's batches, one study's crops the API's: the
    # float summation order differs, nothing else (the preprocessed arrays are identical).
    assert np.abs(emb.embeddings - cached.embeddings[row].numpy()).max() < 1e-6
    model.preprocess([Scan(study_id, image, mask)], tmp_path / "cache")
    ours = StudyCache(tmp_path / "cache").open_arrays(study_id)
    theirs = StudyCache(trained.cache).open_arrays(study_id)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert emb.valid.sum() >= 10 and not emb.valid[~emb.present].any()
    assert np.allclose(np.linalg.norm(emb.embeddings[emb.valid], axis=1), 1.0, atol=1e-5)

    again = FVLM.from_pretrained(model.save_pretrained(tmp_path / "again")).embed(image, mask)
    assert np.abs(again.embeddings - emb.embeddings).max() == 0.0

    # The same scan given as arrays with its affine.
    nifti, labels = nib.load(image), nib.load(mask)
    arrays = model.embed(
        np.asarray(nifti.dataobj, dtype=np.float32), np.asarray(labels.dataobj), nifti.affine
    )
    assert np.abs(arrays.embeddings - emb.embeddings).max() == 0.0


def test_zero_shot_probabilities_and_queries(trained):
    model = FVLM.from_pretrained(trained.folder)
    _, image, mask = trained.scan(1)
    emb = model.embed(image, mask)
    scores = model.zero_shot(emb, queries=["Liver: hepatic steatosis", "scan: ascites"])
    assert len(scores) == len(model.table.diseases()) + 2
    scored = scores["probability"].dropna()
    assert len(scored) >= 10 and ((scored > 0) & (scored < 1)).all()
    query = scores[scores["query"]].set_index("anatomy")
    assert list(query.index) == ["liver", "scan"] and query["finding"].tolist()[0] == (
        "hepatic steatosis"
    )
    # Not evaluable anatomy -> NaN, never a number.
    invalid = {n for n, v in zip(emb.anatomies, emb.valid, strict=True) if not v}
    assert scores.loc[scores["anatomy"].isin(invalid), "probability"].isna().all()
    # The probability is the softmax of positive vs negative prompt logits (sigmoid of the gap).
    logits = np.log(scored / (1 - scored))
    assert np.isfinite(logits).all()


def test_from_checkpoint_without_a_cache_names_both_sources(trained, tmp_path):
    with pytest.raises(ValueError, match=r"tiny\.ckpt.*--cache None.*data\.cache_dir None"):
        FVLM.from_checkpoint(trained.ckpt)
    code = cli.main(["export", "--ckpt", str(trained.ckpt), "--out", str(tmp_path / "x"),
                     "--cache", str(tmp_path / "nowhere")])  # fmt: skip
    assert code == 2 and not (tmp_path / "x").exists()


def test_old_or_foreign_checkpoint_is_refused_with_load_networks_error(tmp_path):
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, old)
    with pytest.raises(ValueError, match=r"old\.ckpt: not an fvlm checkpoint"):
        FVLM.from_checkpoint(old, tmp_path)


def _edited_copy(trained: Trained, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(trained.folder, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


def test_table_or_config_that_does_not_fit_the_weights_names_the_folder(trained, tmp_path):
    def drop_anatomy(config):
        config["anatomy_table"]["anatomies"].pop()

    folder = _edited_copy(trained, tmp_path / "a", drop_anatomy)
    with pytest.raises(ValueError, match=f"{folder}: its anatomy table 'paper' is not the one"):
        FVLM.from_pretrained(folder)

    def widen(config):
        config["network"]["options"]["embed_dim"] = 16

    folder = _edited_copy(trained, tmp_path / "b", widen)
    with pytest.raises(ValueError, match=f"{folder}: model.safetensors does not fit config.json"):
        FVLM.from_pretrained(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match="not an fvlm pretrained folder"):
        FVLM.from_pretrained(folder)


def test_hub_ids_and_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a pretrained folder nor"):
        FVLM.from_pretrained(tmp_path / "missing" / "deep" / "folder")
    with pytest.raises(ValueError, match="no-such-owner/no-such-fvlm.*Hugging Face Hub"):
        FVLM.from_pretrained("no-such-owner/no-such-fvlm")  # offline in tests: a clear error


def test_anatomy_table_travels_whole(paper_table, chest_table, tmp_path):
    for table in (paper_table, chest_table):
        again = _table_from_dict(json.loads(json.dumps(table_to_dict(table))), tmp_path)
        assert again.anatomies == table.anatomies
        assert again.global_diseases == table.global_diseases and again.name == table.name


def test_queries(paper_table):
    query = parse_query("Liver : hepatic steatosis", paper_table)
    assert (query.anatomy, query.terms, query.key) == (
        "liver", ("hepatic steatosis",), "liver/query:hepatic_steatosis"
    )  # fmt: skip
    assert parse_query("small bowel: obstruction", paper_table).anatomy == "small_bowel"
    assert parse_query("scan: ascites", paper_table).anatomy is None
    with pytest.raises(ValueError, match="unknown anatomy 'livre'"):
        parse_query("livre: steatosis", paper_table)
    with pytest.raises(ValueError, match="'anatomy: finding'"):
        parse_query("steatosis", paper_table)


def test_heatmap_api_writes_a_nifti_on_the_input_grid(trained, tmp_path):
    model = FVLM.from_pretrained(trained.folder)
    _, image, mask = trained.scan(0)
    files = model.heatmap(image, mask, "liver: hepatic steatosis", tmp_path / "maps")
    assert [f.suffix for f in files] == [".gz", ".png"]
    heat, source = nib.load(files[0]), nib.load(image)
    assert heat.shape == source.shape and np.allclose(heat.affine, source.affine)
    liver = np.isin(np.asarray(nib.load(mask).dataobj), [5])  # TotalSegmentator v2: liver
    values = np.asarray(heat.dataobj)
    assert np.abs(values).max() > 0 and np.abs(values[~liver]).max() < np.abs(values).max()
    with pytest.raises(ValueError, match="unknown anatomy"):
        model.heatmap(image, mask, "livre: steatosis", tmp_path / "maps")
