"""The anatomy table: one source of truth for grouped anatomies, their sources and their diseases.

Everything that speaks of an anatomy (mask grouping, report decomposition, the model's anatomy
queries, zero-shot prompts, the phantom) reads it from an :class:`AnatomyTable`, loaded from a
preset shipped with the package (``paper``, ``chest``) or from a user's YAML file of the same shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

__all__ = [
    "Anatomy",
    "AnatomyTable",
    "AnatomyTableError",
    "Disease",
    "PRESETS",
    "anatomy_table_from_dict",
    "keyword_pattern",
    "load_anatomy_table",
    "normalize_keyword",
    "totalsegmentator_classes",
]

PRESETS = ("paper", "chest")
TotalSegVersion = Literal["v1", "v2"]
_TOTALSEG_TASK = {"v1": "total_v1", "v2": "total"}
# Between the words of a multiword keyword: any run of spaces, line breaks or hyphens.
_GAP = r"[\s\-]+"
_WORD_CHAR = "A-Za-z0-9"


_GROUP_CHUNK = 1 << 23  # voxels grouped at a time by AnatomyTable.group(in_place=True)


class AnatomyTableError(ValueError):
    """A malformed anatomy file; the message names the file and the offending key."""


def totalsegmentator_classes(version: TotalSegVersion) -> dict[int, str]:
    """Class id -> name of TotalSegmentator's ``total`` task, from TotalSegmentator itself.

    v1 is the 104-class model the paper used, v2 the 117-class ``total`` task of TotalSegmentator 2.
    """
    from totalsegmentator.map_to_binary import class_map

    if version not in _TOTALSEG_TASK:
        raise ValueError(f"TotalSegmentator version must be 'v1' or 'v2', got {version!r}")
    return {int(k): v for k, v in class_map[_TOTALSEG_TASK[version]].items()}


def normalize_keyword(text: str) -> str:
    """Lower-case ``text`` and collapse spaces/hyphens, so that a match maps back to its keyword."""
    return re.sub(_GAP, " ", text.strip().lower())


def keyword_pattern(keywords: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive regex finding any of ``keywords`` as whole words.

    Report decomposition and the phantom's report wording must agree on what counts as a mention
    of an anatomy, so both compile their keywords here. Multiword keywords tolerate any run of
    spaces, line breaks or hyphens between their words ("small-bowel", "small bowel" across a
    line break). Alternatives are ordered longest first and Python's alternation takes the first
    that matches at a position, so matching is leftmost-longest: "pulmonary artery" is one match,
    not "pulmonary".

    Raises:
        ValueError: If ``keywords`` holds no non-blank keyword.
    """
    words = {normalize_keyword(k) for k in keywords} - {""}
    if not words:
        raise ValueError("keyword_pattern needs at least one non-blank keyword")
    ordered = sorted(words, key=lambda k: (-len(k), k))
    alternatives = "|".join(_GAP.join(map(re.escape, k.split(" "))) for k in ordered)
    return re.compile(
        rf"(?<![{_WORD_CHAR}])(?:{alternatives})(?![{_WORD_CHAR}])", flags=re.IGNORECASE
    )


@dataclass(frozen=True)
class Disease:
    """A finding evaluated zero-shot on one anatomy (or on the whole scan when ``anatomy`` is None).

    ``terms`` are the phrases prompts and the phantom's reports use; ``sets`` says which benchmarks
    evaluate it (``paper``: the paper's 54 diseases, ``ctrate``, ``phantom``).
    """

    name: str
    label: str
    anatomy: str | None
    terms: tuple[str, ...]
    sets: tuple[str, ...]

    @property
    def key(self) -> str:
        """Stable column name, e.g. ``liver/steatosis`` (``global/...`` for whole-scan diseases)."""
        return f"{self.anatomy or 'global'}/{self.name}"


@dataclass(frozen=True)
class Anatomy:
    """One grouped anatomy (a row of the paper's Tab. 6)."""

    id: int
    name: str
    label: str
    system: str
    totalseg_v1: tuple[str, ...]
    totalseg_v2: tuple[str, ...]
    keywords: tuple[str, ...]
    diseases: tuple[Disease, ...] = ()
    #: Faces of the scan (``inferior``/``superior``) where a cut is expected and does not make the
    #: anatomy incomplete: the aorta, esophagus or spine run beyond every chest or abdomen scan,
    #: and a report describes their part inside it. Other faces still count as truncation.
    open_ends: tuple[str, ...] = ()

    @property
    def default_text(self) -> str:
        """The paper's description of an anatomy the report does not mention."""
        return f"{self.label} shows no significant abnormalities."


