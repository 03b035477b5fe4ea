"""Crop validity report and recipe measurements on the phantom's geometries and mm extents."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from realistic_extents import sample_scans

from fvlm import cli
from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.crop_validity import (
    CropValidityError,
    StudyBoxes,
    check_crop_validity,
    crop_report,
    crop_validity_rows,
    read_study_boxes,
    simulate_crop_validity,
    smallest_holding_crop,
)

CHEST = load_anatomy_table("chest")
PAPER = load_anatomy_table("paper")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Preprocessing spacing (mm), training crop and ViT patch (voxels)."""

    spacing: tuple[float, float, float]
    crop: tuple[int, int, int]
    patch: tuple[int, int, int]

    @property
    def tokens(self) -> int:
        return math.prod(c // p for c, p in zip(self.crop, self.patch, strict=True))


def config_recipe(preprocess: str, *fit: str) -> Recipe:
    """The recipe of ``configs/preprocess/<preprocess>.yaml`` + ``fvlm fit --config`` overlays."""
    spacing = yaml.safe_load((CONFIGS / "preprocess" / f"{preprocess}.yaml").read_text())["spacing"]
    crop = patch = None
    for name in fit:  # a later --config overrides an earlier one
        config = yaml.safe_load((CONFIGS / name).read_text())
        crop = config.get("data", {}).get("crop_size", crop)
        vision = config.get("model", {}).get("init_args", {}).get("vision", {})
        patch = vision.get("patch_size", patch)
    return Recipe(tuple(spacing), tuple(crop), tuple(patch))


#: The configs' recipes (what the tests assert) and the ones they replaced (what they fixed).
CTRATE = config_recipe("chest", "fvlm.yaml", "ctrate.yaml")
FVLM = config_recipe("abdomen", "fvlm.yaml")
CTRATE_BEFORE = Recipe((1.5, 0.75, 0.75), (96, 384, 384), (16, 32, 32))  # CT-CLIP's grid
AUTHORS_RELEASE = Recipe((3.0, 1.0, 1.0), (112, 256, 352), (16, 32, 32))
FVLM_PAPER = Recipe((5.0, 1.0, 1.0), (96, 256, 384), (16, 16, 32))

#: Anatomies item 5 of the recipe requirement names for CT-RATE (the trachea carries no label
#: but the heart's and lung's neighbours are judged with it).
CHEST_TRAINED = ("lung", "heart", "esophagus", "trachea", "aorta")
ABDOMEN_DISEASED = tuple(
    a.name for a in PAPER.anatomies if any("paper" in d.sets for d in a.diseases)
)


def one_study(
    boxes: list, shape: tuple[int, int, int], truncated: list | None = None
) -> StudyBoxes:
    n = len(boxes)
    return StudyBoxes(
        study_ids=("s0",),
        names=tuple(f"a{i}" for i in range(n)),
        shapes=np.array([shape]),
        spacing=np.ones((1, 3)),
        bboxes=np.array([boxes]),
        truncated=np.array([truncated or [False] * n]),
        abnormal=np.zeros((1, n), bool),
    )


def test_simulated_rates_match_hand_computation() -> None:
    # Axis 0 of 20 voxels, crop 5: A = [10, 12) is held by starts 7..10, C = [8, 10) by 5..8,
    # B = [0, 20) never fits. Either eligible anatomy is chosen half the time and then holds the
    # other in 2 of its 4 starts: each is valid in 1/2 + 1/2 * 2/4 = 75 % of the crops.
    studies = one_study(
        [[[10, 12], [0, 1], [0, 1]], [[0, 20], [0, 1], [0, 1]], [[8, 10], [0, 1], [0, 1]]],
        (20, 1, 1),
    )
    valid, crops = simulate_crop_validity(studies, (5, 1, 1), draws=40_000, seed=0)
    assert crops.tolist() == [40_000] * 3
    rates = valid / crops
    assert abs(rates[0] - 0.75) < 0.01 and abs(rates[2] - 0.75) < 0.01 and rates[1] == 0


def test_field_of_view_truncation_is_never_valid() -> None:
    studies = one_study(
        [[[0, 4], [0, 4], [0, 4]], [[2, 6], [2, 6], [2, 6]]], (8, 8, 8), truncated=[True, False]
    )
    valid, crops = simulate_crop_validity(studies, (8, 8, 8), draws=100)
    assert valid.tolist() == [0, 100] and crops.tolist() == [0, 100]
    rows = crop_validity_rows(studies, (8, 8, 8))
    assert math.isnan(rows[0].valid) and rows[0].complete == 0 and rows[0].present == 1


def test_smallest_holding_crop() -> None:
    extents = np.array([[10, 1, 1]] * 95 + [[1, 10, 1]] * 5)
    assert smallest_holding_crop(extents, 0.95).tolist() == [10, 1, 1]
    # 90 studies small, 10 large on different axes: per-axis 95th percentiles would hold 90 %.
    extents = np.array([[1, 1, 1]] * 90 + [[9, 1, 1]] * 5 + [[1, 9, 1]] * 5)
    crop = smallest_holding_crop(extents, 0.95)
    assert np.prod(crop) == 9 and (extents <= crop).all(axis=1).mean() >= 0.95
    assert smallest_holding_crop(np.zeros((0, 3)), 0.95) is None
    with pytest.raises(ValueError):
        smallest_holding_crop(extents, 1.5)


def write_cache(root: Path, studies: list[dict]) -> None:
    """A cache of JSON files only (what the report reads): manifest, meta.json, report.json."""
    lines = ["study_id,split,status,reason"]
    for i, study in enumerate(studies):
        sid = f"s{i}"
        lines.append(f"{sid},{study.get('split', 'train')},{study.get('status', 'ok')},")
        folder = root / "studies" / sid
        folder.mkdir(parents=True)
        meta = {"shape": study["shape"], "spacing": [2.0, 1.0, 1.0], "anatomies": study["meta"]}
        (folder / "meta.json").write_text(json.dumps(meta))
        report = {"anatomies": {k: {"normal": v} for k, v in study.get("normal", {}).items()}}
        (folder / "report.json").write_text(json.dumps(report))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_report_from_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lung = {"bbox": [[0, 40], [5, 35], [5, 55]], "voxels": 100}
    heart = {"bbox": [[5, 15], [10, 20], [20, 30]], "voxels": 50}
    studies = [
        {"shape": [40, 40, 60], "meta": {"lung": lung, "heart": heart}, "normal": {"lung": False}},
        {"shape": [40, 40, 60], "meta": {"lung": lung | {"truncated": True}, "heart": heart}},
        {"shape": [40, 40, 60], "meta": {"heart": heart}},
        {"shape": [40, 40, 60], "meta": {"lung": lung, "heart": heart}, "split": "valid"},
        {"shape": [40, 40, 60], "meta": {"lung": lung}, "status": "failed"},
    ]
    write_cache(tmp_path, studies)
    check = check_crop_validity(tmp_path, (16, 32, 32), CHEST, split="train")
    rows, warnings = check.rows, check.warnings
    by = {r.anatomy: r for r in rows}
    assert by["lung"].studies == 3
    assert by["lung"].present == pytest.approx(2 / 3) and by["lung"].complete == pytest.approx(
        1 / 3
    )
    assert by["lung"].abnormal == pytest.approx(1 / 3) and by["lung"].valid == 0.0
    assert by["heart"].valid == 1.0 and by["trachea"].present == 0
    assert by["lung"].holding_crop == (40, 30, 50)
    assert by["lung"].holding_crop_mm == (80.0, 30.0, 50.0)
    assert len(warnings) == 1 and "'lung'" in warnings[0]
    assert "0.0 %" in warnings[0] and "40 x 30 x 50 voxels (80 x 30 x 50 mm)" in warnings[0]
    with pytest.raises(CropValidityError, match="lung"):
        check_crop_validity(tmp_path, (16, 32, 32), CHEST, split="train", strict=True)
    # A crop that holds the lung: no warning, strict passes.
    check = check_crop_validity(tmp_path, (40, 40, 60), CHEST, strict=True)
    assert check.warnings == [] and check.rows[0].valid == 1.0
    crop_report(tmp_path, (16, 32, 32), "chest", split="train", draws=500)
    out = capsys.readouterr().out
    assert "lung *" in out and "valid in crops %" in out and "warning: anatomy 'lung'" in out


def test_unknown_anatomy_names_the_study(tmp_path: Path) -> None:
    write_cache(tmp_path, [{"shape": [8, 8, 8], "meta": {"liver": {"bbox": [[0, 1]] * 3}}}])
    with pytest.raises(ValueError, match="study 's0'.*liver"):
        check_crop_validity(tmp_path, (4, 4, 4), CHEST)


def test_crop_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fvlm crop-report`` prints each anatomy's shares and the suggested crop; strict fails."""
    lung = {"bbox": [[0, 40], [5, 35], [5, 55]], "voxels": 100}
    heart = {"bbox": [[5, 15], [10, 20], [20, 30]], "voxels": 50}
    write_cache(
        tmp_path,
        [
            {
                "shape": [40, 40, 60],
                "meta": {"lung": lung, "heart": heart},
                "normal": {"lung": False},
            },
            {"shape": [40, 40, 60], "meta": {"lung": lung | {"truncated": True}, "heart": heart}},
            {"shape": [40, 40, 60], "meta": {"heart": heart}, "normal": {"heart": False}},
            {"shape": [40, 40, 60], "meta": {"lung": lung, "heart": heart}},
        ],
    )
    args = ["crop-report", "--cache", str(tmp_path), "--crop_size", "[16, 32, 32]"]
    assert cli.main([*args, "--anatomy_table", "chest", "--draws", "800"]) == 0
    out = capsys.readouterr().out
    assert "(4 studies) at crop 16 x 32 x 32 voxels (32 x 32 x 32 mm at 2 x 1 x 1 mm" in out
    cells = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isalpha()}
    # lung: present 3/4, complete 2/4, never held by 32 mm; heart: always held, abnormal 1/4
    assert cells["lung"][2:6] == ["75.0", "50.0", "0.0", "25.0"]
    assert cells["heart"][2:6] == ["100.0", "100.0", "100.0", "25.0"]
    assert cells["trachea"][1:4] == ["0.0", "0.0", "-"]
    assert "warning: anatomy 'lung' carries diseases but is valid in only 0.0 %" in out
    assert "a crop of at least 40 x 30 x 50 voxels (80 x 30 x 50 mm)" in out
    # As if preprocessed at 4 x 2 x 2 mm: the crop spans 64 x 64 x 64 mm; the lung's box grows to
    # whole coarse voxels ([5, 35) mm -> voxels [2, 18), 32 mm), never shrinks.
    assert cli.main([*args, "--anatomy_table", "chest", "--spacing", "[4, 2, 2]"]) == 0
    out = capsys.readouterr().out
    assert "(64 x 64 x 64 mm at 4 x 2 x 2 mm" in out
    assert "20 x 16 x 26 voxels (80 x 32 x 52 mm)" in out
    assert cli.main([*args, "--anatomy_table", "chest", "--strict", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fvlm crop-report: error:") and "'lung'" in err and "\n" == err[-1]


def test_crop_report_help() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["crop-report", "--help"])
    assert exit_info.value.code == 0


def test_resampled_keeps_millimetres() -> None:
    studies = one_study([[[3, 7], [0, 5], [2, 4]], [[0, 0], [0, 0], [0, 0]]], (10, 6, 6))
    coarse = studies.resampled((2.0, 4.0, 1.0))
    assert coarse.shapes.tolist() == [[5, 2, 6]]  # round(10 / 2), round(6 / 4), 6
    assert coarse.bboxes[0, 0].tolist() == [[1, 4], [0, 2], [2, 4]]  # never shrinks
    assert not coarse.present[0, 1] and coarse.study_ids == ("s0",)
    with pytest.raises(ValueError, match="spacing"):
        studies.resampled((0.0, 1.0, 1.0))


def test_thousands_of_draws_in_well_under_a_second() -> None:
    boxes, fov, truncated = sample_scans("abdomen", PAPER.names, 1000, seed=0)
    studies = StudyBoxes.from_mm(boxes, fov, FVLM_PAPER.spacing, PAPER.names, truncated)
    begin = time.perf_counter()
    simulate_crop_validity(studies, FVLM_PAPER.crop, draws=20_000)
    assert time.perf_counter() - begin < 1.0


def test_recipes_crop_whole_patches() -> None:
    for recipe in (CTRATE, FVLM):
        assert all(c % p == 0 for c, p in zip(recipe.crop, recipe.patch, strict=True)), recipe
    assert (CTRATE.tokens, FVLM.tokens) == (972, 1152)


# -- the recipes on the phantom's adult geometries (real generator, real preprocessing) ----------

#: Coarse voxels of the geometries' millimetre extents; boxes are rescaled to each recipe's grid.
COARSE = (6.0, 6.0, 6.0)


def phantom_studies(root: Path, geometry: str, preprocess: str, n: int) -> StudyBoxes:
    """``n`` phantom studies of ``geometry`` through ``configs/preprocess/<preprocess>.yaml``.

    Generated and preprocessed at :data:`COARSE` (the same mm extents; only the grid differs) with
    the phantom's own masks; the boxes are then read from the cache's ``meta.json``.
    """
    from fvlm.phantom import generate_phantom
    from fvlm.preprocess.config import PreprocessConfig
    from fvlm.preprocess.runner import run_preprocess

    config = yaml.safe_load((CONFIGS / "preprocess" / f"{preprocess}.yaml").read_text())
    table = config["anatomy_table"]
    manifest = generate_phantom(
        root / "raw", n, seed=0, geometry=geometry, spacing=COARSE, preset=table, progress=False
    )
    settings = PreprocessConfig(
        manifest=manifest,
        cache=root / "cache",
        spacing=COARSE,
        hu_window=tuple(config["hu_window"]),
        anatomy_table=table,
        segmenter="precomputed",
        totalseg_version="v2",
        decomposer="rules",
        workers=1,
        progress=False,
    )
    assert run_preprocess(settings).exit_code == 0
    return read_study_boxes(root / "cache", load_anatomy_table(table), split=None)


#: Anatomies of the paper's 54 diseases that the abdomen phantom draws whole (it draws no
#: adrenal gland or portal vein; the lung and heart are cut by its field of view).
PHANTOM_ABDOMEN = (
    "liver", "kidney", "spleen", "pancreas", "gallbladder", "stomach", "colon", "small_bowel",
    "urinary_bladder", "esophagus", "sacrum",
)  # fmt: skip


@pytest.fixture(scope="module")
def chest_phantom(tmp_path_factory: pytest.TempPathFactory) -> StudyBoxes:
    return phantom_studies(tmp_path_factory.mktemp("chest"), "chest", "chest", 40)


@pytest.fixture(scope="module")
def abdomen_phantom(tmp_path_factory: pytest.TempPathFactory) -> StudyBoxes:
    return phantom_studies(tmp_path_factory.mktemp("abdomen"), "abdomen", "abdomen", 40)


def rows_by_name(studies: StudyBoxes, table: AnatomyTable, recipe: Recipe) -> dict:
    rows = crop_validity_rows(studies.resampled(recipe.spacing), recipe.crop, table, 20_000)
    return {row.anatomy: row for row in rows}


def only(studies: StudyBoxes, keep: np.ndarray) -> StudyBoxes:
    """The studies where ``keep`` is true."""
    return dataclasses.replace(
        studies,
        study_ids=tuple(np.asarray(studies.study_ids)[keep]),
        **{
            f: getattr(studies, f)[keep]
            for f in ("shapes", "spacing", "bboxes", "truncated", "abnormal")
        },
    )


def test_ctrate_recipe_on_the_chest_phantom(chest_phantom: StudyBoxes) -> None:
    rows = rows_by_name(chest_phantom, CHEST, CTRATE)
    for name in CHEST_TRAINED:
        assert rows[name].complete >= 0.9 and rows[name].valid >= 0.8, rows[name]
    before = rows_by_name(chest_phantom, CHEST, CTRATE_BEFORE)
    assert before["lung"].valid == 0.0 and before["esophagus"].valid == 0.0
    # Enlarged hearts (150 mm and more craniocaudal) alone.
    heart = CHEST.index("heart")
    extent_mm = (chest_phantom.bboxes[:, heart, 0, 1] - chest_phantom.bboxes[:, heart, 0, 0]) * (
        chest_phantom.spacing[:, 0]
    )
    enlarged = extent_mm >= 150
    assert enlarged.sum() >= 10
    assert rows_by_name(only(chest_phantom, enlarged), CHEST, CTRATE)["heart"].valid >= 0.8
    assert before["heart"].valid < 0.8


def test_fvlm_recipe_on_the_abdomen_phantom(abdomen_phantom: StudyBoxes) -> None:
    rows = rows_by_name(abdomen_phantom, PAPER, FVLM)
    measured = {k: rows[k].valid for k in ABDOMEN_DISEASED if rows[k].complete > 0}
    assert set(PHANTOM_ABDOMEN) <= set(measured) and min(measured.values()) >= 0.8, measured
    before = rows_by_name(abdomen_phantom, PAPER, FVLM_PAPER)
    assert before["liver"].valid < 0.8  # the paper's 256 mm front to back and 480 mm in height


# -- the same recipes on adult extents in mm (realistic_extents), a second, independent model ----


def mm_rates(geometry: str, table: AnatomyTable, recipe: Recipe, n: int = 1500, keep=None):
    open_ends = {a.name: a.open_ends for a in table.anatomies}
    boxes, extent, truncated = sample_scans(geometry, table.names, n, seed=1, open_ends=open_ends)
    if keep is not None:
        mask = keep(boxes)
        boxes, extent, truncated = boxes[mask], extent[mask], truncated[mask]
    studies = StudyBoxes.from_mm(boxes, extent, recipe.spacing, table.names, truncated)
    return {r.anatomy: r.valid for r in crop_validity_rows(studies, recipe.crop, table, 20_000)}


def test_ctrate_before_trains_no_lung() -> None:
    rates = mm_rates("chest", CHEST, CTRATE_BEFORE)
    assert rates["lung"] == 0.0 and rates["esophagus"] == 0.0 and rates["heart"] < 0.5
    release = mm_rates("chest", CHEST, AUTHORS_RELEASE)
    assert release["lung"] < 0.7  # 256 mm front to back holds the lungs in too few crops


def test_ctrate_recipe_trains_chest_anatomies() -> None:
    rates = mm_rates("chest", CHEST, CTRATE)
    assert min(rates[name] for name in CHEST_TRAINED) >= 0.8, rates
    heart = CHEST.index("heart")
    enlarged = mm_rates(
        "chest", CHEST, CTRATE, keep=lambda b: b[:, heart, 0, 1] - b[:, heart, 0, 0] >= 150
    )
    assert enlarged["heart"] >= 0.8


def test_fvlm_paper_crop_misses_abdominal_anatomies() -> None:
    rates = mm_rates("abdomen", PAPER, FVLM_PAPER)
    assert rates["colon"] < 0.5 and rates["liver"] < 0.6


def test_fvlm_recipe_trains_every_diseased_abdominal_anatomy() -> None:
    rates = mm_rates("abdomen", PAPER, FVLM)
    measured = {k: rates[k] for k in ABDOMEN_DISEASED if not math.isnan(rates[k])}
    assert len(measured) >= 12 and min(measured.values()) >= 0.8, measured
