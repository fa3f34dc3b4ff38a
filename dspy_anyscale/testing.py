"""A scriptable OpenAI-compatible stub server on 127.0.0.1, for tests and benchmarks.

Stdlib only. It answers ``/v1/chat/completions``, ``/v1/completions`` (both also streamed as
server-sent events) and ``/v1/models``, records every request, and plays scripted faults::

    with StubServer() as server:
        server.script(Fault(status=429, headers={"Retry-After": "0"}), Fault(reset=True))
        lm = Anyscale("stub-model", api_base=server.base_url, api_key="sk-test")

By default the answer is built from the prompt so that DSPy's ChatAdapter and JSONAdapter can
parse it: every output field the prompt asks for is filled with ``"<field> for <first input>"``.
Pass ``responder=`` to answer otherwise. ``response_headers=`` are sent with every answer (e.g.
``x-ratelimit-remaining-requests``), and ``cached_tokens=`` reports that many of each JSON answer's
prompt tokens as served from a prompt cache (``usage.prompt_tokens_details.cached_tokens``), as
vLLM does; both can be changed between requests.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import random
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A responder gets the endpoint ("chat" or "completions") and the request body, and returns the
# answer text, or for chat a message dict such as {"content": None, "tool_calls": [...]}.
Responder = Callable[[str, dict[str, Any]], "str | dict[str, Any]"]

_RESPOND = re.compile(r"Respond with (?:the corresponding output fields|a JSON object)[^\n]*")
_FIELD_NAME = re.compile(r"`(?:\[\[ ## )?(\w+)(?: ## \]\])?`")
_INPUT_FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n|\Z)", re.DOTALL)


@dataclass
class Fault:
    """One scripted behaviour, used for the next matching request instead of a normal answer.

    status/headers/body: answer with this status (``body`` as JSON if not bytes).
    reset: close the connection without answering (a connection reset).
    close: close the connection without answering, cleanly (FIN): what a server does to a
        kept-alive connection it has timed out, seen by a client that sends on it just then.
    delay: seconds to wait before answering normally (or before the fault).
    stream_cut_after: for a streamed request, send this many chunks and then drop the connection.
    body_cut_after: send the status line, the headers (with the full Content-Length) and only
        this many bytes of the body, then close the connection (a server that died mid-answer).
    ignore_stream: answer a streamed request with one plain JSON completion (a server or gateway
        that ignores ``stream: true``).
    gzip: send the JSON answer gzip-compressed (``Content-Encoding: gzip``).
    path: only requests whose path ends with this (default: any).
    """

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    reset: bool = False
    close: bool = False
    delay: float = 0.0
    stream_cut_after: int | None = None
    body_cut_after: int | None = None
    ignore_stream: bool = False
    gzip: bool = False
    path: str | None = None


# Transient faults a real deployment produces; each one is retried by DSPy.
DEFAULT_CHAOS = [
    Fault(status=500, headers={"Retry-After": "0"}),
    Fault(
        status=502,
        body=b"<html><body>Bad Gateway</body></html>",
        headers={"Content-Type": "text/html", "Retry-After": "0"},
    ),
    Fault(status=503, headers={"Retry-After": "0"}),
    Fault(status=429, headers={"Retry-After": "0"}),
    Fault(reset=True),
]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    peer: tuple[str, int] | None = None  # the client's address: one per connection


def dspy_field_responder(endpoint: str, body: dict[str, Any]) -> str:
    """Fill the output fields a DSPy adapter asks for, from the prompt's first input value.

    Reads the adapter's closing instruction ("Respond with the corresponding output fields, ..."
    or "Respond with a JSON object ...") and answers in that format; anything else is echoed.
    """
    text = _last_user_text(endpoint, body)
    instructions = _RESPOND.findall(text)
    instruction = instructions[-1] if instructions else ""
    outputs = [name for name in dict.fromkeys(_FIELD_NAME.findall(instruction)) if name != "completed"]
    inputs = [
        value.strip()
        for name, value in _INPUT_FIELD.findall(text)
        if value.strip() != f"{{{name}}}" and name not in outputs and name != "completed"
    ]
    subject = inputs[0] if inputs else text.strip()[:80]
    if not outputs:
        return f"echo: {subject}"
    if "JSON" in instruction or "response_format" in body:
        return json.dumps({name: f"{name} for {subject}" for name in outputs})
    parts = [f"[[ ## {name} ## ]]\n{name} for {subject}" for name in outputs]
    return "\n\n".join([*parts, "[[ ## completed ## ]]"])


def _prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    if endpoint == "completions":
        return str(body.get("prompt", ""))
    return "\n\n".join(_content_text(m.get("content")) for m in body.get("messages", []))


def _last_user_text(endpoint: str, body: dict[str, Any]) -> str:
    if endpoint == "completions":
        return str(body.get("prompt", ""))
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return _content_text(users[-1].get("content")) if users else ""


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return str(content or "")


class StubServer:
    """Threaded HTTP/1.1 keep-alive server; start with ``with`` or :meth:`start`."""

    def __init__(
        self,
        *,
        responder: Responder = dspy_field_responder,
        latency: float = 0.0,
        api_key: str | None = None,
        model: str = "stub-model",
        models: list[dict[str, Any]] | None = None,
        port: int = 0,
        response_headers: dict[str, str] | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        self.responder = responder
        self.response_headers = dict(response_headers or {})  # sent with every answer
        self.cached_tokens = cached_tokens  # reported as cached in each JSON answer's usage (at most its prompt)
        self._port = port  # 0: any free port; a given one restarts a stopped server where clients knew it
        self.models = models  # the GET /models "data" entries; default: one entry for `model`
        self.latency = latency
        self.api_key = api_key
        self.model = model
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0  # POSTs being answered that arrived since the last reset()
        self.max_in_flight = 0
        # Bumped by reset(): a request that arrived before (a hung one an earlier test abandoned) leaves
        # without touching the counts, which describe what came after.
        self._generation = 0
        self._faults: deque[Fault] = deque()
        self._chaos: tuple[float, list[Fault]] = (0.0, [])
        self._random = random.Random(0)
        self._lock = threading.Lock()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> StubServer:
        handler = type("Handler", (_Handler,), {"stub": self})
        server = _QuietServer(("127.0.0.1", self._port), handler)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="stub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection, as a stopped service would: a client's kept-alive
        connection must not go on being answered."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- scripting -----------------------------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """Queue faults; each is used once, by the next request it matches."""
        with self._lock:
            self._faults.extend(faults)

    def chaos(self, rate: float, faults: list[Fault] | None = None, seed: int = 0) -> None:
        """From now on, each POST fails with probability ``rate``, with a fault drawn from ``faults``."""
        with self._lock:
            self._chaos = (rate, list(faults or DEFAULT_CHAOS))
            self._random = random.Random(seed)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()
            self._chaos = (0.0, [])
            self._generation += 1
            self.in_flight = 0
            self.max_in_flight = 0

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path is None or path.endswith(fault.path):
                    self._faults.remove(fault)
                    return fault
            rate, faults = self._chaos
            if rate and self._random.random() < rate:
                return self._random.choice(faults)
        return None

    def _enter(self) -> int:
        """Count a POST in; returns the generation to hand back to :meth:`_leave`."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._generation

    def _leave(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self.in_flight -= 1

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def posts(self, path_suffix: str = "") -> list[RecordedRequest]:
        """The recorded POST requests whose path ends with ``path_suffix``."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith(path_suffix)]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    # listen() backlog: a burst of 256 new connections (a benchmark's fan-out) must all be queued,
    # not refused or left to SYN retries (1 s each), while the accept loop starts their threads.
    request_queue_size = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()  # connections being served (kept alive between requests)
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every open connection now (their handler threads see it closed and finish)."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, reset) is part of the tests, not a server error.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    stub: StubServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms to every small response

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr logging
        pass

    # --- plumbing ------------------------------------------------------------------------------

    def _send_json(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, fault: Fault | None = None
    ) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = dict(headers or {})
        if fault is not None and fault.gzip:
            data = gzip.compress(data)
            headers["Content-Encoding"] = "gzip"
        self.send_response(status)
        content_type = "application/json"
        for name, value in headers.items():
            if name.lower() == "content-type":
                content_type = value
            else:
                self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", self._request_id())
        self.end_headers()
        if fault is not None and fault.body_cut_after is not None:
            self.wfile.write(data[: fault.body_cut_after])
            self.wfile.flush()
            self._close_connection()
            return
        self.wfile.write(data)

    def _request_id(self) -> str:
        return f"req-{len(self.stub.requests)}"

    def _close_connection(self) -> None:
        # shutdown() sends the FIN now; close() alone would wait for the handler to return.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _reset_connection(self) -> None:
        # SO_LINGER 0: close() sends RST instead of FIN, as a crashed peer or a proxy would.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _read_body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return {"_unparseable": raw.decode("utf-8", "replace")}

    def _authorized(self) -> bool:
        if self.stub.api_key is None or self.headers.get("Authorization") == f"Bearer {self.stub.api_key}":
            return True
        self._send_json(401, {"error": {"message": "Invalid API key", "type": "authentication_error"}})
        return False

    # --- routes --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.stub._record(RecordedRequest("GET", self.path, dict(self.headers), None, self.client_address))
        if not self._authorized():
            return
        if self.path.rstrip("/").endswith("/models"):
            data = self.stub.models or [{"id": self.stub.model, "object": "model", "owned_by": "stub"}]
            self._send_json(200, {"object": "list", "data": data})
        elif self.path.endswith("/health"):
            self._send_json(200, {"status": "ok"})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        generation = self.stub._enter()
        try:
            self._post()
        finally:
            self.stub._leave(generation)

    def _post(self) -> None:
        body = self._read_body()
        self.stub._record(RecordedRequest("POST", self.path, dict(self.headers), body, self.client_address))
        fault = self.stub._next_fault(self.path)
        time.sleep(self.stub.latency + (fault.delay if fault else 0.0))
        if fault and fault.reset:
            self._reset_connection()
            return
        if fault and fault.close:
            self._close_connection()
            return
        if fault and fault.status is not None:
            self._send_json(
                fault.status,
                fault.body if fault.body is not None else {"error": {"message": "scripted"}},
                fault.headers,
                fault,
            )
            return
        if not self._authorized():
            return
        endpoint = "chat" if self.path.endswith("/chat/completions") else "completions"
        if not self.path.endswith("/completions") or body is None or "_unparseable" in body:
            self._send_json(404 if body is not None else 400, {"error": {"message": "bad request"}})
            return
        answer = self.stub.responder(endpoint, body)
        if body.get("stream") and not (fault and fault.ignore_stream):
            self._stream(endpoint, body, answer, fault)
        else:
            completion = _completion(endpoint, body, answer, self.stub.model)
            if self.stub.cached_tokens is not None:
                usage = completion["usage"]
                usage["prompt_tokens_details"] = {"cached_tokens": min(self.stub.cached_tokens, usage["prompt_tokens"])}
            self._send_json(200, completion, dict(self.stub.response_headers), fault=fault)

    def _stream(self, endpoint: str, body: dict[str, Any], answer: str | dict[str, Any], fault: Fault | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("x-request-id", self._request_id())
        for name, value in self.stub.response_headers.items():
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cut = fault.stream_cut_after if fault else None
        for count, event in enumerate(_stream_events(endpoint, body, answer, self.stub.model)):
            if cut is not None and count >= cut:
                self._reset_connection()
                return
            data = f"data: {event}\n\n".encode()
            self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt_tokens = len(_prompt_text("completions", body).split()) + len(_prompt_text("chat", body).split())
    completion_tokens = max(1, len(text.split()))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def tool_call_message(name: str, arguments: dict[str, Any] | str, call_id: str = "call_1") -> dict[str, Any]:
    """A chat answer that calls one tool, for a responder to return."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return {
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
    }


