"""``fvlm generate``: a trained report generator writes a report per scan, or per cached study.

The report generator (:class:`~fvlm.lit_modules.report_generation.ReportGenerationModule`, paper
Sec. 4.3) travels as a folder laid out like the pretrained fVLM's (:mod:`fvlm.pretrained`)::

    model.safetensors   the module's state dict (encoder, visual memory, decoder): no pickle
    config.json         format "fvlm-report-generator": the module's hyper-parameters made
                        self-contained (the encoder from its VisionConfig, the decoder from its
                        BertConfig, the tokenizer folder), the anatomy table (full contents), the
                        training cache's preprocessing recipe and the crop size
    tokenizer/          the decoder's tokenizer

``fvlm export --ckpt report.ckpt --out folder`` writes it: ``fvlm export`` reads what a checkpoint
holds (weights-only) and dispatches, so one command turns every training checkpoint into its
folder. ``fvlm generate --model`` takes that folder or the ``.ckpt`` itself (as ``fvlm predict``).

Scans (a NIfTI, a DICOM folder, a folder of them, a CSV manifest; :func:`fvlm.predict.
collect_scans`) are preprocessed with the training cache's recipe by the function ``fvlm
predict`` uses (:func:`fvlm.pretrained.preprocess_scans`), then each report is generated from the
centred training-size crop the module's test loop reads (the data module's evaluation dataset).
``--cache DIR --split test`` reads cached studies directly and adds each one's reference report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from fvlm import __version__
from fvlm.anatomy import AnatomyTable, anatomy_table_from_dict, load_anatomy_table
from fvlm.checkpoint import NETWORK_KEY
from fvlm.pretrained import (
    CONFIG_NAME,
    PREDICT_SPLIT,
    TOKENIZER_DIR,
    WEIGHTS_NAME,
    preprocess_scans,
    read_folder_config,
    recipe_from_cache,
    table_to_dict,
    training_recipe,
)

if TYPE_CHECKING:
    from fvlm.lit_modules.report_generation import ReportGenerationModule

__all__ = [
    "FORMAT",
    "MODULE_CLASS",
    "PretrainedReportGenerator",
    "checkpoint_contents",
    "generate",
    "is_report_generation_checkpoint",
    "load_report_generator",
]

FORMAT = "fvlm-report-generator"
FORMAT_VERSION = 1
MODULE_CLASS = "fvlm.lit_modules.report_generation.ReportGenerationModule"
"""The module class of a report-generation checkpoint (LightningCLI's ``_class_path``)."""

_LIGHTNING_KEYS = ("_class_path", "_instantiator")  # LightningCLI's bookkeeping in hparams
_CONFIG_NOISE = ("architectures", "_name_or_path", "transformers_version")
_PREVIEW_CHARS = 100


# -- what a checkpoint holds --------------------------------------------------------------------


def _read(path: Path) -> Mapping[str, Any]:
    """The checkpoint through the project's weights-only reader (refuses Python objects)."""
    from fvlm.checkpoint import read_checkpoint

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return read_checkpoint(path)


def checkpoint_contents(checkpoint: Mapping[str, Any]) -> str:
    """What a training checkpoint holds: :data:`MODULE_CLASS` for a report generator, else words.

    The pre-training modules record their network kind; LightningCLI runs record the module class
    (``_class_path``); a report generator trained without the CLI is recognised by its state
    dict (its weights sit under ``generator.``).
    """
    network = checkpoint.get(NETWORK_KEY)
    if isinstance(network, Mapping):
        return f"an fVLM / CLIP pre-training checkpoint (network kind {network.get('kind')!r})"
    if checkpoint.get("fvlm_module"):
        return f"an fVLM / CLIP pre-training checkpoint ({checkpoint['fvlm_module']})"
    hparams = checkpoint.get("hyper_parameters")
    class_path = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    if isinstance(class_path, str):
        return class_path
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping) and any(str(k).startswith("generator.") for k in state):
        return MODULE_CLASS
    return "no fvlm training module (neither a report generator nor a pre-training network)"


