"""Tests of fvlm.models: 3D ViT + inflation, anatomy pooling, text encoder, the two CLIP models."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from fvlm.models import (
    AnatomyPooling,
    FineGrainedCLIP,
    FineGrainedOutput,
    GlobalCLIP,
    TextEncoder,
    VisionConfig,
    VisionTransformer3D,
    load_2d_checkpoint,
    load_tokenizer,
    text_keys,
    token_membership,
)
from fvlm.models.intensity_windows import IntensityWindows, check_source_window
from fvlm.models.text import length_buckets
from fvlm.models.vision import inflate_patch_kernel, inflate_position_embedding

A = 5  # anatomies in the tiny batches
E = 16  # joint embedding width


BertFactory = Callable[..., BertConfig]


@pytest.fixture
def bert(tiny_bert: Callable[..., dict]) -> BertFactory:
    """The suite's tiny ``BertConfig`` (conftest ``tiny_bert``); keyword overrides as there."""
    return lambda **overrides: BertConfig(**tiny_bert(**overrides))


def dropout(p: float) -> dict[str, float]:
    """``BertConfig`` overrides that switch dropout on (the tiny config has none)."""
    return {"hidden_dropout_prob": p, "attention_probs_dropout_prob": p}


def anatomy_map(batch: int = 2) -> torch.Tensor:
    """(B, 16, 32, 32) labels: anatomies as boxes; anatomy index 4 absent from sample 1."""
    labels = torch.zeros(batch, 16, 32, 32, dtype=torch.uint8)
    labels[:, 0:4, 0:8, 0:8] = 1
    labels[:, 2:10, 8:20, 4:12] = 2
    labels[:, 8:16, 16:32, 16:32] = 3
    labels[:, 12:14, 0:3, 28:32] = 4
    labels[0, 5, 30, 1] = 5
    return labels


def tiny_batch(batch: int = 2, length: int = 9, seed: int = 0) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, A, length), generator=gen)
    mask = torch.ones(batch, A, length, dtype=torch.long)
    mask[..., length - 3 :] = 0
    ids = ids * mask
    return {
        "image": torch.rand(batch, 1, 16, 32, 32, generator=gen),
        "anatomy": anatomy_map(batch),
        "valid": torch.ones(batch, A, dtype=torch.bool),
        "normal": torch.arange(batch * A).reshape(batch, A) != 1,  # sample 0, anatomy 1 abnormal
        "text_input_ids": ids,
        "text_attention_mask": mask,
        "report_input_ids": ids[:, 0],
        "report_attention_mask": mask[:, 0],
        "study_id": [f"s{i}" for i in range(batch)],
    }


@pytest.fixture
def fine_grained(bert: BertFactory) -> FineGrainedCLIP:
    """A fresh, seeded fVLM network: tiny ViT, the tiny BERT, ``A`` anatomies."""
    torch.manual_seed(0)
    return FineGrainedCLIP(
        A, VisionConfig.vit_tiny(), text_config=bert(), embed_dim=E, pooling_heads=4
    )


def clip_loss(out: FineGrainedOutput) -> torch.Tensor:
    """A minimal per-anatomy CLIP loss, enough to drive gradients through every tower."""
    logits = torch.einsum("iae,jae->aij", out.image_emb, out.text_emb) * out.logit_scale
    pair = out.valid.T[:, :, None] & out.valid.T[:, None, :]
    logits = logits.masked_fill(~pair, -1e4)
    target = torch.arange(logits.shape[-1]).expand(logits.shape[0], -1)
    loss = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return (loss * out.valid.T).sum() / out.valid.sum()


# ------------------------------------------------------------------------------------------------
# Vision
# ------------------------------------------------------------------------------------------------


