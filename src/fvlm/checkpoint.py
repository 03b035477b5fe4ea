"""Load a trained network from a training checkpoint without executing anything from the file.

A checkpoint is a pickle, and unpickling can run arbitrary code. :func:`load_network` therefore
reads it with ``torch.load(weights_only=True)`` only (tensors and plain containers; anything else
is refused before it is built), decides the network kind from an allow-list instead of importing a
name read from the file, and rebuilds the network with :func:`fvlm.models.build_network` from the
saved hyper-parameters. Plain PyTorch: evaluation loads checkpoints without Lightning.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvlm.models import NETWORK_KINDS, NetworkKind, build_network, network_options

__all__ = ["NETWORK_KEY", "TrainedNetwork", "load_network", "read_checkpoint"]

NETWORK_KEY = "fvlm_network"
"""Checkpoint entry the training modules write: ``{"kind": ..., "prefix": ...}`` (plain strings)."""

# Checkpoints written before NETWORK_KEY existed name their LightningModule class; only these
# names are understood (the string is looked up, never imported).
_LEGACY_MODULES: dict[str, NetworkKind] = {
    "fvlm.lit_modules.fine_grained.FineGrainedCLIPModule": "fine_grained",
    "fvlm.lit_modules.co_teaching.CoTeachingModule": "fine_grained",
    "fvlm.lit_modules.global_clip.GlobalCLIPModule": "global",
}
# Where the evaluated network's weights sit in a module's state dict: a single network, or the
# first of the co-teaching pair.
_PREFIXES = ("network.", "networks.0.")


@dataclass
class TrainedNetwork:
    """A trained network ready for inference.

    Attributes:
        network: :class:`~fvlm.models.FineGrainedCLIP` or :class:`~fvlm.models.GlobalCLIP`, in
            eval mode.
        hparams: The training module's hyper-parameters (plain types), e.g. ``text_model`` for
            the tokenizer and ``num_anatomies``.
        kind: ``fine_grained`` or ``global``.
    """

    network: nn.Module
    hparams: dict[str, Any]
    kind: NetworkKind


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Mapping[str, Any]:
    """A Lightning checkpoint's contents, read weights-only (never unpickling Python objects).

    Raises:
        ValueError: The file holds Python objects (refused, with the reason) or no mapping.
    """
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: refused: the checkpoint holds Python objects that a weights-only load does "
            f"not build (fvlm checkpoints hold only tensors and plain values; loading it unsafely "
            f"could run code): {reason}"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: not an fvlm checkpoint (a {type(checkpoint).__name__})")
    return checkpoint


def _kind(checkpoint: Mapping[str, Any], path: Path) -> NetworkKind:
    entry = checkpoint.get(NETWORK_KEY)
    if isinstance(entry, Mapping):
        kind = entry.get("kind")
        if kind not in NETWORK_KINDS:
            raise ValueError(
                f"{path}: unknown network kind {kind!r}; allowed: {sorted(NETWORK_KINDS)}"
            )
        return kind  # type: ignore[return-value]
    module = checkpoint.get("fvlm_module")
    if module is None:
        raise ValueError(f"{path}: not an fvlm checkpoint (no {NETWORK_KEY!r} entry)")
    if module not in _LEGACY_MODULES:
        raise ValueError(
            f"{path}: refused: module {module!r} is not one of fvlm's training modules "
            f"({', '.join(sorted(_LEGACY_MODULES))})"
        )
    return _LEGACY_MODULES[module]


def _network_state(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        picked = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    raise ValueError(f"{path}: the state dict holds no network weights (keys {_PREFIXES})")


def load_network(path: str | Path, map_location: str | torch.device = "cpu") -> TrainedNetwork:
    """Rebuild the evaluated network of an fvlm training checkpoint (fVLM, co-teaching, CLIP).

    Args:
        path: A ``.ckpt`` written by ``fvlm fit``.
        map_location: Device for the tensors (as ``torch.load``).

    Returns:
        The network in eval mode with its hyper-parameters.

    Raises:
        ValueError: The file holds anything but tensors and plain values (refused before it is
            built), is not an fvlm checkpoint, or names a network kind outside the allow-list.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    kind = _kind(checkpoint, path)
    hparams = checkpoint.get("hyper_parameters")
    state = checkpoint.get("state_dict")
    if not isinstance(hparams, Mapping) or not isinstance(state, Mapping):
        raise ValueError(f"{path}: checkpoint lacks 'hyper_parameters' or 'state_dict'")
    hparams = dict(hparams)
    options = network_options(hparams)
    if isinstance(options.get("vision"), Mapping):  # the weights come from the file: no MAE fetch
        options["vision"] = dict(options["vision"]) | {"init_from": None}
    network = build_network(kind, **options)
    try:
        network.load_state_dict(_network_state(state, path))
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the saved hyper-parameters: {err}") from None
    return TrainedNetwork(network=network.to(map_location).eval(), hparams=hparams, kind=kind)
