"""Typed settings of the preprocessing pipeline (``fvlm preprocess``).

One frozen dataclass: the command line (jsonargparse) is generated from it, so every option is
documented in ``--help`` and a bad value is rejected before any study is read. Only the settings
that change the cache's content enter :meth:`PreprocessConfig.fingerprint`; worker count and
progress display (and how a rerun verifies the cache, or whether fallbacks fail the run) do not, so
changing them never invalidates a cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from fvlm.anatomy import AnatomyTable

from .decomposition.llm import LLMConfig
from .geometry import MAX_OUTPUT_VOXELS, SPACING_RANGE_MM, GeometryRule
from .shards import Shard

__all__ = ["PIPELINE_VERSION", "LLMConfig", "PreprocessConfig", "table_fingerprint"]

# Bump when a code change alters cache content for the same settings: every study is redone.
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of one preprocessing run.

    Args:
        manifest: CSV with ``study_id, image, findings, impression[, mask][, split]``; paths
            relative to its folder.
        cache: Output folder (``studies/<id>/...`` and ``manifest.csv``); created if absent.
        spacing: Voxel size (mm) along the canonical axes (inferior->superior,
            posterior->anterior, left->right). Paper (abdomen): 5 x 1 x 1.
        hu_window: HU range mapped linearly to [0, 1], values outside clipped. Paper: -300..400.
        truncation_margin_mm: An anatomy whose mask comes within this many mm of a face of the
            original scan (before resampling) is recorded as truncated by the field of view in
            ``meta.json`` and is never valid in the loss (Sec. 3.2). 0 counts only masks that
            touch a face; a few mm also catch masks that stop just short of it, as segmentations
            near a cut often do.
        geometry: Where a volume's geometry comes from: ``auto`` = the NIfTI header unless it is
            uninformative (identity affine, zero or sheared columns, implausible spacing), then
            the manifest's metadata columns (``spacing``/CT-RATE's ``XYSpacing``, ``ZSpacing``,
            ...); ``header`` or ``metadata`` force one. Recorded per study in ``meta.json``.
        spacing_range_mm: Plausible voxel sizes (mm); a volume outside fails its study.
        max_output_voxels: Budget of a study's resampled grid; a larger one fails the study
            before anything is allocated (e.g. a spacing in the wrong unit).
        anatomy_table: Anatomy table preset (``paper``, ``chest``) or path to a YAML file.
        segmenter: ``precomputed`` reads the manifest's ``mask`` column (TotalSegmentator label
            maps on the image grid); ``totalsegmentator`` runs it (weights must be installed).
        totalseg_fast: TotalSegmentator's 3 mm ``--fast`` model instead of the 1.5 mm ensemble.
        totalseg_device: TotalSegmentator device: ``gpu``, ``gpu:N``, ``cpu`` or ``mps``.
        totalseg_version: Class map of precomputed masks: ``v1`` (104 classes, as in the paper),
            ``v2`` (117, TotalSegmentator 2) or ``auto`` (detected per mask, recorded in meta).
        rescale: External slope/intercept from the manifest (``rescale_slope``,
            ``rescale_intercept`` columns): ``auto`` applies them only to data not already in HU
            (detected from the air level, recorded in meta), ``always``/``never`` force it.
        decomposer: Report decomposition: ``rules`` (offline keywords) or ``llm`` (the paper's
            prompts on an OpenAI-compatible server, falling back to the rules per prompt).
        llm: LLM server settings, used when ``decomposer`` is ``llm``. Its answer cache defaults to
            ``<cache>/llm_answers``.
        require_report: Fail studies whose findings and impression are both empty. ``false``
            for test sets published without reports (Rad-ChestCT): their anatomies get the
            table's default texts, which zero-shot evaluation never reads.
        workers: Parallel worker processes (1 = all in this process). With ``totalsegmentator``
            on a GPU each worker loads its own model: a few workers per GPU at most.
        progress: Show a progress bar on stderr.
        force: Redo every study even if its inputs and settings are unchanged.
        verify: How a rerun checks an unchanged study's cache files before skipping it:
            ``checksum`` re-reads them for their CRC-32 (finds altered bytes), ``size`` compares
            sizes only (finds truncation, reads nothing). A damaged study is redone.
        fail_on_fallback: Exit with status 4 when the LLM decomposer fell back to the keyword
            rules for any anatomy (server unusable, timeouts, unparseable answers). Such studies
            are asked again on every later run with the LLM configured, either way.
        shard: ``K/N``: process only the studies of shard K of N (a hash of the study id), into
            the shared ``cache`` with this shard's own manifest; run all N (e.g. a SLURM array),
            then ``fvlm merge-shards``. ``None``: every study.
    """

    manifest: Path
    cache: Path
    spacing: tuple[float, float, float] = (5.0, 1.0, 1.0)
    hu_window: tuple[float, float] = (-300.0, 400.0)
    truncation_margin_mm: float = 3.0
    geometry: Literal["auto", "header", "metadata"] = "auto"
    spacing_range_mm: tuple[float, float] = SPACING_RANGE_MM
    max_output_voxels: int = MAX_OUTPUT_VOXELS
    anatomy_table: str = "paper"
    segmenter: Literal["precomputed", "totalsegmentator"] = "precomputed"
    totalseg_fast: bool = False
    totalseg_device: str = "gpu"
    totalseg_version: Literal["auto", "v1", "v2"] = "auto"
    rescale: Literal["auto", "always", "never"] = "auto"
    decomposer: Literal["rules", "llm"] = "rules"
    llm: LLMConfig = field(default_factory=LLMConfig)
    require_report: bool = True
    workers: int = 2
    progress: bool = True
    force: bool = False
    verify: Literal["checksum", "size"] = "checksum"
    fail_on_fallback: bool = False
    shard: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "manifest", Path(self.manifest))
        set_(self, "cache", Path(self.cache))
        set_(self, "spacing", tuple(float(s) for s in self.spacing))
        set_(self, "hu_window", tuple(float(v) for v in self.hu_window))
        set_(self, "spacing_range_mm", tuple(float(v) for v in self.spacing_range_mm))
        set_(self, "truncation_margin_mm", float(self.truncation_margin_mm))
        if isinstance(self.llm, dict):
            set_(self, "llm", LLMConfig(**self.llm))
        if self.decomposer == "llm" and self.llm.cache_dir is None:
            set_(self, "llm", replace(self.llm, cache_dir=self.cache / "llm_answers"))
        self._validate()

    def _validate(self) -> None:
        choices = {
            "segmenter": ("precomputed", "totalsegmentator"),
            "totalseg_version": ("auto", "v1", "v2"),
            "rescale": ("auto", "always", "never"),
            "decomposer": ("rules", "llm"),
            "geometry": ("auto", "header", "metadata"),
            "verify": ("checksum", "size"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window must be [low, high] with low < high, got {self.hu_window}")
        if not self.truncation_margin_mm >= 0:
            raise ValueError(
                f"truncation_margin_mm must be >= 0 (mm), got {self.truncation_margin_mm}"
            )
        low, high = self.spacing_range_mm
        if not 0 < low < high or self.max_output_voxels < 1:
            raise ValueError(
                f"spacing_range_mm must be [low, high] with 0 < low < high and max_output_voxels"
                f" >= 1, got {self.spacing_range_mm} and {self.max_output_voxels}"
            )
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.shard is not None:
            Shard.parse(self.shard)  # raises with the expected form

    @property
    def shard_spec(self) -> Shard | None:
        """The parsed ``shard`` option."""
        return None if self.shard is None else Shard.parse(self.shard)

    def settings(self, table: AnatomyTable) -> dict:
        """The settings that determine the cache content, as recorded in every ``meta.json``."""
        decomposer: dict = {"kind": self.decomposer}
        if self.decomposer == "llm":
            decomposer |= {
                "base_url": self.llm.base_url,
                "model": self.llm.model,
                "temperature": self.llm.temperature,
                "max_tokens": self.llm.max_tokens,
            }
        return {
            "pipeline_version": PIPELINE_VERSION,
            "spacing": list(self.spacing),
            "hu_window": list(self.hu_window),
            "truncation_margin_mm": self.truncation_margin_mm,
            "anatomy_table": {"name": table.name, "sha256": table_fingerprint(table)},
            "segmenter": self.segmenter,
            "geometry": self.geometry,
            "totalseg_fast": self.totalseg_fast if self.segmenter == "totalsegmentator" else None,
            "totalseg_version": self.totalseg_version,
            "rescale": self.rescale,
            "decomposer": decomposer,
        }

    @property
    def geometry_rule(self) -> GeometryRule:
        """How the volume loader decides and bounds each study's geometry."""
        return GeometryRule(
            self.geometry, self.spacing_range_mm, self.max_output_voxels, self.spacing
        )

    def fingerprint(self, table: AnatomyTable) -> str:
        """SHA-256 of :meth:`settings`: a study is redone when it changes."""
        return _sha256_json(self.settings(table))


def _sha256_json(value: object) -> str:
    payload = json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def table_fingerprint(table: AnatomyTable) -> str:
    """SHA-256 of what preprocessing uses from the table (ids, names, labels, classes, keywords).

    Disease lists are left out: editing the zero-shot diseases must not redo the cache.
    """
    return _sha256_json(
        [
            [a.id, a.name, a.label, list(a.totalseg_v1), list(a.totalseg_v2), list(a.keywords)]
            for a in table.anatomies
        ]
    )
