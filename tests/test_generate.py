"""``fvlm generate``: a report generator's export (no pickle) and its reports for scans or a split.

Builds on the fixture of tests/test_pretrained.py (a tiny phantom, its cache, a tiny fVLM
checkpoint): a tiny ReportGenerationModule trains two steps on that cache through a Lightning
Trainer and is saved as a checkpoint. Whatever path a study takes (a NIfTI preprocessed with the
recipe, or the cache itself; the exported folder, or the .ckpt), its report must be the string the
module itself generates from the cached study's crop (greedy decoding).
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from test_pretrained import Trained, make_trained

from fvlm import cli
from fvlm.anatomy import load_anatomy_table
from fvlm.data_modules import CTReportDataModule
from fvlm.data_modules.collate import collate_studies
from fvlm.data_modules.study_dataset import CachedStudyDataset, whole_report_text
from fvlm.generate import PretrainedReportGenerator
from fvlm.lit_modules.report_generation import ReportGenerationModule
from fvlm.models import VisionConfig
from fvlm.preprocess.cache import StudyCache
from fvlm.preprocess.config import table_fingerprint
from fvlm.pretrained import CONFIG_NAME, WEIGHTS_NAME, table_to_dict

CROP = (8, 16, 16)
MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class Report:
    """A trained report generator: the module in memory, its checkpoint, its exported folder."""

    module: ReportGenerationModule
    ckpt: Path
    folder: Path


def train_report_generator(
    root: Path, trained: Trained, mode: str, encoder: str | None, **options: Any
) -> Report:
    """Two training steps on the fixture cache, a checkpoint through the Trainer, its export.

    The decoder is MiniLM's first layer unless ``options`` give a ``decoder_config``.
    """
    torch.manual_seed(0)
    data = CTReportDataModule(
        str(trained.cache), tokenizer="minilm", crop_size=CROP, batch_size=2, num_workers=0,
        train_split="test", val_split="test", crop_check="off",
    )  # fmt: skip
    module = ReportGenerationModule(
        num_anatomies=data.num_anatomies,
        vision=VisionConfig.vit_tiny(img_size=CROP, patch_size=(4, 8, 8), hidden_size=16),
        encoder_checkpoint=encoder,
        mode=mode,
        max_target_length=64,
        max_new_tokens=MAX_NEW_TOKENS,
        **options,
    )
    trainer = Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    ckpt = root / f"report_{mode}.ckpt"
    trainer.save_checkpoint(ckpt)
    folder = root / f"report_{mode}"
    assert cli.main(["export", "--ckpt", str(ckpt), "--out", str(folder)]) == 0
    return Report(module.eval(), ckpt, folder)


def own_reports(report: Report, cache: Path, studies: list[str]) -> dict[str, str]:
    """The module's own ``generate_reports`` on the test loop's crops of ``studies`` (one batch)."""
    dataset = CachedStudyDataset(cache, "test", load_anatomy_table("paper"), CROP, train=False)
    samples = [dataset[dataset.study_ids.index(s)] for s in studies]
    batch = collate_studies(samples, pad_token_id=dataset.pad_token_id)
    with torch.no_grad():
        return dict(zip(studies, report.module.generate_reports(batch), strict=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> Trained:
    return make_trained(tmp_path_factory.mktemp("generate"), tiny_bert())


@pytest.fixture(scope="module")
def whole(trained, tmp_path_factory) -> Report:
    """Whole-report generation on the fVLM checkpoint's encoder (a copy, deleted after export)."""
    root = tmp_path_factory.mktemp("whole")
    encoder = root / "encoder.ckpt"
    shutil.copy(trained.ckpt, encoder)
    report = train_report_generator(root, trained, "whole", str(encoder), decoder_layers=1)
    encoder.unlink()  # the exported folder must not need it
    return report


@pytest.fixture(scope="module")
def anatomy_wise(trained, tmp_path_factory, tiny_bert) -> Report:
    """Anatomy-wise generation on a random encoder of 8 tokens per crop, a compact vocabulary."""
    root = tmp_path_factory.mktemp("anatomy")
    return train_report_generator(
        root, trained, "anatomy", None, decoder_config=tiny_bert(), output_vocabulary="targets"
    )


