"""The encoder's ViT block is MONAI's published TransformerBlock without its unused parts."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import TransformerBlock

from fvlm.models import VisionConfig, VisionTransformer3D
from fvlm.models.vision import ViTBlock

WIDTH, MLP, HEADS = 32, 64, 4


def blocks(dropout: float) -> tuple[ViTBlock, TransformerBlock]:
    torch.manual_seed(3)
    ours = ViTBlock(WIDTH, MLP, HEADS, dropout=dropout, qkv_bias=True)
    torch.manual_seed(3)
    monai = TransformerBlock(
        WIDTH, MLP, HEADS, dropout_rate=dropout, qkv_bias=True, use_flash_attention=True
    )
    return ours, monai


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_block_has_monais_weights_and_outputs(dropout: float) -> None:
    ours, monai = blocks(dropout)
    reference = {k: v for k, v in monai.state_dict().items() if "cross_attn" not in k}
    assert list(ours.state_dict()) == list(reference)  # checkpoints load either way
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference[key]), key  # a seed gives the same weights
    x = torch.randn(2, 10, WIDTH)
    monai.attn.dropout_rate = 0.0  # only MONAI's block needs this for a deterministic reference
    torch.testing.assert_close(ours.eval()(x), monai.eval()(x), rtol=0, atol=1e-5)


def test_dropout_follows_train_and_eval_without_touching_monai() -> None:
    model = VisionTransformer3D(VisionConfig.vit_tiny(dropout=0.5))
    image = torch.rand(1, 1, 16, 32, 32)
    model.eval()
    torch.testing.assert_close(model(image), model(image), rtol=0, atol=0)
    model.train()
    assert (model(image) - model(image)).abs().max() > 1e-3
    # The attention modules keep the rate they were built with in both modes.
    assert {block.attn.dropout_rate for block in model.blocks} == {0.5}


def test_every_encoder_parameter_gets_a_gradient() -> None:
    model = VisionTransformer3D(VisionConfig.vit_tiny())
    model(torch.rand(2, 1, 16, 32, 32)).square().sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert not any("cross_attn" in name for name, _ in model.named_parameters())
