"""The paper's LLM report decomposition over any OpenAI-compatible chat-completions server.

Per section (findings, impression) and per anatomy the model is asked Fig. 6 ("is {anatomy}
mentioned?"); when it says Yes, or when one of the anatomy's keywords occurs in the section (the
paper's complementary string matching), it is asked Fig. 7 ("{anatomy}: description"). The two
sections are merged as in the paper (:func:`merge_sections`).

Robustness, because a preprocessing run sends tens of prompts per report for hours:

* every parseable answer is cached on disk under the SHA-256 of (model, messages), one JSON file
  per prompt written atomically, so an interrupted or repeated run asks nothing twice;
* timeouts, connection errors, 408, 409, 429 and 5xx are retried by the ``openai`` client itself
  (``max_retries``: exponential backoff with jitter, honouring the server's ``Retry-After``); an
  unparseable answer is asked again here, since no client can know what parses; when either runs
  out, that (section, anatomy) falls back to the rule-based result, and every case is counted in
  :attr:`Decomposition.outcomes` (``retry`` is every request beyond a prompt's first);
* an unusable server (connections still refused after the client's retries, a 401/403/404:
  wrong key, model or URL, prompts timing out several times in a row, or a 429 that outlasts the
  client's retries) opens a circuit breaker, which the client lacks: one warning, then everything
  falls back to the rules without waiting on the network; the server is tried again after
  ``down_retry_s`` (after the server's ``Retry-After`` for a 429, if longer);
* an answer longer than ``answer_chars_per_token * max_tokens`` characters (a server that ignores
  ``max_tokens``) and a 200 whose body is no chat completion (HTML, broken JSON) are unparseable
  answers like any other;
* every (section, anatomy) that fell back is listed in :attr:`Decomposition.fallback`, so the
  preprocessing run records it and asks the LLM again on its next run;
* a section longer than ``max_section_chars`` is not sent (``section_too_long``: rules), and a
  report with text but no anatomy found is counted (``no_anatomy_found``).

Throughput: the paper asks per anatomy and per section (2 x anatomies prompts plus one extraction
per mention: ~24 per chest report with 8 anatomies, ~80 per abdomen report with 35). Every prompt
of a section starts with that section's text, and each section's first prompt is answered before
the others are sent, so a server with prefix caching computes each section once.

The API key is read from the environment variable named in :class:`LLMConfig` when the client is
created and lives only inside the (unpicklable, never logged) client object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import openai

from fvlm.anatomy import Anatomy, AnatomyTable

from . import AnatomyDescription, Decomposition
from .merge import SectionText, merge_sections
from .prompts import (
    extraction_messages,
    mention_messages,
    parse_extraction,
    parse_mention,
)
from .rules import RuleDecomposer, no_anatomy_found

__all__ = ["LLMConfig", "LLMDecomposer", "cache_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Messages = list[dict[str, str]]
Job = tuple[str, Anatomy]
# The header the openai client stamps on every attempt of one request (0 on the first).
_RETRY_COUNT_HEADER = "x-stainless-retry-count"
# Status codes that will not get better for the next prompt: wrong key, model or URL.
_FATAL_STATUS = {401, 403, 404}
# Prompts timing out (after the client's retries) this many times in a row open the breaker.
_TIMEOUTS_TO_OPEN = 3


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to ask the LLM; holds the *name* of the API-key variable, never the key.

    Args:
        base_url: OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1`` (vLLM),
            ``http://localhost:11434/v1`` (Ollama), ``http://localhost:8080/v1`` (llama.cpp).
        model: Model name as the server knows it (the paper used Qwen 2.5).
        api_key_env: Environment variable holding the key; local servers usually need none.
        temperature: Sampling temperature; 0 makes answers reproducible and cacheable.
        max_tokens: Answer length limit; descriptions are a few sentences.
        max_concurrency: Prompts in flight at once per decomposer (per worker process).
        timeout_s: Per-request timeout in seconds (the client's ``timeout``).
        max_attempts: Tries per prompt (first try included) before falling back to the rules:
            the client's transport retries are ``max_attempts - 1``, and an unparseable answer
            is asked again up to ``max_attempts`` times.
        down_retry_s: After the server is found unreachable, seconds before trying it again.
        answer_chars_per_token: Answers longer than this many characters per ``max_tokens`` are
            refused as unparseable (a server that ignores ``max_tokens`` cannot fill the disk).
        max_section_chars: A longer section (a pasted log, a concatenated export; about 6k
            tokens, so that prompt and answer fit an 8k context) is not sent: the keyword rules
            decompose it, counted as ``section_too_long`` and listed as a fallback.
        cache_dir: Directory of cached answers; ``None`` disables the cache.
    """

    base_url: str = "http://localhost:8000/v1"
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_attempts: int = 3
    down_retry_s: float = 60.0
    answer_chars_per_token: int = 16
    max_section_chars: int = 24_000
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        checks = {
            "max_concurrency": self.max_concurrency >= 1,
            "max_attempts": self.max_attempts >= 1,
            "max_tokens": self.max_tokens >= 1,
            "timeout_s": self.timeout_s > 0,
            "down_retry_s": self.down_retry_s >= 0,
            "temperature": self.temperature >= 0,
            "answer_chars_per_token": self.answer_chars_per_token >= 1,
            "max_section_chars": self.max_section_chars >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"LLMConfig: invalid {', '.join(bad)} ({self!r})")
        if not self.base_url or not self.model:
            raise ValueError("LLMConfig: base_url and model must be non-empty")
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"LLMConfig: base_url must be an http:// or https:// URL with a host, got "
                f"{self.base_url!r}"
            )

    @property
    def max_answer_chars(self) -> int:
        """The longest answer accepted, in characters."""
        return self.answer_chars_per_token * self.max_tokens


