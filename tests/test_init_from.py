"""``vision.init_from``: a local file or a timm MAE name, inflated to 3D; the paper configs use it.

Nothing downloads: the "hub" is a timm model built with ``pretrained=False`` that the tests save
with safetensors or hand to a stubbed ``timm.create_model``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from fvlm.checkpoint import load_network
from fvlm.models import VisionConfig, VisionTransformer3D
from fvlm.models.vision import read_init_source, warn_if_uninitialised

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MAE = "vit_base_patch16_224.mae"
# A timm ViT of the shape of ours below: 2 blocks, width 192, 3 heads, 16 x 16 patches.
TIMM_ARGS = {"img_size": 32, "depth": 2, "embed_dim": 192, "num_heads": 3, "num_classes": 0}
OURS = {
    "img_size": (8, 32, 32), "patch_size": (4, 16, 16), "hidden_size": 192, "mlp_dim": 768,
    "num_layers": 2, "num_heads": 3,
}  # fmt: skip


@pytest.fixture(scope="module")
def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_ARGS)


@pytest.fixture(scope="module")
def weights_file(timm_vit: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mae") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, str(path))
    return path


def assert_inflated_from(model: VisionTransformer3D, source: torch.nn.Module) -> None:
    """Blocks copied exactly; patch kernel = RGB mean spread over the 4 slices."""
    state = source.state_dict()
    ours = model.state_dict()
    torch.testing.assert_close(ours["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(ours["blocks.0.mlp.linear2.bias"], state["blocks.0.mlp.fc2.bias"])
    torch.testing.assert_close(ours["norm.weight"], state["norm.weight"])
    kernel = ours["patch_embedding.patch_embeddings.weight"]  # (192, 1, 4, 16, 16)
    expected = state["patch_embed.proj.weight"].mean(1) / 4
    for depth in range(4):
        torch.testing.assert_close(kernel[:, 0, depth], expected)


def test_local_safetensors_file(weights_file: Path, timm_vit: torch.nn.Module) -> None:
    assert read_init_source(str(weights_file)) == weights_file
    model = VisionTransformer3D(VisionConfig(**OURS, init_from=str(weights_file)))
    assert_inflated_from(model, timm_vit)


def test_timm_name_is_created_pretrained(
    monkeypatch: pytest.MonkeyPatch, timm_vit: torch.nn.Module
) -> None:
    calls: list[tuple[str, bool]] = []

    def hub(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        calls.append((name, pretrained))
        return timm_vit

    monkeypatch.setattr(timm, "create_model", hub)
    model = VisionTransformer3D(VisionConfig(**OURS, init_from=MAE))
    assert calls == [(MAE, True)]
    assert_inflated_from(model, timm_vit)


def test_offline_error_says_how_to_provide_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch.*save_file.*init_from to that file"):
        read_init_source(MAE)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("/nowhere/mae.pth", FileNotFoundError),
        ("weights.safetensors", FileNotFoundError),
        ("not_a_timm_model.mae", ValueError),
    ],
)
def test_bad_init_from(value: str, error: type[Exception]) -> None:
    with pytest.raises(error, match="init_from"):
        read_init_source(value)


def test_paper_width_without_initialisation_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fvlm.models.vision"):
        assert warn_if_uninitialised(VisionConfig.vit_base())
        assert not warn_if_uninitialised(VisionConfig.vit_base(init_from=MAE))
        assert not warn_if_uninitialised(VisionConfig.vit_tiny())
    assert len(caplog.records) == 1 and "random weights" in caplog.records[0].message


def test_paper_configs_set_mae_and_the_papers_flip(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The merged configs as ``fvlm fit`` parses them; the demo keeps its own settings."""
    from fvlm.lit_modules.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["fvlm"])
    for overlays in (["fvlm.yaml"], ["fvlm.yaml", "ctrate.yaml"]):
        args = ["fit"] + [a for name in overlays for a in ("--config", str(CONFIGS / name))]
        with pytest.raises(SystemExit):
            run_cli([*args, "--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["model"]["init_args"]["vision"]["init_from"] == MAE, overlays
        assert config["data"]["flip_axes"] == [0, 1, 2] and config["data"]["flip_prob"] == 0.2
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert (demo["model"]["init_args"].get("vision") or {}).get("init_from") is None


def test_trained_checkpoint_loads_without_fetching_the_initialisation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timm_vit: torch.nn.Module, tiny_bert
) -> None:
    """``load_network`` takes the weights from the file: no MAE fetch (offline evaluation)."""
    from test_lit_modules import VISION, fit, tiny_module_args

    from fvlm.lit_modules import FineGrainedCLIPModule

    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: timm_vit)
    vision = VisionConfig(**{**VISION.__dict__, "init_from": MAE})
    module = FineGrainedCLIPModule(**tiny_module_args(tiny_bert(), vision=vision))
    trainer = fit(module, epochs=1, n=1)
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_network fetched the MAE weights")

    monkeypatch.setattr(timm, "create_model", offline)
    loaded = load_network(tmp_path / "run.ckpt")
    assert loaded.network.vision.config.init_from is None
    expected = module.network.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.network.state_dict().items())
