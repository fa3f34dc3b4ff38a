"""What goes on the spans and metric points: names and values, from the observer's data. No I/O, no OpenTelemetry.

Names follow the OpenTelemetry GenAI semantic conventions as the ``opentelemetry-semantic-conventions``
0.66b2 registry (semconv 1.44) lists them, where the ``gen_ai`` names are development-status
and maintained in open-telemetry/semantic-conventions-genai; ``gen_ai.provider.name`` replaced
``gen_ai.system`` in semconv 1.37. Names of our own are under ``dspy_anyscale.``.

Prompt and completion text only ever come from :func:`content_attributes`, which the caller
uses only when the user opted in. Nothing here reads a header: the key cannot reach a span.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from .. import _constants as C
from .._observe import CANCELLED, Attempt, AttemptStart
from .._server_facts import span_attributes as rate_limit_attributes

# --- names -------------------------------------------------------------------------------------

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
SYSTEM = "gen_ai.system"  # deprecated for gen_ai.provider.name; still what many backends group by
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
REQUEST_STREAM = "gen_ai.request.stream"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
OUTPUT_TYPE = "gen_ai.output.type"
TOKEN_TYPE = "gen_ai.token.type"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
HTTP_METHOD = "http.request.method"
HTTP_STATUS = "http.response.status_code"
URL_FULL = "url.full"
REQUEST_ID = "http.response.header.x-request-id"  # HTTP semconv: response headers as string arrays
# Ours. The cache is DSPy's client-side answer cache: the conventions have no attribute for it
# (gen_ai.usage.cache_read.* counts a provider's prompt cache, which is something else).
CACHE_HIT = "dspy_anyscale.cache_hit"
STATUS = "dspy_anyscale.status"  # the usage record's status: ok, cached, cancelled, budget, or the error class
ATTEMPTS = "dspy_anyscale.attempts"
ATTEMPT_NUMBER = "dspy_anyscale.attempt.number"  # AttemptStart.number: retries and n candidates alike
ATTEMPT_WAITED = "dspy_anyscale.attempt.waited_s"  # seconds since the call's previous attempt ended
ENDPOINT = "dspy_anyscale.endpoint"  # the service that answered: a Router's member name, else host:port
MODULE = "dspy_anyscale.module"  # the DSPy module that made the call: its path, e.g. generate_query.predict
ADAPTER = "dspy_anyscale.adapter"  # the LoRA adapter the LM is bound to (absent: the base model)
RESPONSE_ID = "gen_ai.response.id"
CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"  # the server's prompt cache (cached_tokens)

# Metrics, with the bucket boundaries the conventions recommend.
OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_USAGE = "gen_ai.client.token.usage"
TIME_TO_FIRST_CHUNK_METRIC = "gen_ai.client.operation.time_to_first_chunk"
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = tuple(4.0**i for i in range(14))  # 1, 4, 16, ... 67108864
FIRST_CHUNK_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

PROVIDER_NAME = C.PROVIDER  # "anyscale": the name on every error this package raises
_OPERATIONS = {"chat": "chat", "completions": "text_completion"}
_DEFAULT_PORTS = {"http": 80, "https": 443}

Attributes = dict[str, Any]


# --- calls -------------------------------------------------------------------------------------


def operation(endpoint: str | None) -> str:
    """``chat`` for /chat/completions, ``text_completion`` for /completions.

    >>> operation("completions")
    'text_completion'
    """
    return _OPERATIONS.get(endpoint or "", "chat")


def span_name(endpoint: str | None, model: str) -> str:
    """The conventions' ``{gen_ai.operation.name} {gen_ai.request.model}``.

    >>> span_name("chat", "meta-llama/Llama-2-70b-chat-hf")
    'chat meta-llama/Llama-2-70b-chat-hf'
    """
    return f"{operation(endpoint)} {model}"


def server(url: str | None) -> Attributes:
    """``server.address`` and ``server.port`` of a URL (the scheme's port when it names none).

    >>> server("https://svc.anyscaleuserdata.com/v1")
    {'server.address': 'svc.anyscaleuserdata.com', 'server.port': 443}
    """
    return dict(_server(url)) if url else {}


@lru_cache(maxsize=64)  # an instance calls one or two URLs: parse each once
def _server(url: str) -> tuple[tuple[str, Any], ...]:
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return ()
    if not parts.hostname:
        return ()
    return ((SERVER_ADDRESS, parts.hostname), *(((SERVER_PORT, port),) if port else ()))


@lru_cache(maxsize=64)
def safe_url(url: str) -> str:
    """The URL without user:password or query (``url.full`` must carry no credentials).

    >>> safe_url("https://user:pw@host/v1/chat/completions?api-key=x")
    'https://host/v1/chat/completions'
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}{parts.path}"


def base_attributes(endpoint: str | None, model: str) -> Attributes:
    """What every call span and metric point carries."""
    return {OPERATION: operation(endpoint), PROVIDER: PROVIDER_NAME, REQUEST_MODEL: model}


def request_attributes(request: Any) -> Attributes:
    """The generation parameters of a ``dspy.lm15.Request`` that the conventions name (no text)."""
    config = getattr(request, "config", None)
    if config is None:
        return {}
    values = {
        "gen_ai.request.max_tokens": config.max_tokens,
        "gen_ai.request.temperature": config.temperature,
        "gen_ai.request.top_p": config.top_p,
        "gen_ai.request.top_k": config.top_k,
        "gen_ai.request.seed": config.seed,
        "gen_ai.request.frequency_penalty": config.frequency_penalty,
        "gen_ai.request.presence_penalty": config.presence_penalty,
        "gen_ai.request.stop_sequences": list(config.stop) if config.stop else None,
        OUTPUT_TYPE: "json" if config.response_format else None,
    }
    return {name: value for name, value in values.items() if _attribute_value(value)}