def is_report_generation_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a :class:`ReportGenerationModule` checkpoint (read weights-only)."""
    return checkpoint_contents(_read(Path(path))) == MODULE_CLASS


# -- the model ----------------------------------------------------------------------------------


def _build_module(hparams: Mapping[str, Any], where: Path) -> ReportGenerationModule:
    """``ReportGenerationModule(**hparams)`` with the encoder shape as a ``VisionConfig``."""
    from fvlm.lit_modules.report_generation import ReportGenerationModule
    from fvlm.models import VisionConfig

    options = dict(hparams)
    if options.get("cache_features"):  # a training speed-up that would keep every study's tokens
        options["cache_features"] = False
    if isinstance(options.get("vision"), Mapping):
        vision = dict(options["vision"])
        for key in ("img_size", "patch_size", "source_hu_window"):
            if vision.get(key) is not None:
                vision[key] = tuple(vision[key])
        if vision.get("hu_windows") is not None:
            vision["hu_windows"] = [tuple(w) for w in vision["hu_windows"]]
        options["vision"] = VisionConfig(**vision)
    try:
        return ReportGenerationModule(**options)
    except (OSError, TypeError) as err:  # a missing encoder checkpoint or text model, an option
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where}: cannot rebuild the report generator: {reason}") from None


class PretrainedReportGenerator:
    """A trained report generator with the anatomy table and recipe of its training cache.

    Args:
        module: The trained module (eval mode).
        table: The anatomy table it was trained with (its label maps' meaning).
        recipe: The preprocessing ``settings`` of its training cache.
    """

    def __init__(
        self, module: ReportGenerationModule, table: AnatomyTable, recipe: Mapping[str, Any]
    ) -> None:
        count = int(module.hparams.num_anatomies)
        if count != len(table):
            raise ValueError(
                f"the report generator was trained on {count} anatomies but its anatomy table "
                f"{table.name!r} has {len(table)}"
            )
        self.module = module.eval()
        self.table = table
        self.recipe = dict(recipe)

    @property
    def crop_size(self) -> tuple[int, int, int]:
        """The training crop ``(d, h, w)`` in cache voxels the encoder reads."""
        return tuple(int(c) for c in self.module.generator.encoder.config.img_size)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return next(self.module.parameters()).device

    # -- loading and saving ---------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | Path, cache: str | Path | None = None, device: str = "cpu"
    ) -> PretrainedReportGenerator:
        """A report-generation ``.ckpt`` (read weights-only) with its training cache's recipe.

        The module is rebuilt as ``fvlm test --ckpt_path`` would (its encoder checkpoint and text
        model must be readable, as in training), then the file's weights are loaded.

        Args:
            ckpt: A ``.ckpt`` of ``fvlm fit --config configs/report_generation.yaml``.
            cache: Its training cache (default: the checkpoint's ``data.cache_dir``).
            device: Where the weights go.

        Raises:
            ValueError: The file is not a report generator (what it is, named), holds Python
                objects, or its weights, anatomy table or cache do not fit.
        """
        ckpt = Path(ckpt)
        checkpoint = _read(ckpt)
        contents = checkpoint_contents(checkpoint)
        if contents != MODULE_CLASS:
            hint = "; use fvlm predict for it" if "pre-training" in contents else ""
            raise ValueError(
                f"{ckpt}: not a report-generation checkpoint ({MODULE_CLASS}) but {contents}{hint}"
            )
        hparams, state = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
        if not isinstance(hparams, Mapping) or not isinstance(state, Mapping):
            raise ValueError(f"{ckpt}: checkpoint lacks 'hyper_parameters' or 'state_dict'")
        options = {k: v for k, v in hparams.items() if k not in _LIGHTNING_KEYS}
        options |= {"clinical_classifier": None, "results_file": None}
        encoder = options.get("encoder_checkpoint")
        if encoder and not Path(encoder).is_file():
            raise ValueError(
                f"{ckpt}: its encoder's shape is read from its encoder_checkpoint {encoder}, which "
                "is gone; export the .ckpt where that file exists (the exported folder needs it "
                "no more)"
            )
        module = _build_module(options, ckpt)
        try:
            module.load_state_dict(dict(state))
        except RuntimeError as err:
            reason = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
            raise ValueError(
                f"{ckpt}: weights do not fit the saved hyper-parameters: {reason}"
            ) from None
        data = checkpoint.get("datamodule_hyper_parameters")
        data = dict(data) if isinstance(data, Mapping) else {}
        table = load_anatomy_table(data.get("anatomy_table") or "paper")
        recipe = training_recipe(ckpt, cache, data, table)
        return cls._checked(module.to(device), table, recipe, ckpt)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> PretrainedReportGenerator:
        """Load an exported folder: safetensors and JSON only, nothing unpickled or downloaded.

        Raises:
            ValueError: Not a report-generator folder (an fVLM folder is named as such), a newer
                format, or its config, table and weights disagree.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from fvlm.preprocess.config import table_fingerprint

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such report-generator folder or checkpoint")
        config, config_path = read_folder_config(folder, "a report-generator folder")
        weights = folder / WEIGHTS_NAME
        if config.get("format") != FORMAT:
            raise ValueError(
                f"{config_path}: not a report-generator folder (format {config.get('format')!r}"
                f", not {FORMAT!r}); an fVLM pretrained folder runs with fvlm predict"
            )
        if int(config.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: format version {config['format_version']} is newer than this "
                f"fvlm {__version__} reads ({FORMAT_VERSION}); upgrade fvlm"
            )
        try:
            table = anatomy_table_from_dict(dict(config.get("anatomy_table") or {}), str(folder))
        except ValueError as err:
            raise ValueError(f"{folder}: its anatomy table is invalid: {err}") from None
        recipe = dict(config.get("preprocessing") or {})
        if (recipe.get("anatomy_table") or {}).get("sha256") != table_fingerprint(table):
            raise ValueError(
                f"{folder}: its anatomy table {table.name!r} is not the one of its preprocessing "
                "recipe (fingerprints differ): config.json was edited or assembled from two models"
            )
        hparams = dict(config.get("module", {}).get("hyper_parameters") or {})
        module = _build_module(hparams | {"text_model": str(folder / TOKENIZER_DIR)}, folder)
        try:
            load_model(module, weights, strict=True)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights}: unreadable safetensors file: {err}") from None
        except RuntimeError as err:
            reason = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
            raise ValueError(
                f"{folder}: model.safetensors does not fit config.json: {reason}"
            ) from None
        return cls._checked(module.to(device), table, recipe, folder)

    @classmethod
    def _checked(
        cls, module: ReportGenerationModule, table: AnatomyTable, recipe: Mapping, where: Path
    ) -> PretrainedReportGenerator:
        try:
            return cls(module, table, recipe)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``tokenizer/`` into ``folder``."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # save_model keeps one copy of tied tensors (the LM head shares the word embeddings).
        save_model(self.module, str(folder / WEIGHTS_NAME), metadata={"fvlm": __version__})
        self.module.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fvlm_version": __version__,
            "module": {"class": MODULE_CLASS, "hyper_parameters": self._portable_hparams()},
            "crop_size": list(self.crop_size),
            "anatomy_table": table_to_dict(self.table),
            "preprocessing": self.recipe,
            "tokenizer": TOKENIZER_DIR,
        }
        try:
            text = json.dumps(config, indent=2)
        except TypeError as err:
            raise ValueError(
                f"save_pretrained: a hyper-parameter is not plain JSON: {err}"
            ) from None
        (folder / CONFIG_NAME).write_text(text + "\n")
        return folder

    def _portable_hparams(self) -> dict[str, Any]:
        """Hyper-parameters that rebuild the module from the folder alone.

        The encoder is built from its own ``VisionConfig`` (not the encoder checkpoint it was
        loaded from), the decoder from its ``BertConfig`` (no text weights are fetched), and the
        test-time side files (clinical classifier, results file) are dropped.
        """
        generator = self.module.generator
        hparams = {k: v for k, v in self.module.hparams.items() if k not in _LIGHTNING_KEYS}
        vision = dataclasses.asdict(generator.encoder.config)
        vision |= {"init_from": None, "checkpoint_activations": False}
        return hparams | {
            "vision": vision,
            "encoder_checkpoint": None,
            "decoder_config": self._decoder_config(),
            "decoder_layers": None,
            "text_model": TOKENIZER_DIR,
            "clinical_classifier": None,
            "results_file": None,
        }

    def _decoder_config(self) -> dict[str, Any]:
        """The ``BertConfig`` fields the module's decoder was built from.

        Its ``decoder_config``, else its text model's config: the decoder before a compact output
        vocabulary cut it, which the module's ``vocabulary`` hyper-parameter cuts again.
        """
        from transformers import AutoConfig

        from fvlm.models.text import resolve_text_model

        hparams = self.module.hparams
        if hparams.get("decoder_config") is not None:
            return dict(hparams["decoder_config"])
        config = AutoConfig.from_pretrained(resolve_text_model(hparams["text_model"]))
        if config.model_type != "bert":
            raise ValueError(
                f"save_pretrained: decoder {config.model_type!r} is not BERT-family; only "
                "BertConfig decoders are rebuilt from the saved config"
            )
        if hparams.get("decoder_layers") is not None:
            config.num_hidden_layers = int(hparams["decoder_layers"])
        return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}

    # -- generating -----------------------------------------------------------------------------

    def generate_split(
        self, cache_dir: str | Path, split: str, batch_size: int = 4, progress: bool = False
    ) -> dict[str, str]:
        """One generated report per ``ok`` study of a cache split, from its centred crop.

        The crops are the module's test loop's (the data module's evaluation dataset and its
        collation), so a study reads the same voxels here as under ``fvlm test``.
        """
        from torch.utils.data import DataLoader

        from fvlm.data_modules.collate import collate_studies
        from fvlm.data_modules.study_dataset import CachedStudyDataset

        dataset = CachedStudyDataset(
            cache_dir, split, self.table, self.crop_size, train=False,
            tokenizer=str(self.module.hparams.text_model), flip_axes=(),
        )  # fmt: skip
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=functools.partial(collate_studies, pad_token_id=dataset.pad_token_id),
        )
        reports: dict[str, str] = {}
        bar = tqdm(total=len(dataset), desc="generate", unit="study", disable=not progress)
        with bar, torch.no_grad():
            for batch in loader:
                moved = {
                    k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()
                }
                texts = self.module.generate_reports(moved, self.table.names)
                reports.update(zip(batch["study_id"], texts, strict=True))
                bar.update(len(texts))
        return reports


