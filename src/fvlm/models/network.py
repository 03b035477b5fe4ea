"""Build a trained network (fine-grained or global CLIP) from plain, serialisable options.

The LightningModules and :func:`fvlm.checkpoint.load_network` both call :func:`build_network`, so
a checkpoint's saved hyper-parameters rebuild exactly the network that was trained, without
importing Lightning or any class named in the file.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fvlm.models.fine_grained_clip import FineGrainedCLIP
from fvlm.models.global_clip import GlobalCLIP
from fvlm.models.supervised import AnatomyClassifier
from fvlm.models.text import MINILM, TextPooling
from fvlm.models.vision import VisionConfig

__all__ = ["NETWORK_KINDS", "NetworkKind", "build_network", "network_options"]

NetworkKind = Literal["fine_grained", "global", "supervised"]
NETWORK_KINDS: dict[str, type[FineGrainedCLIP] | type[GlobalCLIP]] = {
    "fine_grained": FineGrainedCLIP,
    "global": GlobalCLIP,
    "supervised": AnatomyClassifier,
}
"""The allow-list of networks a checkpoint may ask for (by kind, never by an import path)."""


def build_network(
    kind: NetworkKind,
    num_anatomies: int = 0,
    vision: VisionConfig | Mapping[str, Any] | None = None,
    text_model: str = MINILM,
    text_config: Mapping[str, Any] | None = None,
    text_trainable_layers: int | None = None,
    text_pooling: TextPooling = "cls",
    text_gradient_checkpointing: bool = False,
    embed_dim: int = 512,
    pooling_heads: int = 8,
    temperature: float = 0.07,
    max_logit_scale: float = 100.0,
    disease_anatomies: Sequence[int] = (),
) -> FineGrainedCLIP | GlobalCLIP:
    """A fresh network of ``kind`` with the towers' options.

    Args:
        kind: ``fine_grained`` (fVLM) or ``global`` (the CLIP baseline).
        num_anatomies: Length of the anatomy table; required (>= 1) for ``fine_grained``.
        vision: 3D ViT shape, as a :class:`VisionConfig` or its fields (YAML, checkpoints).
        text_model: Text backbone: ``minilm``, a local path or a hub name.
        text_config: ``BertConfig`` fields of a randomly initialised text tower (tests);
            overrides ``text_model``.
        text_trainable_layers: Train only the last ``k`` text layers (``None``: all).
        text_pooling: ``cls`` (paper) or ``mean``.
        text_gradient_checkpointing: Activation checkpointing in the text backbone.
        embed_dim: Joint embedding width.
        pooling_heads: Heads of the anatomy attention (``fine_grained`` only).
        temperature: Initial temperature.
        max_logit_scale: Cap of ``1 / temperature``.
        disease_anatomies: Anatomy index per disease of the supervised baseline's head
            (``supervised`` only; :class:`~fvlm.models.supervised.DiseaseHead`).
    """
    if kind not in NETWORK_KINDS:
        raise ValueError(f"unknown network kind {kind!r}; choose one of {sorted(NETWORK_KINDS)}")
    bert = None
    if text_config is not None:
        from transformers import BertConfig

        bert = BertConfig(**dict(text_config))
    if isinstance(vision, Mapping):
        vision = VisionConfig(**dict(vision))
    common: dict[str, Any] = {
        "vision": vision,
        "text_model": text_model,
        "text_config": bert,
        "text_trainable_layers": text_trainable_layers,
        "text_pooling": text_pooling,
        "text_gradient_checkpointing": text_gradient_checkpointing,
        "embed_dim": embed_dim,
        "temperature": temperature,
        "max_logit_scale": max_logit_scale,
    }
    if kind == "global":
        return GlobalCLIP(**common)
    if num_anatomies < 1:
        raise ValueError("num_anatomies must be >= 1 (linked from data.num_anatomies)")
    if kind == "supervised":
        return AnatomyClassifier(
            num_anatomies, list(disease_anatomies), pooling_heads=pooling_heads, **common
        )
    return FineGrainedCLIP(num_anatomies=num_anatomies, pooling_heads=pooling_heads, **common)


_OPTIONS = tuple(p for p in inspect.signature(build_network).parameters if p != "kind")


def network_options(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`build_network` options among ``hparams``, with plain-type values.

    A :class:`VisionConfig` becomes a dict, so the result (and a checkpoint holding it) loads
    with ``torch.load(weights_only=True)``.
    """
    options = {key: hparams[key] for key in _OPTIONS if key in hparams}
    if isinstance(options.get("vision"), VisionConfig):
        options["vision"] = dataclasses.asdict(options["vision"])
    return options
