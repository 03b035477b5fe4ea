"""`fvlm eval-radchestct` end to end on a Rad-ChestCT-layout folder made from the phantom.

The folder is written as the release stores it (``.npz`` arrays ``ct`` in HU, axes inferior,
posterior, left; ``imgtest_Abnormality_and_Location_Labels.csv``; the spacing in
``CT_Scan_Metadata_Complete_35747.csv``), plus precomputed TotalSegmentator maps on the same grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from eval_fixtures import chest_preprocess_config, tiny_checkpoint
from nibabel import orientations

from fvlm.anatomy import load_anatomy_table
from fvlm.cli import main as fvlm_main
from fvlm.evaluation import run as evaluate_module
from fvlm.evaluation.ctrate import ctrate_label_map
from fvlm.evaluation.radchestct import (
    RADCHESTCT_CALCIFICATION_MERGE,
    RADCHESTCT_TO_CTRATE,
    merge_max_scores,
    radchestct_affine,
)
from fvlm.evaluation.run import evaluate_checkpoint
from fvlm.phantom import generate_phantom
from fvlm.preprocess.manifest import read_manifest
from fvlm.preprocess.volume import NPZ_AXCODES, load_npz, load_volume

SPACING = 10.0  # isotropic, as the release (0.8 mm there)
NOT_EVALUABLE = {"lung/mosaic_attenuation", "heart/coronary_calcification"}
CORRUPT, MASK_ONLY = "tst00099", "tst00098"
PHANTOM_CHEST = {  # the phantom's diseases with a CT-RATE label and a Rad-ChestCT column
    "lung/emphysema", "lung/pleural_effusion", "lung/nodule", "heart/cardiomegaly",
    "heart/pericardial_effusion", "aorta/calcification",
}  # fmt: skip


def write_radchestct_like(phantom: Path, root: Path) -> pd.DataFrame:
    """The phantom as Rad-ChestCT; returns the CT-RATE-keyed labels written (by NoteAcc_DEID).

    Each phantom disease with a CT-RATE label goes to the first Rad-ChestCT abnormality mapped to
    that label (one location column); the other mapped abnormalities get a column of zeros. Two
    extra labelled studies: one whose volume is corrupt, one with a mask but no volume.
    """
    manifest = pd.read_csv(phantom / "manifest.csv")
    phantom_labels = pd.read_csv(phantom / "labels.csv").set_index("study_id")
    (root / "volumes").mkdir(parents=True)
    (root / "totalseg").mkdir()
    rows, written = [], []
    for i, study in enumerate(manifest.itertuples(), start=1):
        name = f"tst{i:05d}"
        image = nib.load(phantom / study.image)
        transform = orientations.ornt_transform(
            orientations.io_orientation(image.affine), orientations.axcodes2ornt(NPZ_AXCODES)
        )
        assert np.allclose(image.header.get_zooms()[:3], SPACING)
        hu = orientations.apply_orientation(image.get_fdata(), transform)
        np.savez_compressed(root / "volumes" / f"{name}.npz", ct=np.rint(hu).astype(np.int16))
        mask = orientations.apply_orientation(
            np.asarray(nib.load(phantom / study.mask).dataobj), transform
        )
        nib.save(
            nib.Nifti1Image(mask.astype(np.int16), radchestct_affine(SPACING)),
            root / "totalseg" / f"{name}.nii.gz",
        )
        row, truth = {"NoteAcc_DEID": name}, {"study_id": name}
        for column, key in ctrate_label_map("chest").items():
            value = int(phantom_labels.loc[study.study_id, key]) if key in phantom_labels else 0
            for j, abnormality in enumerate(RADCHESTCT_TO_CTRATE[column]):
                row[f"{abnormality}*{key.split('/')[0]}"] = value if j == 0 else 0
            truth[key] = value if RADCHESTCT_TO_CTRATE[column] else np.nan
        rows.append(row)
        written.append(truth)
    good = (root / "volumes" / "tst00001.npz").read_bytes()
    (root / "volumes" / f"{CORRUPT}.npz").write_bytes(good[: len(good) // 2])
    for extra in (CORRUPT, MASK_ONLY):
        (root / "totalseg" / f"{extra}.nii.gz").write_bytes(
            (root / "totalseg" / "tst00001.nii.gz").read_bytes()
        )
        rows.append(rows[0] | {"NoteAcc_DEID": extra})
    pd.DataFrame(rows).to_csv(root / "imgtest_Abnormality_and_Location_Labels.csv", index=False)
    ids = [r["NoteAcc_DEID"] for r in rows]
    pd.DataFrame({"NoteAcc_DEID": ids, "final_spacing": SPACING}).to_csv(
        root / "CT_Scan_Metadata_Complete_35747.csv", index=False
    )
    return pd.DataFrame(written).set_index("study_id")


def test_eval_radchestct_scores_the_mapped_labels(tmp_path, capsys, monkeypatch, tiny_bert):
    phantom = tmp_path / "phantom"
    generate_phantom(phantom, n_studies=8, seed=2, geometry="chest", spacing=(SPACING,) * 3,
                     splits=(0.0, 0.0, 1.0), progress=False)  # fmt: skip
    root = tmp_path / "radchestct"
    truth = write_radchestct_like(phantom, root)
    table = load_anatomy_table("chest")
    ckpt = tiny_checkpoint(tmp_path / "chest.ckpt", len(table), tiny_bert())
    cache, out = tmp_path / "cache", tmp_path / "eval"
    merges = []  # the tiny model may score aorta above coronary everywhere: record the rule too

    def recording_merge(scores, rule, table):
        merges.append(rule)
        return merge_max_scores(scores, rule, table)

    monkeypatch.setattr(evaluate_module, "merge_max_scores", recording_merge)
    code = fvlm_main([
        "eval-radchestct", "--root", str(root), "--ckpt", str(ckpt), "--name", "fVLM",
        "--cache", str(cache), "--preprocess_config",
        str(chest_preprocess_config(tmp_path / "chest_small.yaml", (SPACING,) * 3)),
        "--workers", "1", "--out", str(out),
    ])  # fmt: skip
    assert code in (None, 0)
    printed = capsys.readouterr().out
    assert "not evaluable on Rad-ChestCT" in printed and "lung/mosaic_attenuation" in printed

    # The .npz volumes went through the preprocessor with the metadata's spacing and the release's
    # axis order; the corrupt one failed naming its file; the mask-only study never became one.
    status = pd.read_csv(cache / "manifest.csv").set_index("study_id")
    assert MASK_ONLY not in status.index
    assert status.loc[CORRUPT, "status"] == "failed"
    assert f"{CORRUPT}.npz" in status.loc[CORRUPT, "reason"]
    assert "not a readable npz archive" in status.loc[CORRUPT, "reason"]
    ok = [s for s in status.index if s != CORRUPT]
    assert len(ok) == 8 and (status.loc[ok, "status"] == "ok").all()
    for study in ok:
        meta = json.loads((cache / "studies" / study / "meta.json").read_text())
        assert meta["orientation"]["source_axcodes"] == "IPL"
        assert meta["orientation"]["source_spacing"] == [SPACING] * 3
        assert meta["inputs"]["npz_spacing"] == SPACING
        assert meta["rescale"]["applied"] is False and meta["table"] == "chest"
        assert meta["spacing"] == [SPACING] * 3 and min(meta["shape"]) > 16  # > the crop

    # All 18 labels are in the outputs; the 16 mapped ones count exactly the written labels, the
    # two without a Rad-ChestCT column have no positives or negatives and are listed as such.
    results = pd.read_csv(out / "fVLM" / "fVLM_per_disease.csv", index_col=0)
    keys = {d.key for d in table.diseases("ctrate")}
    assert set(results.index) == keys | {"macro"}
    for key in keys - NOT_EVALUABLE:
        assert results.loc[key, "n_pos"] == truth.loc[ok, key].sum()
        assert results.loc[key, "n_pos"] + results.loc[key, "n_neg"] == 8
    for key in NOT_EVALUABLE:
        assert results.loc[key, "n_pos"] == results.loc[key, "n_neg"] == 0
        assert np.isnan(results.loc[key, "auroc"]) and not results.loc[key, "in_macro"]
    both = {k for k in keys - NOT_EVALUABLE if 0 < truth.loc[ok, k].sum() < 8}
    assert both == PHANTOM_CHEST  # with this seed each is present in some studies, not all
    assert set(results.index[results["in_macro"]]) == both
    auroc = results.loc[sorted(both), "auroc"]
    assert auroc.between(0.0, 1.0).all()
    assert results.loc["macro", "auroc"] == pytest.approx(auroc.mean())
    summary = json.loads((out / "fVLM" / "fVLM_summary.json").read_text())
    assert set(summary["extra"]["not_evaluable"]) == NOT_EVALUABLE
    assert summary["extra"]["dataset"] == "Rad-ChestCT"
    assert summary["extra"]["scored_by_max"] == {
        "aorta/calcification": ["aorta/calcification", "heart/coronary_calcification"]
    }
    assert summary["n_diseases"] == 18 and summary["n_diseases_in_macro"] == len(both)
    for name in ("roc.png", "fVLM_table.txt"):
        assert (out / "fVLM" / name).stat().st_size > 0
    assert "macro" in (out / "comparison.txt").read_text()

    # Calcification is scored by the max of the arterial-wall and coronary scores (CT-CLIP).
    assert merges == [RADCHESTCT_CALCIFICATION_MERGE]
    scores = pd.read_csv(out / "fVLM" / "scores.csv", index_col=0)
    assert scores.shape == (8, 18) and np.isfinite(scores.to_numpy()).all()
    labels = pd.read_csv(cache / "inputs" / "labels.csv", dtype={"study_id": str})
    raw, _ = evaluate_checkpoint(
        ckpt, cache, labels, split="all", anatomy_table="chest", benchmark="ctrate"
    )
    expected = np.maximum(raw["aorta/calcification"], raw["heart/coronary_calcification"])
    np.testing.assert_allclose(scores["aorta/calcification"], expected.loc[scores.index], rtol=1e-5)
    others = [k for k in scores.columns if k != "aorta/calcification"]
    np.testing.assert_allclose(scores[others], raw.loc[scores.index, others], rtol=1e-5)


# -- .npz volumes in the preprocessor -----------------------------------------------------------


def test_npz_volume_geometry_and_dtypes(tmp_path):
    hu = np.arange(-1000, -1000 + 4 * 3 * 2, dtype=np.int64).reshape(4, 3, 2)
    np.savez_compressed(tmp_path / "a.npz", ct=hu)
    loaded = load_volume(tmp_path / "a.npz", npz_spacing=0.7)
    assert loaded.volume.axcodes == NPZ_AXCODES == ("I", "P", "L")
    assert loaded.volume.spacing == pytest.approx((0.7, 0.7, 0.7))
    assert loaded.volume.data.dtype == np.int16 and loaded.stored_dtype == "int64"
    np.testing.assert_array_equal(loaded.volume.data, hu)
    assert load_npz(tmp_path / "a.npz").volume.spacing == pytest.approx((0.8, 0.8, 0.8))
    np.savez(tmp_path / "f.npz", ct=hu.astype(np.float64) + 0.5)
    assert load_volume(tmp_path / "f.npz").volume.data.dtype == np.float32


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "not a readable npz archive"),
        ("not_zip", "not a readable npz archive"),
        ("npy", "not a readable npz archive"),
        ("no_ct", "no array 'ct'"),
        ("two_d", "expected a 3D array"),
        ("nan", "NaN or infinite"),
        ("text", "non-numeric dtype"),
        ("objects", "not a readable npz archive"),
    ],
)
def test_corrupt_npz_errors_name_the_file(tmp_path, kind, message):
    path = tmp_path / f"{kind}.npz"
    good = tmp_path / "good.npz"
    np.savez_compressed(good, ct=np.zeros((4, 4, 4), np.int16))
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:-40])
    elif kind == "not_zip":
        path.write_bytes(b"not an archive" * 10)
    elif kind == "npy":
        with path.open("wb") as handle:
            np.save(handle, np.zeros((4, 4, 4), np.int16))
    elif kind == "no_ct":
        np.savez(path, volume=np.zeros((4, 4, 4), np.int16))
    elif kind == "two_d":
        np.savez(path, ct=np.zeros((4, 4), np.int16))
    elif kind == "nan":
        np.savez(path, ct=np.full((2, 2, 2), np.nan))
    elif kind == "text":
        np.savez(path, ct=np.full((2, 2, 2), "HU"))
    else:
        np.savez(path, ct=np.empty((2, 2, 2), dtype=object))
    with pytest.raises(ValueError, match=message) as error:
        load_volume(path)
    assert str(path) in str(error.value)


def test_manifest_npz_spacing_must_be_positive(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "study_id,image,findings,impression,npz_spacing\n"
        "a,a.npz,,,0.8\nb,b.npz,,,0\nc,c.nii.gz,x,,\n"
    )
    rows = {row.study_id: row for row in read_manifest(manifest).rows}
    assert rows["a"].npz_spacing == 0.8 and rows["a"].error is None
    assert "npz_spacing must be > 0" in rows["b"].error
    assert rows["c"].npz_spacing is None and rows["c"].error is None