def _attribute_value(value: Any) -> bool:
    return isinstance(value, str | bool | int | float | list)


def outcome_attributes(attempts: Iterable[Attempt]) -> Attributes:
    """Response model, finish reasons, tokens and time to first chunk of a call's answered attempts.

    A token count is left out when any answered attempt did not report it: a partial sum would
    understate the call, and 0 would claim it was free.
    """
    answered = [a for a in attempts if a.ok]
    if not answered:
        return {}
    values: Attributes = {
        RESPONSE_MODEL: next((a.response_model for a in reversed(answered) if a.response_model), None),
        RESPONSE_ID: next((a.response_id for a in reversed(answered) if a.response_id), None),
        CACHE_READ_TOKENS: _reported(a.cached_tokens for a in answered),
        FINISH_REASONS: [a.finish_reason for a in answered if a.finish_reason] or None,
        INPUT_TOKENS: _total(a.prompt_tokens for a in answered),
        OUTPUT_TOKENS: _total(a.completion_tokens for a in answered),
        TIME_TO_FIRST_CHUNK: first_chunk_s(answered),
    }
    return {name: value for name, value in values.items() if value is not None}


def _reported(counts: Iterable[int | None]) -> int | None:
    """The sum of the counts the server reported, None when it reported none."""
    values = [value for value in counts if value is not None]
    return sum(values) if values else None


def first_chunk_s(attempts: Iterable[Attempt]) -> float | None:
    """Seconds from sending the request to its first chunk, for the earliest answered stream."""
    ttfts = [a.ttft_s for a in attempts if a.ok and a.ttft_s is not None]
    return min(ttfts) if ttfts else None


def _total(counts: Iterable[int | None]) -> int | None:
    values = list(counts)
    return None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)


def error_type(error: BaseException) -> str:
    """The class name (low cardinality, as ``error.type`` wants): ``LMAuthError``, ``LMServerError``, ..."""
    return type(error).__qualname__


# --- attempts ----------------------------------------------------------------------------------


def attempt_name(start: AttemptStart) -> str:
    """HTTP client span name ``{method} {path}``, e.g. ``POST /v1/chat/completions``."""
    return _attempt_name(start.url)


@lru_cache(maxsize=64)
def _attempt_name(url: str) -> str:
    try:
        path = urlsplit(url).path
    except ValueError:
        path = ""
    return f"POST {path}" if path else "POST"


def attempt_start_attributes(start: AttemptStart) -> Attributes:
    values: Attributes = {
        HTTP_METHOD: "POST",
        URL_FULL: safe_url(start.url),
        **server(start.url),
        ATTEMPT_NUMBER: start.number,
        ATTEMPT_WAITED: round(start.waited_s, 6) if start.waited_s is not None else None,
    }
    return {name: value for name, value in values.items() if value not in (None, "")}


def attempt_end_attributes(attempt: Attempt) -> Attributes:
    values: Attributes = {
        HTTP_STATUS: attempt.status,
        REQUEST_ID: [attempt.request_id] if attempt.request_id else None,
        TIME_TO_FIRST_CHUNK: attempt.ttft_s,
        STATUS: "ok" if attempt.ok else attempt.error,
        # A consumer that stopped reading is no failure of the attempt.
        ERROR_TYPE: attempt.error if not attempt.ok and attempt.error != CANCELLED else None,
        RESPONSE_ID: attempt.response_id,
        CACHE_READ_TOKENS: attempt.cached_tokens,
        **rate_limit_attributes(attempt.rate_limit),
    }
    return {name: value for name, value in values.items() if value is not None}


# --- content (opt-in only) ---------------------------------------------------------------------


def content_attributes(request: Any) -> Attributes:
    """The conventions' opt-in ``gen_ai.system_instructions`` and ``gen_ai.input.messages``, as JSON."""
    values: Attributes = {}
    system = _system_parts(getattr(request, "system", None))
    if system:
        values[SYSTEM_INSTRUCTIONS] = _json(system)
    messages = [_message(m) for m in getattr(request, "messages", ()) or ()]
    if messages:
        values[INPUT_MESSAGES] = _json(messages)
    return values


def output_content(attempts: Iterable[Attempt]) -> Attributes:
    """``gen_ai.output.messages``: one assistant message per answered attempt (a candidate)."""
    messages = [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": a.output_text}] if a.output_text else [],
            "finish_reason": a.finish_reason or "stop",
        }
        for a in attempts
        if a.ok
    ]
    return {OUTPUT_MESSAGES: _json(messages)} if messages else {}


def _system_parts(system: Any) -> list[dict[str, Any]]:
    if not system:
        return []
    if isinstance(system, str):
        return [{"type": "text", "content": system}]
    return [_part(part) for part in system]


def _message(message: Any) -> dict[str, Any]:
    role = getattr(message, "role", "user")
    return {"role": "system" if role == "developer" else role, "parts": [_part(p) for p in message.parts]}


def _part(part: Any) -> dict[str, Any]:
    """One part in the conventions' JSON schema; media are named, never copied (no blobs on spans)."""
    kind = getattr(part, "type", "text")
    if kind == "text":
        return {"type": "text", "content": part.text}
    if kind == "thinking":
        return {"type": "reasoning", "content": part.text}
    if kind == "tool_call":
        return {"type": "tool_call", "id": part.id, "name": part.name, "arguments": part.input}
    if kind == "tool_result":
        texts = [getattr(item, "text", "") for item in part.content]
        return {"type": "tool_call_response", "id": part.id, "response": "".join(texts)}
    return {"type": kind}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def merged(*parts: Mapping[str, Any]) -> Attributes:
    result: Attributes = {}
    for part in parts:
        result.update(part)
    return result
