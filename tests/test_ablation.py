"""``fvlm ablation``: row configs, the run plan, tables, budget and resume, without training.

Each row's overlay goes through the real LightningCLI parser on top of ``configs/demo.yaml``
(``--print_config``, nothing is built), so a row that set an option its module lacks, or lost one
in the merge, fails here. Runs are faked where the logic is not training (resume, tables).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import fvlm.ablation as ab
from fvlm.ablation import (
    ROWS,
    RunSpec,
    budget_estimate,
    format_tables,
    plan_runs,
    read_results,
    row_overlay,
    subset_cache,
)
from fvlm.cli import main as fvlm_main
from fvlm.config_files import resolve_config

EXPECTED_OPTIONS = {
    "clip": {"fncn": False, "identical_text_positive": False},
    "fga": {"fncn": False, "identical_text_positive": False, "label_correction": "none"},
    "fga_fncn": {"fncn": True, "identical_text_positive": True, "label_correction": "none"},
    "fga_cot": {
        "fncn": False, "identical_text_positive": False, "alpha": 0.5, "burn_in_epochs": 3,
        "seeds": [2, 3],
    },
    "fga_fncn_cot": {
        "fncn": True, "identical_text_positive": True, "alpha": 0.5, "burn_in_epochs": 3,
        "seeds": [2, 3],
    },
    "fga_fncn_self": {
        "fncn": True, "identical_text_positive": True, "label_correction": "self", "alpha": 0.5,
        "burn_in_epochs": 3,
    },
    "fga_fncn_momentum": {
        "fncn": True, "identical_text_positive": True, "label_correction": "momentum",
        "alpha": 0.5, "burn_in_epochs": 3,
    },
    "supervised": {"benchmark": "phantom", "anatomy_table": "paper"},
}  # fmt: skip


def overlay(row: str, tmp_path: Path, seed: int = 1) -> dict:
    return row_overlay(
        RunSpec(row, seed), tmp_path / row, epochs=7, burn_in_epochs=3,
        cache=Path("data/cache/phantom"), labels=Path("labels.csv"), anatomy_table="paper",
    )  # fmt: skip


@pytest.mark.parametrize("row", list(ROWS))
def test_each_row_sets_exactly_the_options_it_names(row: str, tmp_path: Path) -> None:
    config = overlay(row, tmp_path)
    assert config["model"] == {"class_path": ROWS[row].model, "init_args": EXPECTED_OPTIONS[row]}
    assert config["seed_everything"] == 1 and config["data"]["seed"] == 1
    assert config["trainer"]["max_epochs"] == 7
    # only co-teaching (manual optimisation) lifts the base config's gradient clipping
    clip_lifted = "gradient_clip_val" in config["trainer"]
    assert clip_lifted == (row in ("fga_cot", "fga_fncn_cot"))
    assert config["trainer"].get("gradient_clip_val") is None
    checkpoint = config["trainer"]["callbacks"][0]["init_args"]
    assert checkpoint["dirpath"] == str(tmp_path / row / "checkpoints") and checkpoint["save_last"]


def printed_config(*configs: Path) -> dict:
    args = [arg for path in configs for arg in ("--config", str(path))]
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream), pytest.raises(SystemExit):
        fvlm_main(["fit", *args, "--print_config"])
    return yaml.safe_load(stream.getvalue())


@pytest.mark.parametrize("row", ["fga", "fga_fncn_cot", "clip", "supervised"])
def test_row_overlays_parse_on_the_demo_config(row: str, tmp_path: Path) -> None:
    """The merged config has the row's module and values; same-module rows change nothing else."""
    path = tmp_path / "row.yaml"
    path.write_text(yaml.safe_dump(overlay(row, tmp_path)))
    demo = resolve_config("demo")
    base = printed_config(demo)["model"]
    merged = printed_config(demo, path)["model"]
    assert merged["class_path"] == ROWS[row].model
    for key, value in EXPECTED_OPTIONS[row].items():
        assert merged["init_args"][key] == value, key
    # the towers of the base config survive a change of module
    assert merged["init_args"]["vision"] == base["init_args"]["vision"]
    assert merged["init_args"]["embed_dim"] == base["init_args"]["embed_dim"] == 128
    if merged["class_path"] == base["class_path"]:
        changed = {k for k, v in merged["init_args"].items() if base["init_args"].get(k) != v}
        assert changed <= set(EXPECTED_OPTIONS[row]), changed