def test_export_is_safetensors_and_json_and_loads_without_pickle(whole, monkeypatch):
    files = sorted(p.relative_to(whole.folder).as_posix() for p in whole.folder.rglob("*"))
    assert CONFIG_NAME in files and WEIGHTS_NAME in files
    for name in files:
        path = whole.folder / name
        if path.is_file() and name != WEIGHTS_NAME:
            assert path.suffix in (".json", ".txt"), name
            assert not path.read_bytes().startswith(b"\x80"), name  # no pickle header
    config = json.loads((whole.folder / CONFIG_NAME).read_text())
    hparams = config["module"]["hyper_parameters"]
    assert config["format"] == "fvlm-report-generator" and config["crop_size"] == list(CROP)
    assert hparams["encoder_checkpoint"] is None and hparams["text_model"] == "tokenizer"
    assert hparams["vision"]["patch_size"] == [8, 16, 16]  # the fVLM encoder's, not `vision`'s
    # MiniLM's first layer, rebuilt from its BertConfig (no text weights needed).
    assert hparams["decoder_config"]["hidden_size"] == 384 and hparams["decoder_layers"] is None
    assert hparams["decoder_config"]["num_hidden_layers"] == 1
    assert config["preprocessing"]["spacing"] == [12.0, 9.0, 9.0]
    assert len(config["anatomy_table"]["anatomies"]) == 35

    def refuse(*args, **kwargs):
        raise AssertionError("a report-generator folder must load without unpickling")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded = PretrainedReportGenerator.from_pretrained(whole.folder).module.state_dict()
    reference = whole.module.state_dict()
    assert loaded.keys() == reference.keys()
    assert max(float((loaded[k] - reference[k]).abs().max()) for k in reference) == 0.0


