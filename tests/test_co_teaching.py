"""Co-teaching as the paper trains it (Sec. 3.3, A.2) and Fig. 10's parameter distance.

Each network iterates the whole training split every epoch in its own order with its own crops,
takes one optimiser step per batch (alternating with its partner), and after the burn-in softens
its targets with the partner's predictions, computed in evaluation mode without gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cache_factory import write_cache
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from test_lit_modules import fit, make_batch, tiny_module_args
from torch import nn
from torch.utils.data import DataLoader

from fvlm.data_modules import CTReportDataModule
from fvlm.data_modules.ct_report import EpochSampler, stream_seed
from fvlm.lit_modules import CoTeachingModule, FineGrainedCLIPModule
from fvlm.lit_modules.parameter_distance import parameter_distance
from fvlm.loss import fncn_targets
from fvlm.models import VisionConfig

SHAPE = (12, 24, 24)
CROP = (8, 24, 24)
VISION = {
    "img_size": CROP, "patch_size": (4, 8, 8), "hidden_size": 16, "mlp_dim": 32,
    "num_layers": 1, "num_heads": 2,
}  # fmt: skip
N_TRAIN, BATCH = 12, 4  # 3 batches per epoch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cache(
        tmp_path_factory.mktemp("cot") / "cache", n_train=N_TRAIN, n_val=0, shape=SHAPE
    )


def data_module(cache: Path, **overrides: object) -> CTReportDataModule:
    args = {
        "crop_size": CROP, "batch_size": BATCH, "num_workers": 0, "max_text_length": 32,
        "crop_check": "off", "flip_axes": (0, 1, 2), "flip_prob": 0.2,
    } | overrides  # fmt: skip
    return CTReportDataModule(str(cache), "paper", **args)


def co_teaching(text: dict, **extra: object) -> CoTeachingModule:
    return CoTeachingModule(
        num_anatomies=35, vision=VisionConfig(**VISION), text_config=text, embed_dim=8, **extra
    )


class Steps:
    """Records ``(epoch, network, study ids, teaching, loss)`` of every optimiser step."""

    def __init__(self, module: CoTeachingModule) -> None:
        self.rows: list[tuple[int, int, tuple[str, ...], bool, float]] = []
        original = module.network_loss

        def spy(k: int, batch: dict, teach: bool | None = None):  # noqa: ANN202
            losses, out = original(k, batch, teach)
            row = (module.current_epoch, k, tuple(batch["study_id"]), module.teaching())
            self.rows.append((*row, float(losses["loss"])))
            return losses, out

        module.network_loss = spy

    def studies(self, epoch: int, k: int) -> list[str]:
        return [s for e, n, ids, _, _ in self.rows if (e, n) == (epoch, k) for s in ids]


def trainer_for(root: Path, epochs: int, callbacks: list | None = None) -> Trainer:
    callbacks = callbacks or []
    return Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
    )  # fmt: skip


# -- the schedule --------------------------------------------------------------------------------


def test_each_network_sees_every_study_once_per_epoch_in_its_own_order(
    cache: Path, tmp_path: Path, tiny_bert: Callable[..., dict]
) -> None:
    seed_everything(0)
    module = co_teaching(tiny_bert(), burn_in_epochs=1)
    steps = Steps(module)
    data = data_module(cache)
    trainer = trainer_for(tmp_path, epochs=2)
    trainer.fit(module, datamodule=data)

    batches = N_TRAIN // BATCH
    assert data.train_streams == 2
    train_ids = set(data.datasets["train"].study_ids)
    for epoch in (0, 1):
        orders = [steps.studies(epoch, k) for k in (0, 1)]
        for order in orders:
            assert sorted(order) == sorted(train_ids) and len(order) == N_TRAIN  # each once
        assert orders[0] != orders[1]  # own order
    assert steps.studies(0, 0) != steps.studies(1, 0)  # fresh order every epoch
    # Updates alternate: network 0, network 1, network 0, ... one step each per batch.
    assert [row[1] for row in steps.rows] == [0, 1] * (2 * batches)
    # The burn-in counts each network's own epochs: epoch 0 hard targets, epoch 1 co-teaching.
    assert [row[3] for row in steps.rows] == [False] * 2 * batches + [True] * 2 * batches
    # Optimiser steps per network per epoch = batches per epoch (AdamW counts its own steps).
    for optimizer in trainer.optimizers:
        counts = {int(s["step"]) for s in optimizer.state.values()}
        assert counts == {2 * batches}
    assert trainer.global_step == 2 * 2 * batches  # Lightning counts both networks' steps


def test_streams_draw_their_own_crops_and_flips(cache: Path) -> None:
    data = data_module(cache, flip_prob=0.5)
    data.setup("fit")
    data.train_streams = 2
    loader = data.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    samplers = [dl.sampler for dl in loader.flattened]
    assert [s.seed for s in samplers] == [0, stream_seed(0, 1)]
    assert stream_seed(0, 1) != stream_seed(1, 1) and stream_seed(1, 0) == 1
    # The same study in both streams: its crop/flip seed differs, so its crop does too.
    for sampler in samplers:
        sampler.set_epoch(0)
    keys = [dict(s) for s in samplers]
    assert keys[0].keys() == keys[1].keys()
    assert all(keys[0][i] != keys[1][i] for i in keys[0])
    dataset = loader.flattened[0].dataset
    first = [dataset[(0, keys[k][0])]["image"] for k in (0, 1)]
    assert not torch.equal(first[0], first[1])
    # Stream 0 is exactly the single-network loader of the same seed, epoch by epoch.
    single = data_module(cache, flip_prob=0.5)
    single.setup("fit")
    sampler = single.train_dataloader().sampler
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        samplers[0].set_epoch(epoch)
        assert list(sampler) == list(samplers[0])


def test_streams_under_ddp_shard_each_stream(cache: Path) -> None:
    shards: list[list[list[int]]] = []
    for rank in (0, 1):
        data = data_module(cache, batch_size=2, seed=7)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what DDP would show
        data.setup("fit")
        data.train_streams = 2
        loader = data.train_dataloader()
        samplers = [dl.sampler for dl in loader.flattened]
        assert all(isinstance(s, EpochSampler) and s.rank == rank for s in samplers)
        shards.append([[index for index, _ in s] for s in samplers])
    for stream in (0, 1):
        assert sorted(shards[0][stream] + shards[1][stream]) == list(range(N_TRAIN))
    assert shards[0][0] != shards[0][1]  # the streams' orders differ on a rank too


def test_resume_reproduces_both_networks(
    cache: Path, tmp_path: Path, tiny_bert: Callable[..., dict]
) -> None:
    """Resumed after epoch 0, epoch 1 repeats the uninterrupted run: batches, targets, losses."""

    def run(ckpt: Path | None, callbacks: list) -> Steps:
        seed_everything(0)
        module = co_teaching(tiny_bert(), burn_in_epochs=1)
        steps = Steps(module)
        trainer = trainer_for(tmp_path, epochs=2, callbacks=callbacks)
        trainer.fit(module, datamodule=data_module(cache), ckpt_path=ckpt)
        return steps

    every_epoch = ModelCheckpoint(
        dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True
    )
    straight = run(None, [every_epoch])
    resumed = run(tmp_path / "epoch=0.ckpt", [])
    expected = [row for row in straight.rows if row[0] == 1]
    assert [r[:4] for r in resumed.rows] == [r[:4] for r in expected]
    torch.testing.assert_close(
        torch.tensor([r[4] for r in resumed.rows]),
        torch.tensor([r[4] for r in expected]),
        rtol=0,
        atol=1e-5,
    )


def test_single_batches_train_both_networks_with_a_warning(module_args) -> None:
    torch.manual_seed(0)
    module = CoTeachingModule(**module_args(burn_in_epochs=0))
    before = [[p.detach().clone() for p in net.parameters()] for net in module.networks]
    assert not torch.equal(before[0][0], before[1][0])  # distinct initialisations
    with pytest.warns(UserWarning, match="same samples"):
        fit(module, epochs=1, n=1)
    for net, old in zip(module.networks, before, strict=True):
        assert any(not torch.equal(a, b) for a, b in zip(old, net.parameters(), strict=True))
    with pytest.raises(ValueError, match="one batch per network"):
        module.streams([make_batch(0)] * 3)


# -- the teacher ---------------------------------------------------------------------------------


@pytest.fixture
def module_args(tiny_bert: Callable[..., dict]) -> Callable[..., dict]:
    return lambda **extra: tiny_module_args(tiny_bert(), **extra)


def pair_loader(n: int) -> DataLoader:
    pairs = [[make_batch(2 * i), make_batch(2 * i + 1)] for i in range(n)]
    return DataLoader(pairs, batch_size=None, collate_fn=lambda pair: pair)


def test_teacher_runs_in_eval_mode_without_gradients(module_args) -> None:
    torch.manual_seed(0)
    module = CoTeachingModule(**module_args(burn_in_epochs=0))
    calls: list[tuple[int, bool, bool]] = []
    for k, net in enumerate(module.networks):
        net.register_forward_pre_hook(
            lambda m, _args, k=k: calls.append((k, m.training, torch.is_grad_enabled()))
        )
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, pair_loader(2))
    # Per batch: student 0 (train, grad), teacher 1 (eval, no grad), student 1, teacher 0.
    per_batch = [(0, True, True), (1, False, False), (1, True, True), (0, False, False)]
    assert calls == per_batch * 2
    assert all(net.training for net in module.networks)  # train mode restored


def test_teacher_targets_are_deterministic_with_dropout(module_args, tiny_bert) -> None:
    """Dropout probe: in eval mode the partner's targets do not change from call to call."""
    torch.manual_seed(0)
    vision = VisionConfig.vit_tiny(img_size=(8, 16, 16), hidden_size=16, dropout=0.5)
    text = tiny_bert(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    module = CoTeachingModule(**tiny_module_args(text, vision=vision)).train()
    batch = make_batch(0)
    out = module.networks[0](batch)
    first = module.partner_targets(1, batch, out)
    second = module.partner_targets(1, batch, out)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert module.networks[1].training
    noisy = [module.networks[1](batch).image_emb for _ in range(2)]  # train mode: dropout on
    assert not torch.equal(noisy[0], noisy[1])


def test_soft_targets_mix_hard_targets_and_the_partners_probabilities(
    monkeypatch: pytest.MonkeyPatch, module_args
) -> None:
    """targets = alpha * y + (1 - alpha) * softmax(s * V T^T) of the PARTNER, by hand."""
    torch.manual_seed(0)
    alpha = 0.3
    module = CoTeachingModule(**module_args(burn_in_epochs=0, alpha=alpha))
    seen: list[dict] = []
    original = module.contrastive_loss

    def spy(out, soft=None):  # noqa: ANN001, ANN202
        losses = original(out, soft)
        seen.append({"out": out, "i2t": losses["targets_i2t"], "t2i": losses["targets_t2i"]})
        return losses

    monkeypatch.setattr(module, "contrastive_loss", spy)
    partner = copy.deepcopy(module.networks[1]).eval()  # network 1 before any step
    batch = [make_batch(0), make_batch(1)]
    trainer = Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch], batch_size=None, collate_fn=lambda pair: pair))
    out = seen[0]["out"]  # network 0's step, taught by network 1 as it was
    with torch.no_grad():
        teacher = partner(batch[0])
    v, t, s = teacher.image_emb, teacher.text_emb, teacher.logit_scale
    p_i2t = torch.softmax(s * torch.einsum("iae,kae->aik", v, t), dim=-1)  # all pairs valid
    p_t2i = torch.softmax(s * torch.einsum("iae,kae->aik", t, v), dim=-1)
    y = fncn_targets(out.valid, out.normal, out.text_key)
    torch.testing.assert_close(seen[0]["i2t"], alpha * y + (1 - alpha) * p_i2t)
    torch.testing.assert_close(seen[0]["t2i"], alpha * y.transpose(-1, -2) + (1 - alpha) * p_t2i)
    # Self-teaching would give clearly different targets: the test tells the two apart.
    v0, t0 = out.image_emb.detach(), out.text_emb.detach()
    own = torch.softmax(out.logit_scale * torch.einsum("iae,kae->aik", v0, t0), dim=-1)
    assert (alpha * y + (1 - alpha) * own - seen[0]["i2t"]).abs().max() > 1e-3