def test_vision_presets_follow_the_paper() -> None:
    base = VisionConfig.vit_base()
    assert (base.hidden_size, base.mlp_dim, base.num_layers, base.num_heads) == (768, 3072, 12, 12)
    assert base.img_size == (96, 256, 384) and base.patch_size == (16, 16, 32)
    assert base.grid_size == (6, 16, 12) and math.prod(base.grid_size) == 1152
    tiny = VisionConfig.preset("vit_tiny", num_layers=1)
    assert tiny.grid_size == (4, 4, 4) and tiny.num_layers == 1
    assert VisionConfig(img_size=[16, 32, 32], patch_size=[4, 8, 8]).img_size == (16, 32, 32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"img_size": (15, 32, 32), "patch_size": (4, 8, 8)},
        {"hidden_size": 64, "num_heads": 5},
        {"dropout": 1.0},
        {"patch_size": (4, 8)},
    ],
)
def test_vision_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        VisionConfig(**kwargs)  # type: ignore[arg-type]


def test_vision_preset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown vision preset"):
        VisionConfig.preset("vit_huge")  # type: ignore[arg-type]


def test_vision_tokens_shape_and_other_crop_sizes() -> None:
    torch.manual_seed(0)
    model = VisionTransformer3D(VisionConfig.vit_tiny())
    assert model.grid_size == (4, 4, 4)
    tokens = model(torch.rand(2, 1, 16, 32, 32))
    assert tokens.shape == (2, 64, 64) and tokens.dtype == torch.float32
    # A larger evaluation crop: position embeddings are interpolated to the 8 x 4 x 4 grid.
    assert model(torch.rand(1, 1, 32, 32, 32)).shape == (1, 128, 64)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 1, 18, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        model(torch.rand(1, 2, 16, 32, 32))


def test_vision_eval_is_deterministic_with_dropout() -> None:
    model = VisionTransformer3D(VisionConfig.vit_tiny(dropout=0.5)).eval()
    image = torch.rand(1, 1, 16, 32, 32)
    torch.testing.assert_close(model(image), model(image))
    model.train()
    assert not torch.equal(model(image), model(image))


def test_activation_checkpointing_gives_same_values_and_gradients() -> None:
    torch.manual_seed(0)
    plain = VisionTransformer3D(VisionConfig.vit_tiny())
    ckpt = VisionTransformer3D(VisionConfig.vit_tiny(checkpoint_activations=True))
    ckpt.load_state_dict(plain.state_dict())
    image = torch.rand(2, 1, 16, 32, 32)
    out_plain, out_ckpt = plain(image), ckpt(image)
    torch.testing.assert_close(out_plain, out_ckpt)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def fake_2d_vit(width: int = 64, patch: int = 8, side: int = 3, depth: int = 3) -> dict:
    """A random timm/MAE-style 2D ViT state dict (with CLS, decoder and head leftovers)."""
    gen = torch.Generator().manual_seed(1)
    state = {
        "cls_token": torch.randn(1, 1, width, generator=gen),
        "pos_embed": torch.randn(1, 1 + side * side, width, generator=gen),
        "patch_embed.proj.weight": torch.randn(width, 3, patch, patch, generator=gen),
        "patch_embed.proj.bias": torch.randn(width, generator=gen),
        "norm.weight": torch.randn(width, generator=gen),
        "norm.bias": torch.randn(width, generator=gen),
        "decoder_embed.weight": torch.randn(32, width, generator=gen),
        "head.weight": torch.randn(10, width, generator=gen),
    }
    shapes = {
        "norm1.weight": (width,),
        "norm1.bias": (width,),
        "attn.qkv.weight": (3 * width, width),
        "attn.qkv.bias": (3 * width,),
        "attn.proj.weight": (width, width),
        "attn.proj.bias": (width,),
        "norm2.weight": (width,),
        "norm2.bias": (width,),
        "mlp.fc1.weight": (128, width),
        "mlp.fc1.bias": (128,),
        "mlp.fc2.weight": (width, 128),
        "mlp.fc2.bias": (width,),
    }
    for i in range(depth):
        for name, shape in shapes.items():
            state[f"blocks.{i}.{name}"] = torch.randn(*shape, generator=gen)
    return state


