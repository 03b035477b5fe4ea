"""Training end to end on a tiny cache through the real data module: CLI, resume, learning.

The CLI runs ``fit`` for each LightningModule from a YAML file, as a user would; the resume test
compares an interrupted run with an uninterrupted one step by step; the learning test checks that
a short fit takes the contrastive loss clearly below chance level. Towers are tiny (a 1-layer ViT
and the suite's 1-layer BERT, ``tiny_bert``, with the MiniLM tokenizer's vocabulary) and torch
runs on one thread: on a shared 2-core machine two intra-op threads make these millisecond-sized
steps 10-50x slower.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from cache_factory import DEFAULT_ANATOMIES, write_cache
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from fvlm.anatomy import AnatomyTable
from fvlm.cli import main as fvlm_main
from fvlm.data_modules import CachedStudyDataset, CTReportDataModule, collate_studies
from fvlm.data_modules.study_dataset import read_cache_manifest
from fvlm.evaluation import evaluate_scores, zero_shot_scores
from fvlm.lit_modules import FineGrainedCLIPModule
from fvlm.lit_modules.cli import run_cli
from fvlm.models import VisionConfig, load_tokenizer

TinyBert = Callable[..., dict]  # conftest's tiny_bert factory

SHAPE = (12, 24, 24)  # cache volumes
CROP = (8, 24, 24)  # random anatomy-aware crops: about 3 of the 5 anatomies stay whole
PATCH = (4, 8, 8)


def vision(crop: Sequence[int]) -> dict:
    return {
        "img_size": list(crop), "patch_size": list(PATCH), "hidden_size": 16, "mlp_dim": 32,
        "num_layers": 1, "num_heads": 2,
    }  # fmt: skip


def _unsized(config: dict) -> dict:
    return {key: value for key, value in config.items() if key != "img_size"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache") / "cache", n_train=12, n_val=2, shape=SHAPE)


class LossRecorder(Callback):
    """Records ``(epoch, batch_idx, study ids, loss)`` after every training step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, tuple[str, ...], float]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: dict, batch: dict, idx: int
    ) -> None:
        loss = float(outputs["loss"])
        self.steps.append((trainer.current_epoch, idx, tuple(batch["study_id"]), loss))

    def losses(self, epoch: int | None = None) -> list[float]:
        return [s[3] for s in self.steps if epoch is None or s[0] == epoch]


def write_config(
    folder: Path, cache: Path, text: dict, model: str, trainer: dict | None = None, **init_args
) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "default_root_dir": str(folder), "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, **(trainer or {}),
        },
        "model": {
            "class_path": f"fvlm.lit_modules.{model}",
            # no img_size: the CLI links it from data.crop_size
            "init_args": {"vision": _unsized(vision(CROP)), "text_config": text, "embed_dim": 16}
            | init_args,
        },
        "data": {
            "cache_dir": str(cache), "anatomy_table": "paper", "tokenizer": "minilm",
            "crop_size": list(CROP), "batch_size": 4, "num_workers": 0, "max_text_length": 32,
            "report_max_length": 128,
        },
    }  # fmt: skip
    path = folder / f"{model}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "init_args"),
    [
        ("FineGrainedCLIPModule", {"label_correction": "momentum", "burn_in_epochs": 0}),
        ("GlobalCLIPModule", {}),
        ("CoTeachingModule", {"burn_in_epochs": 0}),
    ],
)
def test_cli_fit_fast_dev_run(
    cache: Path,
    tmp_path: Path,
    tiny_bert: TinyBert,
    model: str,
    init_args: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["fvlm"])  # LightningCLI warns when pytest's argv is set
    config = write_config(tmp_path, cache, tiny_bert(), model, **init_args)
    # fast_dev_run caps the optimiser steps; co-teaching takes two per batch (one per network).
    dev_run = 1 if model == "CoTeachingModule" else 2
    cli = run_cli(["fit", "--config", str(config), f"--trainer.fast_dev_run={dev_run}"])
    assert type(cli.model).__name__ == model
    assert cli.model.hparams.num_anatomies == 35  # linked from the data module's table
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])