@dataclass(frozen=True)
class AnatomyTable:
    """Ordered anatomies: index ``i`` of every ``(B, A, ...)`` tensor is ``anatomies[i]``."""

    name: str
    anatomies: tuple[Anatomy, ...]
    global_diseases: tuple[Disease, ...] = field(default=())
    source: str = ""

    def __len__(self) -> int:
        return len(self.anatomies)

    @property
    def names(self) -> list[str]:
        """Anatomy names in table order."""
        return [a.name for a in self.anatomies]

    @property
    def ids(self) -> list[int]:
        """Anatomy ids (values in anatomy label maps) in table order."""
        return [a.id for a in self.anatomies]

    def __getitem__(self, name: str) -> Anatomy:
        return self._by_name[name]

    def index(self, name: str) -> int:
        """Position of anatomy ``name`` along the anatomy axis of model tensors."""
        return self.names.index(name)

    @cached_property
    def _by_name(self) -> dict[str, Anatomy]:
        return {a.name: a for a in self.anatomies}

    def diseases(self, benchmark: str | None = None) -> list[Disease]:
        """All diseases (anatomy-level, then whole-scan), optionally only those of one benchmark."""
        found = [d for a in self.anatomies for d in a.diseases] + list(self.global_diseases)
        return [d for d in found if benchmark is None or benchmark in d.sets]

    def lookup(self, version: TotalSegVersion) -> np.ndarray:
        """Array ``lut`` with ``lut[totalseg_class_id] = anatomy id`` (0 where not grouped)."""
        classes = totalsegmentator_classes(version)
        by_name = {name: cid for cid, name in classes.items()}
        lut = np.zeros(max(classes) + 1, dtype=np.uint8)
        for anatomy in self.anatomies:
            for cls in getattr(anatomy, f"totalseg_{version}"):
                lut[by_name[cls]] = anatomy.id
        return lut

    def group(
        self, label_map: np.ndarray, version: TotalSegVersion, in_place: bool = False
    ) -> np.ndarray:
        """Turn a TotalSegmentator label map into a grouped anatomy-id map (uint8, same shape).

        Classes outside the table (e.g. skull, spinal cord) become background (0). ``in_place``
        overwrites a uint8 ``label_map`` with the result (the source map of a 512 x 512 x 300
        scan is 75 MiB that preprocessing no longer needs); other maps are grouped into a copy.
        """
        lut = self.lookup(version)
        labels = np.asarray(label_map)
        if labels.size and (labels.min() < 0 or labels.max() >= len(lut)):
            raise ValueError(
                f"label map holds class ids outside TotalSegmentator {version} "
                f"(range {labels.min()}..{labels.max()}, expected 0..{len(lut) - 1})"
            )
        flat = labels.ravel(order="K")  # a view of any C- or Fortran-ordered map
        if in_place and labels.dtype == np.uint8 and np.may_share_memory(flat, labels):
            for start in range(0, flat.size, _GROUP_CHUNK):  # temporaries of one chunk
                part = flat[start : start + _GROUP_CHUNK]
                part[...] = lut[part]
            return labels
        if labels.dtype.kind != "u":  # an unsigned map indexes the table as it is (no copy)
            labels = labels.astype(np.int64)
        return lut[labels]

    def validate(self) -> None:
        """Check ids, names and TotalSegmentator class names; raise :class:`AnatomyTableError`."""
        where = self.source or self.name
        seen_ids: set[int] = set()
        seen_names: set[str] = set()
        for anatomy in self.anatomies:
            if not 1 <= anatomy.id <= 255:
                raise AnatomyTableError(f"{where}: anatomy {anatomy.name!r}: id must be in 1..255")
            if anatomy.id in seen_ids or anatomy.name in seen_names:
                raise AnatomyTableError(f"{where}: anatomy {anatomy.name!r}: duplicate id or name")
            seen_ids.add(anatomy.id)
            seen_names.add(anatomy.name)
        for version in _TOTALSEG_TASK:
            known = set(totalsegmentator_classes(version).values())
            owner: dict[str, str] = {}
            for anatomy in self.anatomies:
                for cls in getattr(anatomy, f"totalseg_{version}"):
                    if cls not in known:
                        raise AnatomyTableError(
                            f"{where}: anatomy {anatomy.name!r}: totalseg_{version}: unknown "
                            f"TotalSegmentator class {cls!r}"
                        )
                    if cls in owner:
                        raise AnatomyTableError(
                            f"{where}: class {cls!r} is in both {owner[cls]!r} and {anatomy.name!r}"
                        )
                    owner[cls] = anatomy.name