def test_load_2d_checkpoint_inflates_and_reports(tmp_path) -> None:
    state = fake_2d_vit()
    path = tmp_path / "mae.pth"
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(lr=1e-4)}, path)
    model = VisionTransformer3D(VisionConfig.vit_tiny())
    report = load_2d_checkpoint(model, path)
    own = model.state_dict()

    kernel = own["patch_embedding.patch_embeddings.weight"]
    assert kernel.shape == (64, 1, 4, 8, 8)
    expected_sum = state["patch_embed.proj.weight"].mean(1).sum((-2, -1))
    torch.testing.assert_close(kernel.sum((1, 2, 3, 4)), expected_sum)
    # Constant volume -> same response as the grey 2D filter on a constant image.
    response = F.conv3d(torch.full((1, 1, 4, 8, 8), 0.7), kernel).flatten()
    torch.testing.assert_close(response, 0.7 * expected_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel[:, :, 0], kernel[:, :, 3])  # repeated over depth

    pos = own["patch_embedding.position_embeddings"]
    assert pos.shape == (1, 64, 64)
    slabs = pos.reshape(4, 16, 64)
    torch.testing.assert_close(slabs[0], slabs[3])  # in-plane table repeated over the slabs

    torch.testing.assert_close(own["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(own["blocks.0.attn.out_proj.bias"], state["blocks.0.attn.proj.bias"])
    torch.testing.assert_close(own["blocks.1.mlp.linear2.weight"], state["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(own["norm.weight"], state["norm.weight"])

    assert len(report.loaded) == 2 * 12 + 5  # two blocks, patch kernel+bias, pos, final norm
    assert {"cls_token", "decoder_embed.weight", "head.weight"} <= set(report.skipped)
    assert "blocks.2.attn.qkv.weight" in report.skipped  # deeper than the 2-layer model
    assert not set(report.missing) & set(report.loaded)


def test_load_2d_checkpoint_skips_shape_mismatch_and_inits_from_config(tmp_path) -> None:
    state = fake_2d_vit(width=32)
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    model = VisionTransformer3D(VisionConfig.vit_tiny(hidden_size=64))
    report = load_2d_checkpoint(model, path)
    assert "shape" in report.skipped["blocks.0.attn.qkv.weight"]
    assert report.loaded == ["blocks.0.mlp.linear1.bias", "blocks.1.mlp.linear1.bias"]  # 128 == 128

    state = fake_2d_vit()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = VisionTransformer3D(VisionConfig.vit_tiny(init_from=str(path)))
    torch.testing.assert_close(model.blocks[0].mlp.linear1.weight, state["blocks.0.mlp.fc1.weight"])


def test_inflate_patch_kernel_resizes_in_plane_and_keeps_the_filter_sum() -> None:
    kernel_2d = torch.randn(6, 3, 16, 16)
    kernel = inflate_patch_kernel(kernel_2d, (16, 16, 32))  # the paper's patch
    assert kernel.shape == (6, 1, 16, 16, 32)
    torch.testing.assert_close(kernel.sum((1, 2, 3, 4)), kernel_2d.mean(1).sum((-2, -1)))
    summed = inflate_patch_kernel(kernel_2d, (2, 16, 16), rgb="sum")
    torch.testing.assert_close(summed.sum((1, 2, 3, 4)), kernel_2d.sum((1, 2, 3)))
    pos = inflate_position_embedding(torch.randn(1, 1 + 14 * 14, 8), (6, 16, 12))
    assert pos.shape == (1, 6 * 16 * 12, 8)


def test_intensity_windows_map_cached_values_to_hu_windows() -> None:
    windows = IntensityWindows([[-1000, 200], [-150, 250], [200, 1000]], source=[-1000, 1000])
    # Cached [0, 1] over [-1000, 1000] HU: air, water, 150 HU (enhanced liver), 900 HU (stone).
    cached = torch.tensor([0.0, 0.5, 0.575, 0.95]).view(1, 1, 4, 1, 1)
    out = windows(cached).flatten(2)[0]
    expected = torch.tensor(
        [
            [0.0, 1000 / 1200, 1150 / 1200, 1.0],  # lung window
            [0.0, 150 / 400, 300 / 400, 1.0],  # soft tissue: 150 HU is 3/4 up the window
            [0.0, 0.0, 0.0, 700 / 800],  # dense: only the stone is above 200 HU
        ]
    )
    torch.testing.assert_close(out, expected)
    assert windows(cached.half()).dtype == torch.float16


@pytest.mark.parametrize(
    ("windows", "source", "match"),
    [
        ([[200, 100]], [-1000, 1000], "low < high"),
        ([[500, 900]], [-300, 400], "outside the cached window"),
        ([], [-1000, 1000], "at least one"),
        ([[0, 100]], [400, -300], "source HU window"),
    ],
)
def test_intensity_windows_reject_bad_windows(windows, source, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IntensityWindows(windows, source)


def test_source_window_must_match_the_cache() -> None:
    check_source_window((-1000, 1000), (-1000.0, 1000.0), "cache")
    check_source_window(None, (-300, 400), "cache")  # single-channel model: nothing to check
    with pytest.raises(ValueError, match="preprocessed with hu_window"):
        check_source_window((-1000, 1000), (-1000, 400), "data/cache/x")


def test_vision_with_hu_windows_takes_one_channel_per_window(tmp_path) -> None:
    with pytest.raises(ValueError, match="source_hu_window"):
        VisionConfig.vit_tiny(hu_windows=[[-150, 250]])
    config = VisionConfig.vit_tiny(
        hu_windows=[[-1000, 200], [-150, 250]], source_hu_window=[-1000, 1000]
    )
    model = VisionTransformer3D(config)
    assert model.patch_embedding.patch_embeddings.weight.shape[1] == 2
    assert model(torch.rand(2, 1, 16, 32, 32)).shape == (2, 64, 64)
    # Inflating a 2D checkpoint splits the grey filter over the channels: a volume that looks the
    # same in both windows gets the grey 2D response.
    state = fake_2d_vit()
    torch.save(state, tmp_path / "mae.pth")
    load_2d_checkpoint(model, tmp_path / "mae.pth")
    kernel = model.patch_embedding.patch_embeddings.weight
    torch.testing.assert_close(kernel[:, 0], kernel[:, 1])
    expected_sum = state["patch_embed.proj.weight"].mean(1).sum((-2, -1))
    torch.testing.assert_close(kernel.sum((1, 2, 3, 4)), expected_sum)


# ------------------------------------------------------------------------------------------------
# Anatomy pooling
# ------------------------------------------------------------------------------------------------


def test_token_membership_on_a_hand_made_map() -> None:
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)  # patch 2 -> 2x2x2 grid, 8 tokens
    labels[0, 0, 0, 0] = 1  # token (0, 0, 0) = 0
    labels[0, 3, 3, 3] = 2  # token (1, 1, 1) = 7
    labels[0, 1, 2, 0] = 2  # token (0, 1, 0) = 2
    labels[0, 2, 1, 3] = 4  # token (1, 0, 1) = 5; anatomy index 2 (label 3) is absent
    member = token_membership(labels, 4, (2, 2, 2))
    assert member.shape == (1, 4, 8) and member.dtype == torch.bool
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[0, 0] = expected[1, 2] = expected[1, 7] = expected[3, 5] = True
    assert torch.equal(member[0], expected)


def test_token_membership_matches_per_anatomy_max_pool() -> None:
    labels = anatomy_map()
    member = token_membership(labels, A, (4, 8, 8))
    for a in range(A):
        pooled = F.max_pool3d((labels == a + 1).float()[:, None], (4, 8, 8))
        assert torch.equal(member[:, a], pooled.flatten(1).bool())
    assert not member[1, 4].any() and member[0, 4].sum() == 1


def test_token_membership_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="label 6"):
        token_membership(torch.full((1, 4, 4, 4), 6), 5, (2, 2, 2))
    with pytest.raises(ValueError, match="divisible"):
        token_membership(torch.zeros(1, 5, 4, 4, dtype=torch.long), 5, (2, 2, 2))
    with pytest.raises(ValueError, match="integer"):
        token_membership(torch.zeros(1, 4, 4, 4), 5, (2, 2, 2))


def pooling_reference(pool: AnatomyPooling, tokens: torch.Tensor, member: torch.Tensor):
    """Slow per-sample, per-anatomy loop: the paper's description, written out literally."""
    heads = pool.num_heads
    out = torch.zeros(tokens.shape[0], pool.num_anatomies, pool.proj_weight.shape[-1])
    for b in range(tokens.shape[0]):
        for a in range(pool.num_anatomies):
            query = pool.query[a : a + 1]
            sequence = pool.norm(torch.cat([query, tokens[b, member[b, a]]]))
            q = pool.to_q(sequence[:1]).view(1, heads, -1).transpose(0, 1)
            keys, values = pool.to_kv(sequence).chunk(2, -1)
            k = keys.view(-1, heads, keys.shape[-1] // heads).transpose(0, 1)
            v = values.view(-1, heads, values.shape[-1] // heads).transpose(0, 1)
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            attended = (weights @ v).transpose(0, 1).reshape(1, -1)
            pooled = query + pool.out(attended)
            out[b, a] = F.normalize(pooled[0] @ pool.proj_weight[a] + pool.proj_bias[a], dim=0)
    return out


def test_anatomy_pooling_equals_the_loop_reference() -> None:
    torch.manual_seed(0)
    pool = AnatomyPooling(64, A, E, num_heads=4)
    tokens = torch.randn(2, 64, 64)
    member = token_membership(anatomy_map(), A, (4, 8, 8))
    out = pool(tokens, member)
    assert out.shape == (2, A, E) and out.dtype == torch.float32
    torch.testing.assert_close(out, pooling_reference(pool, tokens, member), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, A))
    assert torch.isfinite(out[1, 4]).all()  # absent anatomy: just its query


def test_tokens_outside_an_anatomy_do_not_influence_it() -> None:
    torch.manual_seed(0)
    pool = AnatomyPooling(64, A, E, num_heads=4)
    tokens = torch.randn(2, 64, 64)
    member = token_membership(anatomy_map(), A, (4, 8, 8))
    outside = ~member[:, 1]
    perturbed = tokens + 10.0 * torch.randn_like(tokens) * outside[..., None]
    before, after = pool(tokens, member), pool(perturbed, member)
    torch.testing.assert_close(before[:, 1], after[:, 1], atol=1e-6, rtol=0)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-3  # anatomy 0 does see those tokens


def test_anatomy_pooling_gradients_are_finite() -> None:
    torch.manual_seed(0)
    pool = AnatomyPooling(64, A, E, num_heads=4)
    tokens = torch.randn(2, 64, 64, requires_grad=True)
    member = token_membership(anatomy_map(), A, (4, 8, 8))
    pool(tokens, member).sum().backward()
    grads = [tokens.grad] + [p.grad for p in pool.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="membership"):
        pool(tokens, member[:, :3])


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------


def test_text_keys_hash_attended_tokens_only() -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9], [0, 0, 5, 6, 7], [5, 6, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    keys = text_keys(ids, mask)
    assert keys.dtype == torch.int64 and (keys >= 0).all()
    assert keys[0] == keys[1] == keys[2] != keys[3]  # padding ids, length and side don't matter
    assert text_keys(ids[:1, :3], mask[:1, :3]) == keys[0]
    # The documented formula, in Python integers: two polynomial hashes over (id + 1).
    expected = 0
    for modulus, base in ((2_147_483_647, 1_000_003), (2_147_483_629, 911_382_323)):
        part = sum((t + 1) * pow(base, i, modulus) for i, t in enumerate([5, 6, 7])) % modulus
        expected = expected * 2**31 + part
    assert int(keys[0]) == expected


def test_encode_unique_encodes_each_distinct_valid_text_once(bert: BertFactory) -> None:
    torch.manual_seed(0)
    encoder = TextEncoder(config=bert(**dropout(0.1)), embed_dim=E).eval()
    texts = torch.tensor([[3, 4, 5, 6, 0, 0], [3, 9, 0, 0, 0, 0], [3, 7, 7, 7, 7, 0]])
    masks = (texts > 0).long()
    pick = torch.tensor([[0, 1, 0, 2], [0, 0, 1, 2], [1, 0, 0, 0]])  # (B=3, A=4)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    ids = F.pad(texts[pick], (0, 6), value=0)  # extra padding must be trimmed away
    mask = F.pad(masks[pick], (0, 6), value=0)
    ids[~mask.bool()] = 42  # pad ids differ from row to row: must not split equal texts

    calls: list[tuple[int, ...]] = []
    handle = encoder.backbone.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    emb, keys = encoder.encode_unique(ids, mask, valid)
    handle.remove()
    assert calls == [(3, 5)]  # three distinct texts, longest 5 tokens
    assert emb.shape == (3, 4, E) and keys.shape == (3, 4)
    assert (emb[~valid] == 0).all() and (keys[~valid] == -1).all()
    for b, a in valid.nonzero().tolist():
        row = encoder(ids[b, a][None], mask[b, a][None])[0]
        torch.testing.assert_close(emb[b, a], row, atol=1e-5, rtol=0)
    assert keys[0, 0] == keys[1, 0] == keys[1, 1] != keys[0, 1]
    torch.testing.assert_close(keys[valid], text_keys(ids, mask)[valid])


def test_encode_unique_without_deduplication_encodes_every_valid_row(bert: BertFactory) -> None:
    torch.manual_seed(0)
    encoder = TextEncoder(config=bert(), embed_dim=E).eval()
    ids = torch.tensor([[[3, 4, 5], [3, 4, 5]], [[3, 9, 0], [3, 4, 5]]])
    mask = (ids > 0).long()
    valid = torch.ones(2, 2, dtype=torch.bool)
    rows: list[int] = []
    encoder.backbone.register_forward_hook(
        lambda module, args, kwargs, output: rows.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    deduplicated, keys = encoder.encode_unique(ids, mask, valid)
    encoder.deduplicate = False
    every, every_keys = encoder.encode_unique(ids, mask, valid)
    assert rows == [2, 4]  # 2 distinct texts vs all 4 valid pairs
    torch.testing.assert_close(every, deduplicated, atol=1e-5, rtol=0)
    assert torch.equal(keys, every_keys)


def test_encode_unique_with_nothing_valid_keeps_the_graph(bert: BertFactory) -> None:
    encoder = TextEncoder(config=bert(), embed_dim=E)
    ids = torch.randint(1, 100, (2, 3, 4))
    emb, keys = encoder.encode_unique(ids, torch.ones_like(ids), torch.zeros(2, 3, dtype=bool))
    assert (emb == 0).all() and (keys == -1).all()
    emb.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_text_encoder_rejects_bad_arguments(bert: BertFactory) -> None:
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(config=bert(), pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name/path or a config"):
        TextEncoder(model=None)


def test_minilm_loads_offline(
    monkeypatch: pytest.MonkeyPatch, tiny_bert: Callable[..., dict]
) -> None:
    """MiniLM (a declared dependency, shipped as a package) loads without the network.

    The suite's tiny BERT shares MiniLM's vocabulary, so real token ids fit its embedding.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    encoder = TextEncoder("minilm", embed_dim=E).eval()
    tokenizer = load_tokenizer("minilm")
    assert len(tokenizer) == tiny_bert()["vocab_size"]
    batch = tokenizer(
        ["The liver shows no significant abnormalities.", "Cyst in the left kidney."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        features = encoder.features(batch["input_ids"], batch["attention_mask"])
        emb = encoder(batch["input_ids"], batch["attention_mask"])
    assert encoder.hidden_size == 384 and features.shape == (2, 384)
    assert emb.shape == (2, E)
    assert encoder.backbone.pooler is None


# ------------------------------------------------------------------------------------------------
# The CLIP models
# ------------------------------------------------------------------------------------------------


def test_fine_grained_clip_output_contract(fine_grained: FineGrainedCLIP) -> None:
    model = fine_grained
    batch = tiny_batch()
    out = model(batch)
    assert out.image_emb.shape == out.text_emb.shape == (2, A, E)
    assert out.image_emb.dtype == out.text_emb.dtype == torch.float32
    assert out.valid.dtype == out.normal.dtype == torch.bool
    assert out.text_key.dtype == torch.int64 and out.text_key.shape == (2, A)
    # Anatomy index 4 is absent from sample 1: invalid although the batch says valid.
    assert out.valid[1, 4].item() is False and out.valid.sum() == 2 * A - 1
    assert (out.text_emb[1, 4] == 0).all() and out.text_key[1, 4] == -1
    assert torch.equal(out.normal, batch["normal"])
    assert out.logit_scale.ndim == 0
    torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))
    torch.testing.assert_close(model.encode_image(batch["image"], batch["anatomy"]), out.image_emb)


def test_logit_scale_is_clamped_at_100(bert: BertFactory, fine_grained: FineGrainedCLIP) -> None:
    model = fine_grained
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(10.0)
    torch.testing.assert_close(model.logit_scale(), torch.tensor(100.0))
    with pytest.raises(ValueError, match="temperature"):
        GlobalCLIP(VisionConfig.vit_tiny(), text_config=bert(), temperature=0.001)


def test_fine_grained_gradients_reach_every_parameter(fine_grained: FineGrainedCLIP) -> None:
    model = fine_grained
    clip_loss(model(tiny_batch())).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # DDP without find_unused_parameters needs this
    for name in (
        "vision.patch_embedding.patch_embeddings.weight",
        "vision.blocks.0.attn.qkv.weight",
        "pooling.query",
        "pooling.proj_weight",
        "text.backbone.embeddings.word_embeddings.weight",
        "text.proj.weight",
        "logit_scale.log_scale",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_bf16_autocast_keeps_float32_embeddings(fine_grained: FineGrainedCLIP) -> None:
    model = fine_grained
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tiny_batch())
        loss = clip_loss(out)
    loss.backward()
    assert out.image_emb.dtype == out.text_emb.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(model.vision.norm.weight.grad).all()


def test_global_embedding_is_the_renormalised_mean_of_present_anatomies(
    fine_grained: FineGrainedCLIP,
) -> None:
    model = fine_grained.eval()
    batch = tiny_batch()
    image, anatomy = batch["image"], batch["anatomy"]
    emb = model.encode_image(image, anatomy)
    glob = model.global_embedding(image, anatomy)
    torch.testing.assert_close(glob[0], F.normalize(emb[0].mean(0), dim=0))
    torch.testing.assert_close(glob[1], F.normalize(emb[1, :4].mean(0), dim=0))
    only = torch.zeros(2, A, dtype=torch.bool)
    only[:, 2] = True
    torch.testing.assert_close(model.global_embedding(image, anatomy, only), emb[:, 2])


def test_fine_grained_clip_reports_missing_batch_keys(fine_grained: FineGrainedCLIP) -> None:
    batch = tiny_batch()
    del batch["valid"]
    with pytest.raises(KeyError, match="valid"):
        fine_grained(batch)


def test_global_clip_is_plain_clip_with_one_anatomy(bert: BertFactory) -> None:
    torch.manual_seed(0)
    model = GlobalCLIP(VisionConfig.vit_tiny(), text_config=bert(), embed_dim=E)
    batch = tiny_batch(batch=3)
    batch["report_input_ids"][2] = batch["report_input_ids"][0]  # identical reports
    out = model(batch)
    assert out.image_emb.shape == out.text_emb.shape == (3, 1, E)
    assert out.valid.all() and out.valid.shape == (3, 1)
    assert out.normal[:, 0].tolist() == [False, True, True]  # sample 0 has one abnormal anatomy
    assert out.text_key[0, 0] == out.text_key[2, 0] != out.text_key[1, 0]
    torch.testing.assert_close(out.text_emb[0], out.text_emb[2])
    assert model.encode_image(batch["image"]).shape == (3, 1, E)
    assert model.global_embedding(batch["image"]).shape == (3, E)
    clip_loss(out).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_frozen_text_backbone_caches_features_and_trains_only_the_projection(
    bert: BertFactory,
) -> None:
    encoder = TextEncoder(config=bert(**dropout(0.1)), embed_dim=8, trainable_layers=0)
    encoder.train()
    assert not encoder.backbone.training  # frozen: no dropout noise
    calls = []
    encoder.backbone.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0], [2, 5, 6, 3]])
    mask = (ids != 0).long()
    first = encoder(ids, mask)
    second = encoder(ids[[1, 0]], mask[[1, 0]])
    assert calls == [3]  # one backbone call; the second call is served from the cache
    assert torch.allclose(first[[1, 0]], second)
    first.sum().backward()
    assert encoder.proj.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in encoder.backbone.parameters())


def test_trainable_layers_freezes_all_but_the_last(bert: BertFactory) -> None:
    encoder = TextEncoder(config=bert(num_hidden_layers=2), embed_dim=8, trainable_layers=1)
    layers = encoder.backbone.encoder.layer
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not any(p.requires_grad for p in encoder.backbone.embeddings.parameters())
    assert not encoder.frozen
    with pytest.raises(ValueError, match="trainable_layers"):
        TextEncoder(config=bert(), embed_dim=8, trainable_layers=2)


def test_length_buckets_bound_the_padding_and_cover_every_text() -> None:
    rng = torch.Generator().manual_seed(0)
    # normal sentences of ~12 tokens and findings of 20-120 tokens, as a batch's unique texts
    lengths = [12] * 10 + torch.randint(20, 121, (60,), generator=rng).tolist()
    groups = length_buckets(lengths, max_waste=1.25, min_size=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    one_group = len(lengths) * max(lengths)
    assert padded <= 1.3 * sum(lengths) < 0.75 * one_group  # vs padding all to the longest
    for group in groups[:-1]:  # closed groups: at least min_size and within the bound
        longest = max(lengths[i] for i in group)
        assert len(group) >= 8 and len(group) * longest <= 1.25 * sum(lengths[i] for i in group)
    assert length_buckets([5, 3], min_size=8) == [[1, 0]]  # too few to split


def test_packed_encoding_equals_padding_to_the_longest(bert: BertFactory) -> None:
    torch.manual_seed(0)
    encoder = TextEncoder(config=bert(), embed_dim=E).eval()
    encoder.min_bucket_texts = 2
    lengths = [3, 3, 4, 12, 13, 30, 31]
    ids = torch.zeros(len(lengths), 32, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 100, (n,))
        mask[row, :n] = 1
    widths: list[int] = []
    encoder.backbone.register_forward_hook(
        lambda module, args, kwargs, output: widths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    packed = encoder.encode_packed(ids, mask)
    assert len(widths) > 1 and max(widths) == 31 and min(widths) < 31  # several groups
    torch.testing.assert_close(packed, encoder(ids, mask), atol=1e-5, rtol=0)
