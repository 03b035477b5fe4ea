"""The supervised baseline (Tab. 1): the disease head by hand, training on labels, evaluation.

The head is checked against a hand computation; the LightningModule trains on a tiny cache whose
organs carry lesions with labels read from the reports, its loss must fall, and its checkpoint
must load weights-only as the ``supervised`` network kind and be scored by ``fvlm evaluate``'s
code path with the head's outputs instead of prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cache_factory import DEFAULT_ANATOMIES, write_cache
from lightning.pytorch import Callback, Trainer, seed_everything

from fvlm.anatomy import AnatomyTable
from fvlm.checkpoint import load_network
from fvlm.data_modules import CTReportDataModule
from fvlm.evaluation.run import evaluate_checkpoint
from fvlm.lit_modules.supervised import SupervisedModule
from fvlm.models.supervised import WHOLE_SCAN, DiseaseHead
from fvlm.preprocess.cache import StudyCache

CROP = (12, 24, 24)
EPOCHS = 8
VISION = {
    "img_size": list(CROP), "patch_size": [4, 8, 8], "hidden_size": 16, "mlp_dim": 32,
    "num_layers": 1, "num_heads": 2, "source_hu_window": [-300.0, 400.0],
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_head_is_an_affine_map_of_the_diseases_anatomy_embedding() -> None:
    head = DiseaseHead(2, [1, WHOLE_SCAN])
    assert head.log_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))  # directions (.6, .8), (0, -1)
        head.bias.copy_(torch.tensor([0.5, -0.5]))
        head.log_scale.fill_(np.log(10.0))
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])  # (1, 3, 2) unit rows
    valid = torch.tensor([[True, False, True]])
    logits = head(emb, valid)
    # disease 0 reads anatomy 1: 10 * (.6 * 0 + .8 * 1) + .5; disease 1 the mean of anatomies 0, 2
    whole = torch.tensor([1.6, 0.8]) / torch.tensor([1.6, 0.8]).norm()
    assert logits[0, 0].item() == pytest.approx(8.5)
    assert logits[0, 1].item() == pytest.approx(float(-10 * whole[1] - 0.5), abs=1e-5)
    # anatomy 1 is not valid here; the whole-scan disease is (two anatomies are)
    assert head.disease_valid(valid).tolist() == [[False, True]]
    assert head.disease_valid(torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[False, False]]
    with pytest.raises(ValueError, match="at least one disease"):
        DiseaseHead(2, [])


def report_labels(cache: Path, table: AnatomyTable, path: Path) -> list[str]:
    """Disease labels from the reports: positive when the impression names one of its terms."""
    diseases = [d for name in DEFAULT_ANATOMIES for d in table[name].diseases[:2]]
    store = StudyCache(cache)
    rows = []
    for study_id in store.ok_studies():
        impression = store.study_report(study_id)["impression"]
        rows.append({"study_id": study_id} | {
            d.key: int(any(f"{t[:1].upper()}{t[1:]}." in impression for t in d.terms))
            for d in diseases
        })  # fmt: skip
    pd.DataFrame(rows).to_csv(path, index=False)
    return [d.key for d in diseases]


class EpochLoss(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, paper_table: AnatomyTable) -> dict:
    folder = tmp_path_factory.mktemp("supervised")
    cache = write_cache(
        folder / "cache", n_train=16, n_val=4, n_test=6, shape=CROP, abnormal_rate=0.5
    )
    labels = folder / "labels.csv"
    keys = report_labels(cache, paper_table, labels)
    seed_everything(0)
    module = SupervisedModule(
        benchmark=None, num_anatomies=len(paper_table), vision=VISION, text_config=TINY_BERT,
        embed_dim=16, warmup_epochs=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
    )  # fmt: skip
    data = CTReportDataModule(
        str(cache), crop_size=CROP, batch_size=4, num_workers=0, max_text_length=16,
        report_max_length=32, labels=str(labels), crop_check="off",
    )  # fmt: skip
    recorder = EpochLoss()
    trainer = Trainer(
        max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(module, data)
    module.eval()
    with torch.no_grad():
        batches = [module.on_after_batch_transfer(b, 0) for b in data.train_dataloader()]
        batches = [b | {"image": b["image"].float()} for b in batches]  # as the trainer feeds it
        probability = torch.cat([torch.sigmoid(module._logits_and_targets(b)[0]) for b in batches])
    checkpoint = folder / "supervised.ckpt"
    trainer.save_checkpoint(checkpoint)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "module": module, "checkpoint": checkpoint, "cache": cache, "labels": labels,
        "keys": keys, "losses": recorder.losses, "metrics": metrics,
        "train_probability": probability,
    }  # fmt: skip


TINY_BERT = {
    "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 32, "max_position_embeddings": 64,
}  # fmt: skip


class FakeData:
    """What the module reads from its data module: the labels and the anatomy names."""

    def __init__(self, labels: pd.DataFrame, names: list[str]) -> None:
        self.disease_labels, self.anatomy_names, self.labels = labels, names, "labels.csv"


def test_targets_keep_known_labels_of_valid_anatomies_only(paper_table: AnatomyTable) -> None:
    module = SupervisedModule(
        benchmark="phantom", num_anatomies=len(paper_table), vision=VISION,
        text_config=TINY_BERT, embed_dim=16,
    )  # fmt: skip
    keys = module.disease_keys
    assert keys == [d.key for d in paper_table.diseases("phantom")]
    labels = pd.DataFrame(
        {"liver/steatosis": [1.0, np.nan], "kidney/cyst": [0.0, 1.0]}, index=["a", "b"]
    )
    trainer = Trainer(accelerator="cpu", logger=False)
    trainer.datamodule = FakeData(labels, paper_table.names)
    module.trainer = trainer
    valid = torch.zeros(2, len(paper_table), dtype=torch.bool)
    valid[:, paper_table.index("liver")] = True
    valid[0, paper_table.index("kidney")] = True
    targets = module.targets(["a", "b"], valid)
    liver, kidney = keys.index("liver/steatosis"), keys.index("kidney/cyst")
    expected = torch.full((2, len(keys)), -1.0)
    expected[0, liver], expected[0, kidney] = 1.0, 0.0  # b: steatosis unknown, kidney invalid
    assert torch.equal(targets, expected)
    logits = torch.randn(2, len(keys))
    manual = (
        -(
            torch.log(torch.sigmoid(logits[0, liver]))
            + torch.log(1 - torch.sigmoid(logits[0, kidney]))
        )
        / 2
    )
    assert module.bce(logits, targets).item() == pytest.approx(manual.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no row for studies"):
        module.targets(["a", "zzz"], valid)


def test_training_on_labels_fits_the_prevalence_and_lowers_the_bce(trained: dict) -> None:
    """The BCE falls, and the mean predicted probability meets each disease's prevalence."""
    losses = trained["losses"]
    first = sum(losses[0]) / len(losses[0])
    last = sum(losses[EPOCHS - 1]) / len(losses[EPOCHS - 1])
    assert last < 0.8 * first, (first, last)
    labels = pd.read_csv(trained["labels"], dtype={"study_id": str}).set_index("study_id")
    train = labels.loc[StudyCache(trained["cache"]).ok_studies("train"), trained["keys"]]
    module = trained["module"]
    columns = [module.disease_keys.index(k) for k in trained["keys"]]
    predicted = trained["train_probability"][:, columns].mean(0).numpy()
    assert np.abs(predicted - train.mean().to_numpy()).max() < 0.12, (predicted, train.mean())
    assert "val/auroc_macro" in trained["metrics"]
    assert 0.0 <= trained["metrics"]["val/auroc_macro"] <= 1.0


