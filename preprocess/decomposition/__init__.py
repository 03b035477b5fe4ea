"""Report decomposition: split a report's findings and impression into per-anatomy descriptions.

The paper (Sec. 3.1) asks an LLM, per anatomy and per section, whether the anatomy is mentioned
(Fig. 6) and to extract its description (Fig. 7), complements the LLM with string matching on the
anatomy table's keywords, and merges the two sections per anatomy. ``rules`` is the offline default
(sentence splitting + keywords); ``llm`` talks to any OpenAI-compatible server.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Protocol

Source = Literal["llm", "rules", "default"]


@dataclass(frozen=True)
class AnatomyDescription:
    """The merged description of one anatomy in one report.

    ``normal`` follows the paper: an anatomy not mentioned in the impression is normal.
    """

    text: str
    normal: bool
    source: Source


@dataclass
class Decomposition:
    """Descriptions for every anatomy of the table plus counts of how each answer was obtained."""

    anatomies: dict[str, AnatomyDescription]
    outcomes: Counter = field(default_factory=Counter)


class Decomposer(Protocol):
    """Anything that decomposes one report; must be picklable for worker processes."""

    def decompose(self, findings: str, impression: str) -> Decomposition:
        """Decompose one report (findings and impression sections)."""
        ...
