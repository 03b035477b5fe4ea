"""A reduced ablation end to end: two rows, one epoch, a tiny cache; the tables are well formed.

Slow (two ``fvlm fit`` subprocesses and two evaluations, about a minute on 2 cores); the fast
tests of the row configs, tables and resume logic are in ``tests/test_ablation.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cache_factory import write_cache

from fvlm.ablation import ablation, read_results
from fvlm.data_modules.study_dataset import read_cache_manifest

pytestmark = pytest.mark.slow

CROP = [8, 24, 24]


def tiny_base(folder: Path, tiny_bert: dict) -> Path:
    """A base config like the demo's, with a 1-layer ViT and the suite's tiny BERT."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_model_summary": False,
        },
        "model": {
            "class_path": "fvlm.lit_modules.FineGrainedCLIPModule",
            "init_args": {
                "vision": {
                    "patch_size": [4, 8, 8], "hidden_size": 16, "mlp_dim": 32, "num_layers": 1,
                    "num_heads": 2,
                },
                "text_config": tiny_bert, "embed_dim": 16, "warmup_epochs": 0,
            },
        },
        "data": {
            "cache_dir": "set-by-the-row", "anatomy_table": "paper", "tokenizer": "minilm",
            "crop_size": CROP, "batch_size": 4, "num_workers": 0, "max_text_length": 32,
            "report_max_length": 128, "crop_check": "off",
        },
    }  # fmt: skip
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def balanced_labels(cache: Path, path: Path) -> Path:
    """Alternating 0/1 labels of the phantom diseases of the cache's anatomies."""
    keys = [
        "liver/steatosis", "liver/cyst", "kidney/cyst", "spleen/splenomegaly",
        "pancreas/pancreatitis", "gallbladder/gallstone",
    ]  # fmt: skip
    studies = [r["study_id"] for r in read_cache_manifest(cache) if r["status"] == "ok"]
    values = (np.arange(len(studies))[:, None] + np.arange(len(keys))[None]) % 2
    pd.DataFrame(values, columns=keys).assign(study_id=studies).to_csv(path, index=False)
    return path


def test_two_rows_one_epoch_give_well_formed_tables(
    tmp_path: Path, tiny_bert, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = write_cache(tmp_path / "cache", n_train=8, n_val=2, n_test=6, shape=(12, 24, 24))
    labels = balanced_labels(cache, tmp_path / "labels.csv")
    base = tiny_base(tmp_path, tiny_bert())
    out = tmp_path / "ablation"
    options = dict(
        rows=["fga_fncn", "supervised"], seeds=[0], epochs=1, burn_in_epochs=0,
        base_config=str(base), cache=cache, labels=labels, out=out,
    )  # fmt: skip
    assert ablation(**options) == 0
    printed = capsys.readouterr().out

    results = read_results(out / "results.csv")
    macro = results[results["disease"] == "macro"].set_index("row")
    assert sorted(macro.index) == ["fga_fncn", "supervised"]
    assert macro["auroc"].between(0, 1).all() and macro["balanced_acc"].between(0, 1).all()
    # every row took the same optimiser updates: 8 studies / batch 4 = 2 steps in one epoch
    assert (macro["steps_per_network"] == 2).all(), macro["steps_per_network"]
    diseases = set(results["disease"]) - {"macro"}
    assert diseases == set(pd.read_csv(labels).columns) - {"study_id"}

    tables = (out / "tables.md").read_text()
    assert tables in printed
    for title in ("Tab. 4", "Tab. 5", "Tab. 1"):
        assert title in tables
    fncn_line = next(line for line in tables.splitlines() if line.startswith("| FGA+FNCN |"))
    assert f"{100 * macro.loc['fga_fncn', 'auroc']:.1f}" in fncn_line and "78.7" in fncn_line
    per_disease = pd.read_csv(out / "per_disease.csv", index_col=0)
    assert set(per_disease.columns) == {"FGA+FNCN", "Supervised"}
    assert (out / "ablation.png").stat().st_size > 1000

    # A second call finds both runs finished: nothing is trained again.
    assert ablation(**options) == 0
    assert "(2 finished)" in capsys.readouterr().out
    assert len(read_results(out / "results.csv")) == len(results)