def test_checkpoint_loads_as_the_supervised_kind(trained: dict) -> None:
    net = load_network(trained["checkpoint"])
    assert net.kind == "supervised"
    module = trained["module"]
    assert net.hparams["disease_keys"] == module.disease_keys
    assert torch.equal(net.network.head.weight, module.network.head.weight.cpu())
    assert not any(p.requires_grad for p in module.network.text.parameters())


def test_evaluation_scores_with_the_head(trained: dict) -> None:
    labels = pd.read_csv(trained["labels"], dtype={"study_id": str})
    scores, table = evaluate_checkpoint(
        trained["checkpoint"], trained["cache"], labels, split="test", benchmark=None
    )
    assert sorted(scores.columns) == sorted(trained["keys"])
    assert len(scores) == 6
    # every anatomy fits the crop whole: every study is scored, by the head's logits
    assert scores.notna().all().all()
    net = load_network(trained["checkpoint"])
    head = net.network.head
    assert table.loc["macro", "auroc"] == pytest.approx(table["auroc"].drop("macro").mean())
    assert head.weight.shape[0] == len(net.hparams["disease_keys"])


def test_refuses_another_anatomy_table(trained: dict, paper_table: AnatomyTable) -> None:
    module = SupervisedModule(
        anatomy_table="chest", num_anatomies=len(paper_table), vision=VISION,
        text_config=TINY_BERT, embed_dim=16, benchmark=None,
    )  # fmt: skip
    data = CTReportDataModule(str(trained["cache"]), crop_size=CROP, labels=str(trained["labels"]))
    trainer = Trainer(accelerator="cpu", logger=False, max_epochs=1, enable_progress_bar=False)
    trainer.datamodule = data  # what fit sets before setup
    module.trainer = trainer
    with pytest.raises(ValueError, match="not the data's anatomy table"):
        module.configure_metrics()
