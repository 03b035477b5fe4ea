"""``fvlm predict``: a batch of scans -> per-scan findings, embeddings, heatmaps; failures listed.

Builds on the fixture of tests/test_pretrained.py (a tiny phantom, its cache, a tiny model).
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from test_pretrained import make_trained

from fvlm import FVLM, cli
from fvlm.anatomy import load_anatomy_table
from fvlm.predict import collect_scans


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    return make_trained(tmp_path_factory.mktemp("predict"), tiny_bert())


def test_a_batch_writes_every_scan_and_lists_the_one_that_fails(trained, tmp_path, capsys):
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    shutil.copytree(trained.phantom / "images", scans)
    shutil.copytree(trained.phantom / "masks", masks)
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    (masks / "broken.nii.gz").write_bytes(b"nor a mask")
    out = tmp_path / "out"
    code = cli.main([
        "predict", "--model", str(trained.folder), "--scans", str(scans), "--mask", str(masks),
        "--query", "liver: hepatic steatosis", "--query", "kidney: renal cyst",
        "--out", str(out), "--progress", "false",
    ])  # fmt: skip
    assert code == 1  # one scan failed
    failed = pd.read_csv(out / "failed.csv")
    assert failed["study_id"].tolist() == ["broken"] and "broken.nii.gz" in failed["reason"][0]
    table = load_anatomy_table("paper")
    n_findings = len(table.diseases()) + 2
    printed = capsys.readouterr().out
    for study_id in trained.manifest["study_id"]:
        folder = out / study_id
        findings = pd.read_csv(folder / "findings.csv")
        assert len(findings) == n_findings
        probability = findings["probability"].dropna()
        assert len(probability) >= 10 and probability.between(0, 1).all()
        assert findings["query"].sum() == 2
        record = json.loads((folder / "findings.json").read_text())
        assert len(record["findings"]) == n_findings and "softmax" in record["definitions"][
            "probability"]  # fmt: skip
        npz = np.load(folder / "embeddings.npz")
        assert npz["embeddings"].shape == (len(table), 8)
        assert npz["anatomies"].tolist() == table.names
        # Rows of anatomies that are not valid score NaN; valid ones are unit vectors.
        valid = npz["valid"]
        assert not valid[~npz["present"]].any()
        assert np.allclose(np.linalg.norm(npz["embeddings"][valid], axis=1), 1.0, atol=1e-5)
        invalid = set(npz["anatomies"][~valid])
        assert findings.loc[findings["anatomy"].isin(invalid), "probability"].isna().all()
        # Heatmaps of the top findings and the queries, aligned with the input scan's grid.
        niftis = sorted((folder / "heatmaps").glob("*.nii.gz"))
        assert niftis and len(niftis) == len(record["heatmaps"]) // 2
        source = nib.load(trained.phantom / "images" / f"{study_id}.nii.gz")
        heat = nib.load(niftis[0])
        assert heat.shape == source.shape and np.allclose(heat.affine, source.affine)
        assert np.abs(np.asarray(heat.dataobj)).max() > 0
        assert (folder / "summary.png").stat().st_size > 10_000
        assert f"{study_id}: top findings" in printed


def test_mask_on_another_grid_fails_that_scan(trained, tmp_path):
    study_id, image, mask = trained.scan(0)
    labels = nib.load(mask)
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj)[1:], labels.affine), shifted)
    out = tmp_path / "out"
    code = cli.main(["predict", "--model", str(trained.folder), "--scans", str(image),
                     "--mask", str(shifted), "--out", str(out), "--progress", "false",
                     "--heatmaps", "false"])  # fmt: skip
    assert code == 1
    reason = pd.read_csv(out / "failed.csv").set_index("study_id").loc[study_id, "reason"]
    assert "shifted.nii.gz" in reason and "\n" not in reason
    assert not (out / study_id).exists()


def test_bad_queries_and_missing_masks_are_one_line_errors(trained, tmp_path, capsys):
    _, image, mask = trained.scan(0)
    base = ["predict", "--model", str(trained.folder), "--scans", str(image), "--out",
            str(tmp_path / "out"), "--progress", "false"]  # fmt: skip
    assert cli.main([*base, "--mask", str(mask), "--query", "livre: steatosis"]) == 2
    error = capsys.readouterr().err.strip()
    assert "unknown anatomy 'livre'" in error and len(error.splitlines()) == 1
    assert cli.main(base) == 2
    error = capsys.readouterr().err
    assert "--mask" in error and "--segmenter totalsegmentator" in error


def test_a_checkpoint_and_a_manifest_work_too(trained, tmp_path):
    rows = trained.manifest[["study_id", "image", "mask"]].head(2)
    rows = rows.assign(image=[str(trained.phantom / p) for p in rows["image"]],
                       mask=[str(trained.phantom / p) for p in rows["mask"]])  # fmt: skip
    manifest = tmp_path / "scans.csv"
    rows.to_csv(manifest, index=False)
    assert [s.study_id for s in collect_scans(manifest)] == rows["study_id"].tolist()
    out = tmp_path / "out"
    code = cli.main(["predict", "--model", str(trained.ckpt), "--cache", str(trained.cache),
                     "--scans", str(manifest), "--out", str(out), "--progress", "false",
                     "--heatmaps", "false"])  # fmt: skip
    assert code == 0 and pd.read_csv(out / "failed.csv").empty
    from_ckpt = np.load(out / rows["study_id"].iloc[0] / "embeddings.npz")["embeddings"]
    folder_out = tmp_path / "folder_out"  # the same batch: crops batched alike, same floats
    assert cli.main(["predict", "--model", str(trained.folder), "--scans", str(manifest),
                     "--out", str(folder_out), "--progress", "false",
                     "--heatmaps", "false"]) == 0  # fmt: skip
    from_folder = np.load(folder_out / rows["study_id"].iloc[0] / "embeddings.npz")["embeddings"]
    assert np.abs(from_ckpt - from_folder).max() == 0.0


def test_the_example_config_and_repeated_queries(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["predict", "--config", "predict", "--scans", "ct.nii.gz", "--query",
                  "spleen: splenomegaly", "--print_config"])  # fmt: skip
    assert exited.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["scans"] == "ct.nii.gz" and printed["model"] == "runs/demo/pretrained"
    assert printed["query"] == [
        "liver: hepatic steatosis", "kidney: renal cyst", "spleen: splenomegaly"
    ]  # fmt: skip


def test_a_dicom_series_folder_is_one_scan(trained, tmp_path):
    from test_dicom import write_series

    study_id, image, mask = trained.scan(0)
    nifti = nib.load(image)
    series = tmp_path / "series"
    write_series(series, np.asarray(nifti.dataobj, dtype=np.float32), nifti.affine)
    assert [(s.study_id, s.image) for s in collect_scans(series, mask)] == [("series", series)]
    out = tmp_path / "out"
    code = cli.main(["predict", "--model", str(trained.folder), "--scans", str(series),
                     "--mask", str(mask), "--out", str(out), "--progress", "false",
                     "--heatmaps", "false"])  # fmt: skip
    assert code == 0
    dicom = np.load(out / "series" / "embeddings.npz")
    reference = FVLM.from_pretrained(trained.folder).embed(image, mask)
    np.testing.assert_array_equal(dicom["valid"], reference.valid)
    assert np.abs(dicom["embeddings"] - reference.embeddings).max() < 1e-4


def test_a_query_worded_like_a_table_finding_keeps_both_heatmaps(trained, tmp_path):
    """The table's "liver hepatic steatosis" and the query "liver: hepatic steatosis" share a
    name: both heatmaps are written (one with ``__2``), none overwrites the other."""
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    study = trained.manifest["study_id"].iloc[0]
    scans.mkdir(), masks.mkdir()
    shutil.copy(trained.phantom / "images" / f"{study}.nii.gz", scans)
    shutil.copy(trained.phantom / "masks" / f"{study}.nii.gz", masks)
    out = tmp_path / "out"
    code = cli.main([
        "predict", "--model", str(trained.folder), "--scans", str(scans), "--mask", str(masks),
        "--query", "liver: hepatic steatosis", "--top", "1000", "--out", str(out),
        "--progress", "false",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / study / "findings.json").read_text())
    names = {p.split("/")[-1] for p in record["heatmaps"]}
    assert {"liver__hepatic_steatosis.nii.gz", "liver__hepatic_steatosis__2.nii.gz"} <= names
    written = sorted((out / study / "heatmaps").glob("*"))
    assert len(written) == len(record["heatmaps"])  # every listed file exists, none twice