# -- Fig. 10 ---------------------------------------------------------------------------------------


def test_parameter_distance_by_hand() -> None:
    net = nn.Linear(2, 1)
    other = nn.Linear(2, 1)
    frozen = nn.Parameter(torch.tensor([100.0]), requires_grad=False)
    net.register_parameter("frozen", frozen)
    other.register_parameter("frozen", nn.Parameter(torch.tensor([-100.0])))
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
        net.bias.fill_(2.0)
        other.weight.copy_(torch.tensor([[1.0, 0.0]]))
        other.bias.fill_(0.0)
    distance, relative = parameter_distance(net, other)
    # Differences (0, 2, 2): sqrt(8); ||theta|| = sqrt(1 + 4 + 4) = 3; the frozen one is left out.
    assert float(distance) == pytest.approx(8**0.5)
    assert float(relative) == pytest.approx(8**0.5 / 3)
    zero, zero_relative = parameter_distance(net, copy.deepcopy(net))
    assert float(zero) == 0.0 and float(zero_relative) == 0.0
    with pytest.raises(ValueError, match="no counterpart"):
        parameter_distance(net, nn.Linear(3, 1))


def test_fig10_distance_is_logged_for_co_teaching_and_momentum(module_args) -> None:
    torch.manual_seed(0)
    cot = CoTeachingModule(**module_args(burn_in_epochs=0))
    trainer = fit(cot, epochs=1, n=2)
    logged = trainer.callback_metrics["train/param_distance"]
    _, expected = parameter_distance(cot.networks[0], cot.networks[1])
    assert float(logged) == pytest.approx(float(expected), rel=1e-6) and float(logged) > 0.1

    torch.manual_seed(0)
    ema = FineGrainedCLIPModule(**module_args(label_correction="momentum", momentum=0.9))
    trainer = fit(ema, epochs=1, n=2)
    logged_ema = trainer.callback_metrics["train/param_distance"]
    _, expected = parameter_distance(ema.network, ema.momentum_network.module)
    assert float(logged_ema) == pytest.approx(float(expected), rel=1e-6)
    assert 0 < float(logged_ema) < float(logged)  # the EMA copy stays close (Fig. 10)

    torch.manual_seed(0)
    itself = FineGrainedCLIPModule(**module_args(label_correction="self"))
    assert float(fit(itself, epochs=1, n=1).callback_metrics["train/param_distance"]) == 0.0
    none = FineGrainedCLIPModule(**module_args())
    assert "train/param_distance" not in fit(none, epochs=1, n=1).callback_metrics


