"""Tests of the anatomy-level contrastive loss (Eq. 1-3) on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fvlm.loss import (
    FineGrainedContrastiveLoss,
    fncn_targets,
    gather_features,
    similarity_probabilities,
    soften_targets,
)

# --------------------------------------------------------------------------------------------
# Hand-computed case: 3 samples, 2 anatomies, 2-D unit embeddings, 1/tau = 2.
# Anatomy 1 is truncated by the crop in sample 2 (invalid pair, zero embeddings).
# --------------------------------------------------------------------------------------------
SCALE = 2.0
V = {0: [(1.0, 0.0), (0.0, 1.0), (0.6, 0.8)], 1: [(0.0, 1.0), (0.6, -0.8)]}
T = {0: [(0.8, 0.6), (0.0, 1.0), (1.0, 0.0)], 1: [(0.6, 0.8), (1.0, 0.0)]}
# normal[i][j]; sample 2 is flagged normal for anatomy 1 but invalid there, so it must not count.
NORMAL = [[True, True], [False, True], [True, True]]
# One-hot targets, and FNCN targets (anatomy 0: samples 0 and 2 normal; anatomy 1: 0 and 1).
ONE_HOT = {0: [[1, 0, 0], [0, 1, 0], [0, 0, 1]], 1: [[1, 0], [0, 1]]}
FNCN = {0: [[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]], 1: [[0.5, 0.5], [0.5, 0.5]]}


def _dot(a: tuple[float, float], b: tuple[float, float]) -> float:
    return a[0] * b[0] + a[1] * b[1]


def _cross_entropy(logits: list[float], target: list[float]) -> float:
    log_z = math.log(sum(math.exp(s) for s in logits))
    return -sum(t * (s - log_z) for s, t in zip(logits, target, strict=True))


def _hand_anatomy_loss(j: int, targets: dict[int, list[list[float]]]) -> float:
    """(1/N_j) sum_i [H(y_i2t, p_i2t) + H(y_t2i, p_t2i)] over the valid samples of anatomy j."""
    n = len(V[j])
    total = 0.0
    for i in range(n):
        total += _cross_entropy([SCALE * _dot(V[j][i], T[j][k]) for k in range(n)], targets[j][i])
        total += _cross_entropy([SCALE * _dot(T[j][i], V[j][k]) for k in range(n)], targets[j][i])
    return total / n


def _hand_batch() -> tuple[torch.Tensor, ...]:
    image = torch.zeros(3, 2, 2)
    text = torch.zeros(3, 2, 2)
    for j in (0, 1):
        for i, (v, t) in enumerate(zip(V[j], T[j], strict=True)):
            image[i, j] = torch.tensor(v)
            text[i, j] = torch.tensor(t)
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    normal = torch.tensor(NORMAL)
    text_key = torch.tensor([[0, 1], [2, 3], [4, -1]])
    return image, text, valid, normal, text_key


@pytest.mark.parametrize(
    ("fncn", "targets", "expected"),
    [(False, ONE_HOT, 1.1673033154878507), (True, FNCN, 1.8206366488211838)],
)
def test_loss_equals_hand_computation(fncn, targets, expected):
    want = 0.5 * (_hand_anatomy_loss(0, targets) + _hand_anatomy_loss(1, targets))
    assert want == pytest.approx(expected, rel=1e-12)  # the literal is this formula's value
    image, text, valid, normal, text_key = _hand_batch()
    out = FineGrainedContrastiveLoss(fncn=fncn)(image, text, valid, normal, text_key, SCALE)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    per_anatomy = [0.5 * _hand_anatomy_loss(j, targets) for j in (0, 1)]
    assert out["per_anatomy"].tolist() == pytest.approx(per_anatomy, rel=1e-6)
    assert out["n_valid"].tolist() == [3, 2]
    assert (out["loss_i2t"] + out["loss_t2i"]).item() == pytest.approx(want, rel=1e-6)


def test_hand_probabilities_and_masking():
    image, text, valid, normal, text_key = _hand_batch()
    p_i2t, p_t2i = similarity_probabilities(image, text, valid, SCALE)
    # anatomy 1, image 0 against the two valid texts: logits 2*0.8 and 2*0.
    e = [math.exp(1.6), math.exp(0.0)]
    assert p_i2t[1, 0, :2].tolist() == pytest.approx([e[0] / sum(e), e[1] / sum(e)], rel=1e-6)
    assert p_i2t[1, 0, 2].item() == 0.0  # invalid column masked out of the softmax
    assert p_i2t[1, 2].abs().sum().item() == 0.0  # invalid row zero
    assert p_t2i[1, :, 2].abs().sum().item() == 0.0
    # text 1 of anatomy 0 against images (1,0), (0,1), (0.6,0.8): logits 0, 2, 1.6
    e = [math.exp(0.0), math.exp(2.0), math.exp(1.6)]
    assert p_t2i[0, 1].tolist() == pytest.approx([x / sum(e) for x in e], rel=1e-6)


# --------------------------------------------------------------------------------------------
# False-negative correction of normals
# --------------------------------------------------------------------------------------------
def test_fncn_targets_known_normal_pattern():
    valid = torch.ones(4, 1, dtype=torch.bool)
    normal = torch.tensor([[1], [1], [0], [1]], dtype=torch.bool)
    key = torch.arange(4).view(4, 1)
    y = fncn_targets(valid, normal, key, fncn=True, identical_text=True)
    third = 1 / 3
    want = [
        [third, third, 0, third],
        [third, third, 0, third],
        [0, 0, 1, 0],
        [third, third, 0, third],
    ]
    assert y.shape == (1, 4, 4)
    assert y[0].tolist() == [pytest.approx(row) for row in want]
    y_off = fncn_targets(valid, normal, key, fncn=False, identical_text=True)
    assert torch.equal(y_off[0], torch.eye(4))


def test_fncn_targets_identical_text_positives():
    valid = torch.ones(5, 1, dtype=torch.bool)
    normal = torch.zeros(5, 1, dtype=torch.bool)
    # samples 0 and 2 share a text; 3 and 4 have no text key (-1) and must not match each other.
    key = torch.tensor([[7], [8], [7], [-1], [-1]])
    y = fncn_targets(valid, normal, key, fncn=True, identical_text=True)[0]
    assert y[0].tolist() == [0.5, 0, 0.5, 0, 0]
    assert y[2].tolist() == [0.5, 0, 0.5, 0, 0]
    assert y[1].tolist() == [0, 1, 0, 0, 0]
    assert y[3].tolist() == [0, 0, 0, 1, 0]
    assert y[4].tolist() == [0, 0, 0, 0, 1]
    y_off = fncn_targets(valid, normal, key, fncn=True, identical_text=False)[0]
    assert torch.equal(y_off, torch.eye(5))


def test_fncn_targets_invalid_rows_and_columns_zero():
    valid = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    normal = torch.ones(4, 2, dtype=torch.bool)  # everyone normal, only validity decides
    key = torch.zeros(4, 2, dtype=torch.long)  # all texts identical too
    y = fncn_targets(valid, normal, key)
    assert y[0, 3].abs().sum() == 0 and y[0, :, 3].abs().sum() == 0
    assert y[1, 1].abs().sum() == 0 and y[1, :, 1].abs().sum() == 0
    assert y[0, 0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert y[1, 3].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])
    sums = y.sum(-1)
    assert torch.allclose(sums, valid.t().float())
    assert torch.equal(y, y.transpose(-1, -2))


def test_fncn_targets_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        fncn_targets(
            torch.ones(3, 2, dtype=torch.bool),
            torch.ones(3, 1, dtype=torch.bool),
            torch.zeros(3, 2, dtype=torch.long),
        )


# --------------------------------------------------------------------------------------------
# Random batches against a per-anatomy loop reference
# --------------------------------------------------------------------------------------------
def _random_batch(seed: int, b: int = 6, a: int = 4, e: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, a, generator=g) > 0.3
    valid[:, 0] = False  # anatomy without any valid sample
    valid[:, 1] = False
    valid[2, 1] = True  # anatomy with exactly one valid sample
    normal = torch.rand(b, a, generator=g) > 0.5
    text_key = torch.randint(0, 4, (b, a), generator=g)  # collisions on purpose
    image = F.normalize(torch.randn(b, a, e, generator=g), dim=-1) * valid[..., None]
    text = F.normalize(torch.randn(b, a, e, generator=g), dim=-1) * valid[..., None]
    return image, text, valid, normal, text_key


def _loop_reference(image, text, valid, normal, text_key, scale, fncn=True, identical=True):
    total = image.new_zeros(())
    for j in range(image.shape[1]):
        idx = valid[:, j].nonzero().flatten()
        if idx.numel() == 0:
            continue
        v, t = image[idx, j], text[idx, j]
        y = torch.eye(idx.numel())
        nrm = normal[idx, j]
        key = text_key[idx, j]
        if fncn:
            y = torch.maximum(y, (nrm[:, None] & nrm[None, :]).float())
        if identical:
            y = torch.maximum(y, ((key[:, None] == key[None, :]) & (key[:, None] >= 0)).float())
        y = y / y.sum(-1, keepdim=True)
        logits = scale * v @ t.t()
        h_i2t = -(y * logits.log_softmax(-1)).sum(-1)
        h_t2i = -(y.t() * logits.t().log_softmax(-1)).sum(-1)
        total = total + 0.5 * (h_i2t + h_t2i).mean()
    return total


@pytest.mark.parametrize("fncn", [True, False])
@pytest.mark.parametrize("identical", [True, False])
def test_batched_loss_matches_loop_reference(fncn, identical):
    batch = _random_batch(1)
    loss = FineGrainedContrastiveLoss(fncn=fncn, identical_text_positive=identical)
    out = loss(*batch, 5.0)
    want = _loop_reference(*batch, 5.0, fncn=fncn, identical=identical)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)


def test_per_anatomy_absent_is_nan_and_single_sample_is_zero():
    batch = _random_batch(2)
    out = FineGrainedContrastiveLoss()(*batch, 5.0)
    assert math.isnan(out["per_anatomy"][0].item())
    assert out["per_anatomy"][1].item() == pytest.approx(0.0, abs=1e-7)
    assert out["n_valid"][:2].tolist() == [0, 1]
    assert out["per_anatomy"].nansum().item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_mean_reduction_is_sum_over_present_anatomies():
    batch = _random_batch(3)
    out_sum = FineGrainedContrastiveLoss(anatomy_reduction="sum")(*batch, 5.0)
    out_mean = FineGrainedContrastiveLoss(anatomy_reduction="mean")(*batch, 5.0)
    n_present = int((out_sum["n_valid"] > 0).sum())
    assert n_present == 3  # anatomy 0 absent, anatomy 1 (one sample) counts
    assert out_mean["loss"].item() * n_present == pytest.approx(out_sum["loss"].item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------
def test_gradients_finite_with_empty_and_single_anatomies():
    image, text, valid, normal, text_key = _random_batch(4)
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    out = FineGrainedContrastiveLoss()(image, text, valid, normal, text_key, log_scale.exp())
    out["loss"].backward()
    for grad in (image.grad, text.grad, log_scale.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert log_scale.grad.abs().item() > 0  # the temperature is learnt
    assert image.grad[:, 0].abs().sum() == 0  # anatomy without valid samples: no gradient
    assert image.grad[~valid].abs().sum() == 0  # invalid pairs get no gradient


def test_all_invalid_batch_gives_zero_loss_with_a_graph():
    image, text, _, normal, text_key = _random_batch(5)
    image.requires_grad_(True)
    valid = torch.zeros(image.shape[:2], dtype=torch.bool)
    scale = torch.tensor(10.0, requires_grad=True)
    out = FineGrainedContrastiveLoss(anatomy_reduction="mean")(
        image, text, valid, normal, text_key, scale
    )
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(image.grad).all() and scale.grad is not None
    assert torch.isnan(out["per_anatomy"]).all()


def test_gradcheck_float64():
    image, text, valid, normal, text_key = (t[:4, 1:] for t in _random_batch(6, a=3, e=3))
    image = image.double().requires_grad_(True)
    text = text.double().requires_grad_(True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss = FineGrainedContrastiveLoss()

    def fn(i, t, s):
        return loss(i, t, valid, normal, text_key, s)["loss"]

    assert torch.autograd.gradcheck(fn, (image, text, scale))


def test_computed_in_float32_under_bf16_autocast():
    batch = _random_batch(7)
    loss = FineGrainedContrastiveLoss()
    want = loss(*batch, 50.0)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(*batch, 50.0)["loss"]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Soft targets (Eq. 3)
# --------------------------------------------------------------------------------------------
def test_soften_targets_alpha_one_and_half():
    image, text, valid, normal, text_key = _random_batch(8)
    y = fncn_targets(valid, normal, text_key)
    p_i2t, _ = similarity_probabilities(image.flip(0), text, valid, 4.0)
    assert torch.equal(soften_targets(y, p_i2t, alpha=1.0), y)
    half = soften_targets(y, p_i2t, alpha=0.5)
    assert torch.allclose(half, 0.5 * y + 0.5 * p_i2t)
    assert torch.allclose(half.sum(-1), valid.t().float())  # valid rows still sum to one
    assert torch.equal(soften_targets(y, p_i2t, alpha=0.0), p_i2t)
    with pytest.raises(ValueError, match="alpha"):
        soften_targets(y, p_i2t, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        soften_targets(y, p_i2t[:, :-1], alpha=0.5)


def test_soften_targets_keeps_invalid_rows_zero():
    valid = torch.tensor([[True], [True], [False]])
    y = fncn_targets(valid, torch.zeros_like(valid), torch.full((3, 1), -1))
    p_other = torch.full((1, 3, 3), 1 / 3)  # a careless teacher without a mask
    soft = soften_targets(y, p_other, alpha=0.5)
    assert soft[0, 2].abs().sum() == 0 and soft[0, :, 2].abs().sum() == 0


def test_soft_targets_in_loss():
    batch = _random_batch(9)
    image, text, valid = batch[:3]
    loss = FineGrainedContrastiveLoss()
    teacher = loss.teacher_targets(image.roll(1, 0), text, valid, 5.0)
    hard = loss(*batch, 5.0)
    assert torch.equal(loss(*batch, 5.0, soft_targets=teacher, alpha=1.0)["loss"], hard["loss"])
    soft = loss(*batch, 5.0, soft_targets=teacher, alpha=0.5)
    # the cross-entropy is linear in the targets: alpha=0.5 is halfway between alpha=1 and 0
    only_teacher = loss(*batch, 5.0, soft_targets=teacher, alpha=0.0)
    halfway = 0.5 * (hard["loss"] + only_teacher["loss"])
    assert soft["loss"].item() == pytest.approx(halfway.item(), rel=1e-6)
    assert torch.allclose(soft["targets_i2t"], 0.5 * hard["targets_i2t"] + 0.5 * teacher[0])
    assert torch.allclose(soft["targets_t2i"], 0.5 * hard["targets_t2i"] + 0.5 * teacher[1])


def test_no_gradient_flows_into_the_teacher():
    image, text, valid, normal, text_key = _random_batch(10)
    student_image = image.clone().requires_grad_(True)
    teacher_image = image.roll(1, 0).requires_grad_(True)
    teacher_text = text.clone().requires_grad_(True)
    teacher_scale = torch.tensor(5.0, requires_grad=True)
    loss = FineGrainedContrastiveLoss()
    p = loss.teacher_targets(teacher_image, teacher_text, valid, teacher_scale)
    assert not p[0].requires_grad and not p[1].requires_grad
    # even probabilities that still carry a graph are detached by soften_targets
    p_graph = similarity_probabilities(teacher_image, teacher_text, valid, teacher_scale)
    assert p_graph[0].requires_grad
    out = loss(student_image, text, valid, normal, text_key, 5.0, soft_targets=p_graph)
    out["loss"].backward()
    assert student_image.grad is not None
    assert teacher_image.grad is None and teacher_text.grad is None and teacher_scale.grad is None


def test_teacher_targets_equal_similarity_probabilities():
    image, text, valid = _random_batch(11)[:3]
    got = FineGrainedContrastiveLoss().teacher_targets(image, text, valid, 3.0)
    want = similarity_probabilities(image, text, valid, 3.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_outputs_for_co_teaching():
    batch = _random_batch(12)
    out = FineGrainedContrastiveLoss()(*batch, 5.0)
    p_i2t, p_t2i = similarity_probabilities(*batch[:3], 5.0)
    assert torch.allclose(out["p_i2t"], p_i2t) and torch.allclose(out["p_t2i"], p_t2i)
    n = batch[0].shape[0]
    assert out["logits"].shape == (batch[0].shape[1], n, n)
    assert torch.allclose(out["logits"][2], 5.0 * batch[0][:, 2] @ batch[1][:, 2].t())
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")


# --------------------------------------------------------------------------------------------
# Arguments and gathering
# --------------------------------------------------------------------------------------------
def test_bad_arguments():
    with pytest.raises(ValueError, match="anatomy_reduction"):
        FineGrainedContrastiveLoss(anatomy_reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        FineGrainedContrastiveLoss(rank=2, world_size=2)
    image, text, valid, normal, text_key = _random_batch(13)
    loss = FineGrainedContrastiveLoss()
    with pytest.raises(ValueError, match="image_emb and text_emb"):
        loss(image, text[:, :2], valid, normal, text_key, 5.0)
    with pytest.raises(ValueError, match="normal"):
        loss(image, text, valid, normal[:, :2], text_key, 5.0)
    with pytest.raises(ValueError, match="alpha"):
        loss(image, text, valid, normal, text_key, 5.0, soft_targets=(valid, valid), alpha=2.0)


def test_gather_features_single_process():
    a, b = torch.randn(2, 3), torch.ones(2, dtype=torch.bool)
    got = gather_features(a, b, rank=0, world_size=1, gather_with_grad=True)
    assert got[0] is a and got[1] is b
    with pytest.raises(RuntimeError, match="process group|distributed"):
        gather_features(a, rank=0, world_size=2)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_skip_all_normal_anatomies_hand_computed(reduction: str) -> None:
    """Anatomy 0 is normal in both samples, anatomy 1 abnormal in sample 0 (logit_scale 1).

    Anatomy 1 has one-hot targets and logits [[1, 0], [0, 1]]: every row's CE is
    log(1 + e^-1), so its term is log(1 + e^-1). Anatomy 0 has FNCN targets [0.5, 0.5]: every
    row's CE is log(1 + e) - 1/2, and so is its term. The option drops anatomy 0 only.
    """
    eye = torch.eye(2)
    image = torch.stack([torch.stack([eye[i], eye[i]]) for i in range(2)])  # (N, A, E)
    text = image.clone()
    valid = torch.ones(2, 2, dtype=torch.bool)
    normal = torch.tensor([[True, False], [True, True]])
    keys = torch.tensor([[1, 2], [3, 4]])
    abnormal_term = math.log(1 + math.exp(-1))
    normal_term = math.log(1 + math.e) - 0.5
    for skip, terms in ((False, [normal_term, abnormal_term]), (True, [abnormal_term])):
        loss_fn = FineGrainedContrastiveLoss(
            anatomy_reduction=reduction, skip_all_normal_anatomies=skip
        )
        emb = image.clone().requires_grad_(True)
        out = loss_fn(emb, text, valid, normal, keys, 1.0)
        expected = sum(terms) / (len(terms) if reduction == "mean" else 1)
        assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
        assert out["in_loss"].tolist() == [not skip, True]
        assert math.isnan(out["per_anatomy"][0].item()) == skip
        out["loss"].backward()
        # A skipped anatomy's embeddings get an exact zero gradient, still in the graph.
        assert (emb.grad[:, 0].abs().max().item() == 0.0) == skip
