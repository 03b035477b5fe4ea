"""Checkpoints load as plain networks with ``weights_only=True``; a pickle payload is refused."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_lit_modules import fit, make_batch, tiny_module_args

from fvlm.checkpoint import NETWORK_KEY, load_network
from fvlm.lit_modules import CoTeachingModule, FineGrainedCLIPModule, GlobalCLIPModule


def trained_checkpoint(
    module_class: type, path: Path, text_config: dict, **extra: object
) -> torch.nn.Module:
    torch.manual_seed(0)
    module = module_class(**tiny_module_args(text_config, **extra))
    trainer = fit(module, epochs=1, n=2)
    trainer.save_checkpoint(path)
    return module


@pytest.mark.parametrize(
    ("module_class", "kind", "extra"),
    [
        (FineGrainedCLIPModule, "fine_grained", {"label_correction": "momentum"}),
        (CoTeachingModule, "fine_grained", {"burn_in_epochs": 0}),
        (GlobalCLIPModule, "global", {}),
    ],
)
def test_load_network_rebuilds_the_trained_network(
    tmp_path: Path, module_class: type, kind: str, extra: dict, tiny_bert: Callable[..., dict]
) -> None:
    path = tmp_path / "model.ckpt"
    module = trained_checkpoint(module_class, path, tiny_bert(), **extra)
    loaded = load_network(path)
    assert loaded.kind == kind and not loaded.network.training
    assert loaded.hparams["text_model"] == "minilm" and loaded.hparams["embed_dim"] == 8
    expected = module.network.state_dict()
    got = loaded.network.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    batch = make_batch(7)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(batch).image_emb, module(batch).image_emb)
    # The module's own file loads through Lightning with weights_only=True, too.
    again = module_class.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(next(again.network.parameters()), next(module.network.parameters()))


class _Payload:
    """Unpickling this object would write ``target`` (what a hostile checkpoint would do)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def test_a_checkpoint_with_a_pickle_payload_is_refused(
    tmp_path: Path, tiny_bert: Callable[..., dict]
) -> None:
    path = tmp_path / "model.ckpt"
    trained_checkpoint(FineGrainedCLIPModule, path, tiny_bert())
    checkpoint = torch.load(path, weights_only=True)
    target = tmp_path / "written_by_the_payload.txt"
    checkpoint["hyper_parameters"]["extra"] = _Payload(target)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"model\.ckpt: refused: .*Python objects"):
        load_network(path)
    assert not target.exists()
    # The same file really is hostile: an unsafe load runs the payload.
    torch.load(path, weights_only=False)
    assert target.read_text() == "pwned"


def test_unknown_network_kinds_and_modules_are_refused(
    tmp_path: Path, tiny_bert: Callable[..., dict]
) -> None:
    path = tmp_path / "model.ckpt"
    trained_checkpoint(FineGrainedCLIPModule, path, tiny_bert())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint[NETWORK_KEY] = {"kind": "os.system"}
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"unknown network kind 'os.system'"):
        load_network(path)
    del checkpoint[NETWORK_KEY]
    checkpoint["fvlm_module"] = "subprocess.Popen"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"refused: module 'subprocess.Popen'"):
        load_network(path)
    checkpoint["fvlm_module"] = "fvlm.lit_modules.fine_grained.FineGrainedCLIPModule"
    torch.save(checkpoint, path)
    assert load_network(path).kind == "fine_grained"  # checkpoints from before NETWORK_KEY
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not an fvlm checkpoint"):
        load_network(path)