def test_cli_reads_the_hu_window_from_the_cache(
    cache: Path, tmp_path: Path, tiny_bert: TinyBert, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vision.source_hu_window`` is linked from the cache (windowed over [-300, 400] HU)."""
    monkeypatch.setattr(sys, "argv", ["fvlm"])
    config = write_config(tmp_path, cache, tiny_bert(), "FineGrainedCLIPModule")
    windows = ["--model.init_args.vision.hu_windows=[[-150, 250], [-300, 0]]"]
    cli = run_cli(["fit", "--config", str(config), "--trainer.fast_dev_run=1", *windows])
    vision = cli.model.network.vision
    assert vision.config.source_hu_window == (-300.0, 400.0)
    assert vision.config.img_size == CROP  # linked from data.crop_size
    assert vision.patch_embedding.patch_embeddings.weight.shape[1] == 2
    assert cli.trainer.global_step == 1


def test_fit_refuses_a_model_built_for_another_cache_window(
    cache: Path, tiny_bert: TinyBert
) -> None:
    """A module built in Python with a stated window fails fast on a cache of another window."""
    config = vision(CROP) | {"hu_windows": [[-150, 250]], "source_hu_window": [-1000, 1000]}
    module = FineGrainedCLIPModule(
        num_anatomies=35, vision=VisionConfig(**config), text_config=tiny_bert(), embed_dim=16
    )
    data = CTReportDataModule(str(cache), "paper", crop_size=CROP, batch_size=4, num_workers=0)
    trainer = Trainer(accelerator="cpu", fast_dev_run=1, logger=False)
    with pytest.raises(ValueError, match=r"preprocessed with hu_window \(-300.0, 400.0\)"):
        trainer.fit(module, datamodule=data)


def test_fvlm_fit_help_lists_model_and_data(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fvlm_main(["fit", "--help"])
    assert exited.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--model" in out and "--data.cache_dir" in out and "--trainer.max_epochs" in out


def test_lightning_console_script_runs_fvlm_cli() -> None:
    script = shutil.which("lightning", path=str(Path(sys.executable).parent))
    assert script is not None, f"no `lightning` console script next to {sys.executable}"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [script, "fit", "--help"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # fvlm's CLI, not some other `lightning`: the data module's options are there.
    assert "--model" in result.stdout and "--data.cache_dir" in result.stdout


def test_cli_resumes_from_its_checkpoint(
    cache: Path, tmp_path: Path, tiny_bert: TinyBert, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["fvlm"])
    trainer = {"enable_checkpointing": True, "limit_val_batches": 0, "max_epochs": 1}
    config = write_config(tmp_path, cache, tiny_bert(), "FineGrainedCLIPModule", trainer=trainer)
    run_cli(["fit", "--config", str(config)])
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    cli = run_cli(
        ["fit", "--config", str(config), "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}"]
    )
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 6


# -- resume and learning -----------------------------------------------------------------------


def fine_grained_run(
    cache: Path,
    root: Path,
    text: dict,
    max_epochs: int,
    callbacks: Sequence[Callback] = (),
    crop: Sequence[int] = CROP,
    batch_size: int = 4,
    num_workers: int = 0,
    lr: float = 1e-3,
) -> tuple[Trainer, FineGrainedCLIPModule, CTReportDataModule]:
    """Seeded data module, module and trainer, as ``fvlm fit`` with ``seed_everything`` builds."""
    seed_everything(0, workers=True)
    data = CTReportDataModule(
        str(cache), "paper", crop_size=tuple(crop), batch_size=batch_size,
        num_workers=num_workers, max_text_length=32,
    )  # fmt: skip
    module = FineGrainedCLIPModule(
        num_anatomies=data.num_anatomies, vision=VisionConfig(**vision(crop)), text_config=text,
        embed_dim=16, optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        min_lr=lr / 10,
    )  # fmt: skip
    trainer = Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks), default_root_dir=root,
    )  # fmt: skip
    return trainer, module, data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run(
    cache: Path, tmp_path: Path, tiny_bert: TinyBert, num_workers: int
) -> None:
    straight = LossRecorder()
    every_epoch = ModelCheckpoint(
        dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer, module, data = fine_grained_run(
        cache, tmp_path, tiny_bert(), 2, [straight, every_epoch], num_workers=num_workers
    )
    trainer.fit(module, datamodule=data)
    assert len(straight.losses(0)) == len(straight.losses(1)) == 3

    # A new process would build everything afresh; this is the same, minus the imports.
    resumed = LossRecorder()
    trainer, module, data = fine_grained_run(
        cache, tmp_path, tiny_bert(), 2, [resumed], num_workers=num_workers
    )
    # Read weights-only (Lightning's default), as `fvlm fit --ckpt_path` reads it.
    trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "epoch=0.ckpt")
    expected = [s for s in straight.steps if s[0] == 1]
    assert [s[:3] for s in resumed.steps] == [s[:3] for s in expected], "other batches"
    torch.testing.assert_close(
        torch.tensor(resumed.losses()), torch.tensor(straight.losses(1)), rtol=0, atol=1e-5
    )


def test_python_built_checkpoint_loads_weights_only(
    cache: Path, tmp_path: Path, tiny_bert: TinyBert
) -> None:
    """``Trainer.fit(ckpt_path=...)`` and ``load_from_checkpoint`` default to weights_only loads."""
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    trainer, module, data = fine_grained_run(cache, tmp_path, tiny_bert(), 1, [every_epoch])
    trainer.fit(module, datamodule=data)
    loaded = FineGrainedCLIPModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.network.vision.config.img_size == CROP


def test_short_fit_takes_the_loss_below_chance(
    cache: Path, tmp_path: Path, tiny_bert: TinyBert, paper_table: AnatomyTable
) -> None:
    """200 steps (100 epochs of 2 batches of 6 whole volumes) take the loss well below chance.

    At chance (all similarities of an anatomy equal) the loss is ``sum_j log N_j`` whatever the
    targets; a collapsed model sits exactly there, so ending clearly below it means the model
    tells studies apart (the floor with FNCN is about half of it). Tiny random towers start near
    chance and need some 30 steps to leave it, hence more steps than a smoke test; measured over
    three cache seeds: fixed-batch loss 0.79-0.86 x chance, last/first steps 0.71-0.81.
    """
    dataset = CachedStudyDataset(
        cache, "train", paper_table, SHAPE, train=False, max_text_length=32
    )
    fixed = collate_studies([dataset[i] for i in range(len(dataset))])
    counts = fixed["valid"].sum(0)
    chance = sum(math.log(n) for n in counts.tolist() if n > 0)

    recorder = LossRecorder()
    trainer, module, data = fine_grained_run(
        cache, tmp_path, tiny_bert(), 100, [recorder], crop=SHAPE, batch_size=6, lr=3e-3
    )
    with torch.no_grad():
        before = module.contrastive_loss(module(fixed))["loss"].item()
    trainer.fit(module, datamodule=data)
    with torch.no_grad():
        after = module.contrastive_loss(module(fixed))["loss"].item()
    steps = recorder.losses()
    first, last = sum(steps[:5]) / 5, sum(steps[-5:]) / 5
    numbers = f"chance {chance:.3f}, fixed batch {before:.3f} -> {after:.3f}, "
    numbers += f"steps {first:.3f} -> {last:.3f} over {len(steps)} steps"
    print(numbers)
    assert len(steps) == 200
    assert 0.95 * chance < before < 1.15 * chance, numbers
    assert after < 0.92 * chance and after < 0.85 * before, numbers
    assert last < 0.88 * first, numbers


# -- zero-shot AUROC and `fvlm test` ------------------------------------------------------------


def write_labels(cache: Path, path: Path, table: AnatomyTable, seed: int = 0) -> Path:
    """Random 0/1 labels (a few unknown) for the diseases of the cache's anatomies."""
    keys = [d.key for d in table.diseases() if d.anatomy in DEFAULT_ANATOMIES]
    studies = [row["study_id"] for row in read_cache_manifest(cache) if row["status"] == "ok"]
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2, (len(studies), len(keys))).astype(float)
    values[rng.random(values.shape) < 0.1] = np.nan
    frame = pd.DataFrame(values, columns=keys).assign(study_id=studies)
    frame.to_csv(path, index=False)
    return path


