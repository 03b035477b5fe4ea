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
from fvlm.data_modules.study_dataset import cache_hu_window
from fvlm.lit_modules.contrastive import adamw
from fvlm.models import MINILM, VisionConfig
from fvlm.models.intensity_windows import check_source_window
from fvlm.models.text import load_tokenizer
from fvlm.models.vision import VisionTransformer3D
from fvlm.preprocess.cache import StudyCache
from fvlm.report_generation import GenerationMode, ReportGenerator, assemble_report, build_decoder
from fvlm.report_metrics import clinical_accuracy, language_scores

__all__ = ["ReportGenerationModule", "load_encoder", "report_demo"]

Protocol = Literal["frozen", "finetune"]


def load_encoder(
    checkpoint: str | None, vision: VisionConfig | None, num_anatomies: int
) -> VisionTransformer3D:
    """The 3D ViT of an fvlm checkpoint (fVLM, co-teaching, CLIP), or a random one.

    Raises:
        ValueError: The checkpoint is unreadable or refused (see :func:`load_network`), or an fVLM
            checkpoint was trained on an anatomy table of another length than the data's.
    """
    if checkpoint is None:
        return VisionTransformer3D(vision)
    trained = load_network(checkpoint)
    trained_anatomies = int(trained.hparams.get("num_anatomies", 0) or 0)
    if trained.kind == "fine_grained" and num_anatomies and trained_anatomies != num_anatomies:
        raise ValueError(
            f"{checkpoint}: trained on an anatomy table of {trained_anatomies} anatomies, but "
            f"the data's table has {num_anatomies}; use the table the encoder was trained with"
        )
    return trained.network.vision


