"""Radiology report generation from a 3D image encoder (paper Sec. 4.3, Tab. 3), and anatomy-wise.

Whole-report generation (the paper): the encoder's visual tokens are projected to the width of a
BERT-family decoder (``is_decoder=True, add_cross_attention=True``) that is trained with the
language-modelling loss under teacher forcing and decodes greedily or by beam search through
``transformers``' ``generate``.

Two CPU-sized economies keep the numbers unchanged: a *compact output vocabulary*
(:func:`compact_decoder`: the embedding and LM-head rows of the token ids the training targets use,
so a phantom step scores a few hundred words instead of 30,522; generation maps back to the
tokenizer's ids) and, under the frozen protocol, *cached visual tokens* (the encoder never changes,
so a study's tokens are computed once and passed in as ``visual_tokens``).

Anatomy-wise generation (beyond the paper, its stated next step): the decoder is conditioned on
one anatomy at a time: its *anatomy token* (the paper's mask-pooled query token,
:class:`~fvlm.models.anatomy_pooling.AnatomyPooling`), the visual tokens that cover it and a
learned embedding of which anatomy it is; it writes that anatomy's decomposed description (the
cache's ``report.json`` texts). A small head on the anatomy token says whether the anatomy is
normal; :func:`assemble_report` writes the abnormal anatomies' descriptions in the anatomy table's
order and summarises the normal ones in one sentence.

The anatomy pooling is part of what an fVLM encoder learnt in pre-training, so an fVLM checkpoint
brings its own (fixed under the frozen protocol, like the ViT); a CLIP or random encoder has none
and gets a new one of the same shape, trained with the decoder. A plain mean of an anatomy's
tokens was tried first: on the phantom, linear probes on it do not separate normal from abnormal
anatomies for any encoder (within-anatomy AUROC below 0.5), on fVLM's anatomy tokens they do
(0.93).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.models.anatomy_pooling import AnatomyPooling, token_membership
from fvlm.models.text import MINILM, resolve_text_model

if TYPE_CHECKING:
    from transformers import BertLMHeadModel

    from fvlm.models.vision import VisionTransformer3D

__all__ = [
    "GenerationMode",
    "ReportGenerator",
    "TargetStats",
    "VisualMemory",
    "assemble_report",
    "build_decoder",
    "clean_description",
    "compact_decoder",
    "new_anatomy_pooling",
    "pool_tokens",
    "prepare_targets",
    "target_vocabulary",
]

GenerationMode = Literal["whole", "anatomy"]
_NULL_SENTENCE = re.compile(r"(?:^|(?<=[.;!?]))\s*null\s*(?:[.;]|$)", re.IGNORECASE)


def build_decoder(
    text_model: str = MINILM,
    config: Mapping[str, Any] | None = None,
    num_layers: int | None = None,
) -> BertLMHeadModel:
    """A BERT-family causal LM with cross-attention to visual memory.

    Args:
        text_model: Pretrained weights (``minilm``, a local path or a hub name) whose self-attention
            layers, embeddings and vocabulary start the decoder; the cross-attention and the LM
            head's transform are new.
        config: ``BertConfig`` fields of a randomly initialised decoder (tests); overrides
            ``text_model``.
        num_layers: Keep only the first ``k`` layers of the pretrained model (a CPU-sized
            decoder); ``None`` keeps all.
    """
    from transformers import BertConfig, BertLMHeadModel
    from transformers.utils import logging as hf_logging

    if config is not None:
        fields = {**dict(config), "is_decoder": True, "add_cross_attention": True}
        return BertLMHeadModel(BertConfig(**fields))
    extra = {} if num_layers is None else {"num_hidden_layers": int(num_layers)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new cross-attention weights are expected, not news
    try:
        return BertLMHeadModel.from_pretrained(
            resolve_text_model(text_model), is_decoder=True, add_cross_attention=True, **extra
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def target_vocabulary(
    targets: Iterable[Sequence[int]], special_ids: Iterable[int | None]
) -> list[int]:
    """Sorted tokenizer ids of a compact output vocabulary: every id of the targets + specials.

    Args:
        targets: Tokenised training targets (whole reports or anatomy descriptions).
        special_ids: Start, end, padding and unknown ids (``None`` entries are skipped); the
            unknown id stands in for target words of other splits that training never saw.
    """
    ids = {int(i) for i in special_ids if i is not None}
    for target in targets:
        ids.update(int(i) for i in target)
    return sorted(ids)


def compact_decoder(decoder: BertLMHeadModel, vocabulary: Sequence[int]) -> BertLMHeadModel:
    """Keep only the rows of ``vocabulary`` in the decoder's word embeddings and LM head.

    Compact id ``k`` is tokenizer id ``vocabulary[k]``; its (tied) embedding and output bias are
    that id's, so the compact decoder's logits equal the full decoder's logits at those ids. The
    output layer then costs ``len(vocabulary)`` instead of the whole WordPiece vocabulary per
    target token, which dominated a CPU training step.

    Raises:
        ValueError: An id outside the decoder's vocabulary, or a repeated id.
    """
    index = torch.as_tensor(list(vocabulary), dtype=torch.long)
    full = int(decoder.config.vocab_size)
    if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= full:
        raise ValueError(f"vocabulary ids must lie in 0..{full - 1} (the decoder's vocabulary)")
    if index.unique().numel() != index.numel():
        raise ValueError("vocabulary ids must be distinct")
    old_embedding, head = decoder.get_input_embeddings(), decoder.cls.predictions
    embedding = nn.Embedding(index.numel(), old_embedding.embedding_dim, padding_idx=None).to(
        old_embedding.weight.device
    )
    embedding.weight = nn.Parameter(old_embedding.weight.detach()[index].clone())
    output = nn.Linear(embedding.embedding_dim, index.numel(), bias=True)
    output.weight = embedding.weight  # tied, as BERT's are
    output.bias = nn.Parameter(head.bias.detach()[index].clone())
    decoder.set_input_embeddings(embedding)
    head.decoder, head.bias = output, output.bias
    decoder.config.vocab_size = index.numel()
    # Kept in the config (and its config.json): a decoder rebuilt from it is already compact.
    decoder.config.tokenizer_vocab_size = full
    return decoder


def pool_tokens(tokens: torch.Tensor, grid: Sequence[int], pool: Sequence[int]) -> torch.Tensor:
    """Average each ``pool`` block of the ``(d, h, w)`` token grid: a shorter whole-report memory.

    Cross-attention over every token of the grid dominates a CPU decoder step; a 2x2x2 pool reads
    an eighth as many tokens, each the mean of a block of neighbours (``(1, 1, 1)``: unchanged).

    Raises:
        ValueError: ``tokens`` is not the grid, or the grid is not divisible by ``pool``.
    """
    batch, count, width = tokens.shape
    grid, pool = tuple(int(g) for g in grid), tuple(int(p) for p in pool)
    shapes = len(grid) == len(pool) == 3
    if (
        not shapes
        or count != math.prod(grid)
        or any(g % p for g, p in zip(grid, pool, strict=True))
    ):
        raise ValueError(
            f"{count} visual tokens are no token grid {grid} divisible by memory_pool {pool}"
        )
    if pool == (1, 1, 1):
        return tokens
    volume = tokens.transpose(1, 2).reshape(batch, width, *grid)
    return F.avg_pool3d(volume, pool).flatten(2).transpose(1, 2)


@dataclass
class TargetStats:
    """Counted target outcomes of a batch (bad input is counted, not silently trained on).

    Attributes:
        empty: Targets without a single word (only special tokens); left out of the loss.
        truncated: Targets longer than the decoder limit, cut to it (they lose their end token).
        unknown: Target tokens outside a compact output vocabulary, trained as ``[UNK]``.
    """

    empty: int = 0
    truncated: int = 0
    unknown: int = 0


def prepare_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TargetStats]:
    """Cut tokenised targets to ``max_length`` and mark what the LM loss must ignore.

    Args:
        input_ids: ``(M, L)`` ``[CLS] text [SEP] [PAD]...`` ids; ``[CLS]`` is the start token.
        attention_mask: ``(M, L)`` 1 on real tokens.
        max_length: The decoder's target limit (at most its position embeddings).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding and on every token of an
        empty target) and the counts.
    """
    lengths = attention_mask.sum(-1)
    stats = TargetStats(
        empty=int((lengths <= 2).sum()), truncated=int((lengths > max_length).sum())
    )
    input_ids, attention_mask = input_ids[:, :max_length], attention_mask[:, :max_length]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[lengths <= 2] = -100
    return input_ids, attention_mask, labels, stats


def clean_description(text: str) -> str:
    """A description without the decomposition's ``null`` placeholders (missing section)."""
    return re.sub(r"\s+", " ", _NULL_SENTENCE.sub(" ", text)).strip()


