"""Zero-shot evaluation of checkpoints on a preprocessing cache: scores, metrics and outputs.

The one code path of ``fvlm evaluate``, ``eval-ctrate`` and ``eval-radchestct``: each checkpoint's
network embeds the split's studies from crops of its training size
(:mod:`~fvlm.evaluation.embedding`), the prompts of each disease are scored against the anatomy's
embedding (fVLM) or the global one (CLIP), studies where the disease is not evaluable are left out
(:mod:`~fvlm.evaluation.evaluability`, counted), and the metrics, tables and plots are written.
Several checkpoints give one comparison table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from fvlm.anatomy import AnatomyTable, load_anatomy_table
from fvlm.checkpoint import TrainedNetwork, load_network
from fvlm.evaluation.ctrate import ctrate_label_map
from fvlm.evaluation.embedding import StudyEmbeddings, embed_studies, network_device
from fvlm.evaluation.embedding_map import plot_embedding_maps
from fvlm.evaluation.evaluability import (
    COUNT_COLUMNS,
    AbsentRule,
    Evaluability,
    count_definitions,
)
from fvlm.evaluation.linear_probe import format_probe, linear_probe, plot_few_shot_curve
from fvlm.evaluation.metrics import ThresholdMethod, evaluate_scores
from fvlm.evaluation.plots import plot_auroc_comparison, plot_roc_curves
from fvlm.evaluation.radchestct import merge_max_scores
from fvlm.evaluation.report import comparison_table, evaluation_notes, write_report
from fvlm.evaluation.retrieval import format_retrieval, retrieval_table, study_texts
from fvlm.evaluation.zero_shot import PROTOCOLS, Protocol, zero_shot_scores
from fvlm.models import load_tokenizer
from fvlm.preprocess.cache import StudyCache

__all__ = [
    "check_labels",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "print_results",
    "supervised_scores",
    "text_encoder",
]


def text_encoder(trained: TrainedNetwork) -> Callable[[list[str]], torch.Tensor]:
    """Texts -> ``(M, E)`` embeddings through the network's tokenizer and text tower."""
    tokenizer = load_tokenizer(trained.hparams["text_model"])
    device = network_device(trained)
    # Whole reports (retrieval) can exceed the text tower's positions: truncate to them.
    limit = getattr(trained.network.text.backbone.config, "max_position_embeddings", None)

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(
            texts, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        return trained.network.encode_text(
            tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        ).cpu()

    return encode


def supervised_scores(
    trained: TrainedNetwork, studies: StudyEmbeddings, keys: Sequence[str]
) -> pd.DataFrame:
    """Logits ``(S, K)`` of the supervised baseline's head (NaN where the anatomy is not valid).

    The baseline's probabilities replace zero-shot scores (its logits rank identically and do
    not saturate); the evaluability rules and metrics are the zero-shot ones.
    """
    head = trained.network.head
    own = list(trained.hparams.get("disease_keys") or [])
    unknown = [k for k in keys if k not in own]
    if unknown:
        raise ValueError(f"the supervised checkpoint has no output for {unknown[:5]}")
    with torch.no_grad():
        emb = studies.embeddings.to(head.weight.device)
        valid = studies.valid.to(emb.device)
        logits = head(emb, valid).double()
        logits = logits.masked_fill(~head.disease_valid(valid), float("nan")).cpu()
    columns = [own.index(k) for k in keys]
    index = pd.Index(studies.study_ids, name="study_id")
    return pd.DataFrame(logits[:, columns].numpy(), index=index, columns=list(keys))


def evaluate_checkpoint(
    checkpoint: Path,
    cache_dir: Path,
    labels: pd.DataFrame,
    split: str = "test",
    anatomy_table: str = "paper",
    benchmark: str | None = None,
    threshold: ThresholdMethod = "top-left",
    n_boot: int = 0,
    device: str = "cpu",
    score_merges: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    absent_rule: AbsentRule = "not_evaluable",
    protocol: Protocol = "ours",
    on_embedded: Callable[[TrainedNetwork, StudyEmbeddings], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score one checkpoint: returns (per-disease scores ``(S, K)``, metrics table).

    ``on_embedded(trained, studies)`` is called once the split is embedded (outputs built on the
    same embeddings: retrieval, linear probe, t-SNE).

    ``protocol`` selects the prompts (:data:`~fvlm.evaluation.zero_shot.PROTOCOLS`); a
    supervised checkpoint is scored by its own head instead of prompts.

    Scores are NaN where a study is not evaluable for a disease; the metrics table carries the
    counts (:data:`~fvlm.evaluation.evaluability.COUNT_COLUMNS`, ``scored_on``) and, in
    ``attrs["evaluation"]``, the forward passes per study and the rules applied.
    ``score_merges`` (CT-RATE column -> columns whose maximum scores it, see
    :func:`~fvlm.evaluation.merge_max_scores`) applies a dataset's scoring rule, such as CT-CLIP's
    calcification rule on Rad-ChestCT, before the metrics; the merged score is evaluable where
    every source is.
    """
    trained = load_network(checkpoint, device)
    table = load_anatomy_table(anatomy_table)
    diseases = [d for d in table.diseases(benchmark) if d.key in labels.columns]
    if not diseases:
        raise ValueError(
            f"no disease of table {table.name!r} (benchmark {benchmark!r}) has a labels column"
        )
    keys = [d.key for d in diseases]
    check_labels(labels, keys, StudyCache(cache_dir).ok_studies(split))  # before the long pass
    studies = embed_studies(trained, cache_dir, split, table, batch_size, num_workers)
    if on_embedded is not None:
        on_embedded(trained, studies)
    network = trained.network
    mode = "global" if trained.kind == "global" else "fine"
    if trained.kind == "supervised":
        scores = supervised_scores(trained, studies, keys)
    else:
        with torch.no_grad():
            scores = zero_shot_scores(
                studies.embeddings, studies.valid, text_encoder(trained),
                float(network.logit_scale()), table, diseases, mode=mode,
                templates=PROTOCOLS[protocol], study_ids=studies.study_ids, output="logit",
            )  # fmt: skip
    evaluable = Evaluability.from_status(
        studies.status, table, diseases, studies.study_ids, mode, absent_rule
    )
    scores = evaluable.apply(scores)
    if score_merges:
        key_of = ctrate_label_map(table)
        scores = merge_max_scores(scores, score_merges, table)
        evaluable = evaluable.merge(
            {key_of[t]: [key_of[c] for c in cols] for t, cols in score_merges.items()}
        )
        scores = scores.mask(evaluable.not_evaluable)
    truth = labels.set_index("study_id").loc[studies.study_ids, [d.key for d in diseases]]
    results = evaluate_scores(scores, truth, threshold_method=threshold, n_boot=n_boot)
    return scores, _with_counts(results, evaluable, studies)


def check_labels(labels: pd.DataFrame, keys: Sequence[str], study_ids: Sequence[str]) -> None:
    """Refuse a labels table that cannot score ``study_ids`` on ``keys``, naming what is wrong.

    Runs before the embedding pass, so a bad labels file costs seconds, not the whole pass.
    Values must be 0, 1 or empty (unknown); every study of the split needs a row.
    """
    if "study_id" not in labels.columns:
        raise ValueError(f"labels: no 'study_id' column (columns: {list(labels.columns)[:8]})")
    ids = labels["study_id"].astype(str)
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise ValueError(f"labels: study ids listed twice: {duplicated[:5]}")
    for key in keys:
        values = pd.to_numeric(labels[key], errors="coerce")
        bad = labels[key].notna() & ~values.isin([0, 1])
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise ValueError(
                f"labels: column {key!r} must hold 0, 1 or nothing; study "
                f"{ids.iloc[row]!r} has {labels[key].iloc[row]!r}"
            )
    missing = sorted(set(map(str, study_ids)) - set(ids))
    if missing:
        raise ValueError(
            f"labels: {len(missing)} studies of the evaluated split have no row, e.g. {missing[:5]}"
        )


def _with_counts(
    results: pd.DataFrame, evaluable: Evaluability, studies: StudyEmbeddings
) -> pd.DataFrame:
    """The metrics table plus the count columns, definitions and forward passes (``attrs``)."""
    counts = evaluable.counts()
    for column in COUNT_COLUMNS:
        results[column] = counts[column].reindex(results.index).astype("Int64")
    results["scored_on"] = counts["scored_on"].reindex(results.index)
    results.attrs["definitions"] = dict(results.attrs.get("definitions") or {}) | (
        count_definitions(evaluable.absent_rule)
    )
    results.attrs["evaluation"] = {
        "forward_passes_per_study": studies.forward_pass_summary(),
        "absent_rule": evaluable.absent_rule,
    }
    return results


def evaluate_checkpoints(
    checkpoints: Sequence[Path],
    names: Sequence[str],
    cache_dir: Path,
    labels: pd.DataFrame,
    out: Path,
    split: str = "test",
    anatomy_table: str = "paper",
    benchmark: str | None = None,
    threshold: ThresholdMethod = "top-left",
    n_boot: int = 0,
    device: str = "cpu",
    score_merges: Mapping[str, Sequence[str]] | None = None,
    extra: Mapping[str, object] | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    absent_rule: AbsentRule = "not_evaluable",
    protocol: Protocol = "ours",
    retrieval: bool = False,
    probe: bool = False,
    tsne: bool = False,
) -> dict[str, pd.DataFrame]:
    """Evaluate each checkpoint and write its outputs.

    Per checkpoint ``out/<name>/``: per-disease CSV, JSON summary (with ``extra``), table, ROC PNG,
    ``scores.csv``, TensorBoard scalars; then ``out/comparison.txt`` (and, with several
    checkpoints, ``out/auroc_comparison.png``). On the same embeddings, optionally:
    ``retrieval`` writes ``out/<name>/retrieval.csv``, ``probe`` ``out/<name>/linear_probe.csv``
    and ``out/linear_probe_fewshot.png``, ``tsne`` ``out/tsne.png``; their tables are kept in
    the returned tables' ``attrs`` (``retrieval_summary``, ``linear_probe_summary``: printed lines)
    for :func:`print_results`.

    Returns:
        name -> the :func:`~fvlm.evaluation.evaluate_scores` table.
    """
    labels = labels.astype({"study_id": str})
    results: dict[str, pd.DataFrame] = {}
    anatomy = load_anatomy_table(anatomy_table)
    embedded: dict[str, StudyEmbeddings] = {}
    retrieved: dict[str, pd.DataFrame] = {}
    for name, ckpt in zip(names, checkpoints, strict=True):

        def on_embedded(
            trained: TrainedNetwork, studies: StudyEmbeddings, name: str = name
        ) -> None:
            embedded[name] = studies
            if retrieval and trained.kind != "supervised":  # no text tower to retrieve with
                texts = study_texts(cache_dir, studies, anatomy)
                retrieved[name] = retrieval_table(studies, *texts, text_encoder(trained), anatomy)
                retrieved[name].to_csv(out / name / "retrieval.csv", index=False)

        (out / name).mkdir(parents=True, exist_ok=True)
        scores, table = evaluate_checkpoint(
            ckpt, cache_dir, labels, split, anatomy_table, benchmark, threshold, n_boot, device,
            score_merges, batch_size, num_workers, absent_rule, protocol, on_embedded,
        )  # fmt: skip
        folder = out / name
        info = {"checkpoint": str(ckpt), "split": split, "protocol": protocol}
        info |= dict(extra or {})
        write_report(table, folder, name=name, extra=info)
        truth = labels.set_index("study_id").loc[scores.index, scores.columns]
        plot_roc_curves(
            scores, truth, folder / "roc.png", results=table, title=f"{name} zero-shot ROC"
        )
        scores.to_csv(folder / "scores.csv")
        results[name] = table
        if name in retrieved:
            table.attrs["retrieval_summary"] = format_retrieval(name, retrieved[name])
    if probe or tsne:
        _probe_and_map(embedded, results, labels, anatomy, benchmark, out, probe, tsne)
    if len(results) > 1:
        plot_auroc_comparison(results, out / "auroc_comparison.png")
    out.mkdir(parents=True, exist_ok=True)
    text = comparison_table(results) + "\n\n" + evaluation_notes(results)
    (out / "comparison.txt").write_text(text + "\n")
    return results


def _probe_and_map(
    embedded: Mapping[str, StudyEmbeddings],
    results: Mapping[str, pd.DataFrame],
    labels: pd.DataFrame,
    table: AnatomyTable,
    benchmark: str | None,
    out: Path,
    probe: bool,
    tsne: bool,
) -> None:
    """Linear probe per model (CSV, few-shot PNG) and the t-SNE map of all models (PNG)."""
    truth = labels.set_index("study_id")
    diseases = [d for d in table.diseases(benchmark) if d.key in truth.columns]
    if probe:
        curves = {name: linear_probe(studies, truth, table, diseases)
                  for name, studies in embedded.items()}  # fmt: skip
        for name, probed in curves.items():
            probed.to_csv(out / name / "linear_probe.csv", index=False)
            results[name].attrs["linear_probe_summary"] = format_probe(name, probed)
        plot_few_shot_curve(curves, out / "linear_probe_fewshot.png")
    if tsne:
        plot_embedding_maps(embedded, truth, table, diseases, out / "tsne.png")


def print_results(results: Mapping[str, pd.DataFrame], out: Path) -> None:
    """Print the comparison table, the evaluable studies and forward passes, and the outputs."""
    print(comparison_table(results))
    print()
    print(evaluation_notes(results))
    retrieval = [
        t.attrs["retrieval_summary"] for t in results.values() if "retrieval_summary" in t.attrs
    ]
    if retrieval:
        print("\nRetrieval Recall@1/5/10 (retrieval.csv):\n" + "\n".join(retrieval))
    probed = [
        t.attrs["linear_probe_summary"]
        for t in results.values()
        if "linear_probe_summary" in t.attrs
    ]
    if probed:
        print("\nLinear probe macro AUROC by share of training labels (linear_probe.csv):")
        print("\n".join(probed))
    print(f"\nOutputs in {out}/ (per-disease CSV, JSON summary, ROC PNG, TensorBoard scalars)")