class ReportGenerationModule(LightningModule):
    """Trains and scores a :class:`~fvlm.report_generation.ReportGenerator`.

    Args:
        num_anatomies: Length of the anatomy table (linked from the data module).
        vision: Shape of a random encoder (ignored with ``encoder_checkpoint``, whose own shape
            is used).
        text_model: Decoder weights and vocabulary (linked from the data module's tokenizer, so
            the targets are tokenised with the decoder's vocabulary).
        encoder_checkpoint: An fvlm training checkpoint whose vision tower is the encoder;
            ``None`` is random initialisation.
        protocol: ``frozen`` (encoder fixed) or ``finetune`` (encoder trained too), as Tab. 3.
        mode: ``whole`` report (paper) or ``anatomy``-wise generation.
        decoder_config: ``BertConfig`` fields of a random decoder (tests); overrides
            ``text_model``'s weights.
        decoder_layers: Keep the first ``k`` layers of the pretrained decoder (CPU demo).
        max_target_length: Target tokens trained on; longer reports are cut and counted.
        max_pairs: Anatomy-wise: (sample, anatomy) pairs trained per batch, abnormal first.
        max_new_tokens: Generation limit per report (whole) or per anatomy (anatomy-wise).
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
        text_model: str = MINILM,
        encoder_checkpoint: str | None = None,
        protocol: Protocol = "frozen",
        mode: GenerationMode = "whole",
        decoder_config: dict | None = None,
        decoder_layers: int | None = None,
        max_target_length: int = 256,
        max_pairs: int | None = 64,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        clinical_classifier: str | None = None,
        results_file: str | None = None,
        optimizer: OptimizerCallable = adamw,
    ) -> None:
        super().__init__()
        if protocol not in ("frozen", "finetune"):
            raise ValueError(f"protocol must be 'frozen' or 'finetune', got {protocol!r}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.tokenizer = load_tokenizer(text_model)
        self.generator = ReportGenerator(
            load_encoder(encoder_checkpoint, vision, num_anatomies),
            build_decoder(text_model, decoder_config, decoder_layers),
            num_anatomies=num_anatomies,
            mode=mode,
            frozen=protocol == "frozen",
            bos_token_id=self.tokenizer.cls_token_id,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            max_target_length=max_target_length,
            max_pairs=max_pairs,
        )
        self.outputs: list[dict[str, str]] = []

    def setup(self, stage: str) -> None:
        """Refuse a cache whose HU window differs from the one the encoder was trained on."""
        cache_dir = getattr(getattr(self._trainer, "datamodule", None), "cache_dir", None)
        if cache_dir is not None:
            source = self.generator.encoder.config.source_hu_window
            check_source_window(source, cache_hu_window(cache_dir), cache_dir)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Finish the loader's raw crops on the device (float32, zero outside the volume)."""
        return finish_crops(batch)

    def _step(self, stage: str, batch: dict) -> torch.Tensor:
        out = self.generator(batch)
        size = batch["image"].shape[0]
        for key in ("loss", "lm_loss", "normal_loss"):
            if key in out:
                self.log(f"{stage}/{key}", out[key], batch_size=size, prog_bar=key == "loss")
        stats = out["stats"]
        self.log(f"{stage}/empty_targets", float(stats.empty), reduce_fx="sum", batch_size=size)
        self.log(
            f"{stage}/truncated_targets", float(stats.truncated), reduce_fx="sum", batch_size=size
        )
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Teacher-forced LM loss (anatomy-wise: plus the normal head's BCE)."""
        return self._step("train", batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The same loss on validation studies (generation is left to ``test``)."""
        self._step("val", batch)

    def generate_reports(self, batch: dict) -> list[str]:
        """One generated report per study of the batch."""
        hp = self.hparams
        out = self.generator.generate(
            batch["image"], batch["anatomy"], max_new_tokens=hp.max_new_tokens,
            num_beams=hp.num_beams,
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
        names = self._anatomy_names()
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
        """The optimiser over the trained parameters (the frozen encoder has none)."""
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])


def train_phantom_classifier(
    cache_dir: str, labels: str, directory: str, text_model: str = MINILM, epochs: int = 4
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
) -> str:
    """Train and test every (encoder, mode) under the frozen protocol; return the Tab. 3 table.

    Args:
        cache_dir: The phantom's preprocessing cache.
        labels: Its disease labels (the clinical classifier's training labels and ground truth).
        encoders: ``random`` or ``name=checkpoint`` entries.
        modes: Generation modes to compare.
        configs: LightningCLI configs of one run.
        out_dir: Where runs, the classifier and ``table.md`` go.
        overrides: Extra LightningCLI arguments for every run (e.g. ``--trainer.max_epochs=1``).
    """
    from fvlm.lit_modules.cli import run_cli

    out = Path(out_dir)
    classifier = out / "clinical_classifier"
    if not (classifier / "scores.json").is_file():
        scores = train_phantom_classifier(cache_dir, labels, str(classifier))
    else:
        scores = json.loads((classifier / "scores.json").read_text())
    lines = [
        f"clinical classifier (val reports): P {scores['precision_macro']:.3f} "
        f"R {scores['recall_macro']:.3f} F1 {scores['f1_macro']:.3f}",
        "| encoder | mode | ACC | F1 | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in encoders:
        name, _, checkpoint = entry.partition("=")
        for mode in modes:
            start, run = time.perf_counter(), out / f"{name}_{mode}"
            args = [f"--config={c}" for c in configs] + [
                f"--data.cache_dir={cache_dir}",
                f"--data.labels={labels}",
                f"--model.init_args.mode={mode}",
                f"--model.init_args.clinical_classifier={classifier}",
                f"--model.init_args.results_file={run / 'results.json'}",
                f"--trainer.default_root_dir={run}",
                *([f"--model.init_args.encoder_checkpoint={checkpoint}"] if checkpoint else []),
                *overrides,
            ]
            cli = run_cli(["fit", *args])
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
            s = cli.model.scores
            lines.append(
                f"| {name} | {mode} | {s.get('acc_macro', math.nan):.3f} | "
                f"{s.get('f1_macro', math.nan):.3f} | {s['bleu1']:.3f} | {s['bleu4']:.3f} | "
                f"{s['meteor']:.3f} | {s['rouge_l']:.3f} | {s['cider']:.3f} | "
                f"{time.perf_counter() - start:.0f} |"
            )
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    return table


if __name__ == "__main__":  # pragma: no cover - `make demo-report`
    from jsonargparse import CLI

    print(CLI(report_demo, as_positional=False))