def assemble_report(
    descriptions: Sequence[str | None], normal: Sequence[bool], names: Sequence[str]
) -> str:
    """One report from per-anatomy outputs, in the anatomy table's order.

    Abnormal anatomies contribute their generated description; the normal ones are named in one
    closing sentence. Anatomies the image does not show (``None``) are left out.

    Args:
        descriptions: Generated text per table anatomy, ``None`` where the anatomy is absent.
        normal: Predicted normal flag per table anatomy.
        names: Table anatomy names (underscores become spaces).
    """
    if not len(descriptions) == len(normal) == len(names):
        raise ValueError(
            f"descriptions ({len(descriptions)}), normal ({len(normal)}) and names "
            f"({len(names)}) must have one entry per anatomy"
        )
    parts, quiet = [], []
    for text, is_normal, name in zip(descriptions, normal, names, strict=True):
        if text is None:
            continue
        if is_normal:
            quiet.append(name.replace("_", " "))
        elif cleaned := clean_description(text):
            parts.append(cleaned if cleaned[-1] in ".!?" else cleaned + ".")
    if quiet:
        listed = quiet[0] if len(quiet) == 1 else ", ".join(quiet[:-1]) + " and " + quiet[-1]
        verb = "shows" if len(quiet) == 1 else "show"
        parts.append(f"The {listed} {verb} no significant abnormalities.")
    return " ".join(parts)