@pytest.mark.parametrize("name", ["whole", "anatomy_wise"])
def test_a_phantom_nifti_gets_the_report_of_its_cached_crop(name, request, trained, tmp_path,
                                                            capsys):  # fmt: skip
    report: Report = request.getfixturevalue(name)
    study_id, image, mask = trained.scan(1)
    out, work = tmp_path / "reports.csv", tmp_path / "work"
    code = cli.main(["generate", "--model", str(report.folder), "--scans", str(image),
                     "--mask", str(mask), "--out", str(out), "--work_dir", str(work),
                     "--progress", "false"])  # fmt: skip
    assert code == 0
    # The scan went through the training cache's recipe: the very arrays of its cached copy.
    ours = StudyCache(work / "cache").open_arrays(study_id)
    for a, b in zip(ours, StudyCache(trained.cache).open_arrays(study_id), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = pd.read_csv(out, keep_default_na=False)
    assert rows.columns.tolist() == ["study_id", "image", "generated", "error"]
    assert rows["study_id"].tolist() == [study_id] and rows["error"].tolist() == [""]
    expected = own_reports(report, trained.cache, [study_id])[study_id]
    assert rows["generated"][0] == expected and expected.strip()
    printed = capsys.readouterr().out
    mode = report.module.hparams.mode
    assert "generate: 1 of 1 studies" in printed and f"{mode} report, greedy" in printed


def test_a_cache_split_with_its_references(whole, trained, tmp_path, capsys):
    studies = StudyCache(trained.cache).ok_studies("test")
    expected = own_reports(whole, trained.cache, studies)
    out = tmp_path / "reports.jsonl"
    base = ["generate", "--cache", str(trained.cache), "--split", "test", "--out", str(out),
            "--progress", "false"]  # fmt: skip
    assert cli.main([*base, "--model", str(whole.folder)]) == 0
    rows = pd.read_json(out, lines=True)
    assert rows.columns.tolist() == ["study_id", "generated", "reference"]
    assert dict(zip(rows["study_id"], rows["generated"], strict=True)) == expected
    cache = StudyCache(trained.cache)
    assert rows["reference"].tolist() == [whole_report_text(cache.study_report(s)) for s in studies]
    printed = capsys.readouterr().out
    assert f"generate: {len(studies)} of {len(studies)} studies" in printed and "bleu4" in printed
    # The .ckpt itself is rebuilt as `fvlm test --ckpt_path` would: from its encoder
    # checkpoint, which is gone here (the anatomy-wise test runs a .ckpt through).
    code = cli.main([*base, "--model", str(whole.ckpt)])
    error = capsys.readouterr().err
    assert code == 2 and "encoder.ckpt, which is gone" in error
    assert len(error.strip().splitlines()) == 1


def test_anatomy_wise_reports_name_the_table_anatomies(anatomy_wise, trained, tmp_path):
    studies = StudyCache(trained.cache).ok_studies("test")
    expected = own_reports(anatomy_wise, trained.cache, studies)  # names from the fit's data
    assert len(set(expected.values())) > 1  # the reports depend on the scan
    assert all("no significant abnormalities" in text for text in expected.values())
    assert not any("anatomy " in text for text in expected.values())
    for model in (anatomy_wise.folder, anatomy_wise.ckpt):
        out = tmp_path / f"{Path(model).stem}.csv"
        assert cli.main(["generate", "--model", str(model), "--cache", str(trained.cache),
                         "--out", str(out), "--progress", "false"]) == 0  # fmt: skip
        rows = pd.read_csv(out, keep_default_na=False)
        assert dict(zip(rows["study_id"], rows["generated"], strict=True)) == expected


def test_bad_input_is_a_one_line_error(whole, trained, tmp_path, capsys):
    _, image, mask = trained.scan(0)
    out = str(tmp_path / "r.csv")

    def error(*args: str) -> str:
        assert cli.main(["generate", *args, "--progress", "false"]) == 2
        text = capsys.readouterr().err.strip()
        assert len(text.splitlines()) == 1, text
        return text

    model = ["--model", str(whole.folder)]
    assert "no such scan" in error(*model, "--scans", str(tmp_path / "no.nii.gz"), "--out", out)
    assert "--mask" in error(*model, "--scans", str(image), "--out", out)
    assert ".csv or .jsonl" in error(*model, "--scans", str(image), "--out", str(tmp_path / "r"))
    assert "either --scans" in error(*model, "--out", out)
    text = error("--model", str(trained.ckpt), "--scans", str(image), "--mask", str(mask),
                 "--out", out)  # fmt: skip
    assert "not a report-generation checkpoint" in text and "'fine_grained'" in text
    assert "fvlm predict" in text
    assert "fvlm predict" in error("--model", str(trained.folder), "--scans", str(image),
                                   "--mask", str(mask), "--out", out)  # fmt: skip
    # A cache grouped with another anatomy table.
    other = tmp_path / "other_cache"
    shutil.copytree(trained.cache, other)
    for meta in other.glob("studies/*/meta.json"):
        record = json.loads(meta.read_text())
        record["settings"]["anatomy_table"] = {"name": "chest", "sha256": "0" * 64}
        meta.write_text(json.dumps(record))
    text = error(*model, "--cache", str(other), "--out", out)
    assert "anatomy table 'chest', not with 'paper'" in text
    text = error(*model, "--cache", str(trained.cache), "--split", "train", "--out", out)
    assert "no 'ok' study in split 'train'" in text
    # A folder whose table is not its recipe's.
    edited = tmp_path / "edited"
    shutil.copytree(whole.folder, edited)
    config = json.loads((edited / CONFIG_NAME).read_text())
    config["anatomy_table"]["anatomies"] = config["anatomy_table"]["anatomies"][:-1]
    (edited / CONFIG_NAME).write_text(json.dumps(config))
    assert "fingerprints differ" in error("--model", str(edited), "--cache", str(trained.cache),
                                          "--out", out)  # fmt: skip
    # A consistent folder of another anatomy table than its weights'.
    chest = load_anatomy_table("chest")
    config = json.loads((whole.folder / CONFIG_NAME).read_text())
    config["anatomy_table"] = table_to_dict(chest)
    config["preprocessing"]["anatomy_table"] = {"name": "chest", "sha256": table_fingerprint(chest)}
    (edited / CONFIG_NAME).write_text(json.dumps(config))
    text = error("--model", str(edited), "--cache", str(trained.cache), "--out", out)
    assert f"trained on 35 anatomies but its anatomy table 'chest' has {len(chest)}" in text
    assert str(edited) in text


def test_the_example_config(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--config", "generate", "--scans", "ct.nii.gz", "--print_config"])
    assert exited.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"] == "runs/report/pretrained" and printed["scans"] == "ct.nii.gz"
    assert printed["out"].endswith(".csv") and printed["split"] == "test"
