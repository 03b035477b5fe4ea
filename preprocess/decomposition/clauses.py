"""Sentences and clauses of a report section, each kept with its context.

A sentence ends at . ! ? followed by white space (not inside "1.5 cm"), at a semicolon or at a
line break (impressions are often one item per line). Translated reports such as CT-RATE's open a
paragraph with the window or the sections the reader looked at ("When examined in the lung
parenchyma window; ..."): that introduction is no finding, so it stays in front of the clause it
introduces (its semicolon becomes a colon) and :func:`introduction_end` tells the decomposer to
ignore the anatomy words it contains ("lung parenchyma window" is not about the lung).

Inside a sentence, contrast conjunctions ("but", "however", "except") end the scope of a negation
and may change the subject, so :func:`clause_spans` cuts a sentence there.
"""

from __future__ import annotations

import re

__all__ = ["clause_spans", "introduction_end", "split_sentences"]

_BOUNDARY = re.compile(r"(?<=[.!?])\s+|;\s*|\s*\n\s*")
# Abbreviations after which a full stop does not end the sentence.
_ABBREVIATION = re.compile(r"(?<![A-Za-z])(?:e\.g|i\.e|approx|vs|cf|dr|fig)\.$", re.IGNORECASE)
# List markers that open an impression item: "1.", "2)", "(3)", "-", "*", bullet.
_ENUMERATOR = re.compile(r"^(?:\(?\d{1,2}[.)]|[-*\u2022])(?:\s+|$)")
# "When examined in the lung parenchyma window", "In the sections passing through the upper
# abdomen", "In the mediastinal window", "Bone window": where the reader looked, not a finding.
_INTRODUCTION = (
    r"(?:(?:when|if|as)\s+(?:examined|evaluated|viewed|assessed|reviewed)\s+)?"
    r"(?:(?:in|on|within|at)\s+)?(?:the\s+)?(?:[A-Za-z-]+\s+){0,4}?"
    r"(?:windows?|sections?|slices?|images?|series)"
    r"(?:\s+(?:passing\s+through|included\s+in|through|of)\s+(?:the\s+)?(?:[A-Za-z-]+\s*){1,4}?)?"
)
_INTRODUCTION_SEPARATOR = re.compile(
    rf"(?:^|(?<=[.!?;\n]))(\s*{_INTRODUCTION})\s*[;:]\s*", re.IGNORECASE
)
_INTRODUCTION_START = re.compile(rf"\s*{_INTRODUCTION}\s*(?:[;:,.]|$)", re.IGNORECASE)
# Contrast conjunctions that end a negation's scope; a "; " left inside a sentence as well.
_CLAUSE_BOUNDARY = re.compile(
    r",?\s+(?=(?:but|however|although|though|whereas|while|yet|except|apart\s+from|aside\s+from"
    r"|other\s+than|with\s+the\s+exception\s+of)\b)|,\s+(?=and\s+(?:there|the|a|an)\b)|[;:]\s+",
    re.IGNORECASE,
)


def split_sentences(text: str) -> list[str]:
    """Split a report section into sentences, each ending with punctuation.

    List markers are removed, clauses cut at a semicolon get a full stop, empty pieces (e.g. a
    bare "1.") are dropped, and a window or section introduction stays with the clause after it,
    so each sentence can be handed to an anatomy as it stands.
    """
    text = _INTRODUCTION_SEPARATOR.sub(lambda m: f"{m.group(1)}: ", text)
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


def introduction_end(sentence: str) -> int:
    """Length of the window/section introduction that opens ``sentence`` (0 when there is none)."""
    match = _INTRODUCTION_START.match(sentence)
    return 0 if match is None else match.end()


def clause_spans(sentence: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the clauses of ``sentence``, cut before contrast conjunctions.

    The introduction (:func:`introduction_end`) is not part of any clause.
    """
    start = introduction_end(sentence)
    spans = []
    for match in _CLAUSE_BOUNDARY.finditer(sentence, start):
        if match.start() > start:
            spans.append((start, match.start()))
        start = match.end()
    if start < len(sentence):
        spans.append((start, len(sentence)))
    return spans