def test_gradient_clipping_of_each_network(module_args) -> None:
    """``gradient_clip_val`` bounds each network's gradient norm at its own step."""
    torch.manual_seed(0)
    module = CoTeachingModule(**module_args(burn_in_epochs=0, gradient_clip_val=1e-3))
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norms.append(float(torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(g) for g in grads if g is not None
        ]))))  # fmt: skip

    original = module.configure_optimizers

    def hooked() -> tuple[list, list]:
        optimizers, schedulers = original()
        for optimizer in optimizers:
            optimizer.register_step_pre_hook(record)
        return optimizers, schedulers

    module.configure_optimizers = hooked
    fit(module, epochs=1, n=2)
    assert len(norms) == 4  # 2 batches x 2 networks
    assert max(norms) <= 1e-3 * (1 + 1e-4)


def test_papers_random_flip_draws_every_axis_with_p_02(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flip_axes: [0, 1, 2]``, ``flip_prob: 0.2``: each axis flipped in about 1 of 5 crops."""
    import fvlm.data_modules.study_dataset as study_dataset

    drawn: list[tuple[int, ...]] = []
    original = study_dataset.draw_flip_axes

    def spy(axes, rng, prob):  # noqa: ANN001, ANN202
        drawn.append(tuple(original(axes, rng, prob)))
        return drawn[-1]

    monkeypatch.setattr(study_dataset, "draw_flip_axes", spy)
    data = data_module(cache)  # the paper's flip
    data.setup("fit")
    assert data.datasets["train"].flip_prob == 0.2
    loader = data.train_dataloader()
    for epoch in range(10):  # 120 crops
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            pass
    rates = [sum(axis in d for d in drawn) / len(drawn) for axis in (0, 1, 2)]
    assert len(drawn) == 10 * N_TRAIN
    assert all(0.1 < rate < 0.3 for rate in rates), rates  # binomial sd 0.037
    assert data_module(cache, flip=False).flip_axes == ()
    with pytest.raises(ValueError, match="flip_prob"):
        data_module(cache, flip_prob=1.5)
