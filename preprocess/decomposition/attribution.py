"""Which anatomy a sentence is about: its subject, not every anatomy it names.

Radiologists locate and explain findings with other anatomies' names: "a hypodense lesion in the
liver at the level of the lung bases" is about the liver, "pleural effusion, possibly due to cardiac
failure" about the lung, "lymph nodes adjacent to the esophagus" about lymph nodes and "the catheter
tip in the right atrium" about a device. A keyword therefore does not make its anatomy a subject
when it stands

- after a relation ("at the level of", "adjacent to", "below", "due to", "secondary to"), up to
  the next comma: it locates or explains the subject (which may be an anatomy outside the table,
  such as the liver in a chest table: then the clause is about no anatomy of the table);
- after a diagnosis ("consistent with", "in keeping with"), unless the clause names no other
  anatomy ("Findings consistent with emphysema");
- next to a subject that is no anatomy of the table (lymph nodes, catheters, tubes, pacemakers,
  clips): it is that object's location ("port catheter in the superior vena cava", "right atrial
  catheter").

A clause that names no anatomy continues the subject of the clause before it ("The heart is
enlarged, but no effusion").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .clauses import clause_spans
from .negation import Assertion, assertion, is_abnormal
from .string_matching import KeywordMatch, KeywordMatcher

__all__ = ["ClauseReading", "read_sentence"]

_RELATION = re.compile(
    r"\b(?:at\s+the\s+levels?\s+of|levels?\s+of|adjacent\s+to|next\s+to|close\s+to|near|"
    r"neighbou?ring|abutting|in\s+contact\s+with|in\s+(?:close\s+)?proximity\s+to|"
    r"in\s+the\s+vicinity\s+of|(?:posterior|anterior|lateral|medial|superior|inferior)\s+to|"
    r"above|below|due\s+to|secondary\s+to|caused\s+by|related\s+to|attribut\w+\s+to|"
    r"in\s+the\s+setting\s+of|as\s+a\s+(?:result|consequence)\s+of|because\s+of|"
    r"owing\s+to)\b[^,;]*",
    re.IGNORECASE,
)
# A diagnosis named after the finding: its anatomy counts when the finding names none.
_DIAGNOSIS = re.compile(
    r"\b(?:consistent\s+with|compatible\s+with|suggestive\s+of|in\s+keeping\s+with|"
    r"in\s+favou?r\s+of|indicative\s+of|representing)\b[^,;]*",
    re.IGNORECASE,
)
_OBJECT = re.compile(
    r"\b(?:lymph\s+nodes?|nodes|lymphadenopath\w*|(?:port\s+)?catheters?|ports?|"
    r"pacemakers?(?:\s+leads?)?|electrodes?|tubes?|drains?|guide\s*wires?|wires?|clips?|"
    r"prosthes[ie]s|cannula\w*|devices?|medical\s+material)\b",
    re.IGNORECASE,
)
# An anatomy word located by an object: the gap between them has no comma and no "and".
_LOCATING_GAP = re.compile(r"^(?:(?!\band\b)[^,;]){0,60}$", re.IGNORECASE)
_MODIFIER_GAP = re.compile(r"^[\s-]*(?:[A-Za-z]+[\s-]+)?$")


@dataclass(frozen=True)
class ClauseReading:
    """One clause of a sentence: the anatomies it is about and how it speaks of them."""

    anatomies: tuple[str, ...]
    assertion: Assertion

    @property
    def abnormal(self) -> bool:
        """Whether the clause flags its anatomies as abnormal."""
        return is_abnormal(self.assertion)


def _locates_object(match: KeywordMatch, clause: str, objects: list[re.Match[str]]) -> bool:
    for obj in objects:
        if obj.end() <= match.start and _LOCATING_GAP.match(clause[obj.end() : match.start]):
            return True
        if match.end <= obj.start() and _MODIFIER_GAP.match(clause[match.end : obj.start()]):
            return True
    return False


def _subjects(clause: str, matcher: KeywordMatcher) -> tuple[str, ...] | None:
    """Anatomies ``clause`` is about; None when it names none (it continues the last subject)."""
    matches = matcher.matches(clause)
    if not matches:
        return None
    objects = list(_OBJECT.finditer(clause))
    matches = [m for m in matches if not _locates_object(m, clause, objects)]
    if not matches:
        return ()
    relations = [r.span() for r in _RELATION.finditer(clause)]
    diagnoses = [r.span() for r in _DIAGNOSIS.finditer(clause)]
    matches = [m for m in matches if not any(a <= m.start < b for a, b in relations)]
    subjects = [m for m in matches if not any(a <= m.start < b for a, b in diagnoses)]
    names: list[str] = []
    for match in subjects or matches:
        names += [n for n in match.anatomies if n not in names]
    return tuple(names)


def read_sentence(sentence: str, matcher: KeywordMatcher) -> list[ClauseReading]:
    """Subject and assertion of each clause of ``sentence``, in order.

    The window introduction is skipped (:func:`~.clauses.clause_spans`); a clause without an
    anatomy word takes the anatomies of the clause before it (none at the start).
    """
    readings: list[ClauseReading] = []
    previous: tuple[str, ...] = ()
    for start, end in clause_spans(sentence):
        clause = sentence[start:end]
        subjects = _subjects(clause, matcher)
        subjects = previous if subjects is None else subjects
        readings.append(ClauseReading(subjects, assertion(clause, matcher.pattern)))
        previous = subjects
    return readings
