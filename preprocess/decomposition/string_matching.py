"""Keyword matching of anatomies in report text: the paper's complementary string matching.

An LLM asked "is the small intestine mentioned?" may answer No to a sentence about the duodenum
(paper Sec. 3.1), so every anatomy of the table carries ``keywords`` (sub-structures, synonyms,
adjectives) and a keyword hit counts as a mention. The rule-based decomposer uses the same matcher
to assign sentences to anatomies.

Matching is case-insensitive, on whole words, and multiword keywords tolerate any run of spaces,
line breaks or hyphens between their words. All keywords of all anatomies are searched at once and
the longest keyword wins at each position, so "pulmonary artery" is the pulmonary artery and never
the lung, and "splenic vein" is the portal/splenic vein and never the spleen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from fvlm.anatomy import Anatomy, AnatomyTable

__all__ = ["KeywordMatch", "KeywordMatcher", "normalize_keyword"]

_ALNUM = "A-Za-z0-9"
_GAP = re.compile(r"[\s\-]+")


def normalize_keyword(text: str) -> str:
    """Lower-case ``text`` and collapse spaces/hyphens, so that matches map back to keywords."""
    return _GAP.sub(" ", text.strip().lower())


@dataclass(frozen=True)
class KeywordMatch:
    """One keyword occurrence: where it is, which keyword, and the anatomies that own it."""

    start: int
    end: int
    keyword: str
    anatomies: tuple[str, ...]


class KeywordMatcher:
    """All keywords of a table compiled into one case-insensitive, longest-first regex.

    An anatomy's ``label`` counts as one of its keywords, since it is the name the LLM prompts use.

    Args:
        table: The anatomy table (or any iterable of anatomies) whose keywords are matched.

    Raises:
        ValueError: If no anatomy has any keyword.
    """

    def __init__(self, table: AnatomyTable | Iterable[Anatomy]) -> None:
        anatomies = table.anatomies if isinstance(table, AnatomyTable) else tuple(table)
        owners: dict[str, list[str]] = {}
        for anatomy in anatomies:
            for keyword in (anatomy.label, *anatomy.keywords):
                key = normalize_keyword(keyword)
                if key and anatomy.name not in owners.setdefault(key, []):
                    owners[key].append(anatomy.name)
        if not owners:
            raise ValueError("the anatomy table has no keywords to match")
        self._owners = {key: tuple(names) for key, names in owners.items()}
        # Longest first: Python's alternation takes the first alternative that matches at a
        # position, so ordering by length gives leftmost-longest matching.
        ordered = sorted(self._owners, key=lambda k: (-len(k), k))
        alternatives = "|".join(r"[\s\-]+".join(map(re.escape, k.split(" "))) for k in ordered)
        self._pattern = re.compile(
            rf"(?<![{_ALNUM}])(?:{alternatives})(?![{_ALNUM}])", flags=re.IGNORECASE
        )

    @property
    def keywords(self) -> dict[str, tuple[str, ...]]:
        """Normalised keyword -> names of the anatomies that own it."""
        return dict(self._owners)

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
