"""Evaluation sees what training saw: crops of the training size, evaluable studies counted.

A tiny cache whose volumes (16 x 32 x 32) are larger than the network's crop: each anatomy's
evaluation embedding must be the network's embedding of its planned crop computed directly, the
forward passes must be the plan's, and a study whose anatomy the field of view truncates (or that
lacks it) must be left out of that anatomy's diseases, counted, unless the absent rule says
otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from cache_factory import write_cache
from torchmetrics.functional.classification import binary_auroc
from transformers import BertConfig

from fvlm.anatomy import load_anatomy_table
from fvlm.checkpoint import TrainedNetwork
from fvlm.crop import crop_array, crop_valid
from fvlm.evaluation import run as run_module
from fvlm.evaluation.crop_plan import plan_crops, tile_crops
from fvlm.evaluation.embedding import PlannedCrops, embed_studies
from fvlm.evaluation.evaluability import AnatomyStatus, Evaluability
from fvlm.evaluation.report import evaluation_notes, format_table, summary_dict
from fvlm.evaluation.run import evaluate_checkpoint
from fvlm.models import FineGrainedCLIP, GlobalCLIP, VisionConfig
from fvlm.preprocess.cache import StudyCache

SHAPE = (16, 32, 32)
N_STUDIES = 6
PAPER = load_anatomy_table("paper")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six test studies of five organs, each organ in its own 8 x 16 x 16 cell of the volume."""
    root = tmp_path_factory.mktemp("eval_crops") / "cache"
    return write_cache(root, "paper", n_train=0, n_val=0, n_test=N_STUDIES, shape=SHAPE, seed=4)


def _vision(crop: tuple[int, int, int]) -> VisionConfig:
    return VisionConfig.vit_tiny(img_size=crop, patch_size=(4, 8, 8), hidden_size=16, num_heads=2)


def _fvlm(tiny_bert, crop: tuple[int, int, int] = (8, 16, 16)) -> TrainedNetwork:
    torch.manual_seed(0)
    network = FineGrainedCLIP(
        len(PAPER), vision=_vision(crop), text_config=BertConfig(**tiny_bert()), embed_dim=8
    ).eval()
    return TrainedNetwork(network, {"text_model": "minilm"}, "fine_grained")


def _direct_crop(cache: Path, study_id: str, start: np.ndarray, crop) -> tuple:
    """The crop read independently of the evaluation code: whole arrays, then crop_array."""
    folder = cache / "studies" / study_id
    image = np.load(folder / "image.npy").astype(np.float32)
    anatomy = np.load(folder / "anatomy.npy")  # the paper preset's ids are its indices + 1
    image_crop = torch.from_numpy(crop_array(image, start, crop))[None, None]
    return image_crop, torch.from_numpy(crop_array(anatomy, start, crop))[None]


def _plan(cache: Path, study_id: str, crop) -> tuple:
    meta = StudyCache(cache).study_meta(study_id)
    bboxes = StudyCache.bboxes(meta, PAPER, study_id)
    complete = ~StudyCache.truncated(meta, PAPER, study_id)
    return plan_crops(meta["shape"], crop, bboxes, complete), bboxes


