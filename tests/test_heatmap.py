"""Anatomy heatmaps: the token decomposition, the cache grid, world alignment and the PNG overlay.

One tiny study goes through the real preprocessing (stored LPS with anisotropic voxels, so that
canonicalisation and resampling both act) and one tiny fVLM network with a 2 x 2 x 2 token grid.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nibabel import orientations
from torch import nn
from transformers import BertConfig

from fvlm.anatomy import totalsegmentator_classes
from fvlm.checkpoint import TrainedNetwork
from fvlm.evaluation.evaluability import AnatomyStatus
from fvlm.heatmap import (
    AnatomyNotEvaluable,
    anatomy_heatmap,
    hottest_voxel,
    save_heatmap_nifti,
    save_heatmap_png,
    text_direction,
    token_embeddings,
)
from fvlm.models import FineGrainedCLIP, VisionConfig
from fvlm.models.anatomy_pooling import AnatomyPooling
from fvlm.preprocess.cache import StudyCache
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.runner import run_preprocess

V2 = {name: cid for cid, name in totalsegmentator_classes("v2").items()}
RAS_SHAPE = (24, 20, 10)  # x: left->right, y: posterior->anterior, z: inferior->superior
RAS_SPACING = (2.0, 2.0, 5.0)
CACHE_SPACING = (5.0, 2.0, 2.0)  # canonical (S, A, R) axes: the cache grid is (10, 20, 24)
LESION = (14, 10, 5)  # RAS voxel of the bright lesion, inside the liver
HU_WINDOW = (-300.0, 400.0)
STUDY = "s000"


def _input_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, v2 labels (liver and spleen, no kidney) and the RAS affine of the input scan."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in RAS_SHAPE), indexing="ij")
    hu = np.full(RAS_SHAPE, -1000.0, dtype=np.float32)
    labels = np.zeros(RAS_SHAPE, dtype=np.uint8)
    hu[((x - 12) / 11) ** 2 + ((y - 10) / 9) ** 2 < 1] = 20.0
    for name, centre, radii, value in (
        ("liver", (14, 10, 5), (5, 5, 2.2), 60.0),
        ("spleen", (6, 10, 5), (2.5, 2.5, 1.5), 50.0),
    ):
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip((x, y, z), centre, radii)) < 1  # noqa: B905
        hu[inside], labels[inside] = value, V2[name]
    hu[LESION[0] : LESION[0] + 2, LESION[1] : LESION[1] + 2, LESION[2]] = 350.0  # 4 x 4 x 5 mm
    affine = np.diag([*RAS_SPACING, 1.0])
    affine[:3, 3] = (-23.0, -19.0, 40.0)
    return hu, labels, affine


def _store_lps(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(("L", "P", "S"))
    )
    stored = np.ascontiguousarray(orientations.apply_orientation(data, transform))
    return nib.Nifti1Image(stored, affine @ orientations.inv_ornt_aff(transform, data.shape))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    """A one-study cache from the real preprocessing; returns (cache, input image path)."""
    folder = tmp_path_factory.mktemp("heatmap")
    hu, labels, affine = _input_volume()
    nib.save(_store_lps(hu.astype(np.int16), affine), folder / "image.nii.gz")
    nib.save(_store_lps(labels, affine), folder / "mask.nii.gz")
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([
            ["study_id", "image", "mask", "findings", "impression", "split"],
            [STUDY, "image.nii.gz", "mask.nii.gz", "A liver lesion.", "Liver lesion.", "test"],
        ])  # fmt: skip
    config = PreprocessConfig(
        manifest=manifest, cache=folder / "cache", spacing=CACHE_SPACING, hu_window=HU_WINDOW,
        workers=1, progress=False, totalseg_version="v2", truncation_margin_mm=0.0,
    )  # fmt: skip
    assert run_preprocess(config).exit_code == 0
    return folder / "cache", folder / "image.nii.gz"


@pytest.fixture(scope="module")
def trained(paper_table, tiny_bert) -> TrainedNetwork:
    """A random tiny fVLM whose (8, 16, 16) crop has a 2 x 2 x 2 token grid."""
    torch.manual_seed(0)
    vision = VisionConfig.vit_tiny(img_size=(8, 16, 16), patch_size=(4, 8, 8), hidden_size=16)
    network = FineGrainedCLIP(
        len(paper_table), vision=vision, text_config=BertConfig(**tiny_bert()), embed_dim=8
    )
    return TrainedNetwork(network.eval(), {"text_model": "minilm"}, "fine_grained")


def test_token_embeddings_decompose_the_anatomy_embedding():
    # One head: the anatomy embedding before its norm is the attention-weighted mean of its own
    # query's vector and of the per-token vectors (the same path, token by token).
    torch.manual_seed(1)
    pooling = AnatomyPooling(hidden_size=12, num_anatomies=3, embed_dim=6, num_heads=1).eval()
    tokens = torch.randn(1, 5, 12)
    membership = torch.zeros(1, 3, 5, dtype=torch.bool)
    membership[0, 1, [1, 3]] = True
    a = 1
    with torch.no_grad():
        expected = pooling(tokens, membership)[0, a]
        sequence = pooling.norm(torch.cat([pooling.query[None], tokens], 1))[0]  # (A + N, C)
        keys, values = pooling.to_kv(sequence).chunk(2, dim=-1)
        attended = [a, 3 + 1, 3 + 3]  # own query key, then tokens 1 and 3
        query = pooling.to_q(sequence[a])
        weights = torch.softmax(keys[attended] @ query / 12**0.5, 0)
        own = pooling.query[a] + pooling.out(values[a])
        own = own @ pooling.proj_weight[a] + pooling.proj_bias[a]
        per_token = token_embeddings(pooling, tokens, a)[0]  # unit vectors; undo the norm:
        raw = pooling.query[a] + pooling.out(pooling.to_kv(pooling.norm(tokens))[0, :, 12:])
        raw = raw @ pooling.proj_weight[a] + pooling.proj_bias[a]
        assert torch.allclose(per_token, F.normalize(raw, dim=-1), atol=1e-6)
        mixed = weights[0] * own + weights[1] * raw[1] + weights[2] * raw[3]
    assert torch.allclose(F.normalize(mixed, dim=-1), expected, atol=1e-5)


def test_heatmap_on_the_cache_grid(study, trained, paper_table):
    cache, _ = study
    store = StudyCache(cache)
    meta = store.study_meta(STUDY)
    heat = anatomy_heatmap(trained, cache, STUDY, "liver", "There is a lesion in the liver.")
    assert heat.heat.shape == tuple(meta["shape"]) == (10, 20, 24)
    liver = np.asarray(store.open_arrays(STUDY)[1]) == paper_table["liver"].id
    assert liver.sum() > 50
    np.testing.assert_array_equal(heat.mask, liver)
    assert np.isnan(heat.heat[~liver]).all()  # NaN outside the anatomy
    assert np.isfinite(heat.heat[liver]).all()  # the crop holds the whole liver
    assert np.abs(heat.heat[liver]).max() <= 1.0
    assert heat.heat[liver].std() > 1e-4  # 8 tokens, trilinear in between: not constant
    again = anatomy_heatmap(trained, cache, STUDY, "liver", "There is a lesion in the liver.")
    np.testing.assert_array_equal(heat.heat, again.heat)  # deterministic
    # The text against itself as the normal side: every token's logit is exactly 0.
    same = anatomy_heatmap(trained, cache, STUDY, "liver", "liver lesion", negative="liver lesion")
    np.testing.assert_allclose(same.heat[liver], 0.0, atol=1e-6)
    assert heat.status == 0 and heat.finding == "There is a lesion in the liver."
    # A finding encoded once gives the same heat as its text.
    direction = text_direction(trained, "There is a lesion in the liver.")
    reused = anatomy_heatmap(trained, cache, STUDY, "liver", direction)
    np.testing.assert_allclose(reused.heat, heat.heat, atol=1e-6, equal_nan=True)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        anatomy_heatmap(trained, cache, STUDY, "liver", direction[:4])


def test_absent_or_unknown_anatomy_and_clip_are_refused(study, trained):
    cache, _ = study
    with pytest.raises(AnatomyNotEvaluable, match=r"'s000'.*'kidney' is absent from the scan"):
        anatomy_heatmap(trained, cache, STUDY, "kidney", "kidney cyst")
    with pytest.raises(ValueError, match="unknown anatomy 'kidneys'"):
        anatomy_heatmap(trained, cache, STUDY, "kidneys", "kidney cyst")
    with pytest.raises(ValueError, match="non-empty text"):
        anatomy_heatmap(trained, cache, STUDY, "liver", [])
    clip = TrainedNetwork(nn.Linear(1, 1), {}, "global")
    with pytest.raises(ValueError, match="need an fVLM network"):
        anatomy_heatmap(clip, cache, STUDY, "liver", "lesion")


def _world(affine: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(voxel, dtype=float) + affine[:3, 3]


def test_nifti_lands_on_the_input_lesion(study, trained, tmp_path):
    # A synthetic heat: the preprocessed image itself, whose brightest voxel is the lesion. Its
    # hottest voxel in the written NIfTI must sit at the lesion's world position (mm) in the
    # input, within one voxel of the heat's grid, both on the cache grid and resampled.
    cache, source = study
    heat = anatomy_heatmap(trained, cache, STUDY, "liver", "liver lesion")
    synthetic = dataclasses.replace(heat, heat=np.asarray(heat.image, dtype=np.float32))
    source_image = nib.load(source)
    lesion_voxels = np.argwhere(np.asarray(source_image.dataobj) >= 300)
    assert len(lesion_voxels) == 4
    lesion_mm = _world(source_image.affine, lesion_voxels.mean(0))
    for reference in (None, source):
        written = nib.load(save_heatmap_nifti(synthetic, tmp_path / "heat.nii.gz", reference))
        data = np.asarray(written.dataobj)
        hot_mm = _world(written.affine, np.asarray(hottest_voxel(data)))
        assert np.all(np.abs(hot_mm - lesion_mm) <= np.array([2.0, 2.0, 5.0])), (hot_mm, lesion_mm)
        assert int(written.header["sform_code"]) == 1
        if reference is not None:
            assert data.shape == source_image.shape
            np.testing.assert_allclose(written.affine, source_image.affine)
    # The real heat: 0 outside the liver in the file, the liver's values inside.
    written = np.asarray(nib.load(save_heatmap_nifti(heat, tmp_path / "real.nii")).dataobj)
    assert (written[~heat.mask] == 0).all()
    np.testing.assert_allclose(written[heat.mask], heat.heat[heat.mask])


def test_nifti_needs_the_cache_affine(study, trained, tmp_path):
    cache, _ = study
    heat = anatomy_heatmap(trained, cache, STUDY, "liver", "liver lesion")
    with pytest.raises(ValueError, match="'s000': meta.json records no 'affine'"):
        save_heatmap_nifti(dataclasses.replace(heat, affine=None), tmp_path / "x.nii.gz")


def test_png_overlay_is_written_and_not_blank(study, trained, tmp_path):
    cache, _ = study
    heat = anatomy_heatmap(
        trained, cache, STUDY, "liver", ["liver lesion", "hepatic mass"], label="liver/lesion"
    )
    path = save_heatmap_png(heat, tmp_path / "png" / "liver.png", window=(-150.0, 250.0))
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels[..., :3].var() > 1e-3
    assert heat.finding == "liver/lesion"
    meta = json.loads((cache / "studies" / STUDY / "meta.json").read_text())
    assert meta["shape"] == list(heat.heat.shape)


def test_anatomy_larger_than_the_crop_has_heat_only_where_the_crop_saw_it(study, tiny_bert):
    cache, _ = study
    torch.manual_seed(0)
    vision = VisionConfig.vit_tiny(img_size=(4, 8, 8), patch_size=(2, 4, 4), hidden_size=16)
    network = FineGrainedCLIP(35, vision=vision, text_config=BertConfig(**tiny_bert()), embed_dim=8)
    small = TrainedNetwork(network.eval(), {"text_model": "minilm"}, "fine_grained")
    heat = anatomy_heatmap(small, cache, STUDY, "liver", "liver lesion")
    assert heat.status == AnatomyStatus.LARGER_THAN_CROP
    seen = np.zeros(heat.mask.shape, dtype=bool)
    seen[tuple(slice(max(s, 0), s + n) for s, n in zip(heat.crop_start, (4, 8, 8)))] = True  # noqa: B905
    assert np.isfinite(heat.heat[heat.mask & seen]).all()
    assert np.isnan(heat.heat[heat.mask & ~seen]).all()
    assert (heat.mask & seen).sum() > 20 and (heat.mask & ~seen).sum() > 20
