"""The per-anatomy normal flag, with a defined fallback when the impression says nothing usable.

The paper (Sec. 3.1): an anatomy not mentioned in the impression is normal, since radiologists
summarise the abnormal findings there. Real impressions break that rule in two ways: they are
missing ("Not given.", empty), or they are global ("The examination is within normal limits.",
"No pleural effusion. Heart size is normal.") while the findings describe abnormalities. So:

- the impression decides (``normal_source: impression``) when at least one of its clauses affirms
  (or suspects) an abnormality of a table anatomy; an anatomy is then normal unless such a clause is
  about it, whether or not the findings mention it;
- otherwise the findings decide (``normal_source: findings``): an anatomy is normal unless a
  findings clause about it affirms or suspects an abnormality (negation and normal wording read by
  :mod:`.negation`);
- an anatomy mentioned in neither section is normal by default (``normal_source: default``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import NormalSource
from .attribution import ClauseReading

__all__ = ["NormalFlag", "normal_flags"]


@dataclass(frozen=True)
class NormalFlag:
    """An anatomy's normal flag and what decided it."""

    normal: bool
    source: NormalSource


def _abnormal(readings: Iterable[ClauseReading]) -> set[str]:
    return {name for r in readings if r.abnormal for name in r.anatomies}


def normal_flags(
    names: Sequence[str],
    findings: Sequence[ClauseReading],
    impression: Sequence[ClauseReading],
) -> dict[str, NormalFlag]:
    """Normal flag of every anatomy in ``names`` from the clause readings of both sections.

    Args:
        names: Anatomy names (table order).
        findings: Readings of the findings section's clauses.
        impression: Readings of the impression section's clauses.
    """
    mentioned = {name for r in (*findings, *impression) for name in r.anatomies}
    from_impression = _abnormal(impression)
    deciding, source = (
        (from_impression, "impression") if from_impression else (_abnormal(findings), "findings")
    )
    return {
        name: NormalFlag(name not in deciding, source if name in mentioned else "default")
        for name in names
    }
