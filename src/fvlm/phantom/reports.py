"""Findings and impression texts that read like radiology reports of the drawn study.

The findings section describes many anatomies - normal ones in varied words, sometimes by a
sub-structure ("jejunal loops", "renal pelvis", "appendix") - plus every drawn disease with its side
and size; the impression lists only the diseases, one sentence per diseased anatomy, or a line
without any anatomy word when the study is normal. Sentence order is shuffled.

Report decomposition (paper Sec. 3.1, done here by keyword matching over the anatomy table)
must be able to recover the per-anatomy texts and the normal flags, so every candidate sentence
is checked against the table before use: a sentence about an anatomy must contain one of its
keywords and no keyword of any other anatomy; a sentence about no anatomy (or about one missing
from the table) must contain no keyword at all. The check is deliberately stricter than the
decomposer's leftmost-longest matcher: every keyword occurrence counts, overlapping or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fvlm.anatomy import AnatomyTable, keyword_pattern

from .findings import Finding
from .volume import LUNG_LOBES

__all__ = ["REPORT_STYLES", "KeywordIndex", "Report", "ReportStyle", "write_report"]

#: ``template``: the decomposable template reports above (the demo's); ``ctrate``: translated
#: English as CT-RATE writes it (:mod:`fvlm.phantom.report_corpus`).
ReportStyle = Literal["template", "ctrate"]
REPORT_STYLES: tuple[str, ...] = ("template", "ctrate")

#: Normal descriptions per anatomy of the table (paper preset names).
NORMAL: dict[str, tuple[str, ...]] = {
    "lung": (
        "The lungs are clear.",
        "No focal consolidation or suspicious nodule in either lung.",
        "The lung bases are clear.",
        "No pleural effusion or pneumothorax.",
        "The pulmonary parenchyma is unremarkable.",
        "Both lungs are well aerated without focal opacity.",
        "No suspicious pulmonary nodules.",
    ),
    "heart": (
        "Heart size is normal.",
        "No pericardial effusion.",
        "Normal cardiac size without pericardial effusion.",
        "The heart is not enlarged.",
        "Unremarkable heart and pericardium.",
    ),
    "aorta": (
        "The aorta is normal in caliber.",
        "No aortic aneurysm.",
        "Normal caliber abdominal aorta without atherosclerotic calcification.",
        "The thoracic aorta is unremarkable.",
        "Aorta of normal course and caliber.",
    ),
    "liver": (
        "The liver is normal in size and attenuation.",
        "Unremarkable liver.",
        "No focal hepatic lesion.",
        "Homogeneous hepatic parenchyma without focal abnormality.",
        "The liver enhances homogeneously.",
        "Normal liver size and contour.",
    ),
    "gallbladder": (
        "The gallbladder is unremarkable.",
        "No radiopaque gallstones.",
        "Normally distended gallbladder without wall thickening.",
        "Gallbladder is unremarkable.",
    ),
    "spleen": (
        "Unremarkable spleen.",
        "The spleen is normal in size.",
        "Normal splenic size and attenuation.",
        "Spleen within normal limits.",
    ),
    "pancreas": (
        "The pancreas is unremarkable.",
        "No peripancreatic inflammation.",
        "Normal pancreatic enhancement without ductal dilatation.",
        "Pancreas is normal in size and enhancement.",
    ),
    "kidney": (
        "The kidneys enhance symmetrically without hydronephrosis.",
        "No renal calculi.",
        "Both kidneys are normal in size and position.",
        "No hydronephrosis or nephrolithiasis.",
        "Normal renal pelvis and calyces bilaterally.",
        "Unremarkable kidneys without focal lesion.",
    ),
    "stomach": (
        "The stomach is unremarkable.",
        "Normal gastric wall thickness.",
        "The stomach is partially distended with fluid and gas.",
        "Unremarkable gastric antrum and fundus.",
    ),
    "small_bowel": (
        "No small bowel dilatation.",
        "Unremarkable duodenum and jejunal loops.",
        "The small bowel loops are normal in caliber.",
        "Normal caliber jejunum and ileum.",
        "The duodenum is unremarkable.",
    ),
    "colon": (
        "The colon is unremarkable.",
        "No colonic wall thickening.",
        "Normal appendix.",
        "Stool and gas within a non-dilated large bowel.",
        "The sigmoid colon is unremarkable.",
    ),
    "urinary_bladder": (
        "The urinary bladder is unremarkable.",
        "Bladder is moderately distended without wall thickening.",
        "Normal urinary bladder.",
    ),
    "esophagus": ("The esophagus is unremarkable.", "No esophageal wall thickening."),
    "trachea": ("The trachea is patent.", "Trachea is midline and patent."),
    "thoracic_vertebrae": (
        "No acute fracture of the thoracic spine.",
        "Vertebral body heights of the thoracic spine are maintained.",
    ),
    "lumbar_vertebrae": (
        "Vertebral body heights of the lumbar spine are maintained.",
        "No aggressive osseous lesion of the lumbar spine.",
    ),
    "rib": ("No rib fractures.", "The ribs are intact."),
    "iliopsoas": ("The psoas muscles are symmetric.", "Unremarkable iliopsoas muscles."),
    "autochthon": ("Paraspinal muscles are unremarkable.",),
    "inferior_vena_cava": ("The inferior vena cava is normal in caliber.",),
}
#: Probability that a normal anatomy is described at all (others: 0.35).
_MENTION = {
    **dict.fromkeys(
        ["lung", "heart", "liver", "kidney", "spleen", "pancreas", "gallbladder"], 0.95
    ),
    **dict.fromkeys(["stomach", "small_bowel", "colon", "urinary_bladder", "aorta"], 0.8),
}
#: Sentences about no anatomy (findings only).
GENERAL = (
    "No free air or free fluid.",
    "No pathologically enlarged lymph nodes.",
    "No suspicious osseous lesions.",
)
#: Impressions of a normal study (no anatomy word).
NORMAL_IMPRESSIONS = (
    "No acute abnormality.",
    "No acute findings.",
    "Unremarkable examination.",
    "No significant abnormality.",
    "No acute intrathoracic or intra-abdominal process.",
    "Normal study.",
)
#: Findings-section descriptions of each disease.
ABNORMAL: dict[str, tuple[str, ...]] = {
    "lung/emphysema": (
        "{Grade} centrilobular emphysema with scattered bullae in both lungs.",
        "Extensive emphysematous changes throughout both lungs with several bullae.",
        "The lungs are hyperlucent with {grade} emphysema and bullous changes.",
        "{Grade} paraseptal and centrilobular emphysema, most pronounced in the upper lobes.",
    ),
    "lung/pleural_effusion": (
        "{Grade} {side} pleural effusion layering dependently.",
        "There is a {grade} {side} pleural effusion with adjacent compressive atelectasis.",
        "{Grade} {side} pleural effusion at the lung base.",
    ),
    "lung/nodule": (
        "A {size} solid nodule in the {lobe}.",
        "There is a {size} noncalcified pulmonary nodule in the {lobe}.",
        "{Size} soft-tissue density nodule within the {lobe}.",
    ),
    "heart/cardiomegaly": (
        "The heart is enlarged.",
        "{Grade} cardiomegaly.",
        "Enlarged cardiac silhouette with dilated chambers.",
    ),
    "heart/pericardial_effusion": (
        "{Grade} circumferential pericardial effusion.",
        "A pericardial effusion measures up to {size} in thickness.",
        "Fluid in the pericardium up to {size} thick.",
    ),
    "kidney/cyst": (
        "A {size} simple cyst arises from the {site} of the {side} kidney.",
        "{Size} exophytic fluid-attenuation lesion of the {side} kidney, consistent with a simple "
        "renal cyst.",
        "There is a {size} Bosniak I cyst in the {site} of the {side} kidney.",
    ),
    "kidney/hydronephrosis": (
        "{Grade} {side} hydronephrosis with dilatation of the renal pelvis and calyces.",
        "Dilated {side} renal collecting system, in keeping with {grade} hydronephrosis.",
        "{Grade} {side} pelvicalyceal dilatation.",
    ),
    "kidney/calculi": (
        "A {size} calculus in the {site} of the {side} kidney.",
        "{Side} nephrolithiasis with a {size} stone in the {site}.",
        "A {size} dense nonobstructing calculus within the {side} kidney.",
    ),
    "liver/steatosis": (
        "Diffusely decreased attenuation of the liver, consistent with hepatic steatosis.",
        "The hepatic parenchyma is diffusely hypodense, in keeping with {grade} steatosis.",
        "{Grade} diffuse fatty infiltration of the liver.",
    ),
    "liver/cyst": (
        "A {size} well-circumscribed fluid-density cyst in hepatic {site}.",
        "{Size} simple hepatic cyst in {site}.",
        "There is a {size} nonenhancing hypodense lesion in the liver, compatible with a cyst.",
    ),
    "gallbladder/gallstone": (
        "{Count} calcified gallstone{s} in the gallbladder, {largest}measuring {size}.",
        "Cholelithiasis with a {size} dependent stone.",
        "The gallbladder contains {count} radiopaque stone{s} {upto} {size}.",
    ),
    "pancreas/pancreatitis": (
        "The pancreas is diffusely enlarged and edematous with peripancreatic fluid and fat "
        "stranding.",
        "Acute interstitial edematous pancreatitis with a peripancreatic fluid collection.",
        "Swollen, hypoenhancing pancreatic parenchyma surrounded by fluid.",
    ),
    "spleen/splenomegaly": (
        "The spleen is enlarged.",
        "{Grade} splenomegaly.",
        "{Grade} splenomegaly without focal splenic lesion.",
        "An enlarged spleen with homogeneous attenuation.",
    ),
    "urinary_bladder/stones": (
        "A {size} calculus in the dependent portion of the urinary bladder.",
        "{Size} vesical calculus.",
        "The bladder contains {count} dense stone{s} {upto} {size}.",
    ),
    "aorta/calcification": (
        "{Grade} atherosclerotic calcifications of the aortic wall.",
        "Calcified plaques along the abdominal aorta.",
        "{Grade} calcified atherosclerotic plaque of the thoracic and abdominal aorta.",
    ),
}
#: Impression phrases; ``{term}`` expands to each of the disease's ``terms`` in the table.
IMPRESSION: dict[str, tuple[str, ...]] = {
    "lung/emphysema": ("{term}", "{grade} emphysema", "centrilobular emphysema"),
    "lung/pleural_effusion": (
        "{term}",
        "{side} pleural effusion",
        "{grade} {side} pleural effusion",
    ),
    "lung/nodule": ("{term}", "{size} pulmonary nodule in the {lobe}", "{term} in the {lobe}"),
    "heart/cardiomegaly": ("{term}", "{grade} cardiomegaly"),
    "heart/pericardial_effusion": ("{term}", "{grade} pericardial effusion"),
    "kidney/cyst": ("{term}", "{side} renal cyst", "simple cyst of the {side} kidney"),
    "kidney/hydronephrosis": ("{term}", "{grade} {side} hydronephrosis"),
    "kidney/calculi": ("{term}", "{side} nephrolithiasis", "nonobstructing {side} renal calculus"),
    "liver/steatosis": ("{term}", "{grade} hepatic steatosis"),
    "liver/cyst": ("{term}", "simple hepatic cyst"),
    "gallbladder/gallstone": ("{term}", "cholelithiasis without cholecystitis"),
    "pancreas/pancreatitis": ("{term}", "acute pancreatitis", "acute pancreatitis with fluid"),
    "spleen/splenomegaly": ("{term}", "{grade} splenomegaly"),
    "urinary_bladder/stones": ("{term}", "{size} bladder calculus"),
    "aorta/calcification": (
        "{term}",
        "aortic atherosclerosis",
        "{grade} aortic wall calcification",
    ),
}
_COUNTS = {1: "a single", 2: "two", 3: "three", 4: "four"}


class KeywordIndex:
    """Which anatomies of a table a text mentions: case-insensitive whole-word keyword matches.

    Each anatomy's label and keywords are searched separately (overlapping matches all count) and
    multiword keywords tolerate spaces or hyphens between words - at least as strict as report
    decomposition, so a sentence that passes here maps to the same anatomy there.
    """

    def __init__(self, table: AnatomyTable) -> None:
        self.names = set(table.names)
        self._patterns = {
            anatomy.name: keyword_pattern((anatomy.label, *anatomy.keywords))
            for anatomy in table.anatomies
            if anatomy.keywords or anatomy.label
        }

    def anatomies(self, text: str) -> set[str]:
        """Names of the anatomies with a keyword in ``text``."""
        return {name for name, pattern in self._patterns.items() if pattern.search(text)}

    def fits(self, text: str, anatomy: str | None) -> bool:
        """Whether ``text`` is about exactly ``anatomy`` (or about no table anatomy at all)."""
        found = self.anatomies(text)
        if anatomy is None or anatomy not in self.names:
            return not found
        return found == {anatomy}


@dataclass(frozen=True)
class Report:
    """A report and, for checks, its sentences as ``(section, anatomy or None, text)``."""

    findings: str
    impression: str
    sentences: tuple[tuple[str, str | None, str], ...]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _size(mm: float | None, rng: np.random.Generator) -> str:
    mm = float(mm or 0.0)
    if mm >= 10 and rng.random() < 0.3:
        return f"{mm / 10:.1f} cm"
    return f"{round(mm)} mm"


def _fields(finding: Finding, rng: np.random.Generator) -> dict[str, str]:
    """Values for the template slots of one finding."""
    side = {"both": "bilateral"}.get(finding.side or "", finding.side or "")
    site = finding.site or ""
    fields = {
        "side": side,
        "grade": finding.grade or "moderate",
        "size": _size(finding.size_mm, rng),
        "site": site,
        "lobe": LUNG_LOBES.get(site, site),
        "count": _COUNTS.get(finding.count, str(finding.count)),
        "s": "" if finding.count == 1 else "s",
        "largest": "" if finding.count == 1 else "the largest ",
        "upto": "measuring" if finding.count == 1 else "up to",
    }
    fields.update({key.capitalize(): _capitalize(value) for key, value in list(fields.items())})
    return fields


def _pick(
    candidates: Sequence[str], anatomy: str | None, index: KeywordIndex, rng: np.random.Generator
) -> str | None:
    """A random candidate that :meth:`KeywordIndex.fits` the anatomy, or None."""
    for i in rng.permutation(len(candidates)):
        text = _capitalize(candidates[int(i)])
        if index.fits(text, anatomy):
            return text
    return None


def _impression(
    findings: Sequence[Finding], table: AnatomyTable, index: KeywordIndex, rng: np.random.Generator
) -> str:
    """One sentence naming all diseases of one anatomy ("Left nephrolithiasis and ...")."""
    anatomy = findings[0].anatomy
    terms = {d.key: d.terms for d in table.diseases()}
    phrases = []
    for finding in findings:
        fields = _fields(finding, rng)
        candidates = []
        for template in IMPRESSION[finding.key]:
            expansions = terms.get(finding.key, ()) if "{term}" in template else ("",)
            candidates += [template.format(term=term, **fields) for term in expansions]
        phrase = _pick(candidates, anatomy, index, rng)
        if phrase is None:
            raise ValueError(
                f"no impression phrase for {finding.key!r} mentions only {anatomy!r} under the "
                f"keywords of table {table.name!r}"
            )
        phrases.append(phrase if not phrases else phrase[:1].lower() + phrase[1:])
    if len(phrases) == 1:
        return f"{phrases[0]}."
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}."


def write_report(
    findings: Sequence[Finding],
    table: AnatomyTable,
    rng: np.random.Generator,
    style: ReportStyle = "template",
) -> Report:
    """Findings and impression of a study with these drawn diseases.

    Args:
        findings: The study's diseases as drawn (sizes and sides are reported).
        table: Anatomy table whose keywords the sentences are checked against.
        rng: The study's report random stream.
        style: ``template`` (one anatomy per sentence, diseases only in the impression) or
            ``ctrate`` (CT-RATE's translated English: missing and global impressions, negations,
            window introductions, sentences naming several anatomies).

    Returns:
        The report; in the template style, diseased anatomies are the only anatomies its
        impression mentions.

    Raises:
        ValueError: If a disease cannot be worded without another anatomy's keyword, or on an
            unknown style.
    """
    if style == "ctrate":
        from .report_corpus import write_ctrate_report  # the corpus imports this module

        region = "abdomen" if "liver" in table.names else "chest"
        written = write_ctrate_report(findings, table, rng, region, incidental=False)
        return Report(
            findings=written.findings,
            impression=written.impression,
            sentences=tuple(
                (s.section, s.anatomies[0] if s.anatomies else None, s.text)
                for s in written.sentences
            ),
        )
    if style != "template":
        raise ValueError(f"report style must be one of {REPORT_STYLES}, got {style!r}")
    index = KeywordIndex(table)
    sentences: list[tuple[str, str | None, str]] = []
    diseased: dict[str, list[Finding]] = {}
    for finding in findings:
        diseased.setdefault(finding.anatomy, []).append(finding)
    for anatomy, group in diseased.items():
        for finding in group:
            text = _pick(
                [t.format(**_fields(finding, rng)) for t in ABNORMAL[finding.key]],
                anatomy,
                index,
                rng,
            )
            if text is None:
                raise ValueError(
                    f"no findings sentence for {finding.key!r} fits table {table.name!r}"
                )
            sentences.append(("findings", anatomy, text))
    for anatomy, candidates in NORMAL.items():
        if anatomy in diseased or rng.random() >= _MENTION.get(anatomy, 0.35):
            continue
        text = _pick(candidates, anatomy, index, rng)
        if text is not None:
            sentences.append(("findings", anatomy, text))
    for _ in range(int(rng.integers(0, 3))):
        text = _pick(GENERAL, None, index, rng)
        if text is not None and all(text != s[2] for s in sentences):
            sentences.append(("findings", None, text))
    order = rng.permutation(len(sentences))
    sentences = [sentences[int(i)] for i in order]
    if diseased:
        impressions = [
            ("impression", anatomy, _impression(group, table, index, rng))
            for anatomy, group in diseased.items()
        ]
        impressions = [impressions[int(i)] for i in rng.permutation(len(impressions))]
    else:
        text = _pick(NORMAL_IMPRESSIONS, None, index, rng)
        impressions = [("impression", None, text or "No acute abnormality.")]
    return Report(
        findings=" ".join(s[2] for s in sentences),
        impression=" ".join(s[2] for s in impressions),
        sentences=tuple(sentences + impressions),
    )
