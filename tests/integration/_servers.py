"""What the integration tests know about the real servers they run against, and how they spread over them.

Two servers written by others, both started once per session on 127.0.0.1 with a key (see conftest.py):
llama.cpp's ``llama-server`` and llama-cpp-python's server (FastAPI on the same llama.cpp engine),
both serving SmolLM2-135M-Instruct. :func:`on_servers` runs a test once per server (and per endpoint);
what a server cannot do is a strict xfail with the reason, never a skip.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPResponse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

SERVERS = ("llama-server", "llama-cpp-python")
ENDPOINTS = ("completions", "chat")
ALIAS = "smollm2-135m-instruct"
FRANCE = "What is the capital of France? Answer in one word."
CONTINUE = "The capital of France is"  # /completions: a chat model answers a bare question with EOS

# What llama-cpp-python 0.3.36's server does differently (found by running it; see test_capabilities.py).
LCP_NO_JSON_SCHEMA = (
    'refuses response_format {"type": "json_schema"} with HTTP 500 (pydantic: "Input should be \'text\' or '
    '\'json_object\'"); it takes Anyscale\'s {"type": "json_object", "schema": ...}'
)
LCP_NO_STREAM_USAGE = "sends no usage in streams, stream_options.include_usage or not"
LCP_IGNORES_N = "ignores n: one choice per request"
LCP_INTERRUPTS_STREAMS = (
    "cuts a running stream short as soon as another request waits (interrupt_requests, on by default): "
    "[DONE], then the chunked body ends unterminated, so the client raises LMTransportError mid-stream"
)
LLAMA_SERVER_NO_TOOLS = "answers in text even with a forced tool_choice (SmolLM2's template has no tools)"


def prompt_for(chat: bool) -> str:
    return FRANCE if chat else CONTINUE


@dataclass(frozen=True)
class Target:
    """A running server as the tests see it."""

    name: str
    base_url: str
    alias: str

    @property
    def is_llama_cpp_python(self) -> bool:
        return self.name == "llama-cpp-python"


def on_servers(
    *,
    endpoints: bool = False,
    xfail: Mapping[str, str] | None = None,
    needs_core: Mapping[str, str] | None = None,
    servers: tuple[str, ...] = SERVERS,
) -> pytest.MarkDecorator:
    """Parametrize a test over both servers (fixture ``server``; or over ``servers``), and with
    ``endpoints=True`` over both endpoints too (argument ``chat``).

    ``xfail`` maps ``"<server>"`` or ``"<server>/<endpoint>"`` to why that case fails: it becomes
    ``xfail(strict=True)``, so the day it passes the suite says so. ``needs_core`` (same keys) marks
    cases that pass only with the core's server-dialect handling: marker ``core_dialects``.
    """
    xfails, core = dict(xfail or {}), dict(needs_core or {})
    known = set(SERVERS) | {f"{s}/{e}" for s in SERVERS for e in ENDPOINTS}
    assert set(xfails) | set(core) <= known, f"unknown cases: {(set(xfails) | set(core)) - known}"
    assert set(servers) <= set(SERVERS), f"unknown servers: {set(servers) - set(SERVERS)}"
    params = []
    for name in servers:
        for endpoint in ENDPOINTS if endpoints else (None,):
            case = name if endpoint is None else f"{name}/{endpoint}"
            marks = []
            if reason := xfails.get(case) or xfails.get(name):
                marks.append(pytest.mark.xfail(strict=True, reason=f"{name}: {reason}"))
            if core.get(case) or core.get(name):
                marks.append(pytest.mark.core_dialects)
            values = (name,) if endpoint is None else (name, endpoint == "chat")
            params.append(pytest.param(*values, marks=marks, id=case.replace("/", "-")))
    return pytest.mark.parametrize("server" if not endpoints else ("server", "chat"), params, indirect=["server"])


# --------------------------------------------------------------------------- a recording proxy


@dataclass(frozen=True)
class Exchange:
    """One request that went through the proxy, and the status the server answered."""

    method: str
    path: str
    body: Any
    status: int


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


@dataclass
class RecordingProxy:
    """A forwarding proxy on 127.0.0.1 in front of a server, recording every request: the way to count
    what the client really sent (retries, a dialect fallback), whatever the server logs."""

    upstream: str  # the server's base URL, e.g. http://127.0.0.1:8080/v1
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{urlsplit(self.upstream).path}"

    def record(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def posts(self) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if e.method == "POST"]

    def clear(self) -> None:
        with self._lock:
            self.exchanges.clear()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(proxy: RecordingProxy) -> type[BaseHTTPRequestHandler]:
    upstream = urlsplit(proxy.upstream)
    prefix = upstream.path.rstrip("/")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._forward(None)

        def do_POST(self) -> None:
            self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def _forward(self, body: bytes | None) -> None:
            path = prefix + self.path[len(prefix) :] if self.path.startswith(prefix) else self.path
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
            conn = HTTPConnection(upstream.hostname, upstream.port, timeout=600)
            try:
                conn.request(self.command, path, body=body, headers=headers)
                response = conn.getresponse()
                proxy.record(Exchange(self.command, path, _json(body), response.status))
                self._relay(response)
            finally:
                conn.close()

        def _relay(self, response: HTTPResponse) -> None:
            # One response per connection, relayed as it arrives (streams too), ended by closing.
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in _chunks(response):
                self.wfile.write(chunk)
                self.wfile.flush()
            self.close_connection = True

    return Handler


def _chunks(response: HTTPResponse) -> Iterator[bytes]:
    while chunk := response.read1(65536):
        yield chunk


def _json(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body
