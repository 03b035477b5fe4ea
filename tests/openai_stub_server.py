"""A real HTTP server on 127.0.0.1 that speaks OpenAI chat completions, with scripted behaviour.

Tests hand it a ``responder`` that sees every request (its arrival index, headers and JSON body)
and returns a :class:`Reply`: an answer, an HTTP error status, response headers (``Retry-After``),
a raw body that is no completion, a delay (to provoke client timeouts) or any combination. The
server records every request and the peak number in flight.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Request:
    index: int
    headers: dict[str, str]
    body: dict[str, Any]
    received: float  # time.monotonic() at arrival

    @property
    def prompt(self) -> str:
        return self.body["messages"][-1]["content"]

    @property
    def retry_count(self) -> int:
        """Which retry of one client call this request is (the openai client's own header)."""
        return int(self.headers.get("x-stainless-retry-count", 0))


@dataclass(frozen=True)
class Reply:
    content: str | None = None
    status: int = 200
    delay_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    raw_body: str | None = None


Responder = Callable[[Request], Reply]


class StubOpenAIServer:
    """``with StubOpenAIServer(responder) as server: OpenAI(base_url=server.base_url)``."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[Request] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> StubOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handle(self, headers: dict[str, str], body: dict[str, Any]) -> Reply:
        with self._lock:
            request = Request(len(self.requests), headers, body, time.monotonic())
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            reply = self.responder(request)
            if reply.delay_s:
                time.sleep(reply.delay_s)
            return reply
        finally:
            with self._lock:
                self._in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # keep test output clean

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = server._handle(headers, body)
                if reply.raw_body is not None:
                    payload: Any = reply.raw_body
                elif reply.status != 200:
                    payload = {"error": {"message": "scripted failure"}}
                else:
                    payload = _completion(body.get("model", ""), reply.content or "")
                self._send(reply.status, payload, reply.headers)

            def _send(
                self, status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()
            ) -> None:
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected in the slow-server tests

        return Handler


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
