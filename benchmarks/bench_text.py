"""Text-tower FLOPs per study at the paper's shapes: padded to the longest text vs packed by length.

The fine-grained step encodes each distinct anatomy text of a batch once
(:meth:`~fvlm.models.TextEncoder.encode_unique`). Padding those texts to the batch's longest made
the text side cost several times its real tokens; :func:`~fvlm.models.text.length_buckets` groups
them by length so each group is padded to its own longest. This benchmark takes realistic texts
(CT-RATE-style abdomen reports of the project's report corpus, decomposed by the rule decomposer
over the paper's 35-anatomy table, missing anatomies getting the table's default text), batches
of ``--batch-size`` studies, BERT-base's shape and the 128-token limit of ``configs/fvlm.yaml``,
and counts forward FLOPs with ``torch.utils.flop_counter`` on the meta device (shapes only,
nothing is computed, so it takes seconds on a CPU):

* text GFLOP per study: every valid text encoded (no dedup), distinct texts padded to the
  longest (before), distinct texts packed by length (after), distinct texts without any padding
  (the floor);
* padding waste (padded / real tokens) before and after (target <= 1.3x);
* text / vision FLOPs per study, vision = the paper-shape ViT-B on one 128x256x288 crop (target
  <= 0.12x).

    python benchmarks/bench_text.py [--reports 240] [--batch-size 12]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_gpu import BERT_BASE, paper_shape  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

TARGET_WASTE, TARGET_RATIO = 1.3, 0.12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=240, help="corpus reports (studies)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the paper config's")
    args = parser.parse_args(argv)
    if args.reports < 1:
        parser.error("--reports must be >= 1")
    return args


def study_lengths(n_reports: int, max_length: int) -> list[list[tuple[int, ...]]]:
    """Per study, the token ids of its 35 anatomy texts (as training tokenises them)."""
    from fvlm.models import load_tokenizer
    from fvlm.phantom.report_corpus import report_corpus
    from fvlm.preprocess.decomposition import RuleDecomposer

    table, reports = report_corpus(n_reports, region="abdomen")
    decomposer = RuleDecomposer(table)
    tokenizer = load_tokenizer("minilm")  # bert-base-uncased's vocabulary
    studies = []
    for report in reports:
        described = decomposer.decompose(report.findings, report.impression).anatomies
        texts = [
            (described[a.name].text.strip() if a.name in described else "") or a.default_text
            for a in table.anatomies
        ]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        studies.append([tuple(row) for row in ids])
    return studies


def _backbone_gflop(backbone: torch.nn.Module, shapes: list[tuple[int, int]]) -> float:
    """Forward GFLOP of the text backbone on ``(texts, width)`` batches (meta tensors)."""
    with FlopCounterMode(display=False) as counter:
        for n, width in shapes:
            ids = torch.zeros(n, width, dtype=torch.long, device="meta")
            backbone(input_ids=ids)  # no mask: the same FLOPs, and no data-dependent checks
    return counter.get_total_flops() / 1e9


def text_costs(studies: list[list[tuple[int, ...]]], batch_size: int) -> dict[str, float]:
    """GFLOP per study and padding waste of the four ways to encode each batch's texts."""
    from transformers import BertConfig, BertModel

    from fvlm.models.text import length_buckets

    with torch.device("meta"):
        backbone = BertModel(BertConfig(**BERT_BASE), add_pooling_layer=False)
    shapes: dict[str, list[tuple[int, int]]] = {k: [] for k in ("all", "before", "after", "floor")}
    real = padded_before = padded_after = 0
    batches = [studies[i : i + batch_size] for i in range(0, len(studies), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches[:1]
    for batch in batches:
        every = [text for study in batch for text in study]
        distinct = sorted(set(every))
        lengths = [len(text) for text in distinct]
        shapes["all"].append((len(every), max(len(t) for t in every)))
        shapes["before"].append((len(distinct), max(lengths)))
        groups = length_buckets(lengths, 1.25, 8)  # the TextEncoder defaults
        shapes["after"] += [(len(g), max(lengths[i] for i in g)) for g in groups]
        shapes["floor"] += [(k, n) for n, k in Counter(lengths).items()]  # same FLOPs as 1 by 1
        real += sum(lengths)
        padded_before += len(distinct) * max(lengths)
        padded_after += sum(len(g) * max(lengths[i] for i in g) for g in groups)
    studies_seen = sum(len(b) for b in batches)
    costs = {k: _backbone_gflop(backbone, v) / studies_seen for k, v in shapes.items()}
    costs["waste_before"] = padded_before / real
    costs["waste_after"] = padded_after / real
    return costs


def vision_gflop() -> float:
    """Forward GFLOP of the paper-shape ViT-B on one crop (meta tensors)."""
    from fvlm.models import VisionConfig, VisionTransformer3D

    shape = paper_shape()
    with torch.device("meta"):
        vit = VisionTransformer3D(
            VisionConfig(img_size=tuple(shape["crop_size"]), **shape["vision"])
        )
        crop = torch.empty(1, 1, *shape["crop_size"])
    with FlopCounterMode(display=False) as counter:
        vit(crop)
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the table and the ratios; returns the figures."""
    args = parse_args(argv)
    shape = paper_shape()
    batch_size = args.batch_size or shape["batch_size"]
    studies = study_lengths(args.reports, shape["max_text_length"])
    costs = text_costs(studies, batch_size)
    vision = vision_gflop()
    print(
        f"fvlm text benchmark: {len(studies)} CT-RATE-style abdomen reports, 35 anatomies, batch "
        f"{batch_size}, BERT-base shape, <= {shape['max_text_length']} tokens; forward GFLOP per "
        "study\n"
    )
    rows = [
        ("every valid text, padded to the longest", costs["all"]),
        ("distinct texts, padded to the longest (before)", costs["before"]),
        ("distinct texts, packed by length (after)", costs["after"]),
        ("distinct texts, no padding (floor)", costs["floor"]),
        ("vision: ViT-B on one 128x256x288 crop", vision),
    ]
    for label, value in rows:
        print(f"  {label:<50}{value:>9.1f}")
    print(
        f"\npadding waste (padded / real tokens): before {costs['waste_before']:.2f}x, after "
        f"{costs['waste_after']:.2f}x (target <= {TARGET_WASTE}x)\n"
        f"text / vision FLOPs per study: before {costs['before'] / vision:.3f}x, after "
        f"{costs['after'] / vision:.3f}x (target <= {TARGET_RATIO}x)"
    )
    return costs | {"vision": vision}


if __name__ == "__main__":
    main()