def load_report_generator(
    model: str | Path, cache: str | Path | None = None, device: str = "cpu"
) -> PretrainedReportGenerator:
    """An exported folder, or a report-generation ``.ckpt`` with its training cache's recipe."""
    path = Path(model)
    if path.is_file():
        return PretrainedReportGenerator.from_checkpoint(path, cache, device)
    return PretrainedReportGenerator.from_pretrained(path, device)


# -- the command ----------------------------------------------------------------------------------


def generate(
    model: str,
    out: Path,
    scans: str | None = None,
    mask: str | None = None,
    segmenter: Literal["precomputed", "totalsegmentator"] = "precomputed",
    cache: str | None = None,
    split: str = "test",
    training_cache: str | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    work_dir: Path | None = None,
    progress: bool = True,
) -> int:
    """Write a radiology report per scan (or per study of a cache split) with a report generator.

    Examples: ``fvlm generate --model runs/report/pretrained --scans ct.nii.gz --mask seg.nii.gz
    --out reports.csv``; ``fvlm generate --model last.ckpt --cache data/cache/phantom --split
    test --out test_reports.jsonl``. One row per study: ``study_id``, ``generated`` (and
    ``image`` for scans, ``reference`` for a cache, ``error`` for a scan that failed). Exit
    status 1 when a scan failed, 0 otherwise.

    Args:
        model: Report-generator folder (``fvlm export`` of a report-generation checkpoint), or
            the ``.ckpt`` itself.
        out: Output table: ``.csv`` or ``.jsonl``.
        scans: One NIfTI file, one DICOM series folder, a folder of them, or a CSV manifest
            (``image`` column, optional ``study_id`` and ``mask``; paths relative to it).
        mask: TotalSegmentator label map on the scan's grid (one scan), or a folder of them named
            like the scans.
        segmenter: ``precomputed`` (``mask``/manifest masks) or ``totalsegmentator`` (runs it;
            its weights must be installed).
        cache: Instead of ``scans``: a preprocessing cache made with the model's recipe and
            anatomy table; its ``split`` studies are reported, with their reference reports.
        split: The cache split to report.
        training_cache: With a ``.ckpt``: its training cache, for the preprocessing recipe
            (default: the checkpoint's data.cache_dir).
        num_beams: Beam width (1: greedy); default: the model's.
        max_new_tokens: Generation limit; default: the model's.
        batch_size: Studies generated together (each decoding step is one batched pass).
        device: ``cpu`` or ``cuda``; also TotalSegmentator's device.
        work_dir: Keep the preprocessed scans here (default: a temporary folder).
        progress: Progress bars on stderr.
    """
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise ValueError(f"{out}: --out must end in .csv or .jsonl")
    if (scans is None) == (cache is None):
        raise ValueError("give either --scans (your own scans) or --cache DIR --split NAME")
    start = time.perf_counter()
    writer = load_report_generator(model, training_cache, device)
    hparams = writer.module.hparams
    if num_beams is not None:
        hparams.num_beams = int(num_beams)
    if max_new_tokens is not None:
        hparams.max_new_tokens = int(max_new_tokens)
    if cache is not None:
        _check_cache(writer, Path(cache), split)
        rows = _cache_rows(writer, Path(cache), split, batch_size, progress)
    else:
        rows = _scan_rows(writer, scans, mask, segmenter, device, batch_size, work_dir, progress)
    frame = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True, force_ascii=False)
    failed = frame[frame["error"] != ""] if "error" in frame else frame.iloc[:0]
    _print_summary(frame, failed, hparams, time.perf_counter() - start, out)
    return 1 if len(failed) else 0


