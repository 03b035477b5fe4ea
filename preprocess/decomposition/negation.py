"""Whether a clause reports an abnormality: NegEx-style negation, uncertainty and normal wording.

The paper's normal flag ("an anatomy not mentioned in the impression is normal") reads every
mention as a finding, so "No pleural effusion. Heart size is normal." would flag the lung and the
heart. Radiologists word normal anatomy in three ways, and each is recognised here:

- a negation in front of the finding ("No ...", "without ...", "absence of ..."), whose scope runs
  to the end of the clause (:func:`fvlm.preprocess.decomposition.clauses.clause_spans` cuts at
  "but", "however", ...), as in NegEx (Chapman et al., 2001);
- a negation after it, as translated reports write it ("... was not observed", "... is not
  enlarged", "... were not detected");
- a normal descriptor ("normal", "unremarkable", "clear", "patent", "natural", "within normal
  limits").

Uncertain findings ("possible", "suspicious for", "cannot be excluded", "?") count as abnormal:
the reader flagged them. Text before a negation is still read ("Cholelithiasis without
cholecystitis" is abnormal), and a finding word ("nodule", "effusion", "-megaly", "-itis") beats a
normal descriptor ("a nodule with smooth margins"). Pseudo-negations ("no change in the nodule",
"not only") do not negate.

negspaCy/medspaCy implement NegEx on top of spaCy (about 100 MB of dependencies and a language
model to tokenise); these rules need only ``re`` and are measured against the project's report
corpus (``benchmarks/bench_decomposition.py``).
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["Assertion", "assertion", "is_abnormal"]

Assertion = Literal["affirmed", "uncertain", "negated", "normal"]

# Words that only carry the subject and the verb around a negation ("The lungs show no ...").
_FILLER = (
    r"the|a|an|both|bilateral|bilaterally|left|right|there|is|are|was|were|be|been|being|has|have|"
    r"had|show|shows|showed|demonstrates?|reveals?|in|on|of|at|within|and|it|its|their|also|"
    r"otherwise|seen|noted|observed|evaluated|examined|included|sections?|upper|lower|middle|"
    r"main|both|each|either|sides?|level|levels|region|part|parts|size|sizes|contour|contours"
)
_PSEUDO = re.compile(
    r"\b(?:no|without)\s+(?:significant\s+|interval\s+|substantial\s+)?(?:change|increase|"
    r"progression|difference)s?\b|\bnot\s+only\b|\bno\s+more\s+than\b",
    re.IGNORECASE,
)
_UNCERTAIN = re.compile(
    r"\?|\b(?:possible|possibly|probable|probably|likely|suspicious|suspected|suspect|"
    r"questionable|equivocal|indeterminate|may|might|could|differential\s+diagnosis|considered|"
    r"suggestive|suggests?|concern(?:ing)?\s+for|rule\s+out|r/o)\b",
    re.IGNORECASE,
)
# "... cannot be excluded": a negation word, an uncertain finding.
_EXCLUSION = re.compile(
    r"\b(?:cannot|can\s+not|could\s+not|not)\s+(?:be\s+)?(?:excluded|ruled\s+out)\b", re.IGNORECASE
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|absence\s+of|absent|negative\s+for|free\s+of|neither|nor|"
    r"no\s+evidence\s+of|no\s+signs?\s+of|rather\s+than)\b",
    re.IGNORECASE,
)
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were|has\s+been|have\s+been|could\s+be|can\s+be)\s+)?"
    r"(?:not|n't)\s+(?:been\s+)?(?:seen|observed|detected|identified|present|visualized|"
    r"visualised|noted|evident|demonstrated|appreciated|found|enlarged|dilated|thickened|"
    r"increased|given|shown|displaced)\b|\b(?:is|are|was|were)\s+absent\b|"
    r"\b(?:has|have)\s+resolved\b|\bno\s+longer\b",
    re.IGNORECASE,
)
_NORMAL = re.compile(
    r"\b(?:normal|normally|unremarkable|clear|intact|patent|open|preserved|maintained|natural|"
    r"symmetric|symmetrical|symmetrically|homogeneous|homogeneously|homogenous|regular|smooth|"
    r"usual|physiological|physiologic|age-appropriate|midline|well[\s-]aerated|aerated|"
    r"within\s+(?:the\s+)?normal\s+limits|non-?dilated|(?:moderately|partially|normally|well)\s+"
    r"distended)\b",
    re.IGNORECASE,
)
# Words that name a finding: they make a clause abnormal unless a negation covers them.
_FINDING = re.compile(
    r"\b(?:nodules?|nodular|mass(?:es)?|lesions?|cysts?|cystic|stones?|calcul(?:us|i)|"
    r"effusions?|consolidation|consolidative|atelectasis|atelectatic|opacit(?:y|ies)|densities|"
    r"density\s+increase|increased\s+density|"
    r"infiltrat\w*|emphysema\w*|bullae?|bullous|bronchiectasis|thicken\w*|enlarge\w*|"
    r"(?<!non-)(?<!non)(?<!not\s)dilat\w*|\w+megaly|\w+itis|\w+iasis|\w+ectasis|\w+osis|"
    r"hernia\w*|fractures?|aneurysm\w*|calcif\w*|plaques?|atherom\w*|atherosclero\w*|"
    r"fibro\w*|sequela\w*|scar\w*|ascites|free\s+(?:fluid|air)|hypodens\w*|hyperdens\w*|"
    r"hypoattenuat\w*|hyperlucen\w*|lytic|sclerotic|destructive|tumou?r\w*|neoplas\w*|metasta\w*|"
    r"malignan\w*|pneumothorax|pneumonia|edema\w*|oedema\w*|stranding|ground[\s-]glass|mosaic|"
    r"reticul\w*|honeycomb\w*|irregular\w*|thromb\w*|occlu\w*|narrow\w*|abscess\w*|"
    r"obstruct\w*|gallstones?|cholelith\w*|collections?|hypertroph\w*|increased|decreased|"
    r"catheters?|pacemaker|stents?|prosthe\w*|lymphadenopath\w*|pathologic\w*|"
    r"cardiomegaly|infarct\w*|embol\w*|bronchiolitis|spondylo\w*|degenerat\w*|osteophyt\w*)\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_ONLY_FILLER = re.compile(rf"^(?:{_FILLER})$", re.IGNORECASE)


def _says_something(text: str, subject: re.Pattern[str] | None) -> bool:
    """Whether ``text`` holds a word other than filler and the anatomy's own name."""
    if subject is not None:
        text = subject.sub(" ", text)
    return any(not _ONLY_FILLER.match(word) for word in _WORD.findall(text))


