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
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fvlm.phantom.report_corpus import Agreement, report_corpus, score_decomposition
from fvlm.preprocess.decomposition import RuleDecomposer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "preprocess/decomposition"
TARGET = {"normal": 0.98, "placement": 0.99}


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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when the working tree's rules miss the target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=400, help="reports per region")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-before", action="store_true", help="skip the committed rules")
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
    print("target (normal >= 98 %, placement >= 99 % per anatomy):", "missed" if missed else "met")
    return int(missed)


if __name__ == "__main__":
    sys.exit(main())
