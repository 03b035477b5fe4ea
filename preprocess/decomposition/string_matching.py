"""Keyword matching of anatomies in report text: the paper's complementary string matching.

An LLM asked "is the small intestine mentioned?" may answer No to a sentence about the duodenum
(paper Sec. 3.1), so every anatomy of the table carries ``keywords`` (sub-structures, synonyms,
adjectives) and a keyword hit counts as a mention. The rule-based decomposer uses the same matcher
to assign sentences to anatomies.

Matching follows :func:`fvlm.anatomy.keyword_pattern` (case-insensitive, whole words, multiword
keywords tolerate any run of spaces, line breaks or hyphens between their words), the same rule the
phantom words its reports by. All keywords of all anatomies are searched at once and the longest
keyword wins at each position, so "pulmonary artery" is the pulmonary artery and never the lung,
and "splenic vein" is the portal/splenic vein and never the spleen.

Reports use inflected forms the table does not list ("lingular" for the lingula, "atrial" for the
atrium, "upper lobes"): :func:`inflections` adds the regular Latin/English plural and adjective
endings of each keyword's last word, unless that form is already another anatomy's keyword.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fvlm.anatomy import Anatomy, AnatomyTable, keyword_pattern, normalize_keyword

__all__ = ["KeywordMatch", "KeywordMatcher", "inflections"]

# (ending, replacements) of a keyword's last word: plurals and adjectives of anatomical nouns
# (lingula -> lingular, atrium -> atrial/atria, appendix -> appendices, artery -> arteries).
_ENDINGS = (
    ("ula", ("ular", "ulae")),
    ("a", ("ae", "al", "as")),
    ("ellum", ("ellar",)),
    ("um", ("a", "al")),
    ("us", ("i", "al")),
    ("ix", ("ices", "iceal")),
    ("y", ("ies",)),
    ("is", ("es",)),
    ("ss", ("sses",)),
    ("s", ()),
    ("", ("s",)),
)
# Shorter words are abbreviations or spine levels (ivc, l1, s1) and are never inflected.
_MIN_INFLECTED = 4


def inflections(keyword: str) -> set[str]:
    """Plural and adjective forms of ``keyword`` (normalised), the keyword itself excluded.

    Only the last word inflects ("upper lobe" -> "upper lobes"); words that are not purely
    alphabetic or shorter than four letters are left alone.
    """
    key = normalize_keyword(keyword)
    head, _, last = key.rpartition(" ")
    if len(last) < _MIN_INFLECTED or not last.isalpha():
        return set()
    for ending, replacements in _ENDINGS:
        if last.endswith(ending):
            stem = last[: len(last) - len(ending)]
            forms = {f"{head} {stem}{r}".strip() for r in replacements}
            return forms - {key}
    return set()  # pragma: no cover - the empty ending always matches


@dataclass(frozen=True)
class KeywordMatch:
    """One keyword occurrence: where it is, which keyword, and the anatomies that own it."""

    start: int
    end: int
    keyword: str
    anatomies: tuple[str, ...]


class KeywordMatcher:
    """All keywords of a table compiled into one regex (:func:`fvlm.anatomy.keyword_pattern`).

    An anatomy's ``label`` counts as one of its keywords, since it is the name the LLM prompts use.
    With ``morphology`` every keyword also matches its :func:`inflections`, except forms that are
    a keyword of some anatomy in their own right (so "pleural" stays wherever the table puts it).

    Args:
        table: The anatomy table (or any iterable of anatomies) whose keywords are matched.
        morphology: Also match the keywords' plural and adjective forms.

    Raises:
        ValueError: If no anatomy has any keyword.
    """

    def __init__(self, table: AnatomyTable | Iterable[Anatomy], morphology: bool = True) -> None:
        anatomies = table.anatomies if isinstance(table, AnatomyTable) else tuple(table)
        owners: dict[str, list[str]] = {}
        for anatomy in anatomies:
            for keyword in (anatomy.label, *anatomy.keywords):
                key = normalize_keyword(keyword)
                if key and anatomy.name not in owners.setdefault(key, []):
                    owners[key].append(anatomy.name)
        if not owners:
            raise ValueError("the anatomy table has no keywords to match")
        if morphology:
            inflected: dict[str, list[str]] = {}
            for key, names in owners.items():
                for form in inflections(key) - owners.keys():
                    inflected.setdefault(form, [])
                    inflected[form] += [n for n in names if n not in inflected[form]]
            owners.update(inflected)
        self._owners = {key: tuple(names) for key, names in owners.items()}
        self._pattern = keyword_pattern(self._owners)

    @property
    def keywords(self) -> dict[str, tuple[str, ...]]:
        """Normalised keyword -> names of the anatomies that own it."""
        return dict(self._owners)

    @property
    def pattern(self) -> re.Pattern[str]:
        """The compiled regex of every keyword (and inflection), leftmost-longest."""
        return self._pattern

    def matches(self, text: str) -> list[KeywordMatch]:
        """Non-overlapping keyword occurrences in ``text``, left to right."""
        found = []
        for m in self._pattern.finditer(text):
            key = normalize_keyword(m.group(0))
            found.append(KeywordMatch(m.start(), m.end(), key, self._owners[key]))
        return found

    def anatomies(self, text: str) -> set[str]:
        """Names of every anatomy with at least one keyword in ``text``."""
        return {name for match in self.matches(text) for name in match.anatomies}

    def mentions(self, text: str, anatomy: str) -> bool:
        """Whether one of ``anatomy``'s keywords occurs in ``text``."""
        return anatomy in self.anatomies(text)
