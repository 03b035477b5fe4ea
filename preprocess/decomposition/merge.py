"""The paper's post-processing: merge per-anatomy findings and impression texts (Sec. 3.1, step 3).

For every anatomy of the table the findings description is concatenated with the impression
description; a section that does not mention the anatomy contributes the string "null", so the text
encoder still sees which section was silent. An anatomy mentioned in neither section gets the
clinical default "{anatomy} shows no significant abnormalities." An anatomy is *normal* when the
impression does not mention it: radiologists summarise the abnormal findings there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from fvlm.anatomy import AnatomyTable

from . import AnatomyDescription, Source

__all__ = ["NULL_TEXT", "SectionText", "merge_sections"]

NULL_TEXT = "null"


@dataclass(frozen=True)
class SectionText:
    """What one section says about one anatomy, and whether an LLM or the rules extracted it."""

    text: str
    source: Literal["llm", "rules"]


def _merged_source(parts: list[SectionText]) -> Source:
    # "llm" only when the LLM produced every present side: a text partly from the rules is
    # reported as "rules" so that fallbacks stay visible in report.json.
    return "llm" if all(p.source == "llm" for p in parts) else "rules"


def merge_sections(
    table: AnatomyTable,
    findings: Mapping[str, SectionText],
    impression: Mapping[str, SectionText],
) -> dict[str, AnatomyDescription]:
    """Merge per-section extractions into one description per anatomy of ``table``.

    Args:
        table: The anatomy table; the result has one entry per anatomy, in table order.
        findings: Anatomy name -> its text in the findings section (absent: not mentioned).
        impression: Anatomy name -> its text in the impression section (absent: not mentioned).

    Returns:
        Anatomy name -> merged description.

    Raises:
        KeyError: If a mapping names an anatomy that is not in the table (a caller bug).
    """
    unknown = (set(findings) | set(impression)) - set(table.names)
    if unknown:
        raise KeyError(f"anatomies not in table {table.name!r}: {sorted(unknown)}")
    merged: dict[str, AnatomyDescription] = {}
    for anatomy in table.anatomies:
        found, impressed = findings.get(anatomy.name), impression.get(anatomy.name)
        if found is None and impressed is None:
            merged[anatomy.name] = AnatomyDescription(anatomy.default_text, True, "default")
            continue
        parts = [p for p in (found, impressed) if p is not None]
        text = " ".join(p.text if p is not None else NULL_TEXT for p in (found, impressed))
        merged[anatomy.name] = AnatomyDescription(text, impressed is None, _merged_source(parts))
    return merged
