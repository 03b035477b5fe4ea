"""A trained fVLM as a shareable folder, and the Python API to run it on one's own scans.

The pretrained folder (the Hugging Face Hub's file layout, so a folder can be pushed to and pulled
from the Hub unchanged)::

    model.safetensors   the evaluated network's weights (safetensors: tensors only, never pickle)
    config.json         network kind and build options, the anatomy table (full contents), the
                        preprocessing recipe, the training crop and the fvlm version
    tokenizer/          the text tower's tokenizer (JSON and text files)

Loading builds the network from ``config.json`` (the text backbone from its saved ``BertConfig``
fields, so no text weights are fetched), then loads ``model.safetensors``: nothing in the folder
is unpickled, and nothing is downloaded when the folder is local.

The *preprocessing recipe* is the ``settings`` entry every study's ``meta.json`` of the training
cache records (spacing, HU window, truncation margin, geometry and rescale rules, TotalSegmentator
version, anatomy-table fingerprint). :class:`FVLM` feeds a user's scan through exactly that
preprocessing (``fvlm.preprocess.runner`` on a one-study manifest) and embeds it with the crops
evaluation uses (:func:`~fvlm.evaluation.embedding.embed_studies`), so a scan is seen as the
training scans were. Example::

    from fvlm import FVLM

    model = FVLM.from_pretrained("runs/demo/pretrained")  # or FVLM.from_checkpoint("last.ckpt")
    emb = model.embed("ct.nii.gz", "ct_totalseg.nii.gz")  # one row per anatomy + validity
    findings = model.zero_shot(emb, queries=["liver: hepatic steatosis"])
    print(findings.sort_values("probability", ascending=False).head())
    model.save_pretrained("my_model")
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from fvlm import __version__
from fvlm.anatomy import (
    Anatomy,
    AnatomyTable,
    Disease,
    anatomy_table_from_dict,
    load_anatomy_table,
)
from fvlm.checkpoint import TrainedNetwork, load_network
from fvlm.models import NETWORK_KINDS, build_network, load_tokenizer, network_options

if TYPE_CHECKING:
    from fvlm.evaluation.embedding import StudyEmbeddings
    from fvlm.preprocess.runner import RunSummary

__all__ = [
    "CONFIG_NAME",
    "MASK_HELP",
    "FORMAT_VERSION",
    "FVLM",
    "PREDICT_SPLIT",
    "TOKENIZER_DIR",
    "WEIGHTS_NAME",
    "Scan",
    "export",
    "ScanEmbeddings",
    "parse_query",
    "preprocess_scans",
    "nifti_reference",
    "scan_id",
    "stage_scan",
    "read_folder_config",
    "recipe_from_cache",
    "table_to_dict",
    "training_recipe",
    "write_heatmaps",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "fvlm-pretrained"
FORMAT_VERSION = 1
PREDICT_SPLIT = "predict"
"""Split name of the scans in the cache :class:`FVLM` preprocesses them into."""

_ZERO_SHOT_KINDS = ("fine_grained", "global")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
_GLOBAL_QUERY_ANATOMIES = ("scan", "global", "whole scan")


@dataclass(frozen=True)
class Scan:
    """One scan to preprocess: an image (NIfTI file or DICOM series folder) and its label map.

    Attributes:
        study_id: Row label of the outputs (letters, digits, ``._+-``).
        image: NIfTI file, or a DICOM series folder.
        mask: TotalSegmentator label map on the image's grid; ``None`` when TotalSegmentator runs.
    """

    study_id: str
    image: Path
    mask: Path | None = None


@dataclass(frozen=True)
class ScanEmbeddings:
    """Anatomy embeddings of one scan, as :meth:`FVLM.embed` returns them.

    Attributes:
        study_id: The scan's id.
        anatomies: Row names (the anatomy table's names; ``["scan"]`` for the CLIP baseline).
        embeddings: ``(A, E)`` float32 unit vectors; zero rows where not ``valid``.
        valid: ``(A,)`` the anatomy was embedded (whole in a crop, or larger than the crop).
        present: ``(A,)`` the label map holds the anatomy.
        status: ``(A,)`` :class:`~fvlm.evaluation.evaluability.AnatomyStatus` names.
    """

    study_id: str
    anatomies: list[str]
    embeddings: np.ndarray
    valid: np.ndarray
    present: np.ndarray
    status: list[str]

    def save(self, path: Path) -> Path:
        """Write the ``.npz``: ``embeddings``, ``valid``, ``present``, ``status``, ``anatomies``."""
        np.savez(
            path,
            anatomies=np.asarray(self.anatomies),
            embeddings=self.embeddings,
            valid=self.valid,
            present=self.present,
            status=np.asarray(self.status),
        )
        return path


# -- the anatomy table and the recipe as plain JSON --------------------------------------------


def _disease_dict(disease: Disease) -> dict[str, Any]:
    return {
        "name": disease.name,
        "label": disease.label,
        "terms": list(disease.terms),
        "sets": list(disease.sets),
    }


def _anatomy_dict(anatomy: Anatomy) -> dict[str, Any]:
    entry = {
        field.name: list(value) if isinstance(value, tuple) else value
        for field in dataclasses.fields(anatomy)
        if (value := getattr(anatomy, field.name)) is not None and field.name != "diseases"
    }
    return entry | {"diseases": [_disease_dict(d) for d in anatomy.diseases]}


def table_to_dict(table: AnatomyTable) -> dict[str, Any]:
    """The table in the YAML schema of ``fvlm.anatomy`` (so a custom table travels whole)."""
    return {
        "name": table.name,
        "anatomies": [_anatomy_dict(a) for a in table.anatomies],
        "global_diseases": [_disease_dict(d) for d in table.global_diseases],
    }


def _table_from_dict(data: Mapping[str, Any], where: Path) -> AnatomyTable:
    """Validate and load a table stored by :func:`table_to_dict` (the YAML schema's checks)."""
    try:
        return anatomy_table_from_dict(dict(data), str(where))
    except ValueError as err:
        raise ValueError(f"{where}: its anatomy table is invalid: {err}") from None


def recipe_from_cache(cache_dir: str | Path, table: AnatomyTable) -> dict[str, Any]:
    """The preprocessing ``settings`` a cache's studies were made with, checked against ``table``.

    Raises:
        ValueError: The cache has no ``ok`` study, its studies disagree, or they were grouped
            with another anatomy table.
    """
    from fvlm.preprocess.cache import StudyCache
    from fvlm.preprocess.config import table_fingerprint

    cache = StudyCache(cache_dir)
    if not cache.manifest_path.is_file():
        raise FileNotFoundError(f"{cache_dir}: no preprocessing cache (no manifest.csv)")
    studies = cache.ok_studies()
    if not studies:
        raise ValueError(f"{cache_dir}: the cache has no 'ok' study to read the recipe from")
    settings = cache.study_meta(studies[0]).get("settings")
    if not isinstance(settings, dict):
        raise ValueError(f"{cache_dir}: study {studies[0]!r} records no preprocessing settings")
    recorded = settings.get("anatomy_table", {}).get("sha256")
    if recorded != table_fingerprint(table):
        raise ValueError(
            f"{cache_dir}: the cache was grouped with anatomy table "
            f"{settings.get('anatomy_table', {}).get('name')!r}, not with {table.name!r} "
            f"({table.source}) that the model was trained with"
        )
    return settings


def parse_query(query: str, table: AnatomyTable) -> Disease:
    """``"liver: hepatic steatosis"`` -> a zero-shot disease of that anatomy (name or label).

    ``"scan: ..."`` asks the whole-scan embedding. The query text is the prompts' ``{term}``.
    """
    anatomy, colon, text = query.partition(":")
    anatomy, text = anatomy.strip().lower(), text.strip()
    if not colon or not anatomy or not text:
        raise ValueError(
            f"query {query!r}: write it as 'anatomy: finding', e.g. 'liver: steatosis'"
        )
    if anatomy in _GLOBAL_QUERY_ANATOMIES:
        name = None
    else:
        by_key = {a.name.lower(): a.name for a in table.anatomies} | {
            a.label.lower(): a.name for a in table.anatomies
        }
        if anatomy not in by_key:
            raise ValueError(
                f"query {query!r}: unknown anatomy {anatomy!r}; table {table.name!r} has "
                f"{', '.join(table.names)} (or 'scan' for the whole scan)"
            )
        name = by_key[anatomy]
    slug = _UNSAFE_ID_CHARS.sub("_", text.lower()).strip("_") or "query"
    return Disease(name=f"query:{slug}", label=text, anatomy=name, terms=(text,), sets=("query",))


def scan_id(path: Path) -> str:
    """A study id from a scan's file or folder name (extension dropped, unsafe characters ``_``)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _UNSAFE_ID_CHARS.sub("_", name).strip("_.") or "scan"


# -- the model ------------------------------------------------------------------------------------


class FVLM:
    """A trained fVLM (or CLIP baseline) with its anatomy table and preprocessing recipe.

    Args:
        trained: The network; ``hparams["text_model"]`` names its tokenizer.
        table: The anatomy table it was trained with.
        recipe: The preprocessing ``settings`` of its training cache.
        options: :func:`~fvlm.models.build_network` options that rebuild the network.
    """

    def __init__(
        self,
        trained: TrainedNetwork,
        table: AnatomyTable,
        recipe: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> None:
        self.trained = trained
        self.table = table
        self.recipe = dict(recipe)
        self.options = dict(options)
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def network(self) -> torch.nn.Module:
        """The network, in eval mode."""
        return self.trained.network

    @property
    def kind(self) -> str:
        """``fine_grained`` (fVLM) or ``global`` (CLIP)."""
        return self.trained.kind

    @property
    def crop_size(self) -> tuple[int, int, int]:
        """The training crop ``(d, h, w)`` in cache voxels that every forward pass uses."""
        return tuple(int(c) for c in self.network.vision.config.img_size)  # type: ignore[return-value]

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | Path,
        cache: str | Path | None = None,
        device: str = "cpu",
    ) -> FVLM:
        """A training checkpoint with the recipe of the cache it was trained on.

        Args:
            ckpt: A ``.ckpt`` of ``fvlm fit`` (read weights-only by
                :func:`~fvlm.checkpoint.load_network`).
            cache: The preprocessing cache of the training run; default: the checkpoint's
                ``data.cache_dir``.
            device: Where the weights go.
        """
        ckpt = Path(ckpt)
        trained = load_network(ckpt, device)
        if trained.kind not in _ZERO_SHOT_KINDS:
            raise ValueError(
                f"{ckpt}: a {trained.kind!r} network has no text tower to score findings with; "
                f"fvlm predict and the pretrained folder take {' or '.join(_ZERO_SHOT_KINDS)}"
            )
        data = _datamodule_hparams(ckpt)
        table_source = data.get("anatomy_table") or trained.hparams.get("anatomy_table") or "paper"
        table = load_anatomy_table(table_source)
        recipe = training_recipe(ckpt, cache, data, table)
        tokenizer = data.get("tokenizer") or trained.hparams.get("text_model")
        trained.hparams["text_model"] = tokenizer
        options = network_options(trained.hparams)
        return cls(trained, table, recipe, options)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str = "cpu") -> FVLM:
        """Load a pretrained folder: a local folder first, else a Hugging Face Hub repository id.

        Nothing is unpickled (safetensors and JSON only); a local folder needs no network.

        Raises:
            FileNotFoundError: Neither a folder nor a Hub id.
            ValueError: The folder is incomplete or its config and weights disagree (named).
        """
        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = _download(str(name_or_path))
        config, config_path = read_folder_config(folder, "an fvlm pretrained folder")
        weights = folder / WEIGHTS_NAME
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: not an fvlm pretrained config (format {FORMAT!r})")
        if int(config.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: format version {config['format_version']} is newer than this "
                f"fvlm {__version__} reads ({FORMAT_VERSION}); upgrade fvlm"
            )
        kind = config.get("network", {}).get("kind")
        if kind not in NETWORK_KINDS or kind not in _ZERO_SHOT_KINDS:
            raise ValueError(f"{config_path}: unknown network kind {kind!r}")
        table = _table_from_dict(config.get("anatomy_table") or {}, folder)
        recipe = dict(config.get("preprocessing") or {})
        _check_table(table, recipe, config["network"]["options"], kind, folder)
        options = dict(config["network"]["options"])
        tokenizer = str(folder / TOKENIZER_DIR)
        if options.get("text_config") is None:
            raise ValueError(f"{config_path}: network.options.text_config is missing")
        network = build_network(kind, **(options | {"text_model": tokenizer}))
        _load_weights(network, weights, folder)
        hparams = options | {"text_model": tokenizer}
        trained = TrainedNetwork(network=network.to(device).eval(), hparams=hparams, kind=kind)
        return cls(trained, table, recipe, options)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``tokenizer/`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt", "fvlm": __version__})
        load_tokenizer(self.trained.hparams["text_model"]).save_pretrained(folder / TOKENIZER_DIR)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fvlm_version": __version__,
            "network": {"kind": self.kind, "options": self._portable_options()},
            "crop_size": list(self.crop_size),
            "anatomy_table": table_to_dict(self.table),
            "preprocessing": self.recipe,
            "tokenizer": TOKENIZER_DIR,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    def _portable_options(self) -> dict[str, Any]:
        """Build options that need nothing outside the folder: the text tower from its config."""
        options = network_options(self.options)
        vision = dict(options.get("vision") or dataclasses.asdict(self.network.vision.config))
        vision |= {"init_from": None, "checkpoint_activations": False}
        for key in ("img_size", "patch_size", "source_hu_window"):
            if vision.get(key) is not None:
                vision[key] = list(vision[key])
        if vision.get("hu_windows") is not None:
            vision["hu_windows"] = [list(w) for w in vision["hu_windows"]]
        backbone = self.network.text.backbone.config
        if backbone.model_type != "bert":
            raise ValueError(
                f"save_pretrained: text backbone {backbone.model_type!r} is not BERT-family; "
                "only BertConfig text towers are rebuilt from the saved config"
            )
        text_config = {
            k: v
            for k, v in backbone.to_dict().items()
            if k not in ("architectures", "_name_or_path", "transformers_version")
        }
        return options | {
            "vision": vision,
            "text_config": text_config,
            "text_model": TOKENIZER_DIR,
            "text_gradient_checkpointing": False,
        }

    # -- running on scans -----------------------------------------------------------------------

    def preprocess(
        self,
        scans: Sequence[Scan],
        cache_dir: str | Path,
        segmenter: str = "precomputed",
        device: str = "cpu",
        workers: int = 1,
        progress: bool = False,
    ) -> RunSummary:
        """Preprocess ``scans`` into ``cache_dir`` with the model's recipe (split ``predict``)."""
        return preprocess_scans(
            scans, cache_dir, self.recipe, self.table, segmenter, device, workers, progress
        )

    def embed_cache(
        self, cache_dir: str | Path, batch_size: int = 4, progress: bool = False
    ) -> StudyEmbeddings:
        """Embed the ``predict`` split of a cache :meth:`preprocess` wrote."""
        from fvlm.evaluation.embedding import embed_studies

        return embed_studies(
            self.trained, Path(cache_dir), PREDICT_SPLIT, self.table, batch_size, 0, progress
        )

    def scan_embeddings(
        self, studies: StudyEmbeddings, cache_dir: str | Path
    ) -> list[ScanEmbeddings]:
        """Per-scan :class:`ScanEmbeddings` of an :meth:`embed_cache` result."""
        from fvlm.evaluation.evaluability import AnatomyStatus
        from fvlm.preprocess.cache import StudyCache

        cache = StudyCache(cache_dir)
        out = []
        for s, study_id in enumerate(studies.study_ids):
            emb = studies.embeddings[s].float().numpy()
            if self.kind == "global":
                names, present = ["scan"], np.ones(1, dtype=bool)
                status = ["whole"]
            else:
                names = self.table.names
                bboxes = cache.bboxes(cache.study_meta(study_id), self.table, study_id)
                present = (bboxes[..., 1] > bboxes[..., 0]).all(axis=-1)
                status = [AnatomyStatus(int(v)).name.lower() for v in studies.status[s]]
            out.append(
                ScanEmbeddings(
                    study_id=study_id,
                    anatomies=list(names),
                    embeddings=emb,
                    valid=studies.valid[s].numpy().astype(bool),
                    present=np.asarray(present, dtype=bool),
                    status=status,
                )
            )
        return out

    def diseases(self, queries: Sequence[str] = ()) -> list[Disease]:
        """Every disease of the table, then one per query (:func:`parse_query`)."""
        return [*self.table.diseases(), *(parse_query(q, self.table) for q in queries)]

    @torch.no_grad()
    def score(
        self, embeddings: Sequence[ScanEmbeddings], queries: Sequence[str] = ()
    ) -> pd.DataFrame:
        """Zero-shot probabilities, one row per (scan, anatomy, disease), queries last.

        ``probability`` = softmax over {negative, positive} prompt logits (the zero-shot
        evaluation's score, :mod:`fvlm.evaluation.zero_shot`), NaN where the anatomy is not
        evaluable in the scan (absent, truncated by the field of view).
        """
        from fvlm.evaluation.zero_shot import zero_shot_scores

        diseases = self.diseases(queries)
        if not embeddings:
            return pd.DataFrame(columns=_SCORE_COLUMNS)
        image = torch.as_tensor(np.stack([e.embeddings for e in embeddings]))
        valid = torch.as_tensor(np.stack([e.valid for e in embeddings]))
        wide = zero_shot_scores(
            image, valid, self.encode_text, float(self.network.logit_scale()),
            self.table, diseases, mode="global" if self.kind == "global" else "fine",
            study_ids=[e.study_id for e in embeddings],
        )  # fmt: skip
        rows = [
            {
                "study_id": study_id,
                "anatomy": d.anatomy or "scan",
                "finding": d.label,
                "key": d.key,
                "query": "query" in d.sets,
                "probability": float(wide.loc[study_id, d.key]),
            }
            for study_id in wide.index
            for d in diseases
        ]
        return pd.DataFrame(rows, columns=_SCORE_COLUMNS)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``(M, E)`` text embeddings; each prompt is encoded once per loaded model.

        The prompts of the table's diseases (a few hundred) cost more than a scan's crops on a
        CPU, and they are the same for every scan: later scans and calls reuse them.
        """
        from fvlm.evaluation.run import text_encoder

        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            encoded = text_encoder(self.trained)(missing)
            self._text_cache.update(zip(missing, encoded, strict=True))
        return torch.stack([self._text_cache[t] for t in texts])

    def run(
        self,
        scans: Sequence[Scan],
        work_dir: str | Path,
        segmenter: str = "precomputed",
        batch_size: int = 4,
        progress: bool = False,
    ) -> tuple[list[ScanEmbeddings], dict[str, str]]:
        """Preprocess and embed ``scans``: the embeddings of those that worked, and failures.

        Returns:
            ``(embeddings, failed)`` with ``failed`` mapping study id -> one-line reason.
        """
        cache_dir = Path(work_dir) / "cache"
        summary = self.preprocess(scans, cache_dir, segmenter, progress=progress)
        failed = {r.study_id: r.reason for r in summary.results if r.status == "failed"}
        if len(failed) == len(scans):
            return [], failed
        studies = self.embed_cache(cache_dir, batch_size, progress)
        return self.scan_embeddings(studies, cache_dir), failed

    def embed(
        self,
        volume: str | Path | np.ndarray,
        anatomy_map: str | Path | np.ndarray | None = None,
        affine: np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
        segmenter: str = "precomputed",
    ) -> ScanEmbeddings:
        """Anatomy embeddings of one scan, preprocessed with the model's recipe.

        Args:
            volume: NIfTI file, DICOM series folder, or an array in HU.
            anatomy_map: TotalSegmentator label map on the volume's grid (file or array);
                ``None`` with ``segmenter="totalsegmentator"``.
            affine: The array's 4x4 voxel-to-world (RAS, mm) affine.
            spacing: Or just its voxel size (mm), axes taken as RAS.
            segmenter: ``precomputed`` (``anatomy_map``) or ``totalsegmentator``.

        Raises:
            ValueError: The scan failed preprocessing (the reason names the file).
        """
        with tempfile.TemporaryDirectory(prefix="fvlm-embed-") as tmp:
            scan = stage_scan(volume, anatomy_map, Path(tmp), affine, spacing)
            if scan.mask is None and segmenter == "precomputed":
                raise ValueError(f"{scan.image}: {MASK_HELP}")
            embeddings, failed = self.run([scan], tmp, segmenter)
        if failed:
            raise ValueError(failed[scan.study_id])
        return embeddings[0]

    def zero_shot(
        self,
        volume: str | Path | np.ndarray | ScanEmbeddings,
        anatomy_map: str | Path | np.ndarray | None = None,
        affine: np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
        queries: Sequence[str] = (),
    ) -> pd.DataFrame:
        """P(finding) per (anatomy, disease) of the table, plus ``queries`` (see :meth:`score`).

        ``volume`` may be an :meth:`embed` result (no second preprocessing).
        """
        if isinstance(volume, ScanEmbeddings):
            embeddings = volume
        else:
            embeddings = self.embed(volume, anatomy_map, affine, spacing)
        return self.score([embeddings], queries).drop(columns="study_id")

    def heatmap(
        self,
        volume: str | Path | np.ndarray,
        anatomy_map: str | Path | np.ndarray,
        query: str,
        out_dir: str | Path,
        affine: np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
    ) -> list[Path]:
        """Fig. 11 heatmap of ``query`` (``"anatomy: finding"``) written into ``out_dir``.

        Returns the files written (NIfTI aligned with the input, PNG overlays).
        """
        out_dir = Path(out_dir)
        with tempfile.TemporaryDirectory(prefix="fvlm-heatmap-") as tmp:
            scan = stage_scan(volume, anatomy_map, Path(tmp), affine, spacing)
            if scan.mask is None:
                raise ValueError(f"{scan.image}: {MASK_HELP}")
            summary = self.preprocess([scan], Path(tmp) / "cache")
            failed = [r.reason for r in summary.results if r.status == "failed"]
            if failed:
                raise ValueError(failed[0])
            written = write_heatmaps(
                self, Path(tmp) / "cache", scan.study_id, [parse_query(query, self.table)],
                out_dir, nifti_reference(scan.image),
            )  # fmt: skip
        if not written:
            raise ValueError(f"{scan.image}: {query!r}: no heatmap (anatomy not evaluable)")
        return next(iter(written.values()))[1]


def preprocess_scans(
    scans: Sequence[Scan],
    cache_dir: str | Path,
    recipe: Mapping[str, Any],
    table: AnatomyTable,
    segmenter: str = "precomputed",
    device: str = "cpu",
    workers: int = 1,
    progress: bool = False,
) -> RunSummary:
    """Preprocess ``scans`` into ``cache_dir`` (split ``predict``) with a training ``recipe``.

    Every model run on one's own scans (:class:`FVLM`, :mod:`fvlm.generate`) so sees them as its
    training cache's scans were made.
    """
    from fvlm.preprocess.config import PreprocessConfig
    from fvlm.preprocess.runner import run_preprocess

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = cache_dir.parent / f"{cache_dir.name}_scans.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "image", "mask", "findings", "impression", "split"])
        for scan in scans:
            mask = "" if scan.mask is None else str(Path(scan.mask).resolve())
            writer.writerow(
                [scan.study_id, str(Path(scan.image).resolve()), mask, "", "", PREDICT_SPLIT]
            )
    config = PreprocessConfig(
        manifest=manifest,
        cache=cache_dir,
        spacing=tuple(recipe["spacing"]),
        hu_window=tuple(recipe["hu_window"]),
        truncation_margin_mm=recipe.get("truncation_margin_mm", 3.0),
        geometry=recipe.get("geometry", "auto"),
        anatomy_table=table.name,
        segmenter=segmenter,  # type: ignore[arg-type]
        totalseg_fast=bool(recipe.get("totalseg_fast") or False),
        totalseg_device=device,
        totalseg_version=recipe.get("totalseg_version", "auto"),
        rescale=recipe.get("rescale", "auto"),
        decomposer="rules",
        require_report=False,
        workers=workers,
        progress=progress,
    )
    return run_preprocess(config, table=table)


_SCORE_COLUMNS = ["study_id", "anatomy", "finding", "key", "query", "probability"]

MASK_HELP = (
    "no anatomy masks: give a TotalSegmentator label map on the scan's grid (--mask FILE, or "
    "the 'mask' column of a manifest), or run TotalSegmentator (--segmenter totalsegmentator; "
    "needs its weights installed, see totalseg_download_weights / totalseg_import_weights)"
)


def read_folder_config(folder: Path, what: str) -> tuple[dict, Path]:
    """``config.json`` of a pretrained folder (fVLM or report generator) and its path.

    Raises:
        ValueError: The weights, config or tokenizer are missing, or the config is not JSON;
            ``what`` names the kind of folder expected.
    """
    config_path = folder / CONFIG_NAME
    for path in (config_path, folder / WEIGHTS_NAME, folder / TOKENIZER_DIR):
        if not path.exists():
            raise ValueError(f"{folder}: not {what} (no {path.name})")
    try:
        return json.loads(config_path.read_text()), config_path
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON: {err}") from None


def training_recipe(
    ckpt: Path, cache: str | Path | None, data: Mapping[str, Any], table: AnatomyTable
) -> dict:
    """The preprocessing recipe of a checkpoint's training cache, read from the cache's meta.

    ``cache`` overrides the cache the checkpoint's data hyper-parameters (``data``) record.

    Raises:
        ValueError: No cache recorded or given, or none readable there (both paths named).
    """
    cache_dir = cache if cache is not None else data.get("cache_dir")
    try:
        if cache_dir is None:
            raise FileNotFoundError("the checkpoint records no data.cache_dir")
        return recipe_from_cache(cache_dir, table)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{ckpt}: cannot read the preprocessing recipe from the training cache "
            f"(--cache {cache!r}, the checkpoint's data.cache_dir "
            f"{data.get('cache_dir')!r}): {err}"
        ) from None


def write_heatmaps(
    model: FVLM,
    cache_dir: Path,
    study_id: str,
    findings: Sequence[Disease],
    out_dir: Path,
    reference: Path | None = None,
) -> dict[str, tuple[Any, list[Path]]]:
    """Fig. 11 heatmaps of ``findings`` in one cached study (:mod:`fvlm.heatmap`).

    The heat of a finding is each anatomy token's zero-shot logit / logit scale: cosine to the
    finding's positive prompts minus cosine to its negative prompts (the prompts the scores use).
    Per finding: ``<anatomy>__<finding>.nii.gz`` (on the grid of ``reference``, the input NIfTI,
    else on the cache grid with its world affine) and a PNG of axial and coronal slices through
    the hottest voxel; a second finding of the same name (a query worded like a table finding)
    gets ``__2``. Whole-scan findings, the CLIP baseline and anatomies that are not
    evaluable in the scan have no heatmap and are skipped.

    Returns:
        ``{disease key: (AnatomyHeatmap, files written)}``.
    """
    from fvlm.evaluation.zero_shot import build_prompts
    from fvlm.heatmap import (
        AnatomyNotEvaluable,
        anatomy_heatmap,
        save_heatmap_nifti,
        save_heatmap_png,
    )

    if model.kind != "fine_grained":
        return {}
    findings = [d for d in findings if d.anatomy is not None]
    prompts = build_prompts(model.table, findings)
    written: dict[str, tuple[Any, list[Path]]] = {}
    for disease in findings:
        positive, negative = prompts[disease.key]
        try:
            heat = anatomy_heatmap(
                model.trained, cache_dir, study_id, disease.anatomy, positive, negative,
                table=model.table, label=disease.label,
            )  # fmt: skip
        except AnatomyNotEvaluable:
            continue
        stem = _UNSAFE_ID_CHARS.sub("_", f"{disease.anatomy}__{disease.label}".lower())
        taken = {path.name for _, paths in written.values() for path in paths}
        base, copy = stem, 1
        while f"{stem}.nii.gz" in taken:  # a query worded like a table finding: keep both
            copy += 1
            stem = f"{base}__{copy}"
        files = [
            save_heatmap_nifti(heat, out_dir / f"{stem}.nii.gz", reference),
            save_heatmap_png(heat, out_dir / f"{stem}.png"),
        ]
        written[disease.key] = (heat, files)
    return written


def stage_scan(
    volume: str | Path | np.ndarray,
    anatomy_map: str | Path | np.ndarray | None,
    folder: Path,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    study_id: str | None = None,
) -> Scan:
    """A :class:`Scan` of file paths; arrays are written as NIfTI into ``folder`` first."""
    import nibabel as nib

    if isinstance(volume, (str, Path)):
        image = Path(volume)
        if not image.exists():
            raise FileNotFoundError(f"{image}: no such scan")
        study_id = study_id or scan_id(image)
        grid = None
    else:
        array = np.asarray(volume)
        if array.ndim != 3:
            raise ValueError(f"volume: expected a 3D array, got shape {array.shape}")
        if affine is None:
            if spacing is None:
                raise ValueError("volume: an array needs its affine (or spacing, mm)")
            affine = np.diag([*(float(s) for s in spacing), 1.0])
        grid = np.asarray(affine, dtype=np.float64)
        study_id = study_id or "scan"
        image = folder / f"{study_id}.nii.gz"
        nib.save(nib.Nifti1Image(array.astype(np.float32), grid), image)
    mask: Path | None
    if anatomy_map is None:
        mask = None
    elif isinstance(anatomy_map, (str, Path)):
        mask = Path(anatomy_map)
        if not mask.is_file():
            raise FileNotFoundError(f"{mask}: no such label map")
    else:
        labels = np.asarray(anatomy_map)
        if grid is None:
            grid = nib.load(str(image)).affine if image.is_file() else None
        if grid is None:
            raise ValueError(f"{image}: an array label map needs an image file or an affine")
        mask = folder / f"{study_id}_mask.nii.gz"
        nib.save(nib.Nifti1Image(labels.astype(np.int16), grid), mask)
    return Scan(study_id=study_id, image=image, mask=mask)


def nifti_reference(image: Path) -> Path | None:
    """The input image as a grid to write heatmaps on (NIfTI files only, not DICOM folders)."""
    return image if image.is_file() and image.name.lower().endswith((".nii", ".nii.gz")) else None


def _datamodule_hparams(ckpt: Path) -> dict[str, Any]:
    """The training run's data options (``cache_dir``, ``anatomy_table``, ``tokenizer``)."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    data = checkpoint.get("datamodule_hyper_parameters") if isinstance(checkpoint, dict) else None
    return dict(data) if isinstance(data, Mapping) else {}


def _check_table(
    table: AnatomyTable,
    recipe: Mapping[str, Any],
    options: Mapping[str, Any],
    kind: str,
    folder: Path,
) -> None:
    from fvlm.preprocess.config import table_fingerprint

    recorded = (recipe.get("anatomy_table") or {}).get("sha256")
    if recorded != table_fingerprint(table):
        raise ValueError(
            f"{folder}: its anatomy table {table.name!r} is not the one of its preprocessing "
            "recipe (fingerprints differ): config.json was edited or assembled from two models"
        )
    count = options.get("num_anatomies")
    if kind == "fine_grained" and count != len(table):
        raise ValueError(
            f"{folder}: the weights are for {count} anatomies but its anatomy table "
            f"{table.name!r} has {len(table)}"
        )


def _load_weights(network: torch.nn.Module, weights: Path, folder: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: unreadable safetensors file: {err}") from None
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        reason = " ".join(line.strip() for line in first[:3])
        raise ValueError(
            f"{folder}: model.safetensors does not fit config.json: {reason}"
        ) from None


def _download(repo_id: str) -> Path:
    """A Hub repository's pretrained folder (``huggingface_hub``'s cache), or a clear error."""
    if not _HUB_ID.match(repo_id):
        raise FileNotFoundError(
            f"{repo_id}: neither a pretrained folder nor a Hugging Face Hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, f"{TOKENIZER_DIR}/*"]
        )
    except Exception as err:  # noqa: BLE001 - offline, missing repo, auth: all one message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{repo_id}: no local folder of that name, and the Hugging Face Hub download failed "
            f"({type(err).__name__}: {reason})"
        ) from None
    return Path(path)


def export(ckpt: Path, out: Path, cache: Path | None = None, device: str = "cpu") -> Path:
    """Turn a training checkpoint into a pretrained folder (safetensors + JSON, no pickle).

    The preprocessing recipe is read from the cache the model trained on (the checkpoint's
    ``data.cache_dir``; ``--cache`` overrides). Load the folder with
    ``FVLM.from_pretrained(out)`` or ``fvlm predict --model out``; a report-generation
    checkpoint's folder with ``fvlm generate --model out``.

    Args:
        ckpt: A ``.ckpt`` written by ``fvlm fit``.
        out: The folder to write (created; files of the same name are replaced).
        cache: The training run's preprocessing cache (default: the checkpoint's).
        device: Where the weights are loaded while exporting.
    """
    from fvlm.generate import PretrainedReportGenerator, is_report_generation_checkpoint

    if is_report_generation_checkpoint(ckpt):  # a report generator's folder (fvlm generate)
        return PretrainedReportGenerator.from_checkpoint(ckpt, cache, device).save_pretrained(out)
    return FVLM.from_checkpoint(ckpt, cache, device).save_pretrained(out)
