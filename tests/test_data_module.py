"""CTReportDataModule over a tiny cache written directly in the format of docs/architecture.md."""

from __future__ import annotations

import csv
import json
import logging
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.crop import center_crop_start, crop_array
from fvlm.data_modules import BATCH_KEYS, CachedStudyDataset, CTReportDataModule, collate_studies
from fvlm.data_modules.collate import CROP_EXTENT, finish_crops
from fvlm.models.text import load_tokenizer
from fvlm.preprocess.cache import CacheError, StudyCache
from fvlm.preprocess.config import PreprocessConfig
from fvlm.preprocess.runner import run_preprocess

CROP = (8, 12, 16)


def finished(sample: dict) -> dict:
    """A sample's crops as the model sees them (float32, padded): what the device hook does."""
    crops = finish_crops({k: sample[k][None] for k in ("image", "anatomy", CROP_EXTENT)})
    return sample | {"image": crops["image"][0], "anatomy": crops["anatomy"][0]}


# Non-contiguous ids, so the id -> index + 1 mapping of the loader is really exercised.
TABLE_YAML = {
    "name": "tiny",
    "anatomies": [
        {
            "id": id_,
            "name": name,
            "label": name,
            "totalseg_v1": classes,
            "totalseg_v2": classes,
            "keywords": [name],
        }
        for id_, name, classes in [
            (10, "liver", ["liver"]),
            (20, "spleen", ["spleen"]),
            (30, "kidney", ["kidney_left", "kidney_right"]),
        ]
    ],
}
LONG_TEXT = "The liver is enlarged with a large hypodense lesion in segment seven " * 4


@pytest.fixture(scope="module")
def table_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("table") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TABLE_YAML))
    return path