def new_anatomy_pooling(
    encoder: VisionTransformer3D,
    num_anatomies: int,
    embed_dim: int | None = None,
    num_heads: int | None = None,
) -> AnatomyPooling:
    """A new (untrained) anatomy pooling over ``encoder``'s tokens: for encoders without one.

    ``embed_dim`` defaults to the encoder's width and ``num_heads`` to its heads.
    """
    width = int(encoder.hidden_size)
    heads = int(num_heads or encoder.config.num_heads)
    return AnatomyPooling(width, num_anatomies, int(embed_dim or width), heads)


class VisualMemory(nn.Module):
    """Encoder tokens -> decoder width: what the decoder's cross-attention reads.

    Whole-report memory is every visual token. Anatomy memory is the anatomy's token (from the
    anatomy pooling) followed by the visual tokens that cover it, each plus the anatomy's learned
    embedding; the tokens of each pair are gathered (not masked from the whole grid), so the
    memory is as long as the largest anatomy of the batch, not the whole grid.

    Args:
        vision_width: Visual token width ``C``.
        decoder_width: Decoder hidden width ``H``.
        num_anatomies: Anatomy table length (one learned embedding each).
        anatomy_width: Anatomy token width ``E``; ``None`` for whole-report memory only (no
            parameters that would sit unused under DDP).
    """

    def __init__(
        self,
        vision_width: int,
        decoder_width: int,
        num_anatomies: int,
        anatomy_width: int | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(vision_width, decoder_width), nn.LayerNorm(decoder_width)
        )
        self.anatomy_proj: nn.Module | None = None
        self.anatomy_embedding: nn.Embedding | None = None
        if anatomy_width is not None:
            self.anatomy_proj = nn.Sequential(
                nn.Linear(anatomy_width, decoder_width), nn.LayerNorm(decoder_width)
            )
            self.anatomy_embedding = nn.Embedding(max(num_anatomies, 1), decoder_width)

    def whole(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory ``(B, N, H)`` and its all-ones mask of whole-report generation."""
        memory = self.proj(tokens)
        return memory, torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)

    def anatomy_token(self, embedding: torch.Tensor, anatomy: torch.Tensor) -> torch.Tensor:
        """Each pair's first memory row ``(P, H)``: its anatomy token plus which anatomy it is.

        The normal head reads the same row.
        """
        if self.anatomy_proj is None or self.anatomy_embedding is None:
            raise ValueError("this visual memory was built without anatomy tokens (whole mode)")
        return self.anatomy_proj(embedding.to(self.anatomy_proj[0].weight.dtype)) + (
            self.anatomy_embedding(anatomy)
        )

    def anatomy(
        self,
        tokens: torch.Tensor,
        membership: torch.Tensor,
        sample: torch.Tensor,
        anatomy: torch.Tensor,
        embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory of (sample, anatomy) pairs.

        Args:
            tokens: ``(B, N, C)`` visual tokens.
            membership: ``(B, A, N)`` bool, token covers anatomy (:func:`token_membership`).
            sample: ``(P,)`` sample index of each pair.
            anatomy: ``(P,)`` anatomy index of each pair; each must own at least one token.
            embedding: ``(P, E)`` each pair's anatomy token (the anatomy pooling's output).

        Returns:
            Memory ``(P, 1 + K, H)`` (row 0: :meth:`anatomy_token`) and its mask ``(P, 1 + K)``.
        """
        member = membership[sample, anatomy]  # (P, N)
        counts = member.sum(-1, keepdim=True)
        if bool((counts == 0).any()):
            raise ValueError("every (sample, anatomy) pair must own at least one visual token")
        width = int(counts.max())
        order = member.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :width]
        picked = tokens[sample[:, None], order]  # (P, K, C)
        first = self.anatomy_token(embedding, anatomy)[:, None]
        where = self.anatomy_embedding(anatomy)[:, None]
        memory = torch.cat([first, self.proj(picked) + where], dim=1)
        mask = torch.cat([torch.ones_like(counts), member.gather(1, order).long()], dim=1)
        return memory, mask


