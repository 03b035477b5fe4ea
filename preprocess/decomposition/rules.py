"""Offline report decomposition: sentence splitting plus the anatomy table's keywords.

This is the default when no LLM server is configured, and the fallback of the LLM decomposer for
every prompt that fails. Each sentence (or semicolon-separated clause) of a section goes to every
anatomy whose keyword it contains; the sentences of one anatomy, in report order, are its section
text. Sentences without any keyword are dropped, which is what the LLM's extraction does as well.
"""

from __future__ import annotations

import re
from collections import Counter

from fvlm.anatomy import AnatomyTable

from . import Decomposition
from .merge import SectionText, merge_sections
from .string_matching import KeywordMatcher

__all__ = ["RuleDecomposer", "split_sentences"]

# A sentence ends at . ! ? followed by white space (not inside "1.5 cm"), at a semicolon, or at a
# line break (impressions are often one item per line).
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|;\s*|\s*\n\s*")
# Abbreviations after which a full stop does not end the sentence.
_ABBREVIATION = re.compile(r"(?<![A-Za-z])(?:e\.g|i\.e|approx|vs|cf|dr|fig)\.$", re.IGNORECASE)
# List markers that open an impression item: "1.", "2)", "(3)", "-", "*", bullet.
_ENUMERATOR = re.compile(r"^(?:\(?\d{1,2}[.)]|[-*\u2022])(?:\s+|$)")


def split_sentences(text: str) -> list[str]:
    """Split a report section into sentences, each ending with punctuation.

    List markers are removed, clauses cut at a semicolon get a full stop, and empty pieces (e.g. a
    bare "1.") are dropped, so each sentence can be handed to an anatomy as it stands.
    """
    pieces: list[str] = []
    for piece in _BOUNDARY.split(text):
        if pieces and _ABBREVIATION.search(pieces[-1]):
            pieces[-1] = f"{pieces[-1]} {piece}"
        else:
            pieces.append(piece)
    sentences = []
    for piece in pieces:
        sentence = piece.strip()
        while (stripped := _ENUMERATOR.sub("", sentence, count=1).strip()) != sentence:
            sentence = stripped
        if not any(ch.isalnum() for ch in sentence):
            continue
        if sentence[-1] not in ".!?":
            sentence = f"{sentence.rstrip(',:')}."
        sentences.append(sentence)
    return sentences


class RuleDecomposer:
    """Rule-based decomposer (sentence splitting + keyword table).

    Picklable: it holds the table and a compiled regex only.

    Args:
        table: The anatomy table whose keywords assign sentences to anatomies.
    """

    def __init__(self, table: AnatomyTable) -> None:
        self.table = table
        self.matcher = KeywordMatcher(table)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self.table.name!r})"

    def extract(self, section: str) -> dict[str, str]:
        """Anatomy name -> the sentences of ``section`` that mention it (only mentioned anatomies).

        Keys follow table order so that outputs are deterministic.
        """
        found: dict[str, list[str]] = {}
        for sentence in split_sentences(section):
            for name in self.matcher.anatomies(sentence):
                found.setdefault(name, []).append(sentence)
        return {name: " ".join(found[name]) for name in self.table.names if name in found}

    def decompose(self, findings: str, impression: str) -> Decomposition:
        """Decompose one report; outcomes count ``rules`` (section-anatomy texts), ``default``."""
        sections = [
            {name: SectionText(text, "rules") for name, text in self.extract(part).items()}
            for part in (findings, impression)
        ]
        anatomies = merge_sections(self.table, *sections)
        outcomes = Counter(
            rules=sum(len(s) for s in sections),
            default=sum(d.source == "default" for d in anatomies.values()),
        )
        return Decomposition(anatomies, +outcomes)
