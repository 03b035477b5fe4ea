"""Scores of generated reports (paper Tab. 3): language metrics, clinical accuracy, GREEN.

Definitions (written here once, next to the code that computes them):

* **BLEU-1..4**: corpus BLEU (``torchmetrics.text.BLEUScore``, uniform n-gram weights up to n,
  brevity penalty) over lower-cased texts with punctuation split off as separate tokens.
* **ROUGE-L**: mean over reports of the longest-common-subsequence F-measure
  (``torchmetrics.text.ROUGEScore``, ``rougeL_fmeasure``).
* **METEOR** and **CIDEr(-D)**: the COCO caption evaluation code (``pycocoevalcap``) on the same
  tokens. METEOR runs the bundled METEOR 1.5 jar and therefore needs a Java runtime; without
  ``pycocoevalcap`` or ``java`` both are reported as NaN with a note saying why (nothing downloads).
  CIDEr's document frequencies come from the scored references, so it is comparable only between
  runs on the same reference set.
* **Clinical accuracy** (A.1): a text classifier (:mod:`fvlm.clinical_classifier`) reads each
  generated report; per disease, ACC is the fraction of reports whose predicted presence equals the
  ground-truth label; the macro value is the mean over diseases. The same table also gives the
  macro F1 of those predictions, which is the more telling number when diseases are rare.
* **GREEN**: an LLM judge counts the reference's findings that the generated report matches and
  the generated report's clinically significant errors; GREEN = matched / (matched + errors)
  (1 when both are 0), averaged over reports. Only through an OpenAI-compatible server
  (:class:`~fvlm.preprocess.decomposition.llm.LLMConfig`); without one it is skipped with a note.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fvlm.preprocess.decomposition.llm import LLMConfig

__all__ = [
    "clinical_accuracy",
    "green_score",
    "language_scores",
    "normalize_report",
]

_PUNCT = re.compile(r"([.,;:!?()\[\]])")


def normalize_report(text: str) -> str:
    """Lower case, punctuation as separate tokens, single spaces: the tokens every metric sees."""
    return " ".join(_PUNCT.sub(r" \1 ", text.lower()).split())


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} generated reports but {len(references)} references")
    if not predictions:
        raise ValueError("no reports to score")
    empty = [i for i, ref in enumerate(references) if not ref.strip()]
    if empty:
        raise ValueError(f"references {empty[:5]} are empty: nothing to score them against")


def _coco_scores(
    hyp: list[str], ref: list[str], meteor: bool
) -> tuple[dict[str, float], list[str]]:
    """METEOR and CIDEr via pycocoevalcap, or NaN with the reason."""
    nan = {"meteor": math.nan, "cider": math.nan}
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return nan, ["METEOR, CIDEr: skipped (pip install pycocoevalcap)"]
    gts = {i: [r] for i, r in enumerate(ref)}
    res = {i: [h or "."] for i, h in enumerate(hyp)}  # the scorers refuse an empty hypothesis
    scores = {"cider": float(Cider().compute_score(gts, res)[0]), "meteor": math.nan}
    if not meteor:
        return scores, ["METEOR: not computed (meteor=False)"]
    if shutil.which("java") is None:
        return scores, ["METEOR: skipped (pycocoevalcap's METEOR 1.5 needs a Java runtime)"]
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # a Java subprocess, ended when the scorer is collected
    scores["meteor"] = float(scorer.compute_score(gts, res)[0])
    return scores, []


def language_scores(
    predictions: Sequence[str], references: Sequence[str], meteor: bool = True
) -> tuple[dict[str, float], list[str]]:
    """BLEU-1..4, ROUGE-L, METEOR and CIDEr of generated reports against their references.

    Args:
        predictions: Generated reports (an empty one scores 0, it is not an error).
        references: One reference report each; an empty reference is a ``ValueError``.
        meteor: Run METEOR (starts a Java process: seconds to minutes on a busy machine).

    Returns:
        Scores keyed ``bleu1``..``bleu4``, ``rouge_l``, ``meteor``, ``cider``, and notes on any
        metric that was skipped.
    """
    from torchmetrics.text import BLEUScore, ROUGEScore

    _check_pairs(predictions, references)
    hyp = [normalize_report(p) for p in predictions]
    ref = [normalize_report(r) for r in references]
    scores = {f"bleu{n}": float(BLEUScore(n_gram=n)(hyp, [[r] for r in ref])) for n in range(1, 5)}
    rouge = ROUGEScore(rouge_keys="rougeL", tokenizer=str.split)
    scores["rouge_l"] = float(rouge(hyp, ref)["rougeL_fmeasure"])
    coco, notes = _coco_scores(hyp, ref, meteor)
    return scores | coco, notes


def clinical_accuracy(
    predicted: torch.Tensor, truth: torch.Tensor, diseases: Sequence[str]
) -> dict[str, float]:
    """Per-disease ACC of the classifier's findings in generated reports (A.1), macro ACC and F1.

    Args:
        predicted: ``(N, K)`` 0/1, diseases the classifier finds in the generated reports.
        truth: ``(N, K)`` 0/1 ground-truth labels of the same studies.
        diseases: ``K`` disease names.

    Returns:
        ``acc/<disease>``, ``acc_macro`` and ``f1_macro``.
    """
    from torchmetrics.functional.classification import multilabel_accuracy, multilabel_f1_score

    if predicted.shape != truth.shape or predicted.ndim != 2 or predicted.shape[1] != len(diseases):
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and truth {tuple(truth.shape)} must both be "
            f"(N, {len(diseases)})"
        )
    k = len(diseases)
    pred, target = predicted.long(), truth.long()
    per = multilabel_accuracy(pred, target, num_labels=k, average=None)
    out = {f"acc/{d}": float(v) for d, v in zip(diseases, per, strict=True)}
    out["acc_macro"] = float(per.mean())
    out["f1_macro"] = float(multilabel_f1_score(pred, target, num_labels=k, average="macro"))
    return out


_GREEN_PROMPT = (
    "You compare a generated radiology report with the reference report of the same scan. "
    "Count (a) the clinical findings of the reference that the generated report states "
    "correctly, and (b) the clinically significant errors of the generated report (false or "
    "missing findings, wrong location or severity). Answer with JSON only: "
    '{{"matched": <int>, "significant_errors": <int>}}.\n\n'
    "Reference report:\n{reference}\n\nGenerated report:\n{generated}"
)


def green_score(
    predictions: Sequence[str], references: Sequence[str], config: LLMConfig | None
) -> tuple[float, str]:
    """GREEN through an OpenAI-compatible server; ``(nan, reason)`` without one.

    Args:
        predictions: Generated reports.
        references: Their reference reports.
        config: The server (the same settings as the LLM report decomposition); ``None`` skips.

    Returns:
        The mean GREEN score and a note (how many answers could not be read, or why skipped).
    """
    if config is None:
        return math.nan, "GREEN: skipped (no LLM server configured; pass an LLMConfig)"
    import os

    import openai

    _check_pairs(predictions, references)
    client = openai.OpenAI(
        base_url=config.base_url,
        api_key=os.environ.get(config.api_key_env) or "EMPTY",
        timeout=config.timeout_s,
        max_retries=config.max_attempts - 1,
    )
    values, unreadable = [], 0
    for generated, reference in zip(predictions, references, strict=True):
        prompt = _GREEN_PROMPT.format(reference=reference, generated=generated)
        answer = client.chat.completions.create(
            model=config.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=config.temperature,
            max_tokens=config.max_tokens,
        )
        counts = _green_counts(answer.choices[0].message.content or "")
        if counts is None:
            unreadable += 1
            continue
        matched, errors = counts
        values.append(1.0 if matched + errors == 0 else matched / (matched + errors))
    mean = sum(values) / len(values) if values else math.nan
    return mean, f"GREEN: {len(values)} reports judged, {unreadable} answers unreadable"


def _green_counts(answer: str) -> tuple[int, int] | None:
    match = re.search(r"\{.*\}", answer, re.DOTALL)
    if match is None:
        return None
    try:
        data = json.loads(match.group(0))
        matched, errors = int(data["matched"]), int(data["significant_errors"])
    except (ValueError, KeyError, TypeError):
        return None
    return (matched, errors) if matched >= 0 and errors >= 0 else None