def _split_answer(answer: str | dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(answer, dict):
        return answer.get("content") or "", list(answer.get("tool_calls") or [])
    return answer, []


def _completion(endpoint: str, body: dict[str, Any], answer: str | dict[str, Any], model: str) -> dict[str, Any]:
    text, tool_calls = _split_answer(answer)
    max_tokens = body.get("max_tokens")
    finish = "length" if max_tokens is not None and len(text.split()) > max_tokens else "stop"
    if finish == "length":
        text = " ".join(text.split()[:max_tokens])
    choice: dict[str, Any] = {"index": 0, "finish_reason": "tool_calls" if tool_calls else finish}
    if endpoint == "chat":
        choice["message"] = {"role": "assistant", "content": text or (None if tool_calls else "")}
        if tool_calls:
            choice["message"]["tool_calls"] = tool_calls
        if body.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {"token": w, "logprob": -0.1 * (i + 1), "bytes": None, "top_logprobs": []}
                    for i, w in enumerate(text.split())
                ]
            }
    else:
        choice["text"] = text
        if body.get("logprobs") is not None:
            words = text.split()
            choice["logprobs"] = {
                "tokens": words,
                "token_logprobs": [-0.1] * len(words),
                "top_logprobs": [{w: -0.1} for w in words],
                "text_offset": [],
            }
    object_name = "chat.completion" if endpoint == "chat" else "text_completion"
    return {
        "id": f"cmpl-{time.monotonic_ns()}",
        "object": object_name,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(body, text),
    }


def _stream_events(endpoint: str, body: dict[str, Any], answer: str | dict[str, Any], model: str) -> Iterator[str]:
    text, tool_calls = _split_answer(answer)
    ident = f"cmpl-{time.monotonic_ns()}"
    words = re.findall(r"\S+\s*|\s+", text) or ([] if tool_calls else [""])

    def chunk(delta_text: str | None, finish: str | None) -> str:
        if endpoint == "chat":
            delta = {"content": delta_text} if delta_text is not None else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": finish}
        return json.dumps({"id": ident, "model": model, "choices": [choice]})

    if endpoint == "chat":
        yield json.dumps(
            {
                "id": ident,
                "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
            }
        )
    for word in words:
        yield chunk(word, None)
    for index, call in enumerate(tool_calls):  # name first, arguments in two fragments
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        first = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": arguments[:half]},
        }
        for fragment in (first, {"index": index, "function": {"arguments": arguments[half:]}}):
            yield json.dumps(
                {
                    "id": ident,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"tool_calls": [fragment]}, "finish_reason": None}],
                }
            )
    yield chunk(None, "tool_calls" if tool_calls else "stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        yield json.dumps({"id": ident, "model": model, "choices": [], "usage": _usage(body, text)})
    yield "[DONE]"
