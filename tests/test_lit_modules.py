"""The LightningModules wire the plain pieces correctly: co-teaching, label correction, schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from fvlm.lit_modules import FineGrainedCLIPModule, GlobalCLIPModule
from fvlm.lit_modules.schedule import warmup_cosine
from fvlm.models import VisionConfig

VISION = VisionConfig.vit_tiny(img_size=(8, 16, 16), patch_size=(4, 8, 8), hidden_size=16)
A = 3


def make_batch(seed: int, b: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    anatomy = torch.zeros(b, 8, 16, 16, dtype=torch.uint8)
    anatomy[:, :4, :8] = 1
    anatomy[:, 4:, 8:] = 2
    anatomy[:, :, :, 12:] = 3
    ids = torch.randint(5, 64, (b, A, 6), generator=g)
    ids[:, :, 0] = 1
    normal = torch.rand(b, A, generator=g) > 0.5
    ids[normal] = torch.tensor([1, 7, 8, 9, 2, 0])  # identical "normal" texts
    mask = (ids != 0).long()
    report = torch.randint(5, 64, (b, 10), generator=g)
    return {
        "image": torch.rand(b, 1, 8, 16, 16, generator=g),
        "anatomy": anatomy,
        "valid": torch.ones(b, A, dtype=torch.bool),
        "normal": normal,
        "text_input_ids": ids,
        "text_attention_mask": mask,
        "report_input_ids": report,
        "report_attention_mask": torch.ones_like(report),
        "study_id": [f"s{i}" for i in range(b)],
    }


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.batches = [make_batch(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def loader(n: int = 4) -> DataLoader:
    return DataLoader(Batches(n), batch_size=None)


def fit(module, epochs: int = 1, n: int = 4, **trainer_args) -> Trainer:
    trainer = Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_args,
    )  # fmt: skip
    trainer.fit(module, loader(n))
    return trainer


def tiny_module_args(text_config: dict, **extra: object) -> dict:
    """Keyword arguments of a tiny module (``A`` anatomies, width 8); ``extra`` adds or replaces."""
    return {
        "num_anatomies": A,
        "vision": VISION,
        "text_config": text_config,
        "embed_dim": 8,
    } | extra


@pytest.fixture
def module_args(tiny_bert: Callable[..., dict]) -> Callable[..., dict]:
    """:func:`tiny_module_args` with the suite's tiny BERT (conftest ``tiny_bert``)."""
    return lambda **extra: tiny_module_args(tiny_bert(), **extra)


@pytest.mark.parametrize("correction", ["none", "self", "momentum"])
def test_label_corrections_train_and_loss_falls(correction, module_args):
    torch.manual_seed(0)
    module = FineGrainedCLIPModule(
        **module_args(label_correction=correction, burn_in_epochs=1, momentum=0.5)
    )
    batch = make_batch(0)
    with torch.no_grad():
        first = module.contrastive_loss(module(batch))["loss"].item()
    fit(module, epochs=6, n=1)
    with torch.no_grad():
        last = module.contrastive_loss(module(batch))["loss"].item()
    assert last < first
    if correction == "momentum":
        live = next(module.network.parameters())
        ema = next(module.momentum_network.parameters())
        assert not torch.equal(live, ema) and not ema.requires_grad


def test_global_clip_module_trains(module_args):
    torch.manual_seed(0)
    module = GlobalCLIPModule(**module_args())
    out = module(make_batch(0))
    assert out.image_emb.shape == (4, 1, 8)
    fit(module, epochs=1, n=2)


def test_warmup_cosine_schedule_numbers():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-4)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10, min_lr=1e-6)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[9] == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5, rel=0.02)
    assert lrs[-1] == pytest.approx(1e-6, rel=0.1)
    with pytest.raises(ValueError):
        warmup_cosine(opt, total_steps=5, warmup_steps=6, min_lr=0)


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (7, 1), (5, 5), (5, 0), (250, 37)])
def test_warmup_cosine_equals_the_closed_form(total, warmup):
    """torch's LinearLR + CosineAnnealingLR give the paper's formula at every step."""
    peak, floor = 1e-4, 1e-6

    def closed_form(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = warmup_cosine(opt, total_steps=total, warmup_steps=warmup, min_lr=floor)
    for step in range(total + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(closed_form(step), rel=1e-9)
        opt.step()
        sched.step()


def test_momentum_network_is_an_exponential_moving_average(module_args):
    """After k steps the EMA holds m * ema + (1 - m) * live of the previous one (first: a copy)."""
    torch.manual_seed(0)
    module = FineGrainedCLIPModule(**module_args(label_correction="momentum", momentum=0.5))
    ema = module.momentum_network
    history = []
    original = module.on_train_batch_end

    def record(outputs, batch, batch_idx):
        previous = next(ema.module.parameters()).detach().clone()
        original(outputs, batch, batch_idx)
        live = next(module.network.parameters()).detach().clone()
        history.append((previous, live, next(ema.module.parameters()).detach().clone()))

    module.on_train_batch_end = record
    fit(module, epochs=1, n=3)
    (_, live0, ema0), *rest = history
    torch.testing.assert_close(ema0, live0)
    for previous, live, now in rest:
        torch.testing.assert_close(now, 0.5 * previous + 0.5 * live)
    assert not any(p.requires_grad for p in ema.parameters())


def test_validation_auroc_skips_a_disease_with_no_scored_study(paper_table) -> None:
    """A disease whose anatomy no validation crop held has nothing to score; the rest still do."""
    import pandas as pd

    from fvlm.lit_modules.zero_shot_validation import ZeroShotAUROC

    keys = [d.key for d in paper_table.diseases("phantom")][:2]
    labels = pd.DataFrame({keys[0]: [0, 1, 0, 1], keys[1]: [0, 1, 0, 1]}, index=list("abcd"))
    metric = ZeroShotAUROC(paper_table, labels, "minilm", "fine")
    scores = torch.tensor([[0.0, 0.1], [0.0, 0.9], [0.0, 0.4], [0.0, 0.3]])
    target = torch.tensor([[-1, 0], [-1, 1], [-1, 0], [-1, 1]])  # the first: all ignored
    metric.auroc.update(scores, target)
    metric.counts.update(scores, target)
    result = metric.compute()
    assert keys[0] not in result
    assert float(result[keys[1]]) == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs ordered
    assert float(result["macro"]) == pytest.approx(0.75)
    assert torch.isnan(metric.compute()["macro"])  # reset: an empty epoch gives NaN, no error