def write_study(
    cache: Path,
    study_id: str,
    table: AnatomyTable,
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    texts: dict[str, str],
    abnormal: set[str],
    absent: set[str] = frozenset(),
) -> None:
    """One study as the preprocessing cache stores it (image, anatomy map, meta, report)."""
    labels = np.zeros(shape, dtype=np.uint8)
    for anatomy in table.anatomies:
        if anatomy.name in absent:
            continue
        size = rng.integers(2, np.minimum(shape, 7) + 1)
        lo = rng.integers(0, np.asarray(shape) - size + 1)
        labels[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = anatomy.id
    # Background is a ramp along the left-right axis in [0.5, 1); anatomies are id / 64 < 0.5,
    # so a test can check both image/map alignment and the flip direction.
    ramp = 0.5 + 0.5 * np.arange(shape[2]) / shape[2]
    image = np.broadcast_to(ramp, shape).copy()
    image[labels > 0] = labels[labels > 0] / 64
    anatomies = {}
    for anatomy in table.anatomies:
        where = np.argwhere(labels == anatomy.id)
        if len(where) == 0:
            continue  # absent (or overwritten): not listed, as the cache writer would do
        bbox = [[int(a), int(b) + 1] for a, b in zip(where.min(0), where.max(0), strict=True)]
        anatomies[anatomy.name] = {"bbox": bbox, "voxels": len(where)}
    folder = cache / "studies" / study_id
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", image.astype(np.float16))
    np.save(folder / "anatomy.npy", labels)
    meta = {"spacing": [5.0, 1.0, 1.0], "shape": list(shape), "table": table.name}
    (folder / "meta.json").write_text(json.dumps(meta | {"anatomies": anatomies}))
    report = {
        "findings": " ".join(texts.values()) or "No findings.",
        "impression": " ".join(texts[n] for n in sorted(abnormal) if n in texts),
        "anatomies": {
            name: {"text": text, "normal": name not in abnormal, "source": "rules"}
            for name, text in texts.items()
        },
    }
    (folder / "report.json").write_text(json.dumps(report))


def write_cache(cache: Path, table: AnatomyTable, n_train: int = 6) -> Path:
    """A tiny cache: train/val/test studies of varied sizes, one failed study, one small volume."""
    rng = np.random.default_rng(0)
    rows = []
    specs = [("train", i) for i in range(n_train)] + [("val", 0), ("val", 1), ("test", 0)]
    for split, i in specs:
        study_id = f"{split}_{i:02d}"
        shape = (int(rng.integers(10, 16)), int(rng.integers(14, 20)), int(rng.integers(18, 24)))
        texts = {"liver": "Liver is normal."}
        abnormal: set[str] = set()
        if i % 2 == 0:
            texts["spleen"] = "Splenomegaly."
            abnormal.add("spleen")
        if i == 1:
            texts["liver"] = LONG_TEXT
            abnormal.add("liver")
        absent = {"kidney"} if i == 3 else set()
        write_study(cache, study_id, table, shape, rng, texts, abnormal, absent)
        rows.append({"study_id": study_id, "split": split, "status": "ok", "reason": ""})
    # A small volume (padded in every mode) and a failed study that must be skipped.
    write_study(cache, "train_small", table, (6, 10, 12), rng, {}, set())
    rows.append({"study_id": "train_small", "split": "train", "status": "ok", "reason": ""})
    rows.append({"study_id": "broken", "split": "train", "status": "failed", "reason": "bad"})
    with (cache / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study_id", "split", "status", "reason"])
        writer.writeheader()
        writer.writerows(rows)
    return cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, table_path: Path) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache"), load_anatomy_table(table_path))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def make_dm(cache: Path, table_path: Path, **overrides) -> CTReportDataModule:
    args = dict(
        cache_dir=str(cache),
        anatomy_table=str(table_path),
        crop_size=CROP,
        batch_size=3,
        num_workers=0,
        max_text_length=32,
    )
    return CTReportDataModule(**(args | overrides))


def counts_in(anatomy: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(anatomy.ravel(), minlength=n + 1)[1:]


def test_properties_and_splits(cache: Path, table_path: Path) -> None:
    dm = make_dm(cache, table_path)
    assert dm.num_anatomies == 3 and dm.anatomy_names == ["liver", "spleen", "kidney"]
    assert Path(dm.tokenizer_path).is_dir()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 7  # 6 + the small one; the failed study is skipped
    assert len(dm.datasets["val"]) == 2 and "test" not in dm.datasets
    dm.setup("test")
    assert dm.datasets["test"].study_ids == ["test_00"]


def test_batch_keys_shapes_dtypes(cache: Path, table_path: Path) -> None:
    dm = make_dm(cache, table_path)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 2  # 7 studies, batch 3, incomplete last batch dropped
    batch = next(iter(loader))
    # The loader leaves the crops in the cache dtype with their window; the device finishes them.
    assert tuple(batch) == (*BATCH_KEYS, CROP_EXTENT)
    assert batch["image"].dtype == torch.float16 and batch[CROP_EXTENT].shape == (3, 3, 2)
    batch = finish_crops(batch)
    assert tuple(batch) == BATCH_KEYS
    b, a = 3, 3
    assert batch["image"].shape == (b, 1, *CROP) and batch["image"].dtype == torch.float32
    assert batch["anatomy"].shape == (b, *CROP) and batch["anatomy"].dtype == torch.uint8
    assert batch["valid"].shape == (b, a) and batch["valid"].dtype == torch.bool
    assert batch["normal"].shape == (b, a) and batch["normal"].dtype == torch.bool
    for key in ("text_input_ids", "text_attention_mask"):
        assert batch[key].dtype == torch.long and batch[key].shape[:2] == (b, a)
    for key in ("report_input_ids", "report_attention_mask"):
        assert batch[key].dtype == torch.long and batch[key].ndim == 2 and len(batch[key]) == b
    assert isinstance(batch["study_id"], list) and len(batch["study_id"]) == b
    assert 0.0 <= batch["image"].min() and batch["image"].max() < 1.0
    assert int(batch["anatomy"].max()) <= a  # labels are table index + 1, not the raw ids


def test_dynamic_padding_to_longest_text(cache: Path, table_path: Path, tokenizer) -> None:
    dm = make_dm(cache, table_path, max_text_length=64)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    index = {sid: i for i, sid in enumerate(dataset.study_ids)}
    pair = [dataset[index["train_00"]], dataset[index["train_02"]]]
    long_pair = pair + [dataset[index["train_01"]]]
    for samples in (pair, long_pair):
        batch = collate_studies(samples, pad_token_id=tokenizer.pad_token_id)
        texts = []
        for sid in batch["study_id"]:
            report = json.loads((cache / "studies" / sid / "report.json").read_text())
            texts += [report["anatomies"].get(n, {}).get("text") for n in dm.anatomy_names]
        defaults = [a.default_text for a in dataset.table.anatomies] * len(samples)
        texts = [t or d for t, d in zip(texts, defaults, strict=True)]
        longest = max(len(tokenizer(t, truncation=True, max_length=64)["input_ids"]) for t in texts)
        assert batch["text_input_ids"].shape[-1] == longest
        assert int(batch["text_attention_mask"].sum(-1).max()) == longest
        mask = batch["text_attention_mask"].bool()
        assert (batch["text_input_ids"][~mask] == tokenizer.pad_token_id).all()
        reports = batch["report_attention_mask"].sum(-1)
        assert batch["report_input_ids"].shape[-1] == int(reports.max())
    # The long liver text (truncated at 64) lengthens only the batch that holds it.
    assert collate_studies(pair)["text_input_ids"].shape[-1] < 64
    assert collate_studies(long_pair)["text_input_ids"].shape[-1] == 64


def test_valid_matches_anatomy_map_and_normal_matches_report(cache: Path, table_path: Path) -> None:
    torch.manual_seed(0)
    dm = make_dm(cache, table_path)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    table = dataset.table
    n_valid = n_truncated = 0
    for _ in range(15):
        for i, study_id in enumerate(dataset.study_ids):
            sample = finished(dataset[i])
            meta = json.loads((cache / "studies" / study_id / "meta.json").read_text())
            report = json.loads((cache / "studies" / study_id / "report.json").read_text())
            voxels = np.array([meta["anatomies"].get(n, {}).get("voxels", 0) for n in table.names])
            inside = counts_in(sample["anatomy"].numpy(), len(table))
            valid = sample["valid"].numpy()
            # valid <=> present and every voxel of the anatomy is in the crop.
            np.testing.assert_array_equal(valid, (voxels > 0) & (inside == voxels))
            # The anatomy-aware crop always keeps at least one anatomy whole.
            assert valid.any()
            n_valid += int(valid.sum())
            n_truncated += int(((voxels > 0) & ~valid).sum())
            expected_normal = [
                report["anatomies"].get(n, {}).get("normal", True) for n in table.names
            ]
            assert sample["normal"].tolist() == expected_normal
    assert n_valid > 0 and n_truncated > 0  # both cases really occurred


def test_image_and_anatomy_stay_aligned_under_flips(cache: Path, table_path: Path) -> None:
    torch.manual_seed(1)
    dm = make_dm(cache, table_path, flip_axes=(0, 1, 2))
    dm.setup("fit")
    dataset = dm.datasets["train"]
    ids = torch.tensor(dataset.table.ids, dtype=torch.float32)
    directions = set()
    for _ in range(10):
        for i, study_id in enumerate(dataset.study_ids):
            if study_id == "train_small":
                continue  # padded: no background ramp to read the direction from
            sample = finished(dataset[i])
            image, anatomy = sample["image"][0], sample["anatomy"].long()
            organ = anatomy > 0
            expected = ids[anatomy[organ] - 1] / 64
            torch.testing.assert_close(image[organ], expected, atol=1e-3, rtol=0)
            assert (image[~organ] >= 0.5).all()
            rows = image[~organ.any(-1)]  # (d, h) rows of background only
            if len(rows):
                directions.add(bool(rows[0, -1] > rows[0, 0]))
    assert directions == {True, False}  # left-right flips happened, and not always


def test_eval_is_deterministic_centre_crop(cache: Path, table_path: Path) -> None:
    dm = make_dm(cache, table_path, eval_batch_size=2)
    dm.setup("fit")
    first = finish_crops(next(iter(dm.val_dataloader())))
    second = finish_crops(next(iter(dm.val_dataloader())))
    torch.testing.assert_close(first["image"], second["image"], rtol=0, atol=0)
    assert first["study_id"] == ["val_00", "val_01"]
    image = np.load(cache / "studies" / "val_00" / "image.npy")
    start = center_crop_start(image.shape, CROP)
    expected = crop_array(image, start, CROP, dtype=np.float32)
    np.testing.assert_array_equal(first["image"][0, 0].numpy(), expected)


def test_small_volume_is_padded_whole(cache: Path, table_path: Path) -> None:
    dm = make_dm(cache, table_path)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    sample = finished(dataset[dataset.study_ids.index("train_small")])
    image = np.load(cache / "studies" / "train_small" / "image.npy")
    assert sample["image"].shape == (1, *CROP)
    # Smaller than the crop on every axis: every voxel kept, the rest is zero padding.
    assert int((sample["image"] > 0).sum()) == image.size
    assert sample["valid"].all()


def test_reads_through_memory_maps(cache: Path, table_path: Path, monkeypatch) -> None:
    calls = []
    real_load = np.load

    def spy(path, *args, **kwargs):
        result = real_load(path, *args, **kwargs)
        calls.append((Path(path).name, kwargs.get("mmap_mode"), type(result)))
        return result

    monkeypatch.setattr(np, "load", spy)
    dataset = CachedStudyDataset(
        cache, "val", load_anatomy_table(table_path), CROP, train=True, max_text_length=32
    )
    dataset[0]
    assert sorted(c[0] for c in calls) == ["anatomy.npy", "image.npy"]
    assert all(mode == "r" and kind is np.memmap for _, mode, kind in calls)


def test_workers_and_seeds(cache: Path, table_path: Path) -> None:
    def order(seed: int, workers: int) -> list[str]:
        dm = make_dm(cache, table_path, num_workers=workers, seed=seed, batch_size=2)
        dm.setup("fit")
        return [sid for batch in dm.train_dataloader() for sid in batch["study_id"]]

    with_workers = order(0, 2)
    assert len(with_workers) == 6 and len(set(with_workers)) == 6
    assert order(0, 0) == with_workers  # the order depends on the seed only
    assert any(order(seed, 0) != with_workers for seed in (1, 2, 3))

    dm = make_dm(cache, table_path, num_workers=2, batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    epochs = [torch.cat([finish_crops(b)["image"] for b in loader]) for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # fresh crops every epoch
    val = list(dm.val_dataloader())
    assert [sid for b in val for sid in b["study_id"]] == ["val_00", "val_01"]


def test_distributed_sampler_follows_the_module_seed(cache: Path, table_path: Path) -> None:
    shards = []
    for rank in (0, 1):
        dm = make_dm(cache, table_path, batch_size=2, seed=7)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what DDP would show
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)
        assert loader.sampler.seed == 7 and loader.sampler.rank == rank
        shards.append(list(loader.sampler))
    assert not set(shards[0]) & set(shards[1])  # each rank sees its own studies


def test_fit_without_training_studies_raises(cache: Path, table_path: Path) -> None:
    dm = make_dm(cache, table_path, train_split="nope")
    with pytest.raises(ValueError, match="no 'ok' study"):
        dm.setup("fit")


def _truncated_liver_cache(root: Path, table: AnatomyTable, n: int = 4) -> Path:
    """``n`` train studies whose liver is marked truncated by the field of view in meta.json."""
    rng = np.random.default_rng(5)
    cache = StudyCache(root)
    for i in range(n):
        study_id = f"cut_{i}"
        write_study(root, study_id, table, (12, 16, 20), rng, {"liver": "Liver cut."}, set())
        meta = cache.study_meta(study_id)
        meta["anatomies"]["liver"] |= {"truncated": True, "truncated_faces": ["superior"]}
        cache.update_meta(study_id, meta)
    cache.write_manifest((f"cut_{i}", "train", "ok", "") for i in range(n))
    return root


def test_truncated_anatomy_is_never_valid(tmp_path: Path, table_path: Path) -> None:
    table = load_anatomy_table(table_path)
    root = _truncated_liver_cache(tmp_path, table)
    liver = table.names.index("liver")
    # A crop larger than every volume holds the liver whole, and still it is not valid.
    whole = CachedStudyDataset(root, "train", table, (16, 20, 24), train=True)
    for i in range(len(whole)):
        valid = whole[i]["valid"].numpy()
        assert not valid[liver] and valid[[1, 2]].all()
    # Over many anatomy-aware crops: never valid, never the anchor (another anatomy always is).
    torch.manual_seed(0)
    dataset = CachedStudyDataset(root, "train", table, (8, 10, 12), train=True)
    liver_whole = 0
    for _ in range(50):
        for i in range(len(dataset)):
            sample = finished(dataset[i])
            voxels = StudyCache(root).study_meta(dataset.study_ids[i])["anatomies"]
            inside = counts_in(sample["anatomy"].numpy(), len(table))
            liver_whole += int(inside[liver] == voxels["liver"]["voxels"])
            assert not sample["valid"][liver] and sample["valid"].any()
    assert liver_whole > 0  # the crop did hold the liver whole at times: only truncation blocks it
    # The same studies without the flag (caches written before it existed) are not truncated.
    for i in range(len(dataset)):
        meta = StudyCache(root).study_meta(f"cut_{i}")
        for entry in meta["anatomies"].values():
            entry.pop("truncated", None)
        StudyCache(root).update_meta(f"cut_{i}", meta)
    assert all(whole[i]["valid"].all() for i in range(len(whole)))


def _long_liver_cache(root: Path, table: AnatomyTable, n: int = 4) -> Path:
    """``n`` train studies whose abnormal liver spans 20 x 8 x 12 voxels (100 x 8 x 12 mm)."""
    rng = np.random.default_rng(7)
    cache = StudyCache(root)
    for i in range(n):
        study_id = f"long_{i}"
        texts = {"liver": "Large liver lesion.", "spleen": "Spleen is normal."}
        write_study(root, study_id, table, (24, 16, 20), rng, texts, {"liver"})
        meta = cache.study_meta(study_id)
        meta["anatomies"]["liver"]["bbox"] = [[2, 22], [4, 12], [4, 16]]
        cache.update_meta(study_id, meta)
    cache.write_manifest((f"long_{i}", "train", "ok", "") for i in range(n))
    return root


def test_fit_setup_checks_the_crop(
    tmp_path: Path, table_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An abnormal organ the crop never holds whole: a warning with the numbers; strict fails."""
    table = load_anatomy_table(table_path)
    root = _long_liver_cache(tmp_path, table)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(caplog.handler)  # Lightning's logger does not propagate to the root
    try:
        with caplog.at_level(logging.INFO), pytest.warns(UserWarning) as caught:
            make_dm(root, table_path).setup("fit")
    finally:
        rank_zero.removeHandler(caplog.handler)
    messages = [str(w.message) for w in caught if "crop check" in str(w.message)]
    assert messages == [
        "crop check: anatomy 'liver' carries diseases but is valid in only 0.0 % of the "
        "anatomy-aware crops of 8 x 12 x 16 voxels (40 x 12 x 16 mm) where it is complete "
        "(under 20 %); a crop of at least 20 x 8 x 12 voxels (100 x 8 x 12 mm) holds it in 95 % "
        "of the studies"
    ]
    table_text = caplog.text
    assert f"crop validity of {root} split 'train' (4 studies)" in table_text
    liver = next(line for line in table_text.splitlines() if line.startswith("liver *"))
    assert liver.split()[2:6] == ["100.0", "100.0", "0.0", "100.0"]
    with pytest.raises(ValueError, match="'liver'.*20 x 8 x 12 voxels"):
        make_dm(root, table_path, crop_check="strict").setup("fit")
    # A crop holding the liver passes strict; ``off`` skips the check (no warning either way).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dm(root, table_path, crop_size=(24, 16, 20), crop_check="strict").setup("fit")
        make_dm(root, table_path, crop_check="off").setup("fit")
    with pytest.raises(ValueError, match="crop_check"):
        make_dm(root, table_path, crop_check="loud")


def test_cache_contract_reads_what_the_writer_wrote(cache: Path, table_path: Path) -> None:
    table = load_anatomy_table(table_path)
    contract = StudyCache(cache)
    rows = contract.read_manifest()
    assert len(rows) == 11 and rows[-1].study_id == "broken" and rows[-1].status == "failed"
    assert contract.ok_studies("val") == ["val_00", "val_01"]
    assert len(contract.ok_studies()) == 10 and "broken" not in contract.ok_studies()
    assert contract.hu_window() is None  # this hand-written cache records none
    meta = contract.study_meta("val_00")
    image, anatomy = contract.open_arrays("val_00", meta)
    assert isinstance(image, np.memmap) and image.shape == anatomy.shape == tuple(meta["shape"])
    boxes = contract.bboxes(meta, table, "val_00")
    for i, anatomy_id in enumerate(table.ids):
        where = np.argwhere(np.asarray(anatomy) == anatomy_id)
        np.testing.assert_array_equal(boxes[i, :, 0], where.min(0))
        np.testing.assert_array_equal(boxes[i, :, 1], where.max(0) + 1)
    assert not contract.truncated(meta, table, "val_00").any()
    with pytest.raises(CacheError, match="meta.json shape"):
        contract.open_arrays("val_00", meta | {"shape": [1, 2, 3]})
    with pytest.raises(CacheError, match="nowhere.*rerun `fvlm preprocess`"):
        contract.study_meta("nowhere")
    with pytest.raises(FileNotFoundError, match="run `fvlm preprocess` first"):
        StudyCache(cache / "nope").read_manifest()


def test_table_mismatch_is_reported(cache: Path) -> None:
    dataset = CachedStudyDataset(cache, "val", load_anatomy_table("chest"), CROP, train=False)
    with pytest.raises(ValueError, match="another table"):
        dataset[0]


@pytest.mark.parametrize(
    "overrides",
    [
        {"crop_size": (8, 12)},
        {"crop_size": (8, 0, 16)},
        {"batch_size": 0},
        {"num_workers": -1},
        {"max_text_length": 1},
        {"flip_axes": (3,)},
        {"flip_axes": (1, 1)},
    ],
)
def test_ill_arg(cache: Path, table_path: Path, overrides: dict) -> None:
    with pytest.raises(ValueError):
        make_dm(cache, table_path, **overrides)


def test_missing_manifest(tmp_path: Path, table_path: Path) -> None:
    dm = make_dm(tmp_path, table_path)
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")


def totalseg_example() -> Path:
    folder = Path(
        os.environ.get(
            "FVLM_TOTALSEG_EXAMPLE",
            Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "totalseg-example",
        )
    )
    if not (folder / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"real CT example not found at {folder} (set FVLM_TOTALSEG_EXAMPLE)")
    return folder


def test_real_ct_through_preprocessing_cache(tmp_path: Path) -> None:
    """A real scan + its TotalSegmentator map, preprocessed by fvlm.preprocess, then loaded."""
    example = totalseg_example()
    rows = [
        ("ct_a", "train", "The liver shows a hypodense cyst.", "Hepatic cyst."),
        ("ct_b", "train", "Normal spleen. Kidneys are unremarkable.", ""),
        ("ct_c", "val", "No abnormality.", "Normal study."),
    ]
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "image", "mask", "findings", "impression", "split"])
        for study_id, split, findings, impression in rows:
            ct, seg = example / "example_ct_sm.nii.gz", example / "example_seg.nii.gz"
            writer.writerow([study_id, ct, seg, findings, impression, split])
    config = PreprocessConfig(
        manifest=tmp_path / "manifest.csv", cache=tmp_path / "cache", workers=1, progress=False
    )
    run_preprocess(config)

    crop = (16, 128, 128)
    dm = CTReportDataModule(
        str(tmp_path / "cache"), "paper", crop_size=crop, batch_size=2, num_workers=0
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["val"]) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, *crop) and batch["anatomy"].shape == (2, *crop)
    assert batch["valid"].shape == (2, 35) and batch["valid"].any(dim=1).all()
    for i, study_id in enumerate(batch["study_id"]):
        meta = json.loads((tmp_path / "cache" / "studies" / study_id / "meta.json").read_text())
        voxels = np.array([meta["anatomies"][n]["voxels"] for n in dm.anatomy_names])
        cut = np.array([meta["anatomies"][n]["truncated"] for n in dm.anatomy_names])
        # The example is a 90 mm slab of the abdomen: the liver runs through both ends of it.
        assert cut[dm.anatomy_names.index("liver")] and not cut[dm.anatomy_names.index("pancreas")]
        inside = counts_in(batch["anatomy"][i].numpy(), 35)
        expected = (voxels > 0) & (inside == voxels) & ~cut
        np.testing.assert_array_equal(batch["valid"][i].numpy(), expected)
    liver = dm.anatomy_names.index("liver")
    by_id = dict(zip(batch["study_id"], batch["normal"][:, liver].tolist(), strict=True))
    assert by_id == {"ct_a": False, "ct_b": True}
    val = next(iter(dm.val_dataloader()))
    assert val["study_id"] == ["ct_c"]


def test_batch_of_one_is_refused_with_the_reason(cache: Path, table_path: Path) -> None:
    with pytest.raises(ValueError, match="no negatives"):
        make_dm(cache, table_path, batch_size=1)
    assert make_dm(cache, table_path, batch_size=2, eval_batch_size=1).eval_batch_size == 1


def test_skip_unreadable_reaches_the_datasets(tmp_path: Path, table_path: Path) -> None:
    cache = write_cache(tmp_path / "cache", load_anatomy_table(table_path))
    (cache / "studies" / "train_00" / "image.npy").write_bytes(b"\x93NUMPY")  # truncated
    strict = make_dm(cache, table_path, skip_unreadable=False)
    strict.setup("fit")
    with pytest.raises(CacheError, match="train_00"):
        [strict.datasets["train"][i] for i in range(len(strict.datasets["train"]))]
    lenient = make_dm(cache, table_path, skip_unreadable=True)
    lenient.setup("fit")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ids = [
            lenient.datasets["train"][i]["study_id"] for i in range(len(lenient.datasets["train"]))
        ]
    assert "train_00" not in ids and len(ids) == len(lenient.datasets["train"])