class ReportGenerator(nn.Module):
    """3D encoder -> visual memory -> BERT decoder; whole-report or anatomy-wise.

    Args:
        encoder: The 3D ViT (random, or the vision tower of an fVLM / CLIP checkpoint).
        pooling: Anatomy mode: the anatomy pooling that makes each anatomy's token; ``None``
            builds a new one (``encoder``'s width, one head per ViT head).
        pooling_pretrained: ``pooling`` comes with the pre-trained encoder (an fVLM checkpoint),
            so the frozen protocol fixes it too; a new pooling is always trained.
        decoder: A :func:`build_decoder` model.
        num_anatomies: Anatomy table length ``A`` (labels ``a + 1`` in the anatomy map).
        mode: ``whole`` (paper) or ``anatomy``.
        frozen: The paper's frozen protocol: the encoder is not trained and runs in eval mode;
            ``False`` is its fine-tuning protocol.
        bos_token_id: Start token (BERT: ``[CLS]``, as the targets are tokenised).
        eos_token_id: End token (BERT: ``[SEP]``).
        pad_token_id: Padding.
        max_target_length: Target tokens kept (longer targets are cut and counted).
        max_pairs: Anatomy mode: at most this many (sample, anatomy) pairs per training batch,
            abnormal ones first, the rest drawn at random among the normal ones (a batch holds
            ~30 mostly normal pairs per study and the LM head over the vocabulary dominates the
            step); ``None`` trains on all.
        vocabulary: Tokenizer ids of a compact output vocabulary (:func:`target_vocabulary`);
            the decoder is cut to them (:func:`compact_decoder`). Token ids in and out stay the
            tokenizer's; ``None`` keeps the decoder's whole vocabulary.
        unk_token_id: Tokenizer id that stands in for target tokens outside ``vocabulary``.
        memory_pool: Whole mode: average this ``(d, h, w)`` block of visual tokens into one
            memory token (:func:`pool_tokens`); ``None`` reads every token (the paper).
    """

    def __init__(
        self,
        encoder: VisionTransformer3D,
        decoder: BertLMHeadModel,
        num_anatomies: int,
        pooling: AnatomyPooling | None = None,
        pooling_pretrained: bool = False,
        mode: GenerationMode = "whole",
        frozen: bool = True,
        bos_token_id: int = 101,
        eos_token_id: int = 102,
        pad_token_id: int = 0,
        max_target_length: int = 256,
        max_pairs: int | None = None,
        vocabulary: Sequence[int] | None = None,
        unk_token_id: int = 100,
        memory_pool: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs}")
        if mode not in ("whole", "anatomy"):
            raise ValueError(f"mode must be 'whole' or 'anatomy', got {mode!r}")
        limit = int(decoder.config.max_position_embeddings)
        if not 2 < max_target_length <= limit:
            raise ValueError(
                f"max_target_length must be in 3..{limit} (the decoder's position limit), "
                f"got {max_target_length}"
            )
        self.encoder, self.decoder = encoder, decoder
        self.num_anatomies, self.mode, self.frozen = num_anatomies, mode, frozen
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.max_target_length = pad_token_id, max_target_length
        self.max_pairs, self.unk_token_id = max_pairs, unk_token_id
        if memory_pool is not None and (len(memory_pool) != 3 or min(memory_pool) < 1):
            raise ValueError(f"memory_pool must be 3 positive ints, got {memory_pool!r}")
        self.memory_pool = None if memory_pool is None else tuple(int(p) for p in memory_pool)
        self.vocabulary: torch.Tensor | None
        self.register_buffer("vocabulary", None)
        if vocabulary is not None:
            self.use_vocabulary(vocabulary)
        width = int(decoder.config.hidden_size)
        self.pooling: AnatomyPooling | None = None
        self.normal_head: nn.Linear | None = None
        self.pooling_pretrained = pooling_pretrained
        if mode == "anatomy":
            if pooling is None:
                pooling = new_anatomy_pooling(encoder, num_anatomies)
            if pooling.num_anatomies != num_anatomies:
                raise ValueError(
                    f"the anatomy pooling has {pooling.num_anatomies} anatomies, the table "
                    f"{num_anatomies}"
                )
            self.pooling = pooling
            self.normal_head = nn.Linear(width, 1)
        anatomy_width = None if self.pooling is None else int(self.pooling.proj_weight.shape[-1])
        self.memory = VisualMemory(encoder.hidden_size, width, num_anatomies, anatomy_width)
        if frozen:
            self.encoder.requires_grad_(False)
        if self.pooling_fixed:
            self.pooling.requires_grad_(False)
        self.train()

    @property
    def pooling_fixed(self) -> bool:
        """The anatomy pooling came with the encoder and the frozen protocol fixes both."""
        return self.frozen and self.pooling_pretrained

    def use_vocabulary(self, vocabulary: Sequence[int]) -> None:
        """Cut the decoder to a compact output vocabulary (before the optimiser is built).

        ``vocabulary`` (a buffer, so checkpoints carry it) maps compact ids back to the
        tokenizer's; a lookup table maps the other way, with ``[UNK]`` for the ids it lacks.
        """
        if self.vocabulary is not None:
            raise ValueError("the decoder already has a compact vocabulary")
        ids = torch.as_tensor(list(vocabulary), dtype=torch.long)
        specials = (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)
        missing = sorted({int(i) for i in specials} - set(ids.tolist()))
        if missing:
            raise ValueError(f"the compact vocabulary lacks the special token ids {missing}")
        config = self.decoder.config
        rebuilt = getattr(config, "tokenizer_vocab_size", None) is not None
        if rebuilt and int(config.vocab_size) != ids.numel():
            raise ValueError(
                f"the decoder is compact with {config.vocab_size} ids, the vocabulary has "
                f"{ids.numel()}"
            )
        full = int(config.tokenizer_vocab_size) if rebuilt else int(config.vocab_size)
        if not rebuilt:  # a decoder rebuilt from a compact one's config is compact already
            compact_decoder(self.decoder, ids.tolist())
        lookup = torch.full((full,), int((ids == self.unk_token_id).nonzero()), dtype=torch.long)
        lookup[ids] = torch.arange(ids.numel())
        device = self.decoder.device
        self.vocabulary = ids.to(device)
        self.register_buffer("to_compact", lookup.to(device), persistent=False)

    def compact(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Tokenizer ids -> decoder ids, and how many became ``[UNK]`` (identity when full)."""
        if self.vocabulary is None:
            return ids, 0
        out = self.to_compact[ids]
        unknown = int(
            ((out == self.to_compact[self.unk_token_id]) & (ids != self.unk_token_id)).sum()
        )
        return out, unknown

    def _decoder_id(self, token_id: int) -> int:
        return token_id if self.vocabulary is None else int(self.to_compact[token_id])

    def train(self, mode: bool = True) -> ReportGenerator:
        """A frozen encoder stays in eval mode (no dropout on features it does not learn)."""
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        if self.pooling_fixed:
            self.pooling.eval()
        return self

    def visual_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Encoder tokens ``(B, N, C)``; without a graph under the frozen protocol."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.encoder(image)

    def pairs(
        self, anatomy: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Membership ``(B, A, N)`` and the (sample, anatomy) pairs to describe.

        A pair is described when the anatomy owns a token of the crop (and, in training, when it
        is ``valid``: wholly inside the crop, as its description assumes).
        """
        membership = token_membership(anatomy, self.num_anatomies, self.encoder.patch_size)
        keep = membership.any(-1)
        if valid is not None:
            keep = keep & valid.bool()
        sample, index = keep.nonzero(as_tuple=True)
        return membership, sample, index

    def anatomy_tokens(
        self,
        tokens: torch.Tensor,
        membership: torch.Tensor,
        sample: torch.Tensor,
        anatomy: torch.Tensor,
    ) -> torch.Tensor:
        """Each pair's anatomy token ``(P, E)`` from the anatomy pooling (no graph when fixed)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.pooling_fixed):
            return self.pooling(tokens, membership)[sample, anatomy]

    def normal_logits(self, embedding: torch.Tensor, anatomy: torch.Tensor) -> torch.Tensor:
        """``(P,)`` logits that each pair's anatomy is normal, from its anatomy token."""
        return self.normal_head(self.memory.anatomy_token(embedding, anatomy)).squeeze(-1)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Teacher-forced LM loss (anatomy mode: plus the normal head's BCE) and target counts.

        The normal head learns from every valid pair, so its probabilities keep the data's share
        of normal anatomies; the LM loss reads ``max_pairs`` of them, abnormal first.

        Whole mode reads ``report_input_ids``/``report_attention_mask``; anatomy mode reads
        ``anatomy``, ``valid``, ``normal`` and ``text_input_ids``/``text_attention_mask``. Under
        the frozen protocol ``visual_tokens`` (the encoder's tokens of ``image``, computed once)
        may stand in for ``image``.
        """
        tokens = self._tokens(batch.get("visual_tokens"), batch.get("image"))
        if self.mode == "whole":
            memory, mask = self.memory.whole(self._pooled(tokens, batch["image"]))
            ids, attention = batch["report_input_ids"], batch["report_attention_mask"]
            normal_loss = None
        else:
            membership, sample, index = self.pairs(batch["anatomy"], batch["valid"])
            if sample.numel() == 0:
                raise ValueError(
                    f"no anatomy of studies {list(batch.get('study_id', []))} is valid in its "
                    "crop: nothing to describe"
                )
            embedding = self.anatomy_tokens(tokens, membership, sample, index)
            normal = batch["normal"][sample, index]
            logits = self.normal_logits(embedding, index)
            normal_loss = F.binary_cross_entropy_with_logits(logits, normal.float())
            keep = self._subsample(normal)
            sample, index, embedding = sample[keep], index[keep], embedding[keep]
            memory, mask = self.memory.anatomy(tokens, membership, sample, index, embedding)
            ids = batch["text_input_ids"][sample, index]
            attention = batch["text_attention_mask"][sample, index]
        ids, attention, labels, stats = prepare_targets(ids, attention, self.max_target_length)
        ids, stats.unknown = self.compact(ids)
        labels = torch.where(labels == -100, labels, ids)
        lm_loss = self._lm_loss(ids, attention, labels, memory, mask)
        losses = {"lm_loss": lm_loss, "loss": lm_loss, "stats": stats}
        if normal_loss is not None:
            losses["normal_loss"] = normal_loss
            losses["loss"] = lm_loss + normal_loss
        return losses

    def _subsample(self, normal: torch.Tensor) -> torch.Tensor:
        """Indices of the pairs the LM loss reads: all, or ``max_pairs`` with abnormal first."""
        if self.max_pairs is None or normal.numel() <= self.max_pairs:
            return torch.arange(normal.numel(), device=normal.device)
        noise = torch.rand(normal.shape, device=normal.device)
        keep = (noise + (~normal.bool()).float()).argsort(descending=True)[: self.max_pairs]
        return keep.sort().values

    def _lm_loss(
        self,
        ids: torch.Tensor,
        attention: torch.Tensor,
        labels: torch.Tensor,
        memory: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        keep = (labels != -100).any(-1)
        if not bool(keep.any()):  # only empty targets: nothing to learn, but a graph to return
            return memory.sum() * 0.0
        out = self.decoder(
            input_ids=ids[keep],
            attention_mask=attention[keep],
            encoder_hidden_states=memory[keep],
            encoder_attention_mask=mask[keep],
            labels=labels[keep],
        )
        return out.loss

    def _tokens(self, tokens: torch.Tensor | None, image: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:
            return self.visual_tokens(image)
        if not self.frozen:
            raise ValueError("cached visual tokens need the frozen protocol (a trained encoder's "
                             "tokens change every step)")  # fmt: skip
        return tokens

    def _pooled(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if self.memory_pool is None:
            return tokens
        grid = [s // p for s, p in zip(image.shape[-3:], self.encoder.patch_size, strict=True)]
        return pool_tokens(tokens, grid, self.memory_pool)

    @torch.no_grad()
    def _decode(
        self, memory: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, num_beams: int
    ) -> torch.Tensor:
        from transformers import DynamicCache, EncoderDecoderCache

        bos = self._decoder_id(self.bos_token_id)
        start = torch.full((memory.shape[0], 1), bos, device=memory.device)
        ids = self.decoder.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden_states=memory,
            encoder_attention_mask=mask,
            # BERT's cross-attention layers need the encoder-decoder cache kind.
            cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self._decoder_id(self.eos_token_id),
            pad_token_id=self._decoder_id(self.pad_token_id),
        )
        return ids if self.vocabulary is None else self.vocabulary[ids]

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor | None,
        anatomy: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        visual_tokens: torch.Tensor | None = None,
        describe_normal: bool = True,
    ) -> dict[str, Any]:
        """Generated tokenizer ids (greedy with ``num_beams=1``, else beam search).

        ``visual_tokens`` (frozen protocol) stand in for the encoder's tokens of ``image``.
        ``describe_normal=False`` (anatomy mode) decodes only the anatomies the normal head
        calls abnormal, the ones :func:`assemble_report` writes out; the others' rows are
        padding. Most anatomies of a study are normal, so this saves most of the decoding.

        Returns:
            Whole mode: ``{"ids": (B, T)}``. Anatomy mode: ``{"ids": (P, T), "sample": (P,),
            "anatomy": (P,), "normal_prob": (P,)}`` for every anatomy present in the crop.
        """
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be >= 1")
        was_training = self.training
        self.eval()
        try:
            tokens = self._tokens(visual_tokens, image)
            if self.mode == "whole":
                memory, mask = self.memory.whole(self._pooled(tokens, image))
                return {"ids": self._decode(memory, mask, max_new_tokens, num_beams)}
            if anatomy is None:
                raise ValueError("anatomy-wise generation needs the anatomy label map")
            membership, sample, index = self.pairs(anatomy)
            embedding = self.anatomy_tokens(tokens, membership, sample, index)
            normal_prob = torch.sigmoid(self.normal_logits(embedding, index))
            todo = torch.ones_like(normal_prob, dtype=torch.bool)
            if not describe_normal:
                todo = normal_prob < 0.5
            ids = torch.full((sample.numel(), 1), self.pad_token_id, device=sample.device)
            if bool(todo.any()):
                memory, mask = self.memory.anatomy(
                    tokens, membership, sample[todo], index[todo], embedding[todo]
                )
                decoded = self._decode(memory, mask, max_new_tokens, num_beams)
                ids = ids.new_full((sample.numel(), decoded.shape[1]), self.pad_token_id)
                ids[todo] = decoded
            return {"ids": ids, "sample": sample, "anatomy": index, "normal_prob": normal_prob}
        finally:
            self.train(was_training)