def _require(entry: dict, key: str, kind: type, where: str) -> object:
    if not isinstance(entry, dict):
        raise AnatomyTableError(f"{where}: expected a mapping, got {type(entry).__name__}")
    if key not in entry:
        raise AnatomyTableError(f"{where}: missing key {key!r}")
    value = entry[key]
    if kind is list and value is None:
        return []
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AnatomyTableError(
            f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _strings(entry: dict, key: str, where: str) -> tuple[str, ...]:
    values = _require(entry, key, list, where)
    if not all(isinstance(v, str) for v in values):
        raise AnatomyTableError(f"{where}: key {key!r} must be a list of strings")
    return tuple(values)


def _disease(entry: dict, anatomy: str | None, where: str) -> Disease:
    name = _require(entry, "name", str, where)
    where = f"{where} ({name})"
    return Disease(
        name=name,
        label=str(entry.get("label", name.replace("_", " ").capitalize())),
        anatomy=anatomy,
        terms=_strings(entry, "terms", where),
        sets=_strings(entry, "sets", where),
    )


_OPEN_END_FACES = ("inferior", "superior")


def _open_ends(entry: dict, where: str) -> tuple[str, ...]:
    faces = _strings(entry, "open_ends", where) if "open_ends" in entry else ()
    unknown = sorted(set(faces) - set(_OPEN_END_FACES))
    if unknown:
        raise AnatomyTableError(f"{where}: open_ends {unknown} not in {list(_OPEN_END_FACES)}")
    return faces


def _anatomy(entry: dict, where: str) -> Anatomy:
    name = _require(entry, "name", str, where)
    where = f"{where} ({name})"
    diseases = entry.get("diseases") or []
    if not isinstance(diseases, list):
        raise AnatomyTableError(f"{where}: key 'diseases' must be a list")
    return Anatomy(
        id=_require(entry, "id", int, where),
        name=name,
        label=_require(entry, "label", str, where),
        system=str(entry.get("system", "")),
        totalseg_v1=_strings(entry, "totalseg_v1", where),
        totalseg_v2=_strings(entry, "totalseg_v2", where),
        keywords=_strings(entry, "keywords", where),
        open_ends=_open_ends(entry, where),
        diseases=tuple(
            _disease(d, name, f"{where}: diseases[{i}]") for i, d in enumerate(diseases)
        ),
    )


def load_anatomy_table(preset_or_path: str | Path = "paper") -> AnatomyTable:
    """Load a preset by name (``paper``, ``chest``) or a user's YAML file, validated.

    Errors name the file and the entry (``anatomies[3] (liver): missing key 'keywords'``).
    """
    if str(preset_or_path) in PRESETS:
        source = f"preset {preset_or_path!r}"
        text = resources.files("fvlm").joinpath(f"anatomy_presets/{preset_or_path}.yaml")
        raw = text.read_text()
    else:
        path = Path(preset_or_path)
        if not path.is_file():
            raise AnatomyTableError(
                f"anatomy table {str(path)!r} is neither a preset {PRESETS} nor an existing file"
            )
        source, raw = str(path), path.read_text()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise AnatomyTableError(f"{source}: not valid YAML: {err}") from err
    return anatomy_table_from_dict(data, source, Path(str(preset_or_path)).stem)


def anatomy_table_from_dict(data: object, source: str, default_name: str = "table") -> AnatomyTable:
    """Validate a table already parsed (the YAML schema; e.g. a pretrained folder's JSON).

    Errors name ``source`` and the entry, as :func:`load_anatomy_table`'s do.
    """
    anatomies = _require(data, "anatomies", list, source)
    if not anatomies:
        raise AnatomyTableError(f"{source}: 'anatomies' is empty")
    table = AnatomyTable(
        name=str(data.get("name", default_name)),
        anatomies=tuple(_anatomy(a, f"{source}: anatomies[{i}]") for i, a in enumerate(anatomies)),
        global_diseases=tuple(
            _disease(d, None, f"{source}: global_diseases[{i}]")
            for i, d in enumerate(data.get("global_diseases") or [])
        ),
        source=source,
    )
    table.validate()
    return table
