"""Which studies a disease can be scored on, why the others cannot, and the rule for absent organs.

A zero-shot score of an anatomy's disease is only as good as the anatomy's embedding. The paper
aligns structurally complete anatomies only (Sec. 3.2), so evaluation follows the same rule:

* ``whole``: the anatomy is whole in one of the scan's planned crops
  (:mod:`~fvlm.evaluation.crop_plan`) and embedded from it. Evaluated.
* ``larger_than_crop``: the anatomy is complete in the scan but larger than the training crop
  on some axis; it is embedded from the crop centred on it (its central part, as training never
  saw it whole). Evaluated and counted, so a reader sees how many scores rest on a partial view.
* ``truncated``: the scan's field of view cuts the anatomy (``truncated`` in ``meta.json``). Not
  evaluable: the missing part may hold the very finding.
* ``absent``: the anatomy has no voxel in the scan (outside the field of view, resected, or not
  segmented). Not evaluable by default; ``absent_rule="negative"`` scores it as a negative
  prediction instead (score = the lowest score of that disease among the evaluated studies), for
  protocols where an organ that is not there cannot be diseased. Use it only when the scans'
  field of view covers the anatomy's region; otherwise a chest scan would "rule out" bladder
  disease.

Whole-scan diseases (``global/...``) of fVLM are scored on the renormalised mean of the study's
evaluable anatomy embeddings (fVLM has no global embedding); a study without any evaluable
anatomy is not evaluable for them. The CLIP baseline scores every disease on its one global
embedding, but the same studies are left out for it as for fVLM: absence and truncation are facts
of the scan, not of the model, and two AUROCs compare only on the same studies.

Nothing is substituted silently: a not evaluable study gets a NaN score, which the metrics leave
out of that disease (``n_excluded``), and every count appears in the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import numpy as np
import pandas as pd

from fvlm.anatomy import AnatomyTable, Disease
from fvlm.evaluation.crop_plan import CropPlan

__all__ = [
    "ABSENT_RULES",
    "COUNT_COLUMNS",
    "AbsentRule",
    "AnatomyStatus",
    "Evaluability",
    "anatomy_status",
    "count_definitions",
]

AbsentRule = Literal["not_evaluable", "negative"]
ABSENT_RULES: tuple[str, ...] = ("not_evaluable", "negative")

#: Count columns :meth:`Evaluability.counts` adds to a metrics table, in print order.
COUNT_COLUMNS: tuple[str, ...] = (
    "evaluated",
    "not_evaluable",
    "absent",
    "truncated",
    "larger_than_crop",
)


class AnatomyStatus(IntEnum):
    """How an anatomy of one scan is embedded for evaluation (see the module notes)."""

    WHOLE = 0
    LARGER_THAN_CROP = 1
    TRUNCATED = 2
    ABSENT = 3


_EVALUABLE = (AnatomyStatus.WHOLE, AnatomyStatus.LARGER_THAN_CROP)


def anatomy_status(plan: CropPlan, bboxes: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    """``(A,)`` int8 :class:`AnatomyStatus` of one scan from its crop plan and ``meta.json``."""
    present = (bboxes[..., 1] > bboxes[..., 0]).all(axis=-1)
    status = np.full(len(present), AnatomyStatus.WHOLE, dtype=np.int8)
    status[plan.larger_than_crop] = AnatomyStatus.LARGER_THAN_CROP
    status[present & truncated] = AnatomyStatus.TRUNCATED
    status[~present] = AnatomyStatus.ABSENT
    return status


def count_definitions(absent_rule: AbsentRule) -> dict[str, str]:
    """Plain-language definition of each count column, with the absent rule in force."""
    absent = (
        "scored as a negative prediction (score = the disease's lowest evaluated score)"
        if absent_rule == "negative"
        else "not evaluable"
    )
    return {
        "evaluated": "studies scored for this disease (before studies without a label are "
        "dropped; n_pos + n_neg count the labelled ones)",
        "not_evaluable": "studies left out of this disease (NaN score): anatomy truncated by the "
        "field of view, or absent under absent_rule=not_evaluable; whole-scan diseases: no "
        "evaluable anatomy to average",
        "absent": f"studies without the anatomy in the scan; {absent}",
        "truncated": "studies whose anatomy the scan's field of view cuts; not evaluable",
        "larger_than_crop": "evaluated studies whose anatomy exceeds the training crop; embedded "
        "from the crop centred on it",
        "scored_on": "the embedding the disease is scored on",
    }


@dataclass(frozen=True)
class Evaluability:
    """Per (study, disease) masks of the module's cases, ``(S, K)`` bool DataFrames.

    Attributes:
        absent: The disease's anatomy has no voxel in the scan.
        truncated: The field of view cuts the disease's anatomy.
        larger_than_crop: The anatomy is embedded from the crop centred on it.
        not_evaluable: The study gets no score for the disease (NaN).
        scored_on: Per disease key, the embedding it is scored on.
        absent_rule: The rule applied to absent anatomies.
    """

    absent: pd.DataFrame
    truncated: pd.DataFrame
    larger_than_crop: pd.DataFrame
    not_evaluable: pd.DataFrame
    scored_on: pd.Series
    absent_rule: AbsentRule

    @classmethod
    def from_status(
        cls,
        status: np.ndarray,
        table: AnatomyTable,
        diseases: Sequence[Disease],
        study_ids: Sequence[str],
        mode: Literal["fine", "global"],
        absent_rule: AbsentRule = "not_evaluable",
    ) -> Evaluability:
        """Masks from the ``(S, A)`` :class:`AnatomyStatus` of the studies.

        Args:
            status: ``(S, A)`` status codes in table order.
            table: The anatomy table.
            diseases: The scored diseases (columns, in order).
            study_ids: Row labels.
            mode: ``fine`` (fVLM, anatomy embeddings) or ``global`` (CLIP).
            absent_rule: ``not_evaluable`` (default) or ``negative``.
        """
        if absent_rule not in ABSENT_RULES:
            raise ValueError(f"absent_rule must be one of {ABSENT_RULES}, got {absent_rule!r}")
        status = np.asarray(status)
        if status.shape != (len(study_ids), len(table)):
            raise ValueError(
                f"status must be (studies, anatomies) = {(len(study_ids), len(table))}, "
                f"got {status.shape}"
            )
        none = np.zeros(len(study_ids), dtype=bool)
        masks: dict[str, dict[str, np.ndarray]] = {
            k: {} for k in ("absent", "truncated", "larger_than_crop", "not_evaluable")
        }
        scored_on = {}
        for disease in diseases:
            key = disease.key
            if disease.anatomy is None:
                no_anatomy = ~np.isin(status, _EVALUABLE).any(axis=1)
                fine = mode == "fine"
                parts = (none, none, none, no_anatomy if fine else none)
                scored_on[key] = "mean of anatomy embeddings" if fine else "global embedding"
            else:
                column = status[:, table.index(disease.anatomy)]
                absent = column == AnatomyStatus.ABSENT
                truncated = column == AnatomyStatus.TRUNCATED
                larger = column == AnatomyStatus.LARGER_THAN_CROP
                skip = truncated | (absent if absent_rule == "not_evaluable" else none)
                parts = (absent, truncated, larger if mode == "fine" else none, skip)
                scored_on[key] = "anatomy embedding" if mode == "fine" else "global embedding"
            for name, mask in zip(masks, parts, strict=True):
                masks[name][key] = mask
        index = pd.Index(list(study_ids), name="study_id")
        frames = {name: pd.DataFrame(cols, index=index) for name, cols in masks.items()}
        return cls(**frames, scored_on=pd.Series(scored_on, dtype=object), absent_rule=absent_rule)

    def apply(self, scores: pd.DataFrame) -> pd.DataFrame:
        """``scores`` with NaN where not evaluable and the absent rule applied; a copy.

        Under ``absent_rule="negative"`` an absent anatomy's study gets the lowest score of the
        disease's other evaluated studies, so it ranks as the most confident negative; if no
        other study is evaluated the score stays NaN (there is no scale to place it on).
        """
        out = scores.copy()
        for key in self.not_evaluable.columns:
            skip = self.not_evaluable[key].reindex(out.index).to_numpy()
            out.loc[skip, key] = np.nan
            if self.absent_rule == "negative":
                absent = self.absent[key].reindex(out.index).to_numpy()
                others = out.loc[~absent, key]
                out.loc[absent, key] = others.min() if others.notna().any() else np.nan
        return out

    def merge(self, merges: Mapping[str, Sequence[str]]) -> Evaluability:
        """Masks of diseases scored by the maximum of others: a case of any source counts.

        ``merges`` maps a disease key to the keys whose maximum scores it (e.g. Rad-ChestCT's
        calcification rule); the merged score is evaluable only where every source is.
        """
        frames = {}
        for name in ("absent", "truncated", "larger_than_crop", "not_evaluable"):
            frame = getattr(self, name).copy()
            for target, sources in merges.items():
                frame[target] = frame[list(sources)].any(axis=1)
            frames[name] = frame
        scored_on = self.scored_on.copy()
        for target, sources in merges.items():
            scored_on[target] = f"max over {', '.join(sources)}"
        return Evaluability(**frames, scored_on=scored_on, absent_rule=self.absent_rule)

    def counts(self) -> pd.DataFrame:
        """Per disease: :data:`COUNT_COLUMNS` (numbers of studies) and ``scored_on``."""
        n = len(self.not_evaluable)
        table = pd.DataFrame(
            {
                "evaluated": n - self.not_evaluable.sum(axis=0),
                "not_evaluable": self.not_evaluable.sum(axis=0),
                "absent": self.absent.sum(axis=0),
                "truncated": self.truncated.sum(axis=0),
                "larger_than_crop": (self.larger_than_crop & ~self.not_evaluable).sum(axis=0),
            }
        ).astype(int)
        table["scored_on"] = self.scored_on.reindex(table.index)
        table.index.name = "disease"
        return table
