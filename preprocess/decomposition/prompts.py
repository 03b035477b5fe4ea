"""The paper's two decomposition prompts (Appendix Fig. 6 and Fig. 7) and their strict parsers.

Both prompts put the report section first and the instruction after it, as in the figures, and
name the anatomy by its table ``label``. That order is also what makes the LLM path fast: all
prompts about one section share its text as a prefix (one user message, no per-anatomy text
before it), which servers with prefix caching compute once.

The paper queries one anatomy at a time ("this approach significantly simplifies the complexity
of description extraction"), so each prompt is about one anatomy of one section. Parsers return
``None`` for anything that is not the requested format: the caller then retries and finally falls
back to the rules, instead of guessing.
"""

from __future__ import annotations

import re

__all__ = [
    "EXTRACTION_PROMPT",
    "MENTION_PROMPT",
    "extraction_messages",
    "mention_messages",
    "parse_extraction",
    "parse_mention",
]

MENTION_PROMPT = (
    "{section}\n\n"
    "You are a professional radiologist. Please determine if the anatomy ({anatomy}) is mentioned "
    'in this CT image report. Please answer directly with "Yes" or "No".'
)

EXTRACTION_PROMPT = (
    "{section}\n\n"
    "You are a professional radiologist. Please extract the descriptive information about the "
    "specific anatomy ({anatomy}) from this CT image diagnostic report. Please follow these "
    "guidelines:\n"
    "Precise extraction: Extract the descriptive information directly related to {anatomy} from "
    "the report.\n"
    "Specify anatomical details: If the report mentions specific areas, parts, or anatomical "
    "details of {anatomy}, make sure to include this information in the description. This could "
    "include affected areas, normal structures, or any notable features.\n"
    "Concise and clear: Directly extract the report content, avoiding unnecessary explanations or "
    "background.\n"
    'Format requirement: Please provide the information in the format "{anatomy}: descriptive '
    'information", ensuring to use {anatomy} as the unified prefix for the item. Even if the '
    "anatomy has multiple independent parts or multiple lateral characteristics, it should be "
    "treated and described as a whole, returning only one comprehensive piece of information "
    "about that anatomy."
)

# Reasoning models (Qwen3, DeepSeek-R1) may prepend their chain of thought.
_THINK = re.compile(r"^\s*<think>.*?</think>", flags=re.DOTALL | re.IGNORECASE)
_DECORATION = "\\s\"'`*_"
_YES_NO = re.compile(rf"^[{_DECORATION}]*(yes|no)(?![A-Za-z])", flags=re.IGNORECASE)
# Descriptions that say there is nothing to describe are not a description.
_EMPTY = {"", "null", "none", "n/a", "na", "not mentioned", "no information", "not applicable"}


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def mention_messages(section: str, anatomy: str) -> list[dict[str, str]]:
    """Chat messages of Fig. 6, asking whether ``anatomy`` (a table label) is in ``section``."""
    return _user(MENTION_PROMPT.format(section=section.strip(), anatomy=anatomy))


def extraction_messages(section: str, anatomy: str) -> list[dict[str, str]]:
    """Chat messages of Fig. 7: extract the description of ``anatomy`` from ``section``."""
    return _user(EXTRACTION_PROMPT.format(section=section.strip(), anatomy=anatomy))


def parse_mention(answer: str) -> bool | None:
    """``True``/``False`` for an answer that starts with Yes/No, else ``None`` (unparseable).

    "Yes.", "**No**" and "No, it is not mentioned." are accepted; "Not mentioned", "Maybe" and an
    empty answer are not.
    """
    match = _YES_NO.match(_THINK.sub("", answer))
    return None if match is None else match.group(1).lower() == "yes"


def _prefix(anatomy: str) -> re.Pattern[str]:
    words = r"[\s_\-]+".join(map(re.escape, anatomy.split()))
    return re.compile(rf"^[{_DECORATION}\-\u2022]*{words}[{_DECORATION}]*:[{_DECORATION}]*", re.I)


def parse_extraction(answer: str, anatomy: str) -> str | None:
    """The description in an ``"{anatomy}: description"`` answer, prefix stripped, else ``None``.

    The first non-empty line must carry the prefix (markdown emphasis, quotes and bullets around it
    are tolerated); later lines are joined to it, their own prefix stripped if they repeat it, as
    the prompt asks for one piece of information per anatomy. An empty or "null" description is
    unparseable: the model was asked because the anatomy is mentioned.
    """
    prefix = _prefix(anatomy)
    lines = [line.strip() for line in _THINK.sub("", answer).splitlines() if line.strip()]
    if not lines or not prefix.match(lines[0]):
        return None
    parts = [prefix.sub("", line, count=1).strip().strip("\"'`*").strip() for line in lines]
    description = " ".join(p for p in parts if p)
    if description.lower().rstrip(".") in _EMPTY:
        return None
    return description
