"""Report decomposition: split a report's findings and impression into per-anatomy descriptions.

The paper (Sec. 3.1) asks an LLM, per anatomy and per section, whether the anatomy is mentioned
(Fig. 6) and to extract its description (Fig. 7), complements the LLM with string matching on the
anatomy table's keywords, and merges the two sections per anatomy. ``rules`` is the offline default
(sentence splitting + keywords); ``llm`` talks to any OpenAI-compatible server.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

Source = Literal["llm", "rules", "default"]
#: What decided an anatomy's normal flag: the impression (the paper's rule), the findings (the
#: impression is missing or states no abnormality), or nothing (the anatomy is mentioned nowhere).
NormalSource = Literal["impression", "findings", "default"]


@dataclass(frozen=True)
class AnatomyDescription:
    """The merged description of one anatomy in one report.

    ``normal`` follows the paper: an anatomy not mentioned in the impression is normal;
    ``normal_source`` says what decided it (None: the paper's rule, ``default`` when the anatomy is
    mentioned nowhere, ``impression`` otherwise).
    """

    text: str
    normal: bool
    source: Source
    normal_source: NormalSource | None = None

    def __post_init__(self) -> None:
        if self.normal_source is None:
            paper = "default" if self.source == "default" else "impression"
            object.__setattr__(self, "normal_source", paper)


@dataclass
class Decomposition:
    """Descriptions for every anatomy of the table plus counts of how each answer was obtained.

    ``fallback`` names the anatomies for which an LLM prompt failed (server unusable, timeouts,
    unparseable answers) and the keyword rules answered instead: ``report.json`` records them as
    ``decomposer_used: rules``, and the next run with the LLM configured asks again.
    """

    anatomies: dict[str, AnatomyDescription]
    outcomes: Counter = field(default_factory=Counter)
    fallback: frozenset[str] = frozenset()


class Decomposer(Protocol):
    """Anything that decomposes one report; must be picklable for worker processes."""

    def decompose(self, findings: str, impression: str) -> Decomposition:
        """Decompose one report (findings and impression sections)."""
        ...


# The implementations import the types above, so they are imported after them.
from .llm import LLMConfig, LLMDecomposer  # noqa: E402
from .merge import NULL_TEXT, SectionText, merge_sections  # noqa: E402
from .rules import RuleDecomposer, split_sentences  # noqa: E402
from .string_matching import KeywordMatcher  # noqa: E402

if TYPE_CHECKING:
    from fvlm.anatomy import AnatomyTable

__all__ = [
    "NULL_TEXT",
    "AnatomyDescription",
    "Decomposer",
    "Decomposition",
    "KeywordMatcher",
    "LLMConfig",
    "LLMDecomposer",
    "NormalSource",
    "RuleDecomposer",
    "SectionText",
    "Source",
    "build_decomposer",
    "merge_sections",
    "split_sentences",
]


def build_decomposer(
    kind: Literal["rules", "llm"], table: AnatomyTable, llm: LLMConfig | None = None
) -> Decomposer:
    """The decomposer a preprocessing config asks for.

    Args:
        kind: ``rules`` (offline keyword rules) or ``llm`` (the paper's prompts on a server).
        table: The anatomy table to decompose into.
        llm: Server settings; required for ``llm``, ignored for ``rules``.

    Raises:
        ValueError: On an unknown ``kind`` or ``llm`` without a config, before any work starts.
    """
    match kind:
        case "rules":
            return RuleDecomposer(table)
        case "llm":
            if llm is None:
                raise ValueError("decomposer 'llm' needs an LLMConfig (base_url, model, ...)")
            return LLMDecomposer(table, llm)
        case _:
            raise ValueError(f"unknown decomposer {kind!r}; expected 'rules' or 'llm'")