def test_plan_covers_rows_seeds_and_data_fractions() -> None:
    runs = plan_runs(["clip", "fga_fncn_cot", "supervised"], [0, 1], [0.25, 1.0])
    names = [r.name for r in runs]
    assert names[:6] == [
        "clip-s0", "clip-s1", "fga_fncn_cot-s0", "fga_fncn_cot-s1", "supervised-s0",
        "supervised-s1",
    ]  # fmt: skip
    assert names[6:] == ["clip-s0-f25", "clip-s1-f25", "fga_fncn_cot-s0-f25", "fga_fncn_cot-s1-f25"]
    with pytest.raises(ValueError, match="unknown ablation rows"):
        plan_runs(["fga", "cot"], [0])
    with pytest.raises(ValueError, match="data_fractions"):
        plan_runs(["fga"], [0], [1.5])


def fake_results(rows: dict[str, list[float]], epochs: int = 20) -> pd.DataFrame:
    """Macro rows (and one disease row) with the given AUROC per seed; ACC = AUROC - 0.1."""
    records = []
    for row, aurocs in rows.items():
        for seed, auroc in enumerate(aurocs):
            for disease in ("macro", "liver/steatosis"):
                records.append({
                    "row": row, "label": ROWS[row].label, "seed": seed, "fraction": 1.0,
                    "epochs": epochs, "steps_per_network": 600, "train_s": 200.0, "eval_s": 30.0,
                    "disease": disease, "auroc": auroc, "balanced_acc": auroc - 0.1,
                })  # fmt: skip
    return pd.DataFrame(records)


def test_tables_print_mean_and_spread_beside_the_paper() -> None:
    results = fake_results({"clip": [0.60, 0.64], "fga_fncn": [0.80], "fga_fncn_cot": [0.9, 0.8]})
    text = format_tables(results)
    lines = text.splitlines()
    assert "| CLIP | 62.0 ± 2.0 | 52.0 ± 2.0 | 2 | 70.9 | 69.3 |" in lines  # Tab. 4
    assert "| CLIP | 62.0 ± 2.0 | 52.0 ± 2.0 | 2 | 68.4 | 66.7 |" in lines  # Tab. 1
    assert "| FGA+FNCN | 80.0 | 70.0 | 1 | 78.7 | 75.3 |" in lines
    assert "| none (baseline) | 80.0 | 70.0 | 1 | 78.7 | 75.3 |" in lines  # Tab. 5
    assert "| co-teaching | 85.0 ± 5.0 | 75.0 ± 5.0 | 2 | 79.8 | 75.9 |" in lines
    assert "| FGA | - | - | 0 | 76.0 | 74.0 |" in lines  # not run yet
    # another epoch count is another experiment
    assert "| CLIP | - | - | 0 |" in format_tables(results, epochs=5)


def test_budget_uses_costs_then_measured_times() -> None:
    runs = [RunSpec("fga", 0), RunSpec("fga_fncn_cot", 0), RunSpec("clip", 0, 0.5)]
    expected = (1.0 + 2.5 + 0.95 * 0.5) * 20 * 10.0 + 3 * 40.0
    assert budget_estimate(runs, 20, 10.0, 40.0) == pytest.approx(expected)
    # measured: 200 s for one cost unit x 20 epochs -> 10 s per unit-epoch... here 2 units
    done = fake_results({"fga": [0.8], "fga_fncn_cot": [0.8]})
    per_unit = 400.0 / ((1.0 + 2.5) * 20)
    assert budget_estimate(runs[:1], 20, 99.0, 99.0, done) == pytest.approx(per_unit * 20 + 30.0)


def test_subset_cache_keeps_nested_fractions_of_training_studies(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "studies").mkdir(parents=True)
    ids = [f"s{i:02d}" for i in range(20)]
    splits = ["train"] * 16 + ["test"] * 4
    pd.DataFrame({"study_id": ids, "split": splits, "status": "ok", "reason": ""}).to_csv(
        cache / "manifest.csv", index=False
    )
    kept = {}
    for fraction in (0.25, 0.5):
        view = subset_cache(cache, fraction, tmp_path / "views")
        manifest = pd.read_csv(view / "manifest.csv")
        kept[fraction] = set(manifest.loc[manifest["split"] == "train", "study_id"])
        assert (view / "studies").resolve() == (cache / "studies").resolve()
        assert (manifest["split"] == "test").sum() == 4
    assert len(kept[0.25]) == 4 and len(kept[0.5]) == 8
    assert kept[0.25] < kept[0.5]


