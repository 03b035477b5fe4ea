"""``ReportGenerationModule``: report generation from a pre-trained 3D encoder (paper Tab. 3).

The encoder is the vision tower of an fVLM or CLIP checkpoint (read weights-only through
:func:`fvlm.checkpoint.load_network`) or a random ViT; under the ``frozen`` protocol only the
visual projection and the decoder learn, under ``finetune`` the encoder too. ``fvlm fit`` trains
with the LM loss; ``fvlm test`` generates a report per test study and logs the language metrics
and, with a clinical classifier and the data module's disease labels, the clinical accuracy.
:func:`report_demo` trains and scores random / CLIP / fVLM encoders in both generation modes on the
phantom and prints a Tab. 3-like table (``make demo-report``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from fvlm.checkpoint import load_network
from fvlm.clinical_classifier import ClinicalClassifier, classifier_scores
from fvlm.data_modules.collate import finish_crops
from fvlm.data_modules.study_dataset import CachedStudyDataset, cache_hu_window, whole_report_text
from fvlm.lit_modules.contrastive import adamw
from fvlm.models import MINILM, VisionConfig
from fvlm.models.anatomy_pooling import AnatomyPooling
from fvlm.models.intensity_windows import check_source_window
from fvlm.models.text import load_tokenizer
from fvlm.models.vision import VisionTransformer3D
from fvlm.preprocess.cache import StudyCache
from fvlm.report_generation import (
    GenerationMode,
    ReportGenerator,
    assemble_report,
    build_decoder,
    new_anatomy_pooling,
    target_vocabulary,
)
from fvlm.report_metrics import clinical_accuracy, language_scores

__all__ = ["ReportGenerationModule", "encoder_arguments", "load_encoder", "report_demo"]

Protocol = Literal["frozen", "finetune"]
OutputVocabulary = Literal["targets", "full"]


def load_encoder(
    checkpoint: str | None, vision: VisionConfig | None, num_anatomies: int
) -> tuple[VisionTransformer3D, AnatomyPooling | None]:
    """The 3D ViT of an fvlm checkpoint, or a random one, and the checkpoint's anatomy pooling.

    The pooling comes from fVLM and co-teaching checkpoints; CLIP and random encoders have none.

    Raises:
        ValueError: The checkpoint is unreadable or refused (see :func:`load_network`), or an fVLM
            checkpoint was trained on an anatomy table of another length than the data's.
    """
    if checkpoint is None:
        return VisionTransformer3D(vision), None
    trained = load_network(checkpoint)
    trained_anatomies = int(trained.hparams.get("num_anatomies", 0) or 0)
    if trained.kind == "fine_grained" and num_anatomies and trained_anatomies != num_anatomies:
        raise ValueError(
            f"{checkpoint}: trained on an anatomy table of {trained_anatomies} anatomies, but "
            f"the data's table has {num_anatomies}; use the table the encoder was trained with"
        )
    pooling = getattr(trained.network, "pooling", None)
    return trained.network.vision, pooling if isinstance(pooling, AnatomyPooling) else None


class ReportGenerationModule(LightningModule):
    """Trains and scores a :class:`~fvlm.report_generation.ReportGenerator`.

    Args:
        num_anatomies: Length of the anatomy table (linked from the data module).
        vision: Shape of a random encoder (ignored with ``encoder_checkpoint``, whose own shape
            is used).
        anatomy_pooling: Anatomy mode: ``{"embed_dim": E, "num_heads": h}`` of the anatomy
            pooling; filled in at construction (an fVLM checkpoint's own, else the encoder's
            width and heads) and saved in the hyper-parameters, so a checkpoint or exported
            folder rebuilds the same module without the encoder checkpoint.
        text_model: Decoder weights and vocabulary (linked from the data module's tokenizer, so
            the targets are tokenised with the decoder's vocabulary).
        encoder_checkpoint: An fvlm training checkpoint whose vision tower is the encoder;
            ``None`` is random initialisation.
        protocol: ``frozen`` (encoder fixed) or ``finetune`` (encoder trained too), as Tab. 3.
        encoder_lr_scale: ``finetune``: the pre-trained encoder's (and anatomy pooling's)
            learning rate as a fraction of the optimiser's; 1.0 trains all at one rate.
        mode: ``whole`` report (paper) or ``anatomy``-wise generation.
        decoder_config: ``BertConfig`` fields of a random decoder (tests); overrides
            ``text_model``'s weights.
        decoder_layers: Keep the first ``k`` layers of the pretrained decoder (CPU demo).
        max_target_length: Target tokens trained on; longer reports are cut and counted.
        max_pairs: Anatomy-wise: (sample, anatomy) pairs trained per batch, abnormal first.
        max_new_tokens: Generation limit per report (whole) or per anatomy (anatomy-wise).
        output_vocabulary: ``targets``: the decoder's embeddings and LM head keep only the token
            ids of the training split's targets plus the special tokens, found at ``fit``
            setup (a few hundred on the phantom instead of 30,522); ``full``: all of them.
        vocabulary: The compact vocabulary's tokenizer ids; filled in at ``fit`` setup and saved
            in the hyper-parameters, so a checkpoint rebuilds the same decoder.
        memory_pool: Whole mode: average each ``(d, h, w)`` block of visual tokens into one
            memory token (CPU demo); ``None`` reads every token (the paper).
        cache_features: Frozen protocol only: encode each study once and reuse its visual
            tokens in every later epoch and at test time. The training studies are then read
            with the evaluation's deterministic centre crop (no random crop or flip), so one
            study always has one set of tokens.
        num_beams: 1 decodes greedily, more by beam search.
        clinical_classifier: Directory of a saved :class:`ClinicalClassifier`; with the data
            module's ``labels`` it gives the clinical accuracy at test time.
        results_file: JSON file the test scores and generated reports are written to.
        optimizer: Optimiser factory over the trained parameters.
    """

    def __init__(
        self,
        num_anatomies: int = 0,
        vision: VisionConfig | None = None,
        anatomy_pooling: dict[str, int] | None = None,
        text_model: str = MINILM,
        encoder_checkpoint: str | None = None,
        protocol: Protocol = "frozen",
        encoder_lr_scale: float = 1.0,
        mode: GenerationMode = "whole",
        decoder_config: dict | None = None,
        decoder_layers: int | None = None,
        max_target_length: int = 256,
        max_pairs: int | None = 64,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        output_vocabulary: OutputVocabulary = "full",
        vocabulary: list[int] | None = None,
        memory_pool: tuple[int, int, int] | None = None,
        cache_features: bool = False,
        clinical_classifier: str | None = None,
        results_file: str | None = None,
        optimizer: OptimizerCallable = adamw,
    ) -> None:
        super().__init__()
        if protocol not in ("frozen", "finetune"):
            raise ValueError(f"protocol must be 'frozen' or 'finetune', got {protocol!r}")
        if output_vocabulary not in ("targets", "full"):
            raise ValueError(
                f"output_vocabulary must be 'targets' or 'full', got {output_vocabulary!r}"
            )
        if encoder_lr_scale <= 0:
            raise ValueError(f"encoder_lr_scale must be > 0, got {encoder_lr_scale}")
        if cache_features and protocol != "frozen":
            raise ValueError("cache_features needs protocol 'frozen' (a trained encoder changes)")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.tokenizer = load_tokenizer(text_model)
        encoder, pooling = load_encoder(encoder_checkpoint, vision, num_anatomies)
        pretrained = pooling is not None and mode == "anatomy"
        if mode == "anatomy" and pooling is None:
            pooling = new_anatomy_pooling(encoder, num_anatomies, **(anatomy_pooling or {}))
        self.generator = ReportGenerator(
            encoder,
            build_decoder(text_model, decoder_config, decoder_layers),
            num_anatomies=num_anatomies,
            pooling=pooling if mode == "anatomy" else None,
            pooling_pretrained=pretrained,
            mode=mode,
            frozen=protocol == "frozen",
            bos_token_id=self.tokenizer.cls_token_id,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            max_target_length=max_target_length,
            max_pairs=max_pairs,
            vocabulary=vocabulary if output_vocabulary == "targets" else None,
            unk_token_id=self.tokenizer.unk_token_id,
            memory_pool=memory_pool,
        )
        if self.generator.pooling is not None:
            self.hparams.anatomy_pooling = {
                "embed_dim": int(self.generator.pooling.proj_weight.shape[-1]),
                "num_heads": int(self.generator.pooling.num_heads),
            }
        self.outputs: list[dict[str, str]] = []
        self.features: dict[str, torch.Tensor] = {}  # study id -> visual tokens (cache_features)

    def setup(self, stage: str) -> None:
        """Check the cache's HU window; at ``fit``, fix training crops and the vocabulary.

        A cache whose HU window differs from the one the encoder was trained on is refused.
        """
        datamodule = getattr(self._trainer, "datamodule", None)
        cache_dir = getattr(datamodule, "cache_dir", None)
        if cache_dir is not None:
            source = self.generator.encoder.config.source_hu_window
            check_source_window(source, cache_hu_window(cache_dir), cache_dir)
        train = getattr(datamodule, "datasets", {}).get("train") if stage == "fit" else None
        if train is None:
            return
        if self.hparams.cache_features:
            train.train = False  # the evaluation's centre crop: one crop, one set of tokens
        if self.hparams.output_vocabulary == "targets" and self.generator.vocabulary is None:
            vocabulary = self.training_vocabulary(train)
            self.generator.use_vocabulary(vocabulary)
            self.hparams.vocabulary = vocabulary

    def training_vocabulary(self, dataset: CachedStudyDataset) -> list[int]:
        """The compact output vocabulary: token ids of the split's targets of this mode."""
        whole = self.generator.mode == "whole"
        limit = self.hparams.max_target_length
        targets = []
        for study in dataset.study_ids:
            report = dataset.cache.study_report(study)
            texts = [whole_report_text(report)] if whole else dataset.read_texts(report, study)[0]
            targets += self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        t = self.tokenizer
        return target_vocabulary(
            targets, (t.cls_token_id, t.sep_token_id, t.pad_token_id, t.unk_token_id)
        )

    def visual_tokens(self, batch: dict) -> torch.Tensor | None:
        """The batch's cached visual tokens, encoding the studies not seen yet; ``None`` when off.

        Frozen features of a study never change, so after its first batch the encoder is skipped.
        """
        if not self.hparams.cache_features:
            return None
        studies = list(batch["study_id"])
        new = [i for i, study in enumerate(studies) if study not in self.features]
        if new:
            with torch.no_grad():
                tokens = self.generator.visual_tokens(batch["image"][new])
            for i, row in zip(new, tokens, strict=True):
                self.features[studies[i]] = row.clone()
        return torch.stack([self.features[study] for study in studies])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finish the loader's raw crops on the device (float32, zero outside the volume)."""
        return finish_crops(batch)

    def _step(self, stage: str, batch: dict) -> torch.Tensor:
        tokens = self.visual_tokens(batch)
        out = self.generator(batch if tokens is None else {**batch, "visual_tokens": tokens})
        size = batch["image"].shape[0]
        for key in ("loss", "lm_loss", "normal_loss"):
            if key in out:
                self.log(f"{stage}/{key}", out[key], batch_size=size, prog_bar=key == "loss")
        stats = out["stats"]
        self.log(f"{stage}/empty_targets", float(stats.empty), reduce_fx="sum", batch_size=size)
        for key in ("truncated", "unknown"):
            value = float(getattr(stats, key))
            self.log(f"{stage}/{key}_targets", value, reduce_fx="sum", batch_size=size)
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Teacher-forced LM loss (anatomy-wise: plus the normal head's BCE)."""
        return self._step("train", batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The same loss on validation studies (generation is left to ``test``)."""
        self._step("val", batch)

    def generate_reports(
        self, batch: dict, anatomy_names: Sequence[str] | None = None
    ) -> list[str]:
        """One generated report per study of the batch.

        ``anatomy_names`` name the anatomies of anatomy-wise reports; default: the trainer's
        data module's (``fvlm generate`` passes its table's, having no trainer).
        """
        hp = self.hparams
        out = self.generator.generate(
            batch["image"], batch["anatomy"], max_new_tokens=hp.max_new_tokens,
            num_beams=hp.num_beams, visual_tokens=self.visual_tokens(batch), describe_normal=False,
        )  # fmt: skip
        texts = self.tokenizer.batch_decode(out["ids"], skip_special_tokens=True)
        if self.generator.mode == "whole":
            return [t.strip() for t in texts]
        size, count = batch["image"].shape[0], self.hparams.num_anatomies
        described: list[list[str | None]] = [[None] * count for _ in range(size)]
        normal = [[True] * count for _ in range(size)]
        for text, s, a, p in zip(
            texts, out["sample"].tolist(), out["anatomy"].tolist(), out["normal_prob"].tolist(),
            strict=True,
        ):  # fmt: skip
            described[s][a], normal[s][a] = text, p >= 0.5
        names = list(anatomy_names) if anatomy_names is not None else self._anatomy_names()
        return [assemble_report(d, n, names) for d, n in zip(described, normal, strict=True)]

    def _anatomy_names(self) -> list[str]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        names = getattr(datamodule, "anatomy_names", None)
        return list(names) if names else [f"anatomy {i}" for i in range(self.hparams.num_anatomies)]

    def on_test_epoch_start(self) -> None:
        """Start collecting generated reports."""
        self.outputs = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Generate the batch's reports and keep them with their study ids."""
        for study, text in zip(batch["study_id"], self.generate_reports(batch), strict=True):
            self.outputs.append({"study_id": study, "generated": text})

    def on_test_epoch_end(self) -> None:
        """Score the generated reports, log the scores and write ``results_file``."""
        datamodule = self.trainer.datamodule
        cache = StudyCache(datamodule.cache_dir)
        for row in self.outputs:
            report = cache.study_report(row["study_id"])
            parts = (report.get("findings"), report.get("impression"))
            row["reference"] = " ".join(p.strip() for p in parts if p and p.strip())
        generated = [row["generated"] for row in self.outputs]
        references = [row["reference"] for row in self.outputs]
        scores, notes = language_scores(generated, references)
        scores |= self._clinical(generated, [row["study_id"] for row in self.outputs], notes)
        for key, value in scores.items():
            if not math.isnan(value):
                self.log(f"test/{key}", value)
        if self.hparams.results_file:
            path = Path(self.hparams.results_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            result = {"scores": scores, "notes": notes, "reports": self.outputs}
            path.write_text(json.dumps(result, indent=1))
        self.scores, self.notes = scores, notes

    def _clinical(self, generated: list[str], studies: list[str], notes: list[str]) -> dict:
        labels = getattr(self.trainer.datamodule, "disease_labels", None)
        if self.hparams.clinical_classifier is None or labels is None:
            notes.append("clinical accuracy: skipped (needs clinical_classifier and data labels)")
            return {}
        reader = ClinicalClassifier.load(self.hparams.clinical_classifier)
        missing = [d for d in reader.diseases if d not in labels.columns]
        if missing:
            raise ValueError(f"the labels file has no column for classifier diseases {missing}")
        truth = torch.tensor(labels.loc[studies, reader.diseases].fillna(0).to_numpy())
        return clinical_accuracy(reader.predict(generated), truth, reader.diseases)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the file loadable with ``weights_only=True`` (``fvlm test --ckpt_path``)."""
        hparams = checkpoint.get("hyper_parameters", {})
        if isinstance(hparams.get("vision"), VisionConfig):
            hparams["vision"] = dataclasses.asdict(hparams["vision"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimiser over the trained parameters (the frozen encoder has none).

        Under ``finetune`` the pre-trained parameters (the encoder, and an fVLM checkpoint's
        anatomy pooling) form their own group at ``encoder_lr_scale`` times the learning rate.
        """
        generator = self.generator
        pretrained = list(generator.encoder.parameters())
        if generator.pooling is not None and generator.pooling_pretrained:
            pretrained += list(generator.pooling.parameters())
        ids = {id(p) for p in pretrained}
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        old = [p for p in pretrained if p.requires_grad]
        scale = float(self.hparams.encoder_lr_scale)
        groups = [{"params": new}] + ([{"params": old, "lr_scale": scale}] if old else [])
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        return optimizer


def train_phantom_classifier(
    cache_dir: str, labels: str, directory: str, text_model: str = MINILM, epochs: int = 6
) -> dict[str, float]:
    """Fine-tune the clinical classifier on the cache's training reports; score it on ``val``.

    Returns the classifier's own macro precision / recall / F1 on the validation reports.
    """
    import pandas as pd

    cache = StudyCache(cache_dir)
    frame = pd.read_csv(labels, dtype={"study_id": str}).set_index("study_id")
    diseases = list(frame.columns)

    def split(name: str) -> tuple[list[str], torch.Tensor]:
        ids = [s for s in cache.ok_studies(name) if s in frame.index]
        texts = []
        for study in ids:
            report = cache.study_report(study)
            parts = (report.get("findings"), report.get("impression"))
            texts.append(" ".join(p.strip() for p in parts if p and p.strip()))
        return texts, torch.tensor(frame.loc[ids, diseases].fillna(0).to_numpy())

    reader = ClinicalClassifier(diseases, text_model=text_model)
    reader.fit(*split("train"), epochs=epochs, lr=1e-4)
    texts, truth = split("val")
    scores = classifier_scores(reader.predict(texts), truth, diseases)
    reader.save(directory)
    Path(directory, "scores.json").write_text(json.dumps(scores, indent=1))
    return scores


def encoder_arguments(entry: str) -> tuple[str, list[str]]:
    """A table row's name and the CLI arguments that build its encoder.

    ``random`` is a random ViT; ``name=<checkpoint>`` the vision tower of an fvlm checkpoint;
    ``name=init_from:<source>`` a random-shaped ViT inflated from 2D weights at construction
    (``VisionConfig.init_from``: a local file or a timm name such as ``vit_base_patch16_224.mae``,
    the paper's "MAE-inflated" encoder; offline without a cached copy it fails with a clear
    error).
    """
    name, _, source = entry.partition("=")
    if not name:
        raise ValueError(
            f"encoder entry {entry!r} has no name (random | name=ckpt | name=init_from:X)"
        )
    if not source:
        return name, []
    if source.startswith("init_from:"):
        return name, [f"--model.init_args.vision.init_from={source.removeprefix('init_from:')}"]
    return name, [f"--model.init_args.encoder_checkpoint={source}"]


TABLE_COLUMNS = ("acc_macro", "f1_macro", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l",
                 "cider")  # fmt: skip


def report_demo(
    cache_dir: str = "data/cache/phantom",
    labels: str = "data/phantom/labels.csv",
    encoders: Sequence[str] = (
        "random",
        "clip=runs/demo/clip/checkpoints/last.ckpt",
        "fvlm=runs/demo/fvlm/checkpoints/last.ckpt",
    ),
    modes: Sequence[str] = ("whole", "anatomy"),
    configs: Sequence[str] = ("configs/report_generation.yaml", "configs/demo_report.yaml"),
    out_dir: str = "runs/demo/report",
    overrides: Sequence[str] = (),
    threads: int | None = 1,
    classifier: str | None = None,
) -> str:
    """Train and test every (encoder, mode) under the frozen protocol; return the Tab. 3 table.

    Writes ``table.md`` and ``results.json`` (every row's scores and its generated reports next
    to their references) under ``out_dir``.

    Args:
        cache_dir: The phantom's preprocessing cache.
        labels: Its disease labels (the clinical classifier's training labels and ground truth).
        encoders: :func:`encoder_arguments` entries: ``random``, ``name=checkpoint`` or
            ``name=init_from:<2D weights>``.
        modes: Generation modes to compare.
        configs: LightningCLI configs of one run.
        out_dir: Where runs, the classifier, ``table.md`` and ``results.json`` go.
        overrides: Extra LightningCLI arguments for every run (e.g. ``--trainer.max_epochs=1``).
        threads: Torch intra-op threads of the report runs (1: the loader worker has the other
            core of 2, and small matrix products gain nothing from a second thread on a busy
            machine); ``None`` keeps torch's default, which the clinical classifier always uses
            (on 2 cores: 187 s instead of ~300 s with one thread).
        classifier: A trained clinical classifier's directory (with its ``scores.json``) to
            reuse; ``None`` trains one into ``out_dir/clinical_classifier`` unless it is there.
    """
    from fvlm.lit_modules.cli import run_cli

    out = Path(out_dir)
    classifier = Path(classifier) if classifier else out / "clinical_classifier"
    if not (classifier / "scores.json").is_file():
        scores = train_phantom_classifier(cache_dir, labels, str(classifier))
    else:
        scores = json.loads((classifier / "scores.json").read_text())
    if threads is not None:  # after the classifier, which has no loader worker beside it
        torch.set_num_threads(threads)
    lines = [
        f"clinical classifier (val reports): P {scores['precision_macro']:.3f} "
        f"R {scores['recall_macro']:.3f} F1 {scores['f1_macro']:.3f}",
        "| encoder | mode | ACC | F1 | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L "
        "| CIDEr | s |",
        "|---|---|" + "---|" * (len(TABLE_COLUMNS) + 1),
    ]
    results: dict[str, Any] = {"classifier": scores, "runs": {}}
    for entry in encoders:
        name, encoder_args = encoder_arguments(entry)
        for mode in modes:
            start, run = time.perf_counter(), out / f"{name}_{mode}"
            args = [f"--config={c}" for c in configs] + [
                f"--data.cache_dir={cache_dir}",
                f"--data.labels={labels}",
                f"--model.init_args.mode={mode}",
                f"--model.init_args.clinical_classifier={classifier}",
                f"--model.init_args.results_file={run / 'results.json'}",
                f"--trainer.default_root_dir={run}",
                *encoder_args,
                *overrides,
            ]
            cli = run_cli(["fit", *args])
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
            s, seconds = cli.model.scores, time.perf_counter() - start
            cells = " | ".join(f"{s.get(key, math.nan):.3f}" for key in TABLE_COLUMNS)
            lines.append(f"| {name} | {mode} | {cells} | {seconds:.0f} |")
            results["runs"][f"{name}_{mode}"] = {
                "scores": s, "notes": cli.model.notes, "seconds": seconds,
                "reports": cli.model.outputs,
            }  # fmt: skip
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return table


if __name__ == "__main__":  # pragma: no cover - `make demo-report`
    from jsonargparse import CLI

    print(CLI(report_demo, as_positional=False))