def assertion(clause: str, subject: re.Pattern[str] | None = None) -> Assertion:
    """How ``clause`` speaks of what it names: affirmed, uncertain, negated or normal.

    Args:
        clause: One clause (a sentence cut at contrast conjunctions).
        subject: Pattern of the anatomy words of the table; text before a negation that holds
            only these and filler words is the negation's subject ("The lungs show no nodule").

    Returns:
        ``negated`` or ``normal`` when the clause describes nothing abnormal, ``affirmed`` or
        ``uncertain`` (abnormal, possibly) otherwise.
    """
    text = _PSEUDO.sub(" finding ", clause)
    if _EXCLUSION.search(text):
        return "uncertain"
    before, after = _PRE_NEGATION.search(text), _POST_NEGATION.search(text)
    if after is not None and (before is None or after.start() <= before.start()):
        return "negated"  # "... was not observed": the negation looks back over the clause
    head = text if before is None else text[: before.start()]
    if _UNCERTAIN.search(head):
        return "uncertain"
    if _FINDING.search(head):
        return "affirmed"
    if before is not None:
        return "negated"
    if _NORMAL.search(head) or not _says_something(head, subject):
        return "normal"
    return "affirmed"


def is_abnormal(value: Assertion) -> bool:
    """Whether an assertion flags its anatomy as abnormal (affirmed or uncertain)."""
    return value in ("affirmed", "uncertain")
