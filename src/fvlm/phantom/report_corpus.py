"""Reports as radiologists write them, with ground truth: CT-RATE-style chest and abdomen reports.

The phantom's template reports are written to be decomposable (one anatomy per sentence, diseases
only in the impression), so they never exercise what real reports do. CT-RATE's translated English
does: passive voice ("was observed"), "are natural", semicolons, parentheses, question marks,
window introductions ("When examined in the lung parenchyma window;"), impressions that are missing
("Not given.") or global ("within normal limits"), negated impressions ("No pleural effusion.
Heart size is normal."), inflected sub-structures ("lingular"), and sentences that name several
anatomies but are about one ("pleural effusion, possibly due to cardiac failure").

:func:`write_ctrate_report` words a study's findings that way and records, for every sentence, the
anatomies it is about and whether it is abnormal; :func:`report_corpus` samples findings without
drawing volumes and writes a corpus for tests and ``benchmarks/bench_decomposition.py``. An anatomy
is abnormal when any sentence about it is (the label semantics of CT-RATE); an impression that is
present and not global names every abnormal anatomy, as radiologists summarise.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from fvlm.anatomy import AnatomyTable, load_anatomy_table

from .findings import Finding
from .volume import LUNG_LOBES

__all__ = [
    "FAILURE_CLASSES",
    "Agreement",
    "CorpusReport",
    "CorpusSentence",
    "report_corpus",
    "score_decomposition",
    "write_ctrate_report",
]

Region = Literal["chest", "abdomen"]
#: Failure classes of real reports that the corpus exercises (each report lists its own).
FAILURE_CLASSES = (
    "missing_impression",
    "global_impression",
    "negation",
    "uncertainty",
    "window_introduction",
    "morphology",
    "cross_anatomy",
)

# Sentences about normal anatomy: (anatomies, text, failure class or "").
_NORMAL: dict[str, tuple[tuple[str, str], ...]] = {
    "lung": (
        ("", "Aeration of both lungs was normal."),
        ("negation", "No mass or infiltrative lesion was detected in both lungs."),
        ("negation", "No pleural effusion or pneumothorax was observed."),
        ("", "Both lungs are clear."),
        ("morphology", "The lingular segment and both upper lobes are natural."),
    ),
    "heart": (
        ("", "Heart contour, size are natural."),
        ("negation", "Pericardial effusion-thickening was not observed."),
        ("", "Heart size is normal."),
    ),
    "aorta": (
        ("", "Thoracic aorta diameter is normal."),
        ("negation", "No aneurysmatic dilatation was observed in the thoracic aorta."),
    ),
    "esophagus": (
        (
            "negation",
            "Thoracic esophagus calibration was normal and no significant tumoral wall "
            "thickening was detected.",
        ),
        ("", "The esophagus is natural."),
    ),
    "trachea": (("", "Trachea and both main bronchi are open."), ("", "The trachea is patent.")),
    "pulmonary_artery": (("", "The main pulmonary artery diameter is normal."),),
    "thoracic_vertebrae": (
        ("morphology", "Thoracic vertebral corpus heights are preserved."),
        ("negation", "No lytic-destructive lesion was detected in the thoracic spine."),
    ),
    "rib": (("negation", "No fracture was detected in the ribs."),),
    "liver": (
        ("", "Liver size and parenchymal density are natural."),
        ("negation", "No space-occupying lesion was detected in the liver."),
    ),
    "gallbladder": (("", "The gallbladder is natural."),),
    "spleen": (("", "Spleen size is normal."), ("", "The spleen is natural.")),
    "pancreas": (("", "The pancreas is natural."),),
    "kidney": (
        ("negation", "No stones or hydronephrosis were observed in both kidneys."),
        ("", "Both kidneys are natural in size and location."),
    ),
    "adrenal_gland": (("", "Both adrenal glands are natural."),),
    "stomach": (("", "The stomach is partially distended and natural."),),
    "small_bowel": (("negation", "No dilatation was observed in the small bowel loops."),),
    "colon": (("", "The colon is natural."),),
    "urinary_bladder": (("", "The urinary bladder is natural."),),
}
# Sentences about no anatomy of any preset (lymph nodes, devices, other organs).
_NO_ANATOMY = (
    (
        "negation",
        "No lymph node in pathological size and appearance was detected in the mediastinum "
        "and both hilar regions.",
    ),
    ("", "Upper abdominal organs included in the sections are natural."),
    ("negation", "No lytic-destructive lesions were detected in the bone structures."),
)
# Abnormal sentences that name other anatomies than the one they are about: (about, template).
_CROSS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "chest": (
        ((), "Lymph nodes in the paraesophageal region measuring up to {size} were observed."),
        ((), "Lymph nodes adjacent to the esophagus measuring up to {size} were observed."),
        ((), "The catheter tip is in the right atrium."),
        ((), "A port catheter terminating in the superior vena cava was observed."),
    ),
    "abdomen": (
        (
            ("liver",),
            "A {size} hypodense lesion was observed in the liver at the level of the lung bases.",
        ),
        ((), "Lymph nodes adjacent to the abdominal aorta measuring up to {size} were observed."),
    ),
}
# Findings sentences per disease key: (failure class or "", template).
_ABNORMAL: dict[str, tuple[tuple[str, str], ...]] = {
    "lung/nodule": (
        ("", "A {size} nodule was observed in the {lobe}."),
        ("morphology", "Nodules with a diameter of {size} were observed in both upper lobes."),
        ("morphology", "A {size} nodule was observed in the lingular segment of the left lung."),
    ),
    "lung/emphysema": (
        ("", "Emphysematous changes are seen in both lungs."),
        ("morphology", "Centriacinar emphysema was observed in both upper lobes."),
    ),
    "lung/pleural_effusion": (
        ("", "Pleural effusion was observed on the {side}, measuring {size} in its thickest part."),
        ("uncertainty", "Minimal pleural effusion was observed on the {side} (?)."),
        (
            "cross_anatomy",
            "Pleural effusion was observed on the {side}, possibly due to cardiac failure.",
        ),
    ),  # fmt: skip
    "lung/atelectasis": (
        ("", "Linear atelectasis is observed in the {lobe}."),
        ("morphology", "Subsegmental atelectasis was observed in the lingular segment."),
        ("uncertainty", "Possible atelectasis was observed in both lower lobes."),
    ),
    "lung/opacity": (("", "Ground-glass densities were observed in both lower lobes."),),
    "heart/cardiomegaly": (
        ("", "The heart size has increased (cardiomegaly)."),
        ("morphology", "Left atrial enlargement was observed."),
    ),
    "heart/pericardial_effusion": (
        ("", "Pericardial effusion reaching {size} in its thickest part was observed."),
    ),
    "heart/coronary_calcification": (
        ("", "Calcific atheroma plaques were observed in the coronary arteries."),
    ),
    "aorta/calcification": (
        ("", "Atherosclerotic changes were observed in the aortic arch."),
        ("", "Calcific atheroma plaques were observed in the wall of the thoracic aorta."),
    ),
    "esophagus/hiatal_hernia": (("", "A sliding type hiatal hernia was observed."),),
    "liver/steatosis": (("", "Liver density has decreased (hepatosteatosis)."),),
    "liver/cyst": (
        ("", "A {size} hypodense lesion was observed in the liver, compatible with a cyst."),
    ),
    "gallbladder/gallstone": (("", "Gallstones were observed in the gallbladder lumen."),),
    "spleen/splenomegaly": (("", "Spleen size has increased (splenomegaly)."),),
    "pancreas/pancreatitis": (
        ("", "Edematous pancreas with peripancreatic fluid, consistent with pancreatitis."),
    ),
    "kidney/cyst": (("", "A {size} simple cyst was observed in the {side} kidney."),),
    "kidney/hydronephrosis": (("", "Grade 2 hydronephrosis was observed in the {side} kidney."),),
    "kidney/calculi": (("", "A {size} stone was observed in the {side} kidney."),),
    "urinary_bladder/stones": (("", "A {size} stone was observed in the urinary bladder."),),
}
# Impression phrases per disease key.
_IMPRESSION: dict[str, tuple[str, ...]] = {
    "lung/nodule": ("Pulmonary nodule.", "Nodule in the {lobe}."),
    "lung/emphysema": ("Emphysema.", "Emphysematous changes in both lungs."),
    "lung/pleural_effusion": ("Pleural effusion on the {side}.", "Pleural effusion on the {side}?"),
    "lung/atelectasis": ("Atelectasis.",),
    "lung/opacity": ("Ground-glass opacities in both lungs.",),
    "heart/cardiomegaly": ("Cardiomegaly.",),
    "heart/pericardial_effusion": ("Pericardial effusion.",),
    "heart/coronary_calcification": ("Coronary artery calcification.",),
    "aorta/calcification": ("Atherosclerotic changes in the aorta.",),
    "esophagus/hiatal_hernia": ("Hiatal hernia.",),
    "liver/steatosis": ("Hepatosteatosis.",),
    "liver/cyst": ("Hepatic cyst.",),
    "gallbladder/gallstone": ("Cholelithiasis.",),
    "spleen/splenomegaly": ("Splenomegaly.",),
    "pancreas/pancreatitis": ("Acute pancreatitis.",),
    "kidney/cyst": ("Renal cyst on the {side}.",),
    "kidney/hydronephrosis": ("Hydronephrosis on the {side}.",),
    "kidney/calculi": ("Nephrolithiasis on the {side}.",),
    "urinary_bladder/stones": ("Bladder stone.",),
}
# Impression sentences about normal anatomy (negated or normal wording).
_IMPRESSION_NORMAL = {
    "lung": "No pleural effusion.",
    "heart": "Heart size is normal.",
    "aorta": "The aorta is of normal caliber.",
    "kidney": "No hydronephrosis.",
}
_GLOBAL_IMPRESSIONS = (
    "The examination is within normal limits.",
    "No significant pathology was detected.",
)
_MISSING_IMPRESSIONS = ("Not given.", "")
_CHEST = ("lung", "heart", "esophagus", "trachea", "aorta", "pulmonary_artery")
_CHEST += ("thoracic_vertebrae", "rib")
_REGION_KEYS: dict[Region, tuple[str, ...]] = {
    "chest": (
        "lung/nodule", "lung/emphysema", "lung/pleural_effusion", "lung/atelectasis",
        "lung/opacity", "heart/cardiomegaly", "heart/pericardial_effusion",
        "heart/coronary_calcification", "aorta/calcification", "esophagus/hiatal_hernia",
    ),
    "abdomen": (
        "liver/steatosis", "liver/cyst", "gallbladder/gallstone", "spleen/splenomegaly",
        "pancreas/pancreatitis", "kidney/cyst", "kidney/hydronephrosis", "kidney/calculi",
        "urinary_bladder/stones", "aorta/calcification", "lung/pleural_effusion",
    ),
}  # fmt: skip
_PRESET: dict[Region, str] = {"chest": "chest", "abdomen": "paper"}


@dataclass(frozen=True)
class CorpusSentence:
    """One sentence of a corpus report and its ground truth.

    Attributes:
        section: ``findings`` or ``impression``.
        text: The sentence as written (with its window introduction, if any).
        evidence: The part that must reach the anatomy's text (the text less its introduction).
        anatomies: Anatomies of the table the sentence is about (empty: none).
        abnormal: Whether it describes an abnormality (uncertain ones included).
        failure: The failure class it exercises ("" for none).
    """

    section: str
    text: str
    evidence: str
    anatomies: tuple[str, ...]
    abnormal: bool
    failure: str = ""


@dataclass(frozen=True)
class CorpusReport:
    """A report, its sentences with ground truth, and the normal flag of every table anatomy."""

    report_id: str
    findings: str
    impression: str
    sentences: tuple[CorpusSentence, ...]
    normal: dict[str, bool]
    failures: frozenset[str] = field(default_factory=frozenset)


def _fields(finding: Finding, rng: np.random.Generator) -> dict[str, str]:
    side = finding.side if finding.side in ("left", "right") else "right"
    site = finding.site or ""
    lobe = LUNG_LOBES.get(site) or str(rng.choice(list(LUNG_LOBES.values())))
    return {"side": side, "size": f"{round(finding.size_mm or 8)} mm", "lobe": lobe}


def _choice(rng: np.random.Generator, options: Sequence) -> object:
    return options[int(rng.integers(len(options)))]


def write_ctrate_report(
    findings: Sequence[Finding],
    table: AnatomyTable,
    rng: np.random.Generator,
    region: Region = "chest",
    report_id: str = "",
    incidental: bool = True,
) -> CorpusReport:
    """A CT-RATE-style report of ``findings`` with per-sentence ground truth.

    Args:
        findings: The study's diseases (keys of :data:`_ABNORMAL`; others are not worded).
        table: Anatomy table: the ground truth names only its anatomies.
        rng: Random stream of this report.
        region: ``chest`` (CT-RATE) or ``abdomen``: which normal anatomies are described.
        report_id: Name of the report in the corpus.
        incidental: Also describe abnormalities that are not in ``findings`` (lymph nodes,
            catheters, a liver lesion named by the lung's level); the phantom, whose images
            show only ``findings``, turns this off.
    """
    names = set(table.names)
    sentences: list[CorpusSentence] = []
    failures: set[str] = set()

    def add(section: str, text: str, about: Sequence[str], abnormal: bool, failure: str) -> None:
        about = tuple(a for a in about if a in names)
        sentences.append(CorpusSentence(section, text, text, about, abnormal, failure))
        if failure:
            failures.add(failure)

    worded = [f for f in findings if f.key in _ABNORMAL]
    diseased = {f.anatomy for f in worded}
    for finding in worded:
        failure, template = _choice(rng, _ABNORMAL[finding.key])
        add("findings", template.format(**_fields(finding, rng)), [finding.anatomy], True, failure)
    described = _CHEST if region == "chest" else [*_CHEST[:2], *_NORMAL.keys() - set(_CHEST)]
    for anatomy in described:
        if anatomy not in diseased and anatomy in _NORMAL and rng.random() < 0.85:
            failure, text = _choice(rng, _NORMAL[anatomy])
            add("findings", text, [anatomy], False, failure)
    for failure, text in _NO_ANATOMY:
        if rng.random() < 0.5:
            add("findings", text, [], False, failure)
    for about, template in _CROSS[region]:
        if incidental and rng.random() < 0.25:
            text = template.format(size=f"{int(rng.integers(6, 25))} mm")
            add("findings", text, about, True, "cross_anatomy")
    order = rng.permutation(len(sentences))
    sentences = [sentences[int(i)] for i in order]
    # Lung sentences last, after a window introduction, as CT-RATE writes them.
    lung = [s for s in sentences if s.anatomies == ("lung",)]
    sentences = [s for s in sentences if s.anatomies != ("lung",)] + lung
    if lung and rng.random() < 0.7:
        intro = _choice(
            rng, ("When examined in the lung parenchyma window;", "In the lung window;")
        )
        first = lung[0]
        sentences[len(sentences) - len(lung)] = CorpusSentence(
            first.section, f"{intro} {first.text}", first.text, first.anatomies, first.abnormal,
            first.failure or "window_introduction",
        )  # fmt: skip
        failures.add("window_introduction")
    findings_text = " ".join(s.text for s in sentences)

    abnormal_about = {a for s in sentences if s.abnormal for a in s.anatomies}
    roll = rng.random()
    impression: list[CorpusSentence] = []
    if roll < 0.15:
        text = str(_choice(rng, _MISSING_IMPRESSIONS))
        failures.add("missing_impression")
    elif roll < 0.3 or not abnormal_about:
        text = str(_choice(rng, _GLOBAL_IMPRESSIONS))
        if abnormal_about:
            failures.add("global_impression")
    else:
        for finding in worded:
            if finding.anatomy in names:
                phrase = str(_choice(rng, _IMPRESSION[finding.key]))
                phrase = phrase.format(**_fields(finding, rng))
                failure = "uncertainty" if phrase.endswith("?") else ""
                impression.append(CorpusSentence(
                    "impression", phrase, phrase, (finding.anatomy,), True, failure
                ))  # fmt: skip
        if "liver" in abnormal_about - {f.anatomy for f in worded}:
            phrase = "Hypodense lesion in the liver."
            impression.append(CorpusSentence("impression", phrase, phrase, ("liver",), True))
        for anatomy, phrase in _IMPRESSION_NORMAL.items():
            if anatomy in names and anatomy not in abnormal_about and rng.random() < 0.3:
                impression.append(
                    CorpusSentence("impression", phrase, phrase, (anatomy,), False, "negation")
                )
        failures.update(s.failure for s in impression if s.failure)
        text = " ".join(s.text for s in impression)
    return CorpusReport(
        report_id=report_id,
        findings=findings_text,
        impression=text,
        sentences=tuple(sentences + impression),
        normal={name: name not in abnormal_about for name in table.names},
        failures=frozenset(failures),
    )


def _sample_findings(region: Region, rng: np.random.Generator) -> list[Finding]:
    keys = _REGION_KEYS[region]
    count = int(rng.choice([0, 1, 1, 2, 2, 3]))
    chosen = rng.choice(len(keys), size=count, replace=False)
    findings, anatomies = [], set()
    for i in sorted(int(i) for i in chosen):
        key = keys[i]
        if key.split("/")[0] in anatomies and rng.random() < 0.5:
            continue
        anatomies.add(key.split("/")[0])
        side = str(rng.choice(["left", "right"]))
        site = str(rng.choice(list(LUNG_LOBES))) if key.startswith("lung/") else None
        findings.append(Finding(key, side=side, size_mm=float(rng.integers(4, 40)), site=site))
    return findings


def report_corpus(
    n_reports: int = 200, region: Region = "chest", seed: int = 0
) -> tuple[AnatomyTable, list[CorpusReport]]:
    """A deterministic corpus of CT-RATE-style reports and the table they are labelled with.

    Args:
        n_reports: Number of reports.
        region: ``chest`` (chest preset, CT-RATE's anatomies) or ``abdomen`` (paper preset).
        seed: Seed of the corpus; report ``i`` depends on ``(seed, region, i)`` only.

    Raises:
        ValueError: On a negative count or an unknown region.
    """
    if n_reports < 0:
        raise ValueError(f"n_reports must be >= 0, got {n_reports}")
    if region not in _PRESET:
        raise ValueError(f"region must be 'chest' or 'abdomen', got {region!r}")
    table = load_anatomy_table(_PRESET[region])
    stream = 0 if region == "chest" else 1
    reports = []
    for index in range(n_reports):
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream, index, 0xC7]))
        findings = _sample_findings(region, rng)
        reports.append(write_ctrate_report(findings, table, rng, region, f"{region}_{index:05d}"))
    return table, reports


class _Described(Protocol):
    text: str
    normal: bool


@dataclass
class Agreement:
    """Per-anatomy agreement of a decomposer with the corpus' ground truth.

    Attributes:
        normal: Anatomy -> (reports whose normal flag is right, reports).
        placement: Anatomy -> (right, counted) over the sentences that are about the anatomy or
            that the decomposer put in its text: right when both hold.
        errors: ``(report_id, anatomy, what)`` of every disagreement, for reading.
    """

    normal: Counter = field(default_factory=Counter)
    normal_total: Counter = field(default_factory=Counter)
    placement: Counter = field(default_factory=Counter)
    placement_total: Counter = field(default_factory=Counter)
    errors: list[tuple[str, str, str]] = field(default_factory=list)

    def rate(self, kind: Literal["normal", "placement"], anatomy: str | None = None) -> float:
        """Fraction right for one anatomy, or over all anatomies (1.0 when nothing counted)."""
        right, total = getattr(self, kind), getattr(self, f"{kind}_total")
        keys = list(total) if anatomy is None else [anatomy]
        counted = sum(total[k] for k in keys)
        return 1.0 if counted == 0 else sum(right[k] for k in keys) / counted


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def score_decomposition(
    reports: Sequence[CorpusReport],
    decompose: Callable[[str, str], Mapping[str, _Described]],
) -> Agreement:
    """Normal-flag agreement and evidence placement of ``decompose`` on ``reports``.

    Args:
        reports: Corpus reports (:func:`report_corpus`).
        decompose: ``(findings, impression) -> anatomy -> description`` with ``text`` and
            ``normal`` (e.g. ``lambda f, i: decomposer.decompose(f, i).anatomies``).
    """
    result = Agreement()
    for report in reports:
        described = decompose(report.findings, report.impression)
        texts = {name: _words(d.text) for name, d in described.items()}
        for name, truth in report.normal.items():
            result.normal_total[name] += 1
            if described[name].normal == truth:
                result.normal[name] += 1
            else:
                result.errors.append((report.report_id, name, f"normal should be {truth}"))
        for sentence in report.sentences:
            evidence = _words(sentence.evidence)
            for name, text in texts.items():
                placed, about = evidence in text, name in sentence.anatomies
                if placed or about:
                    result.placement_total[name] += 1
                    if placed and about:
                        result.placement[name] += 1
                    else:
                        what = "missing" if about else "misplaced"
                        result.errors.append((report.report_id, name, f"{what}: {sentence.text}"))
    return result
