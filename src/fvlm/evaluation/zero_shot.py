"""Zero-shot disease scoring: anatomy embeddings against positive and negative prompts.

For a disease of anatomy ``a`` (paper Sec. 4.2, CT-CLIP's protocol), a study's probability is

    P(disease) = softmax(logit_scale * [cos(v_a, t_neg), cos(v_a, t_pos)])[1]
               = sigmoid(logit_scale * (cos(v_a, t_pos) - cos(v_a, t_neg)))

where ``v_a`` is the study's embedding of anatomy ``a`` and ``t_pos``/``t_neg`` are prompt
embeddings. Single prompts are brittle, so each side is a set of templates expanded over the
disease's ``terms`` (from the anatomy table). By default the prompt embeddings of a side are
averaged and renormalised before the softmax (CLIP's prompt ensembling, ``ensemble="embedding"``);
``ensemble="probability"`` instead averages the probability of every (positive, negative) prompt
pair. Everything is computed in float64 from the logit, and ``output="logit"`` returns the logit
itself: with a large learned ``logit_scale`` the probabilities of confident studies round to
exactly 1.0, and such ties would lower the AUROC although the ranking is known.

Which image embedding a disease uses:

* ``mode="fine"`` (fVLM): the embedding of the disease's anatomy. When that anatomy is not valid in
  a study (absent, or cut by the crop or the field of view), the study is not evaluable for the
  disease: its score is NaN (nothing else is substituted) and it is counted in
  ``attrs["not_evaluable"]``; the metrics leave it out of that disease. Whole-scan diseases
  (``global/...``, e.g. CT-RATE's medical material and lymphadenopathy, which belong to no single
  anatomy) use the whole-scan embedding: the renormalised mean of the study's valid anatomy
  embeddings (counted in ``attrs["whole_scan_mean"]``; NaN without any valid anatomy).
* ``mode="global"`` (the CLIP baseline): every disease uses the one global embedding per study.

:mod:`~fvlm.evaluation.evaluability` decides which anatomies are valid in an evaluation and the
documented rule for absent ones.

Protocols (``fvlm evaluate --protocol``), so numbers compare with the anchors' tables:

* ``ours`` (default): :data:`DEFAULT_POSITIVE_TEMPLATES` / :data:`DEFAULT_NEGATIVE_TEMPLATES` over
  every term of the disease, the negatives describing the normal anatomy in the training texts'
  words.
* ``fvlm``: the authors' prompts, one pair per disease from its printed label: "X." / "Not x."
  (paper Tab. 1/2).
* ``ctclip``: CT-CLIP's, "X is present." / "X is not present." (CT-CLIP's and the paper's Tab. 2
  CT-RATE / Rad-ChestCT numbers).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F

from fvlm.anatomy import AnatomyTable, Disease
from fvlm.models.fine_grained_clip import whole_scan_embedding

__all__ = [
    "DEFAULT_NEGATIVE_TEMPLATES",
    "DEFAULT_POSITIVE_TEMPLATES",
    "PROTOCOLS",
    "PromptTemplates",
    "Protocol",
    "build_prompts",
    "whole_scan_embedding",
    "zero_shot_scores",
]

log = logging.getLogger(__name__)

# Sentences are not capitalised: the decomposition's default text for a normal anatomy is
# "{label} shows no significant abnormalities." with the lower-case label, and the first negative
# template reproduces it exactly, so the "normal" side speaks the training texts' language.
DEFAULT_POSITIVE_TEMPLATES: tuple[str, ...] = (
    "{anatomy} shows {term}.",
    "There is {term} in the {anatomy}.",
    "{term} is seen in the {anatomy}.",
    "Findings in the {anatomy} are consistent with {term}.",
)
# Negatives describe the normal anatomy instead of negating the finding: sentence encoders embed
# "no steatosis" close to "steatosis", which made negated prompts nearly as similar to diseased
# anatomies as the positive ones (phantom demo: macro AUROC 0.68 -> 0.71 with these). Negated
# templates remain available through ``PromptTemplates(negative=...)``.
DEFAULT_NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "{anatomy} shows no significant abnormalities.",
    "Unremarkable {anatomy}.",
    "The {anatomy} is normal.",
    "Normal {anatomy}.",
)
_FIELDS = {"anatomy", "term"}
_ARTICLES = ("a ", "an ", "the ")

Mode = Literal["fine", "global"]
Ensemble = Literal["embedding", "probability"]


@dataclass(frozen=True)
class PromptTemplates:
    """Positive and negative prompt templates with ``{anatomy}`` and ``{term}`` placeholders.

    Attributes:
        positive: templates asserting the finding.
        negative: templates denying it; a template without ``{term}`` (the normal-anatomy text)
            is shared by all diseases of an anatomy.
        global_anatomy: what ``{anatomy}`` reads for whole-scan diseases (``global/...``).
        strip_article_in_negative: write "no enlarged heart" rather than "no an enlarged heart"
            for terms that start with an article.
        use_label: fill ``{term}`` with the disease's printed label only (first letter lower
            case unless it is an acronym), not with each of its ``terms``: one prompt pair per
            disease, as the anchors' protocols.
        capitalize: upper-case the first letter of every prompt.
    """

    positive: tuple[str, ...] = DEFAULT_POSITIVE_TEMPLATES
    negative: tuple[str, ...] = DEFAULT_NEGATIVE_TEMPLATES
    global_anatomy: str = "scan"
    strip_article_in_negative: bool = True
    use_label: bool = False
    capitalize: bool = False

    def __post_init__(self) -> None:
        for side in ("positive", "negative"):
            templates = tuple(getattr(self, side))
            object.__setattr__(self, side, templates)
            if not templates:
                raise ValueError(f"PromptTemplates.{side} is empty")
            for template in templates:
                fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
                if not fields <= _FIELDS:
                    raise ValueError(
                        f"template {template!r} uses {sorted(fields - _FIELDS)}; "
                        f"only {{anatomy}} and {{term}} are filled in"
                    )
        if not any("{term}" in t for t in self.positive):
            raise ValueError("at least one positive template must name the finding ({term})")


Protocol = Literal["ours", "fvlm", "ctclip"]
PROTOCOLS: dict[str, PromptTemplates] = {
    "ours": PromptTemplates(),
    "fvlm": PromptTemplates(
        positive=("{term}.",), negative=("Not {term}.",), use_label=True, capitalize=True
    ),
    "ctclip": PromptTemplates(
        positive=("{term} is present.",),
        negative=("{term} is not present.",),
        use_label=True,
        capitalize=True,
    ),
}
"""Prompt templates of each evaluation protocol (module notes)."""


def _label_term(label: str) -> str:
    """A printed label as a term inside a sentence: "Hepatic steatosis" -> "hepatic steatosis"."""
    if len(label) > 1 and label[1].isupper():  # an acronym ("CT", "COPD") stays as it is
        return label
    return label[:1].lower() + label[1:]


def _sentence(text: str, capitalize: bool) -> str:
    return text[:1].upper() + text[1:] if capitalize else text


def _bare(term: str) -> str:
    lowered = term.lower()
    for article in _ARTICLES:
        if lowered.startswith(article):
            return term[len(article) :]
    return term


def _unique(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def build_prompts(
    table: AnatomyTable,
    diseases: Sequence[Disease] | None = None,
    templates: PromptTemplates | None = None,
) -> dict[str, tuple[list[str], list[str]]]:
    """Positive and negative prompt texts per disease key, templates x terms, duplicates removed.

    Args:
        table: anatomy table (gives each anatomy's printed label).
        diseases: diseases to prompt for (default: all diseases of the table).
        templates: prompt templates (default: :class:`PromptTemplates`).

    Returns:
        ``{disease.key: (positive_texts, negative_texts)}`` in the order of ``diseases``.
    """
    templates = templates or PromptTemplates()
    prompts: dict[str, tuple[list[str], list[str]]] = {}
    for disease in table.diseases() if diseases is None else diseases:
        if disease.anatomy is None:
            anatomy = templates.global_anatomy
        elif disease.anatomy in table.names:
            anatomy = table[disease.anatomy].label
        else:
            raise ValueError(
                f"disease {disease.key!r}: anatomy {disease.anatomy!r} is not in table "
                f"{table.name!r}"
            )
        if templates.use_label:
            terms = (_label_term(disease.label),)
        else:
            terms = disease.terms or (disease.label.lower(),)
        neg_terms = [_bare(t) if templates.strip_article_in_negative else t for t in terms]
        cap = templates.capitalize
        positive = [
            _sentence(t.format(anatomy=anatomy, term=term), cap)
            for t in templates.positive
            for term in terms
        ]
        negative = [
            _sentence(t.format(anatomy=anatomy, term=term), cap)
            for t in templates.negative
            for term in neg_terms
        ]
        prompts[disease.key] = (_unique(positive), _unique(negative))
    return prompts


def _encode(
    text_encode: Callable[[list[str]], torch.Tensor], texts: list[str], batch_size: int
) -> dict[str, torch.Tensor]:
    unique = _unique(texts)
    chunks = [text_encode(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
    encoded = F.normalize(torch.cat(chunks).detach().to(torch.float64), dim=-1)
    if encoded.shape[0] != len(unique):
        raise ValueError(f"text_encode returned {encoded.shape[0]} rows for {len(unique)} texts")
    return dict(zip(unique, encoded, strict=True))


def _disease_embedding(
    disease: Disease,
    table: AnatomyTable,
    emb: torch.Tensor,
    valid: torch.Tensor | None,
    whole: torch.Tensor,
    mode: Mode,
) -> torch.Tensor:
    """``(S, E)`` image embeddings scored for ``disease``; NaN rows where it is not evaluable."""
    if mode == "global" or disease.anatomy is None:
        return whole
    index = table.index(disease.anatomy)
    nan = torch.full_like(whole, float("nan"))
    return torch.where(valid[:, index, None], F.normalize(emb[:, index], dim=-1), nan)


def _study_embeddings(
    image_emb: torch.Tensor, valid: torch.Tensor | None, table: AnatomyTable, mode: Mode
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Checked ``(S, A, E)`` float64 embeddings, the validity mask and the whole-scan ``(S, E)``.

    float64 keeps near-1 probabilities apart. ``mode="global"`` has no validity mask.
    """
    emb = image_emb.detach().to(torch.float64)
    if emb.ndim == 2:
        emb = emb.unsqueeze(1)
    if emb.ndim != 3:
        raise ValueError(
            f"image_emb must be (S, A, E) or (S, E), got shape {tuple(image_emb.shape)}"
        )
    if mode == "global":
        if emb.shape[1] != 1:
            raise ValueError(f"mode='global' expects one embedding per study, got {emb.shape[1]}")
        return emb, None, F.normalize(emb[:, 0], dim=-1)
    if emb.shape[1] != len(table):
        raise ValueError(
            f"image_emb has {emb.shape[1]} anatomies but table {table.name!r} has {len(table)}"
        )
    if valid is None or tuple(valid.shape) != tuple(emb.shape[:2]):
        raise ValueError(f"mode='fine' needs valid of shape {tuple(emb.shape[:2])}")
    valid_mask = valid.detach().to(device=emb.device, dtype=torch.bool)
    return emb, valid_mask, whole_scan_embedding(emb, valid_mask)


def _prompt_logit(
    image: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float, ensemble: Ensemble
) -> torch.Tensor:
    """Logit of P(disease) ``(S,)`` of image embeddings against positive and negative prompts."""
    if ensemble == "embedding":
        t_pos, t_neg = F.normalize(pos.mean(0), dim=-1), F.normalize(neg.mean(0), dim=-1)
        return scale * (image @ t_pos - image @ t_neg)
    # z[s, p, n] = logit of the softmax of pair (p, n); log(mean sigmoid(z)) over pairs, minus
    # log(mean sigmoid(-z)), is the logit of the mean probability, computed stably.
    z = (scale * ((image @ pos.T)[:, :, None] - (image @ neg.T)[:, None, :])).flatten(1)
    return torch.logsumexp(F.logsigmoid(z), 1) - torch.logsumexp(F.logsigmoid(-z), 1)


def zero_shot_scores(
    image_emb: torch.Tensor,
    valid: torch.Tensor | None,
    text_encode: Callable[[list[str]], torch.Tensor],
    logit_scale: float | torch.Tensor,
    table: AnatomyTable,
    diseases: Sequence[Disease] | None = None,
    mode: Mode = "fine",
    templates: PromptTemplates | None = None,
    ensemble: Ensemble = "embedding",
    study_ids: Sequence[str] | None = None,
    batch_size: int = 256,
    output: Literal["probability", "logit"] = "probability",
) -> pd.DataFrame:
    """P(disease) for every study and disease, ``(S, K)``.

    Args:
        image_emb: ``(S, A, E)`` anatomy embeddings in table order (``mode="fine"``), or
            ``(S, 1, E)`` / ``(S, E)`` global embeddings (``mode="global"``). Need not be
            normalised.
        valid: ``(S, A)`` bool, anatomy present and wholly seen; required for ``"fine"``, ignored
            for ``"global"``.
        text_encode: maps a list of texts to ``(M, E)`` embeddings (the model's text tower with
            its projection); called once per batch of distinct prompts.
        logit_scale: the multiplier of the cosine similarities, i.e. 1 / temperature (CLIP's
            ``logit_scale.exp()``), e.g. 1 / 0.07.
        table: the anatomy table the model was trained with (index ``i`` = ``table.anatomies[i]``).
        diseases: diseases to score (default: all diseases of the table).
        mode: ``"fine"`` or ``"global"``, see the module notes.
        templates: prompt templates (default: :class:`PromptTemplates`).
        ensemble: ``"embedding"`` (average prompt embeddings, renormalise, then one softmax) or
            ``"probability"`` (average the softmax over all positive x negative prompt pairs).
        study_ids: row labels of the result (default: 0..S-1).
        batch_size: prompts per ``text_encode`` call.
        output: ``"probability"`` (P, float64) or its ``"logit"``. Both rank studies identically,
            but P saturates to exactly 1.0 once the logit passes ~37 (float64; ~17 in float32),
            which a large learned ``logit_scale`` can reach; such ties lower the AUROC, so use
            ``"logit"`` when only the ranking and thresholds matter.

    Returns:
        DataFrame ``(S, K)`` with disease keys as columns, NaN where a study is not evaluable for
        a disease. ``attrs`` holds ``mode``, ``ensemble``, ``output``, ``not_evaluable``
        (``{key: studies with a NaN score}``), ``whole_scan_mean`` (``{key: studies scored on the
        mean of their valid anatomy embeddings}``, whole-scan diseases in ``fine`` mode) and
        ``no_valid_anatomy`` (studies without any valid anatomy).
    """
    for name, value, allowed in (
        ("mode", mode, ("fine", "global")),
        ("output", output, ("probability", "logit")),
        ("ensemble", ensemble, ("embedding", "probability")),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    scale = float(logit_scale)
    if not scale > 0:
        raise ValueError(f"logit_scale must be positive (1 / temperature), got {scale}")
    emb, valid_mask, whole = _study_embeddings(image_emb, valid, table, mode)
    n_empty = 0 if valid_mask is None else int((valid_mask.sum(dim=1) == 0).sum())

    diseases = list(table.diseases() if diseases is None else diseases)
    prompts = build_prompts(table, diseases, templates)
    every_text = [t for pos, neg in prompts.values() for t in (*pos, *neg)]
    encoded = _encode(text_encode, every_text, batch_size)

    columns: dict[str, torch.Tensor] = {}
    for disease in diseases:
        pos_texts, neg_texts = prompts[disease.key]
        pos = torch.stack([encoded[t] for t in pos_texts]).to(emb.device)
        neg = torch.stack([encoded[t] for t in neg_texts]).to(emb.device)
        image = _disease_embedding(disease, table, emb, valid_mask, whole, mode)
        logit = _prompt_logit(image, pos, neg, scale, ensemble)
        columns[disease.key] = (logit if output == "logit" else torch.sigmoid(logit)).cpu()
    skipped = {k: int(v.isnan().sum()) for k, v in columns.items()}
    whole_mean = {
        d.key: len(emb) - skipped[d.key] for d in diseases if mode == "fine" and d.anatomy is None
    }

    index = pd.Index(list(study_ids), name="study_id") if study_ids is not None else None
    if index is not None and len(index) != emb.shape[0]:
        raise ValueError(f"{len(index)} study_ids for {emb.shape[0]} studies")
    frame = pd.DataFrame({k: v.numpy() for k, v in columns.items()}, index=index)
    frame.attrs.update(
        mode=mode,
        ensemble=ensemble,
        output=output,
        not_evaluable={k: n for k, n in skipped.items() if n},
        whole_scan_mean=whole_mean,
        no_valid_anatomy=n_empty,
    )
    if frame.attrs["not_evaluable"]:
        log.info(
            "zero-shot: not evaluable (NaN score) per disease: %s; %d studies without any valid "
            "anatomy",
            frame.attrs["not_evaluable"],
            n_empty,
        )
    return frame