def _check_cache(writer: PretrainedReportGenerator, cache: Path, split: str) -> None:
    """The cache must be made with the model's anatomy table, spacing and HU window."""
    from fvlm.models.intensity_windows import check_source_window
    from fvlm.preprocess.cache import StudyCache

    settings = recipe_from_cache(cache, writer.table)  # another anatomy table: named error
    for key in ("spacing", "hu_window"):
        theirs, ours = settings.get(key), writer.recipe.get(key)
        if theirs is not None and ours is not None and list(theirs) != list(ours):
            raise ValueError(
                f"{cache}: preprocessed with {key} {list(theirs)}, but the model was trained on "
                f"{key} {list(ours)}; preprocess it with the model's recipe (or give --scans)"
            )
    check_source_window(
        writer.module.generator.encoder.config.source_hu_window, StudyCache(cache).hu_window(),
        cache,
    )  # fmt: skip
    if not StudyCache(cache).ok_studies(split):
        counts = Counter((r.split, r.status) for r in StudyCache(cache).read_manifest())
        raise ValueError(
            f"{cache}: no 'ok' study in split {split!r}; (split, status) counts: {dict(counts)}"
        )


def _cache_rows(
    writer: PretrainedReportGenerator, cache: Path, split: str, batch_size: int, progress: bool
) -> list[dict[str, str]]:
    from fvlm.data_modules.study_dataset import whole_report_text
    from fvlm.preprocess.cache import StudyCache

    reports = writer.generate_split(cache, split, batch_size, progress)
    studies = StudyCache(cache)
    return [
        {"study_id": study, "generated": text,
         "reference": whole_report_text(studies.study_report(study))}
        for study, text in reports.items()
    ]  # fmt: skip


