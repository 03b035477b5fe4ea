"""The LLM decomposer against a real model: SmolLM2-135M served by ``transformers serve``.

Slow (the server loads for a minute, each answer takes seconds on 2 cores) and optional: it needs
the converted model folder (``make llm-local``, or ``FVLM_LOCAL_LLM``) and the serving extra
(fastapi, uvicorn, gguf). The paper's Fig. 6/7 prompts go over the wire; every (section,
anatomy) ends as a parsed answer or a recorded fallback to the rules, and the agreement with the
corpus's ground truth is printed, not asserted: a 135M model is weak.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fvlm.phantom.report_corpus import report_corpus, score_decomposition
from fvlm.preprocess.decomposition import LLMConfig, LLMDecomposer, RuleDecomposer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from local_llm import SERVER_MODULES, local_server, model_folder  # noqa: E402

pytestmark = pytest.mark.slow
N_REPORTS = 1  # 16 Fig. 6 prompts and the Fig. 7 ones: minutes on a loaded 2-core CPU


@pytest.fixture(scope="module")
def server():
    folder = model_folder()
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder}: no converted model (run `make llm-local`)")
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"serving extra not installed: {', '.join(missing)}")
    with local_server(folder) as (url, model):
        yield url, model


def test_real_model_answers_are_parsed_or_fall_back(server, tmp_path, capsys):
    url, model = server
    table, reports = report_corpus(N_REPORTS, "chest", seed=0)
    # At temperature 0 the server answers the same again: a retry of an unparseable answer
    # only costs time, so one attempt per prompt.
    config = LLMConfig(
        url, model, max_tokens=48, timeout_s=900.0, max_attempts=1, max_concurrency=2,
        cache_dir=tmp_path,
    )  # fmt: skip
    decomposer = LLMDecomposer(table, config)
    outcomes: Counter = Counter()
    fallbacks: list[frozenset[str]] = []

    def decompose(findings: str, impression: str) -> dict:
        result = decomposer.decompose(findings, impression)
        outcomes.update(result.outcomes)
        fallbacks.append(result.fallback)
        # Every anatomy is the LLM's, the rules' (a recorded fallback) or the default.
        for name, description in result.anatomies.items():
            assert description.source in ("llm", "rules", "default")
            if description.source == "rules":  # only a failed prompt gives rules' text
                assert name in result.fallback
        assert bool(result.outcomes["fallback_rules"]) == bool(result.fallback)
        return result.anatomies

    start = time.perf_counter()
    agreement = score_decomposition(reports, decompose)
    seconds = time.perf_counter() - start
    sent = decomposer.requests_sent
    prompts = outcomes["llm_answer"] + outcomes["fallback_rules"]
    rules = RuleDecomposer(table)
    baseline = score_decomposition(reports, lambda f, i: rules.decompose(f, i).anatomies)
    with capsys.disabled():
        print(
            f"\nSmolLM2-135M on {N_REPORTS} chest reports: normal flag "
            f"{agreement.rate('normal'):.2%}, placement {agreement.rate('placement'):.2%} "
            f"(rules {baseline.rate('normal'):.2%}, {baseline.rate('placement'):.2%}); "
            f"{sent} requests in {seconds:.0f} s ({sent / seconds:.3f} requests/s); outcomes "
            f"{dict(sorted(outcomes.items()))}"
        )
    assert outcomes["llm_answer"] > 0  # the real model answered in the requested format
    assert sent >= outcomes["llm_answer"] + outcomes["unparseable"]
    # Each Fig. 6 prompt over a non-empty section ends parsed or as a fallback.
    mention_prompts = sum(
        len(table.anatomies) for r in reports for s in (r.findings, r.impression) if s.strip()
    )
    assert prompts >= mention_prompts
    assert "error_connection" not in outcomes and "skipped_server_down" not in outcomes

    # The answers that parsed are cached: the same reports again send nothing.
    decomposer.requests_sent = 0
    again = Counter()
    for report in reports:
        again.update(decomposer.decompose(report.findings, report.impression).outcomes)
    assert again["cache_hit"] == outcomes["llm_answer"]
    # Only the prompts that failed are asked again (the rerun of the preprocessing run).
    assert (
        decomposer.requests_sent == again["llm_answer"] + again["unparseable"] + again["oversized"]
    )