@pytest.mark.parametrize("crop", [(8, 16, 16), (4, 16, 16)])
def test_each_anatomy_is_embedded_from_its_planned_crop(cache, tiny_bert, crop) -> None:
    trained = _fvlm(tiny_bert, crop)
    crops_run = []
    hook = trained.network.vision.register_forward_hook(
        lambda module, args, out: crops_run.append(len(args[0]))
    )
    studies = embed_studies(trained, cache, "test", PAPER, batch_size=4)
    hook.remove()
    assert len(studies.study_ids) == N_STUDIES and studies.crop_size == crop
    whole = larger = 0
    for s, study_id in enumerate(studies.study_ids):
        plan, bboxes = _plan(cache, study_id, crop)
        assert studies.forward_passes[s] == plan.forward_passes >= 2  # volume > crop
        for a in np.flatnonzero(plan.crop_of >= 0):
            start = plan.starts[plan.crop_of[a]]
            image, anatomy = _direct_crop(cache, study_id, start, crop)
            with torch.no_grad():
                expected = trained.network.encode_image(image, anatomy)[0, a]
            torch.testing.assert_close(studies.embeddings[s, a], expected, rtol=1e-4, atol=1e-5)
            assert studies.valid[s, a]
            if studies.status[s, a] == AnatomyStatus.WHOLE:
                assert crop_valid(bboxes, start, crop)[a]  # the crop holds it whole
                whole += 1
            else:
                assert studies.status[s, a] == AnatomyStatus.LARGER_THAN_CROP
                assert ((bboxes[a, :, 1] - bboxes[a, :, 0]) > crop).any()
                larger += 1
        absent = plan.crop_of < 0
        assert not studies.valid[s, absent].any()
        assert (studies.status[s, absent] == AnatomyStatus.ABSENT).all()
    assert whole + larger == 5 * N_STUDIES
    # 8 x 16 x 16 holds every organ whole; at 4 slices deep most organs exceed the crop.
    assert larger == 0 if crop[0] == 8 else larger > N_STUDIES
    # Every planned crop ran exactly once, batched across studies.
    assert sum(crops_run) == studies.forward_passes.sum() == studies.forward_pass_summary()["total"]
    assert max(crops_run) == 4 and len(crops_run) == -(-sum(crops_run) // 4)


def test_batching_and_workers_do_not_change_embeddings(cache, tiny_bert) -> None:
    trained = _fvlm(tiny_bert)
    one = embed_studies(trained, cache, "test", PAPER, batch_size=1)
    many = embed_studies(trained, cache, "test", PAPER, batch_size=5, num_workers=1)
    torch.testing.assert_close(one.embeddings, many.embeddings, rtol=1e-4, atol=1e-5)
    assert np.array_equal(one.status, many.status)
    with pytest.raises(ValueError, match="batch_size"):
        embed_studies(trained, cache, "test", PAPER, batch_size=0)


def test_clip_embeds_the_mean_over_crops_tiling_the_scan(cache, tiny_bert) -> None:
    torch.manual_seed(0)
    network = GlobalCLIP(_vision((8, 16, 16)), text_config=BertConfig(**tiny_bert()), embed_dim=8)
    trained = TrainedNetwork(network.eval(), {"text_model": "minilm"}, "global")
    studies = embed_studies(trained, cache, "test", PAPER, batch_size=3)
    tiles = tile_crops(SHAPE, (8, 16, 16))
    assert len(tiles) == 8  # 2 x 2 x 2 crops tile 16 x 32 x 32
    assert (studies.forward_passes == 8).all() and studies.crop_rule == "tile"
    study_id = studies.study_ids[1]
    crops = [_direct_crop(cache, study_id, start, (8, 16, 16))[0] for start in tiles]
    with torch.no_grad():
        each = network.encode_image(torch.cat(crops))[:, 0]
    expected = F.normalize(F.normalize(each, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(studies.embeddings[1, 0], expected, rtol=1e-4, atol=1e-5)
    assert studies.valid.shape == (N_STUDIES, 1) and studies.valid.all()


def test_tile_crops_cover_every_voxel_evenly() -> None:
    shape, crop = (10, 33, 5), (4, 16, 8)
    tiles = tile_crops(shape, crop)
    assert len(tiles) == 3 * 3 * 1
    covered = np.zeros(shape, dtype=int)
    for start in tiles:
        source = tuple(
            slice(max(0, s), min(n, s + c)) for s, c, n in zip(start, crop, shape, strict=True)
        )
        covered[source] += 1
    assert (covered >= 1).all()
    assert sorted({int(s) for s in tiles[:, 0]}) == [0, 3, 6]  # evenly spread, last ends at 10
    assert {int(s) for s in tiles[:, 2]} == {-2}  # smaller than the crop: centred, padded


def _labels(study_ids, keys, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = {k: np.resize([0, 1, 1, 0, 1, 0], len(study_ids)) for k in keys}
    values = {k: rng.permutation(v) for k, v in values.items()}
    return pd.DataFrame({"study_id": list(study_ids), **values})


@pytest.fixture()
def cut_cache(tmp_path: Path) -> tuple[Path, str, str]:
    """The cache, but the field of view truncates one study's liver; another lacks the spleen."""
    cache = write_cache(
        tmp_path / "cache", "paper", n_train=0, n_val=0, n_test=N_STUDIES, shape=SHAPE, seed=4
    )
    store = StudyCache(cache)
    cut, without = store.ok_studies("test")[1], store.ok_studies("test")[4]
    meta = store.study_meta(cut)
    meta["anatomies"]["liver"] |= {"truncated": True, "truncated_faces": ["superior"]}
    store.update_meta(cut, meta)
    meta = store.study_meta(without)
    meta["anatomies"]["spleen"] |= {"voxels": 0, "bbox": None}
    store.update_meta(without, meta)
    return cache, cut, without


@pytest.mark.parametrize("absent_rule", ["not_evaluable", "negative"])
def test_truncated_and_absent_anatomies_are_left_out_and_counted(
    cut_cache, tiny_bert, monkeypatch, absent_rule
) -> None:
    cache, cut, without = cut_cache
    trained = _fvlm(tiny_bert)
    monkeypatch.setattr(run_module, "load_network", lambda path, device: trained)
    liver = PAPER["liver"].diseases[0].key
    spleen = PAPER["spleen"].diseases[0].key
    kidney = PAPER["kidney"].diseases[0].key
    ids = StudyCache(cache).ok_studies("test")
    labels = _labels(ids, [liver, spleen, kidney])
    scores, results = evaluate_checkpoint(
        Path("unused.ckpt"), cache, labels, split="test", anatomy_table="paper",
        batch_size=3, absent_rule=absent_rule,
    )  # fmt: skip
    truth = labels.set_index("study_id")

    # The truncated liver: not evaluable (count 1), NaN score, left out of the liver's AUROC.
    assert np.isnan(scores.loc[cut, liver]) and scores[liver].notna().sum() == N_STUDIES - 1
    row = results.loc[liver]
    assert (row["not_evaluable"], row["truncated"], row["absent"], row["evaluated"]) == (1, 1, 0, 5)
    assert row["n_pos"] + row["n_neg"] == N_STUDIES - 1
    kept = scores.index[scores.index != cut]
    expected = binary_auroc(
        torch.tensor(scores.loc[kept, liver].to_numpy()),
        torch.tensor(truth.loc[kept, liver].to_numpy()),
    )
    assert row["auroc"] == pytest.approx(float(expected), abs=1e-6)

    # The absent spleen: not evaluable by default; the most confident negative under "negative".
    row = results.loc[spleen]
    assert row["absent"] == 1 and row["truncated"] == 0
    others = scores.loc[scores.index != without, spleen]
    if absent_rule == "not_evaluable":
        assert np.isnan(scores.loc[without, spleen]) and row["not_evaluable"] == 1
        assert row["n_pos"] + row["n_neg"] == N_STUDIES - 1
    else:
        assert scores.loc[without, spleen] == others.min() and row["not_evaluable"] == 0
        assert row["n_pos"] + row["n_neg"] == N_STUDIES
    # The kidney is whole everywhere: every study counts.
    assert results.loc[kidney, "not_evaluable"] == 0 and scores[kidney].notna().all()

    # The counts and forward passes reach the printed table and the JSON summary.
    summary = summary_dict(results)
    assert summary["per_disease"][liver]["truncated"] == 1
    assert summary["not_evaluable"][liver]["truncated"] == 1
    assert summary["evaluation"]["absent_rule"] == absent_rule
    passes = summary["evaluation"]["forward_passes_per_study"]
    plans = [_plan(cache, study_id, (8, 16, 16))[0].forward_passes for study_id in ids]
    assert passes["mean"] == pytest.approx(np.mean(plans)) and passes["max"] == max(plans)
    notes = evaluation_notes({"fVLM": results})
    assert f"mean {np.mean(plans):.2f}, max {max(plans)}" in notes
    liver_line = next(line for line in notes.splitlines() if line.startswith(liver))
    assert liver_line.split()[1:] == ["5", "1", "0", "1", "0"]
    assert "truncated" in format_table(results)


def test_evaluability_of_whole_scan_diseases_and_clip(chest_table) -> None:
    whole, larger = AnatomyStatus.WHOLE, AnatomyStatus.LARGER_THAN_CROP
    truncated, absent = AnatomyStatus.TRUNCATED, AnatomyStatus.ABSENT
    status = np.full((3, len(chest_table)), absent, dtype=np.int8)
    lung, heart = chest_table.index("lung"), chest_table.index("heart")
    status[0, [lung, heart]] = (larger, whole)
    status[1, [lung, heart]] = (truncated, whole)
    keys = ["lung/emphysema", "heart/cardiomegaly", "global/lymphadenopathy"]
    diseases = [d for d in chest_table.diseases() if d.key in keys]
    ids = ["a", "b", "c"]
    fine = Evaluability.from_status(status, chest_table, diseases, ids, "fine").counts()
    assert fine.loc["lung/emphysema", list(fine.columns[:5])].tolist() == [1, 2, 1, 1, 1]
    assert fine.loc["heart/cardiomegaly", "not_evaluable"] == 1  # study c has no heart
    # Whole-scan diseases: the mean of the evaluable anatomies; study c has none.
    assert fine.loc["global/lymphadenopathy", "not_evaluable"] == 1
    assert fine.loc["global/lymphadenopathy", "scored_on"] == "mean of anatomy embeddings"
    # CLIP leaves out the same studies (facts of the scans), never "larger than crop".
    clip = Evaluability.from_status(status, chest_table, diseases, ids, "global").counts()
    assert clip.loc["lung/emphysema", "not_evaluable"] == 2
    assert clip.loc["lung/emphysema", "larger_than_crop"] == 0
    assert clip.loc["global/lymphadenopathy", "not_evaluable"] == 0
    with pytest.raises(ValueError, match="absent_rule"):
        Evaluability.from_status(status, chest_table, diseases, ids, "fine", "zero")


def test_planned_crops_need_no_text(cache, monkeypatch) -> None:
    import fvlm.data_modules.study_dataset as study_dataset

    monkeypatch.setattr(study_dataset, "load_tokenizer", lambda name: pytest.fail("tokenized"))
    crops = PlannedCrops(cache, "test", PAPER, (8, 16, 16))
    item = crops[0]
    assert set(item) == {"image", "anatomy", "crop_extent", "index"}
    assert item["image"].shape == (1, 8, 16, 16) and item["image"].dtype == torch.float16


def test_labels_are_checked_before_the_embedding_pass() -> None:
    import pandas as pd

    from fvlm.evaluation.run import check_labels

    good = pd.DataFrame({"study_id": ["a", "b"], "liver/cyst": [0, 1], "spleen/x": [1, None]})
    check_labels(good, ["liver/cyst", "spleen/x"], ["a", "b"])
    with pytest.raises(ValueError, match="no 'study_id' column"):
        check_labels(good.rename(columns={"study_id": "id"}), ["liver/cyst"], ["a"])
    with pytest.raises(ValueError, match=r"'liver/cyst'.*study 'b' has 'yes'"):
        check_labels(good.assign(**{"liver/cyst": [0, "yes"]}), ["liver/cyst"], ["a", "b"])
    with pytest.raises(ValueError, match=r"1 studies .* no row, e.g. \['c'\]"):
        check_labels(good, ["liver/cyst"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="listed twice"):
        check_labels(pd.concat([good, good]), ["liver/cyst"], ["a"])