def test_validation_auroc_matches_evaluation_metrics(
    tmp_path: Path,
    tiny_bert: TinyBert,
    tmp_path_factory: pytest.TempPathFactory,
    paper_table: AnatomyTable,
) -> None:
    """Logged ``val/auroc/<disease>`` equal the evaluation's AUROC on the whole split's scores."""
    cache = write_cache(tmp_path / "cache", n_train=4, n_val=10, shape=SHAPE, seed=3)
    labels = write_labels(cache, tmp_path / "labels.csv", paper_table)
    _, module, _ = fine_grained_run(cache, tmp_path, tiny_bert(), 1)
    data = CTReportDataModule(
        str(cache), "paper", crop_size=CROP, batch_size=4, num_workers=0, max_text_length=32,
        labels=str(labels),
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (logged,) = trainer.validate(module, datamodule=data, verbose=False)

    dataset = data.datasets["val"]
    batch = collate_studies([dataset[i] for i in range(len(dataset))])
    tokenizer = load_tokenizer("minilm")

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        return module.network.encode_text(tokens["input_ids"], tokens["attention_mask"])

    truth = pd.read_csv(labels, dtype={"study_id": str}).set_index("study_id")
    diseases = [d for d in paper_table.diseases() if d.key in truth.columns]
    module.eval()
    with torch.no_grad():
        out = module(batch)
        scores = zero_shot_scores(
            out.image_emb, out.valid, encode, out.logit_scale, paper_table, diseases,
            study_ids=batch["study_id"], output="logit",
        )  # fmt: skip
    reference = evaluate_scores(scores, truth.loc[scores.index, scores.columns])
    scored = reference.drop(index="macro")
    scored = scored[(scored["n_pos"] > 0) & (scored["n_neg"] > 0)]
    assert len(scored) >= 3
    for key, row in scored.iterrows():
        assert logged[f"val/auroc/{key}"] == pytest.approx(row["auroc"], abs=1e-5), key
    assert logged["val/auroc_macro"] == pytest.approx(scored["auroc"].mean(), abs=1e-5)


def test_fit_selects_on_auroc_and_fvlm_test_runs(
    cache: Path,
    tmp_path: Path,
    tiny_bert: TinyBert,
    monkeypatch: pytest.MonkeyPatch,
    paper_table: AnatomyTable,
) -> None:
    monkeypatch.setattr(sys, "argv", ["fvlm"])
    labels = write_labels(cache, tmp_path / "labels.csv", paper_table)
    best = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "best"), "monitor": "val/auroc_macro",
                      "mode": "max", "save_top_k": 1},
    }  # fmt: skip
    trainer = {"enable_checkpointing": True, "max_epochs": 2, "callbacks": [best]}
    config = write_config(tmp_path, cache, tiny_bert(), "GlobalCLIPModule", trainer=trainer)
    extra = [f"--data.labels={labels}", "--data.test_split=val"]
    cli = run_cli(["fit", "--config", str(config), *extra])
    callback = cli.trainer.checkpoint_callback
    assert callback.monitor == "val/auroc_macro" and math.isfinite(float(callback.best_model_score))
    # `fvlm test` on that checkpoint: Lightning reads it with weights_only=True.
    cli = run_cli(
        ["test", "--config", str(config), *extra, f"--ckpt_path={callback.best_model_path}"]
    )
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["test/loss"])
    assert 0.0 <= float(metrics["test/auroc_macro"]) <= 1.0


def test_demo_clip_overlay_changes_only_the_model_and_run_folder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--config demo.yaml --config demo_clip.yaml`` keeps the towers, data and schedule."""
    configs = Path(__file__).resolve().parents[1] / "configs"

    def printed(*files: str) -> dict:
        args = [a for f in files for a in ("--config", str(configs / f))]
        with pytest.raises(SystemExit):
            fvlm_main(["fit", *args, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    fvlm, clip = printed("demo.yaml"), printed("demo.yaml", "demo_clip.yaml")
    assert clip["model"]["class_path"] == "fvlm.lit_modules.GlobalCLIPModule"
    assert clip["model"]["init_args"]["fncn"] is False
    for key in ("vision", "embed_dim", "text_pooling", "optimizer", "min_lr", "warmup_epochs"):
        assert clip["model"]["init_args"][key] == fvlm["model"]["init_args"][key], key
    assert clip["data"] == fvlm["data"]
    assert clip["trainer"]["max_epochs"] == fvlm["trainer"]["max_epochs"]
    assert clip["trainer"]["default_root_dir"] == "runs/demo/clip"
