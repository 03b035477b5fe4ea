"""Offline report decomposition: clauses read like a radiologist reads them, plus the keyword table.

This is the default when no LLM server is configured, and the fallback of the LLM decomposer for
every prompt that fails. Each sentence of a section (:mod:`.clauses`) goes to the anatomies it is
about (:mod:`.attribution`: its subject, not every anatomy it names); the sentences of one anatomy,
in report order, are its section text. Sentences about no anatomy of the table are dropped, which
is what the LLM's extraction does as well. The normal flag reads negation and normal wording
(:mod:`.negation`) and falls back to the findings when the impression is missing or global
(:mod:`.normal_flag`); outcomes count ``normal_impression``/``normal_findings`` per anatomy that
a section mentions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from fvlm.anatomy import AnatomyTable

from . import Decomposition
from .attribution import ClauseReading, read_sentence
from .clauses import split_sentences
from .merge import SectionText, merge_sections
from .normal_flag import NormalFlag, normal_flags
from .string_matching import KeywordMatcher

__all__ = ["RuleDecomposer", "SentenceReading", "no_anatomy_found", "split_sentences"]


@dataclass(frozen=True)
class SentenceReading:
    """One sentence of a section and the readings of its clauses."""

    sentence: str
    clauses: tuple[ClauseReading, ...]

    @property
    def anatomies(self) -> list[str]:
        """Anatomies the sentence is about, in order of first mention."""
        names: list[str] = []
        for clause in self.clauses:
            names += [n for n in clause.anatomies if n not in names]
        return names


class RuleDecomposer:
    """Rule-based decomposer (sentences, subjects, negation + keyword table).

    Picklable: it holds the table and a compiled regex only.

    Args:
        table: The anatomy table whose keywords assign sentences to anatomies.
    """

    def __init__(self, table: AnatomyTable) -> None:
        self.table = table
        self.matcher = KeywordMatcher(table)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self.table.name!r})"

    def read(self, section: str) -> list[SentenceReading]:
        """Every sentence of ``section`` with the subject and assertion of each clause."""
        return [
            SentenceReading(s, tuple(read_sentence(s, self.matcher)))
            for s in split_sentences(section)
        ]

    def _texts(self, readings: list[SentenceReading]) -> dict[str, str]:
        found: dict[str, list[str]] = {}
        for reading in readings:
            for name in reading.anatomies:
                found.setdefault(name, []).append(reading.sentence)
        return {name: " ".join(found[name]) for name in self.table.names if name in found}

    def extract(self, section: str) -> dict[str, str]:
        """Anatomy name -> the sentences of ``section`` about it (only anatomies it is about).

        Keys follow table order so that outputs are deterministic.
        """
        return self._texts(self.read(section))

    def _flags(
        self, findings: list[SentenceReading], impression: list[SentenceReading]
    ) -> dict[str, NormalFlag]:
        return normal_flags(
            self.table.names,
            [c for r in findings for c in r.clauses],
            [c for r in impression for c in r.clauses],
        )

    def normal_flags(self, findings: str, impression: str) -> dict[str, NormalFlag]:
        """Normal flag and its source per anatomy (:mod:`.normal_flag`), e.g. for the LLM path."""
        return self._flags(self.read(findings), self.read(impression))

    def decompose(self, findings: str, impression: str) -> Decomposition:
        """Decompose one report.

        Outcomes count ``rules`` (section-anatomy texts), ``default`` (anatomies mentioned
        nowhere), ``normal_impression``/``normal_findings`` (which section decided the normal
        flag of a mentioned anatomy) and ``no_anatomy_found`` (:func:`no_anatomy_found`).
        """
        readings = [self.read(part) for part in (findings, impression)]
        sections = [
            {name: SectionText(text, "rules") for name, text in self._texts(part).items()}
            for part in readings
        ]
        flags = self._flags(*readings)
        anatomies = {
            name: replace(d, normal=flags[name].normal, normal_source=flags[name].source)
            for name, d in merge_sections(self.table, *sections).items()
        }
        outcomes = Counter(
            rules=sum(len(s) for s in sections),
            default=sum(d.source == "default" for d in anatomies.values()),
        )
        outcomes.update(
            f"normal_{d.normal_source}" for d in anatomies.values() if d.source != "default"
        )
        outcomes["no_anatomy_found"] += no_anatomy_found(findings, impression, anatomies)
        return Decomposition(anatomies, +outcomes)


def no_anatomy_found(findings: str, impression: str, anatomies: dict[str, Any]) -> bool:
    """A report with text in which no anatomy of the table is found (counted per study).

    Another language, another body region or only global statements ("within normal limits"):
    every anatomy is then normal by default, which the run's summary must make visible.
    """
    has_text = bool(findings.strip() or impression.strip())
    return has_text and all(d.source == "default" for d in anatomies.values())