def _scan_rows(
    writer: PretrainedReportGenerator,
    scans: str,
    mask: str | None,
    segmenter: str,
    device: str,
    batch_size: int,
    work_dir: Path | None,
    progress: bool,
) -> list[dict[str, str]]:
    """Preprocess the scans as ``fvlm predict`` does, then generate; failed scans keep a row."""
    from fvlm.predict import plan_scans

    batch, todo, failed = plan_scans(scans, mask, segmenter, writer.recipe)
    reports: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fvlm-generate-") as tmp:
        cache_dir = Path(work_dir if work_dir is not None else tmp) / "cache"
        if todo:
            summary = preprocess_scans(
                todo, cache_dir, writer.recipe, writer.table, segmenter, device, progress=progress
            )
            failed |= {r.study_id: r.reason for r in summary.results if r.status == "failed"}
        if len(failed) < len(batch):
            reports = writer.generate_split(cache_dir, PREDICT_SPLIT, batch_size, progress)
    return [
        {"study_id": s.study_id, "image": str(s.image), "generated": reports.get(s.study_id, ""),
         "error": failed.get(s.study_id, "")}
        for s in batch
    ]  # fmt: skip


def _print_summary(
    frame: pd.DataFrame, failed: pd.DataFrame, hparams: Mapping[str, Any], seconds: float, out: Path
) -> None:
    done = frame.drop(failed.index)
    decoding = "greedy" if int(hparams["num_beams"]) == 1 else f"beam {hparams['num_beams']}"
    lines = [
        f"generate: {len(done)} of {len(frame)} studies in {seconds:.1f} s "
        f"({hparams['mode']} report, {decoding}, at most {hparams['max_new_tokens']} tokens); "
        f"written to {out}"
    ]
    if "reference" in done and len(done) and (done["reference"].str.strip() != "").all():
        lines.append(_scores_line(list(done["generated"]), list(done["reference"])))
    for row in done.head(3).itertuples():
        text = row.generated if len(row.generated) <= _PREVIEW_CHARS else (
            row.generated[: _PREVIEW_CHARS - 3] + "..."
        )  # fmt: skip
        lines.append(f"  {row.study_id}: {text}")
    print("\n".join(lines))
    for row in failed.itertuples():
        print(f"failed {row.study_id}: {row.error}", file=sys.stderr)


def _scores_line(generated: Sequence[str], references: Sequence[str]) -> str:
    """BLEU / ROUGE-L / CIDEr against the references (METEOR left to ``fvlm test``: Java)."""
    from fvlm.report_metrics import language_scores

    scores, _ = language_scores(generated, references, meteor=False)
    named = ("bleu1", "bleu4", "rouge_l", "cider")
    return "  against the references: " + ", ".join(
        f"{key} {scores[key]:.3f}" for key in named if key in scores
    )
