"""Report decomposition against ground truth: normal flags and evidence placement per anatomy.

Input: the project's report corpus (``fvlm.phantom.report_corpus``): CT-RATE-style chest reports
labelled with the chest preset and abdomen reports labelled with the paper preset, with missing
and global impressions, negations, uncertainty, window introductions, inflected sub-structures and
sentences that name other anatomies than their subject. For each (report, anatomy) the normal flag
is right or wrong; each sentence that is about an anatomy, or that the decomposer put in its text,
counts for that anatomy and is right when both hold (evidence placement).

"before" is the rule decomposer of the last commit (``git show HEAD:...``, loaded into a temporary
package), "after" the working tree's. The target is a normal flag of at least 98 % and evidence
placement of at least 99 % per anatomy with the rules.

    python benchmarks/bench_decomposition.py                 # 400 reports per region, ~10 s
    python benchmarks/bench_decomposition.py --reports 100 --no-before

The LLM path (the paper's Fig. 6/7 prompts over the wire) is scored on ``--llm-reports`` chest
reports against a server (``--llm-base-url``/``--llm-model``), or against SmolLM2-135M served
on 127.0.0.1 for the run (``--llm-local``, after ``make llm-local``). It prints the agreement,
the outcome counts (answers, fallbacks), requests per report, requests/s, and the hours 50k
reports take at the measured rate and at ``--server-rps``. Requests per report are also computed
offline for both presets with the rules standing in for the model's Yes/No answers.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fvlm.anatomy import AnatomyTable
from fvlm.phantom.report_corpus import (
    Agreement,
    CorpusReport,
    report_corpus,
    score_decomposition,
)
from fvlm.preprocess.decomposition import LLMConfig, LLMDecomposer, RuleDecomposer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "preprocess/decomposition"
TARGET = {"normal": 0.98, "placement": 0.99}
#: CT-RATE's size, for the time estimate.
CTRATE_REPORTS = 50_000


def head_decomposer() -> Callable | None:
    """The committed ``RuleDecomposer`` class, or None when git or the commit has none."""
    try:
        names = subprocess.run(
            ["git", "ls-tree", "--name-only", "HEAD", f"{PACKAGE}/"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = Path(tempfile.mkdtemp(prefix="fvlm_head_")) / "head_decomposition"
    folder.mkdir()
    for name in names:
        text = subprocess.run(
            ["git", "show", f"HEAD:{name}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        (folder / Path(name).name).write_text(text, encoding="utf-8")
    sys.path.insert(0, str(folder.parent))
    try:
        return importlib.import_module("head_decomposition").RuleDecomposer
    except Exception as err:  # noqa: BLE001 - an old commit may not import; say so and go on
        print(f"before: the committed decomposer does not import here ({err})")
        return None


def table_rows(label: str, agreement: Agreement, names: list[str]) -> list[str]:
    """One line per anatomy that the corpus describes: normal flag and placement rates."""
    rows = []
    for name in names:
        if not agreement.placement_total[name]:
            continue
        normal, placement = agreement.rate("normal", name), agreement.rate("placement", name)
        flag = "" if normal >= TARGET["normal"] and placement >= TARGET["placement"] else "  <"
        rows.append(
            f"  {label:6s} {name:18s} normal {normal:7.2%} ({agreement.normal_total[name]:4d})  "
            f"placement {placement:7.2%} ({agreement.placement_total[name]:4d}){flag}"
        )
    return rows


def requests_per_report(table: AnatomyTable, reports: list[CorpusReport]) -> float:
    """Prompts per report if the model answered Fig. 6 as the rules find anatomies.

    One Fig. 6 prompt per (non-empty section, anatomy) and one Fig. 7 prompt per (section,
    anatomy) that the section mentions; no retries.
    """
    rules = RuleDecomposer(table)
    total = 0
    for report in reports:
        for section in (report.findings, report.impression):
            if section.strip():
                total += len(table.anatomies) + len(rules.extract(section))
    return total / len(reports)


def score_llm(
    table: AnatomyTable, reports: list[CorpusReport], config: LLMConfig
) -> tuple[Agreement, Counter, int, float]:
    """Agreement, outcome counts, HTTP requests and seconds of the LLM path on ``reports``."""
    decomposer = LLMDecomposer(table, config)
    outcomes: Counter = Counter()

    def decompose(findings: str, impression: str) -> dict:
        result = decomposer.decompose(findings, impression)
        outcomes.update(result.outcomes)
        return result.anatomies

    start = time.perf_counter()
    agreement = score_decomposition(reports, decompose)
    return agreement, outcomes, decomposer.requests_sent, time.perf_counter() - start


def llm_figures(
    table: AnatomyTable, reports: list[CorpusReport], config: LLMConfig, server_rps: float
) -> list[str]:
    """The LLM path's agreement and throughput lines (rules on the same reports beside it)."""
    agreement, outcomes, requests, seconds = score_llm(table, reports, config)
    rules = score_decomposition(
        reports, lambda f, i: RuleDecomposer(table).decompose(f, i).anatomies
    )
    per_report, rps = requests / len(reports), requests / seconds
    request_hours = CTRATE_REPORTS * per_report / 3600  # hours at 1 request/s
    return [
        f"llm {config.model} at {config.base_url}: {len(reports)} chest reports, "
        f"{requests} requests in {seconds:.0f} s (concurrency {config.max_concurrency})",
        f"  llm:   normal flag {agreement.rate('normal'):.2%}, evidence placement "
        f"{agreement.rate('placement'):.2%}",
        f"  rules: normal flag {rules.rate('normal'):.2%}, evidence placement "
        f"{rules.rate('placement'):.2%} (same reports)",
        *table_rows("llm", agreement, table.names),
        f"  outcomes {dict(sorted(outcomes.items()))}",
        f"  {per_report:.1f} requests/report, {rps:.2f} requests/s; {CTRATE_REPORTS:,} reports: "
        f"{request_hours / rps:,.0f} h at this rate, {request_hours / server_rps:,.1f} h at "
        f"{server_rps:g} requests/s",
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when the working tree's rules miss the target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=400, help="reports per region")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-before", action="store_true", help="skip the committed rules")
    parser.add_argument("--llm-base-url", help="score the LLM path against this server")
    parser.add_argument("--llm-model", help="model name on --llm-base-url")
    parser.add_argument(
        "--llm-local", action="store_true", help="serve SmolLM2-135M on 127.0.0.1 for the run"
    )
    parser.add_argument("--llm-reports", type=int, default=4, help="chest reports for the LLM")
    parser.add_argument("--llm-concurrency", type=int, default=4)
    parser.add_argument("--llm-max-tokens", type=int, default=96)
    parser.add_argument(
        "--llm-attempts",
        type=int,
        default=3,
        help="tries per prompt (at temperature 0 a retry mostly gets the same answer)",
    )
    parser.add_argument(
        "--server-rps",
        type=float,
        default=100.0,
        help="server throughput (requests/s) for the 50k-report estimate",
    )
    args = parser.parse_args(argv)
    before = None if args.no_before else head_decomposer()
    missed = False
    for region in ("chest", "abdomen"):
        table, reports = report_corpus(args.reports, region, seed=args.seed)
        failures = sorted({f for r in reports for f in r.failures})
        print(f"{region}: {len(reports)} reports, preset {table.name!r}; classes {failures}")
        results = []
        for label, cls in (("before", before), ("after", RuleDecomposer)):
            if cls is None:
                continue
            decomposer = cls(table)
            start = time.perf_counter()
            agreement = score_decomposition(
                reports, lambda f, i, d=decomposer: d.decompose(f, i).anatomies
            )
            seconds = time.perf_counter() - start
            results.append((label, agreement))
            print(
                f"  {label}: normal flag {agreement.rate('normal'):.2%}, evidence placement "
                f"{agreement.rate('placement'):.2%} ({len(reports) / seconds:.0f} reports/s)"
            )
        for label, agreement in results:
            print("\n".join(table_rows(label, agreement, table.names)))
        after = results[-1][1]
        missed |= any(
            after.placement_total[n]
            and (after.rate("normal", n) < TARGET["normal"])
            | (after.rate("placement", n) < TARGET["placement"])
            for n in table.names
        )
        print(f"  {requests_per_report(table, reports):.1f} LLM requests/report (rules as model)")
    print("target (normal >= 98 %, placement >= 99 % per anatomy):", "missed" if missed else "met")
    if args.llm_base_url or args.llm_local:
        table, reports = report_corpus(args.llm_reports, "chest", seed=args.seed)
        settings = dict(
            max_concurrency=args.llm_concurrency,
            max_tokens=args.llm_max_tokens,
            max_attempts=args.llm_attempts,
            timeout_s=900.0,
        )
        if args.llm_local:
            from local_llm import local_server, model_folder

            with local_server(model_folder()) as (url, model):
                lines = llm_figures(
                    table, reports, LLMConfig(url, model, **settings), args.server_rps
                )
        else:
            config = LLMConfig(args.llm_base_url, args.llm_model or LLMConfig.model, **settings)
            lines = llm_figures(table, reports, config, args.server_rps)
        print("\n".join(lines))
    return int(missed)


if __name__ == "__main__":
    sys.exit(main())