def test_interrupted_ablation_resumes_with_the_pending_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs in results.csv are skipped; a fit whose last.ckpt is complete is not run again."""
    out = tmp_path / "out"
    out.mkdir()
    fake_results({"clip": [0.6]}, epochs=2).to_csv(out / "results.csv", index=False)
    # fga_fncn trained both epochs before the interruption, but was not evaluated
    done = out / "runs" / "fga_fncn-s0-e2" / "checkpoints"
    done.mkdir(parents=True)
    loops = {"fit_loop": {"epoch_progress": {"current": {"completed": 2}}}}
    torch.save({"global_step": 60, "loops": loops}, done / "last.ckpt")
    fits: list[tuple[str, Path | None]] = []

    def fake_fit(base: Path, overlay: Path, run_dir: Path, resume: Path | None) -> None:
        fits.append((run_dir.name, resume))
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        torch.save({"global_step": 60, "loops": loops}, run_dir / "checkpoints" / "last.ckpt")

    def fake_evaluate(checkpoints, names, *args, **kwargs) -> dict:
        table = pd.DataFrame(
            {"auroc": [0.7, 0.7], "balanced_acc": [0.6, 0.6], "acc": [0.6, 0.6],
             "n_pos": [3, 3], "n_neg": [3, 3]},
            index=pd.Index(["liver/steatosis", "macro"], name="disease"),
        )  # fmt: skip
        return {names[0]: table}

    monkeypatch.setattr(ab, "_fit", fake_fit)
    monkeypatch.setattr("fvlm.evaluation.run.evaluate_checkpoints", fake_evaluate)
    labels = tmp_path / "labels.csv"
    labels.write_text("study_id,liver/steatosis\na,1\n")
    code = ab.ablation(
        rows=["clip", "fga_fncn", "supervised"], epochs=2, out=out, labels=labels,
        cache=tmp_path / "cache",
    )  # fmt: skip
    assert code == 0
    assert fits == [("supervised-s0-e2", None)]  # clip: in the CSV; fga_fncn: checkpoint done
    assert "3 runs (1 finished)" in capsys.readouterr().out
    results = read_results(out / "results.csv")
    macro = results[results["disease"] == "macro"].set_index("row")
    assert list(macro.index) == ["clip", "fga_fncn", "supervised"]
    assert macro.loc["fga_fncn", "steps_per_network"] == 60
    assert np.isnan(macro.loc["fga_fncn", "train_s"])  # resumed: no comparable wall time
    assert "| Supervised | 70.0 | 60.0 | 1 | 73.3 | 69.1 |" in (out / "tables.md").read_text()
    assert (out / "ablation.png").is_file() and (out / "per_disease.csv").is_file()


def test_fig10_distances_are_read_from_the_runs_logs(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for name, values in {"fga_fncn_momentum-s0-e3": [0.01, 0.02, 0.02], "fga-s0-e3": [9.0]}.items():
        with SummaryWriter(str(tmp_path / "runs" / name / "tensorboard" / "version_0")) as writer:
            for step, value in enumerate(values):
                writer.add_scalar(ab.DISTANCE_TAG, value, step)
    curves = ab.read_distances(tmp_path / "runs")
    assert list(curves) == ["fga_fncn_momentum-s0-e3"]  # FGA has no label-correction model
    assert [v for _, v in curves["fga_fncn_momentum-s0-e3"]] == pytest.approx([0.01, 0.02, 0.02])
    assert ab.plot_distances(curves, tmp_path / "fig10.png").stat().st_size > 1000
    assert ab.plot_distances({}, tmp_path / "none.png") is None


def test_co_teaching_steps_count_per_network() -> None:
    """Two co-taught networks share the checkpoint's step count: each took half of it."""
    table = pd.DataFrame(
        {"auroc": [0.7], "balanced_acc": [0.6], "acc": [0.6], "n_pos": [3], "n_neg": [3]},
        index=pd.Index(["macro"], name="disease"),
    )
    cot = ab.run_results(RunSpec("fga_fncn_cot", 0), 2, table, 10.0, 5.0, steps=60)
    single = ab.run_results(RunSpec("fga_fncn", 0), 2, table, 10.0, 5.0, steps=30)
    assert cot["steps_per_network"].item() == single["steps_per_network"].item() == 30


@pytest.mark.parametrize("row", list(ROWS))
def test_every_row_clips_gradients_like_the_base_config(row: str, tmp_path: Path) -> None:
    config = row_overlay(
        RunSpec(row, 0), tmp_path / row, epochs=7, burn_in_epochs=3,
        cache=Path("c"), labels=Path("l.csv"), anatomy_table="paper", gradient_clip_val=1.0,
    )  # fmt: skip
    manual = row in ("fga_cot", "fga_fncn_cot")  # Lightning's clipping is lifted: the module clips
    assert config["model"]["init_args"].get("gradient_clip_val") == (1.0 if manual else None)
    assert ("gradient_clip_val" in config["trainer"]) == manual