def cache_key(model: str, messages: Messages) -> str:
    """SHA-256 (hex) of the model and the exact messages: the identity of one prompt."""
    payload = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class LLMDecomposer:
    """Report decomposition with an LLM (paper Fig. 6 and 7), string matching and rule fallback.

    Picklable for worker processes: the OpenAI client, the lock and the thread pool are created
    lazily in each process.

    Args:
        table: The anatomy table; prompts name anatomies by their ``label``.
        config: Server, model, retries, concurrency and cache settings.
    """

    def __init__(self, table: AnatomyTable, config: LLMConfig) -> None:
        self.table = table
        self.config = config
        self.rules = RuleDecomposer(table)
        self._client: openai.OpenAI | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._warned_down = False
        self._timeouts_in_a_row = 0
        #: HTTP requests sent (client retries included), for throughput figures.
        self.requests_sent = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self.table.name!r}, config={self.config!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------------------------

    def decompose(self, findings: str, impression: str) -> Decomposition:
        """Decompose one report; prompts of both sections run concurrently.

        Empty sections are not sent: nothing can be mentioned in them.
        """
        sections = {"findings": findings, "impression": impression}
        rules = {kind: self.rules.extract(text) for kind, text in sections.items()}
        jobs = [
            (kind, anatomy)
            for kind, text in sections.items()
            if text.strip()
            for anatomy in self.table.anatomies
        ]
        extracted: dict[str, dict[str, SectionText]] = {kind: {} for kind in sections}
        outcomes: Counter = Counter()
        fallback: set[str] = set()

        def run(job: Job) -> tuple[SectionText | None, Counter]:
            kind, anatomy = job
            return self._section_anatomy(sections[kind], anatomy, rules[kind].get(anatomy.name))

        too_long = {
            kind
            for kind, text in sections.items()
            if len(text.strip()) > self.config.max_section_chars
        }
        for kind in too_long:
            # No model reads a section this long: it would only be truncated or refused.
            log.warning(
                "%s section of %d characters exceeds max_section_chars=%d: keyword rules used",
                kind,
                len(sections[kind].strip()),
                self.config.max_section_chars,
            )
            outcomes["section_too_long"] += 1
            outcomes["fallback_rules"] += len(self.table.anatomies)
            fallback.update(self.table.names)
            extracted[kind] = {n: SectionText(t, "rules") for n, t in rules[kind].items()}
        jobs = [job for job in jobs if job[0] not in too_long]
        if jobs:
            for (kind, anatomy), (text, counts) in zip(jobs, self._run(jobs, run), strict=True):
                outcomes.update(counts)
                if counts["fallback_rules"]:
                    fallback.add(anatomy.name)
                if text is not None:
                    extracted[kind][anatomy.name] = text
        anatomies = self._normal_fallback(
            merge_sections(self.table, extracted["findings"], extracted["impression"]),
            findings,
            impression,
        )
        outcomes["default"] += sum(d.source == "default" for d in anatomies.values())
        outcomes["no_anatomy_found"] += no_anatomy_found(findings, impression, anatomies)
        return Decomposition(anatomies, +outcomes, frozenset(fallback))

    def _normal_fallback(
        self, anatomies: dict[str, AnatomyDescription], findings: str, impression: str
    ) -> dict[str, AnatomyDescription]:
        """The paper's normal flag where the impression names an abnormality, else the fallback.

        "Not mentioned in the impression = normal" fails on missing ("Not given.") and global
        ("within normal limits") impressions; there the findings decide, read with negation
        (:mod:`.normal_flag`), exactly as on the rules path, and ``normal_source`` says so.
        """
        flags = self.rules.normal_flags(findings, impression)
        return {
            name: description
            if description.source == "default" or flags[name].source == "impression"
            else replace(description, normal=flags[name].normal, normal_source=flags[name].source)
            for name, description in anatomies.items()
        }

    def _run(self, jobs: list[Job], run: Callable[[Job], R]) -> list[R]:
        """Results of ``run`` over ``jobs`` (in job order) with bounded concurrency.

        Every prompt of one section starts with the section's text (:mod:`.prompts`), so a server
        with prefix caching (vLLM, SGLang) computes it once per section if the first prompt of the
        section has been answered before the others arrive: one prompt per section goes first,
        then the rest, ``max_concurrency`` at a time.
        """
        workers = min(self.config.max_concurrency, len(jobs))
        kinds = [kind for kind, _ in jobs]
        first = [kinds.index(kind) for kind in dict.fromkeys(kinds)]
        rest = [i for i in range(len(jobs)) if i not in first]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fvlm-llm") as pool:
            primed = {i: pool.submit(run, jobs[i]) for i in first}
            results = {i: future.result() for i, future in primed.items()}
            results.update(zip(rest, pool.map(run, [jobs[i] for i in rest]), strict=True))
        return [results[i] for i in range(len(jobs))]

    # -- one (section, anatomy) ----------------------------------------------------------------

    def _section_anatomy(
        self, section: str, anatomy: Anatomy, rules_text: str | None
    ) -> tuple[SectionText | None, Counter]:
        """Fig. 6, string matching, Fig. 7 for one anatomy of one section; rules on failure."""
        counts: Counter = Counter()
        fallback = None if rules_text is None else SectionText(rules_text, "rules")
        mentioned = self._ask(mention_messages(section, anatomy.label), parse_mention, counts)
        if mentioned is None:
            counts["fallback_rules"] += 1
            return fallback, counts
        if not mentioned:
            if rules_text is None:
                return None, counts
            # The paper's complementary string matching: a keyword (e.g. "duodenum" for the
            # small bowel) overrides the model's No.
            counts["string_match"] += 1
        description = self._ask(
            extraction_messages(section, anatomy.label),
            lambda answer: parse_extraction(answer, anatomy.label),
            counts,
        )
        if description is None:
            counts["fallback_rules"] += 1
            return fallback, counts
        return SectionText(description, "llm"), counts

    # -- one prompt ----------------------------------------------------------------------------

    def _ask(
        self, messages: Messages, parse: Callable[[str], T | None], counts: Counter
    ) -> T | None:
        """The parsed answer to one prompt from the cache or the server; ``None`` on failure."""
        key = cache_key(self.config.model, messages)
        cached = self._cache_read(key)
        if (
            cached is not None
            and len(cached) <= self.config.max_answer_chars
            and (parsed := parse(cached)) is not None
        ):
            counts["cache_hit"] += 1
            return parsed
        for attempt in range(self.config.max_attempts):
            if self._server_down():
                counts["skipped_server_down"] += 1
                return None
            if attempt:
                counts["retry"] += 1
            try:
                answer, retries = self._complete(messages)
            except openai.APIError as err:
                # The client has already retried what can get better by retrying.
                counts["retry"] += _retries_taken(err)
                self._count_requests(1 + _retries_taken(err))
                self._count_failure(err, counts)
                return None
            counts["retry"] += retries
            self._count_requests(1 + retries)
            self._mark_up()
            if len(answer) > self.config.max_answer_chars:
                counts["oversized"] += 1
                log.debug("LLM answer of %d characters refused (attempt %d)", len(answer), attempt)
                continue
            parsed = parse(answer)
            if parsed is None:
                counts["unparseable"] += 1
                log.debug("unparseable LLM answer (attempt %d): %.200r", attempt + 1, answer)
                continue
            counts["llm_answer"] += 1
            if not self._cache_write(key, answer):
                counts["cache_write_error"] += 1
            return parsed
        return None

    def _count_requests(self, n: int) -> None:
        with self._lock:
            self.requests_sent += n

    def _count_failure(self, err: openai.APIError, counts: Counter) -> None:
        """Count a request the client gave up on; open the breaker if the server is unusable."""
        if isinstance(err, openai.APITimeoutError):
            counts["error_timeout"] += 1
            with self._lock:
                self._timeouts_in_a_row += 1
                trip = self._timeouts_in_a_row >= _TIMEOUTS_TO_OPEN
            if trip:
                self._mark_down(
                    f"{_TIMEOUTS_TO_OPEN} prompts in a row timed out after "
                    f"{self.config.timeout_s:g} s and {self.config.max_attempts} attempts"
                )
        elif isinstance(err, openai.APIConnectionError):
            counts["error_connection"] += 1
            self._mark_down(f"connection failed: {err}")
        elif isinstance(err, openai.APIStatusError):
            counts[f"error_http_{err.status_code}"] += 1
            if err.status_code in _FATAL_STATUS:
                self._mark_down(f"HTTP {err.status_code} for model {self.config.model!r}")
            elif err.status_code == 429:  # still rate-limited after the client's retries
                self._mark_down("HTTP 429, rate limited", _retry_after_s(err.response))
        else:
            counts["error_other"] += 1
            log.debug("LLM request failed: %s: %s", type(err).__name__, err)

    def _complete(self, messages: Messages) -> tuple[str, int]:
        """The answer's text and the number of retries the client needed for it."""
        raw = self._get_client().chat.completions.with_raw_response.create(
            model=self.config.model,
            messages=messages,  # type: ignore[arg-type]
            temperature=self.config.temperature,
            max_tokens=self.config.max_tokens,
        )
        try:
            content = raw.parse().choices[0].message.content
        except (ValueError, TypeError, AttributeError, IndexError) as err:
            # A 200 whose body is no completion (not JSON, no choices): an unparseable answer.
            log.debug("LLM answer is no chat completion: %s: %s", type(err).__name__, err)
            content = None
        return content if isinstance(content, str) else "", raw.retries_taken

    def _get_client(self) -> openai.OpenAI:
        with self._lock:
            if self._client is None:
                key = os.environ.get(self.config.api_key_env)
                if not key:
                    log.debug("%s is not set; sending no real API key", self.config.api_key_env)
                self._client = openai.OpenAI(
                    base_url=self.config.base_url,
                    api_key=key or "EMPTY",
                    timeout=self.config.timeout_s,
                    max_retries=self.config.max_attempts - 1,
                )
            return self._client

    # -- circuit breaker -----------------------------------------------------------------------

    def _server_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _mark_down(self, reason: str, wait_s: float | None = None) -> None:
        wait = max(self.config.down_retry_s, wait_s or 0.0)
        with self._lock:
            self._down_until = max(self._down_until, time.monotonic() + wait)
            self._timeouts_in_a_row = 0
            first, self._warned_down = not self._warned_down, True
        if first:
            log.warning(
                "LLM server %s is unusable (%s); report decomposition falls back to the keyword "
                "rules (server retried in %.0f s)",
                self.config.base_url,
                reason,
                wait,
            )

    def _mark_up(self) -> None:
        self._timeouts_in_a_row = 0
        if self._warned_down:
            with self._lock:
                was_down, self._warned_down = self._warned_down, False
            if was_down:
                log.warning("LLM server %s answers again", self.config.base_url)

    # -- cache ---------------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path | None:
        if self.config.cache_dir is None:
            return None
        return self.config.cache_dir / key[:2] / f"{key}.json"

    def _cache_read(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None:
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.debug("ignoring unreadable LLM cache file %s: %s", path, err)
            return None
        content = entry.get("content") if isinstance(entry, dict) else None
        return content if isinstance(content, str) else None

    def _cache_write(self, key: str, answer: str) -> bool:
        """Store one answer; ``False`` if the disk refused (the run goes on, uncached)."""
        path = self._cache_path(key)
        if path is None:
            return True
        entry = {"model": self.config.model, "content": answer}
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Temp file in the same directory + os.replace: readers (other workers, a rerun after
            # a crash) see either no file or a complete one.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(entry, handle, ensure_ascii=False)
            os.replace(tmp, path)
        except OSError as err:
            log.debug("could not write LLM cache file %s: %s", path, err)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return False
        return True


def _retry_after_s(response: Any) -> float | None:
    """Seconds of a response's ``Retry-After`` header (``None``: absent or a date)."""
    try:
        value = float(response.headers.get("retry-after", ""))
    except (AttributeError, TypeError, ValueError):
        return None
    return value if 0 <= value < float("inf") else None


def _retries_taken(err: openai.APIError) -> int:
    """Retries the client made before raising ``err`` (read from its last request's header)."""
    try:
        return int(err.request.headers.get(_RETRY_COUNT_HEADER, 0))
    except (AttributeError, ValueError):
        return 0
