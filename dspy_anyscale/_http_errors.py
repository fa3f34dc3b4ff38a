"""From an HTTP failure to the ``dspy.lm15`` error DSPy's retry loop understands. Pure: no I/O.

The transports call these for both HTTP libraries, so a status means the same thing on the sync
and the async path. Every message passes through :func:`redact` before it leaves: given the
transport's :class:`Secrets`, the key and every secret header value the request carried go.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import orjson

from . import _constants as C
from ._secrets import Secret, Secrets, redact
from ._text import preview
from .errors import UnexpectedResponseError

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from ._dspy_types import ErrorDetails, LM15Error, lm15
else:
    from dspy import lm15

# Phrases servers use for "prompt + max_tokens do not fit the context window":
# vLLM / Ray Serve LLM ("maximum context length"), llama.cpp (exceed_context_size_error,
# "exceeds the available context size"), OpenAI ("context_length_exceeded"), TGI ("must be <=").
_CONTEXT_PATTERNS = re.compile(
    r"context[_ ]length|context[_ ]size|context window|maximum context|exceed_context|"
    r"too many tokens|prompt is too long|input is too long|longer than the model",
    re.IGNORECASE,
)
_UNKNOWN_MODEL_PATTERNS = re.compile(r"model .*(does not exist|not found)|unknown model|no such model", re.IGNORECASE)
_AUTH_HINT = (
    f"Check the key: pass api_key=... to Anyscale(...) or set {C.ENV_API_KEY} (an Anyscale Service's bearer "
    "token, or the --api-key your server was started with)"
)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

    None when there is no usable hint; ``math.inf`` for a wait too large to represent ("inf", "1e400",
    an HTTP date centuries ahead), which the engine refuses to wait like any wait above its cap.
    """
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = headers.get("retry-after")
    seconds = _seconds(value)
    if seconds is not None or value is None:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _seconds(value: object) -> float | None:
    """A non-negative number of seconds; ``inf`` for an infinite or overflowing one; None for anything else."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]  # any object: what float() refuses is caught below
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(number) or number < 0:
        return None
    return number if math.isfinite(number) else math.inf


def error_detail(body: bytes) -> tuple[str, str | None]:
    """(message, provider code) from the error shapes OpenAI-compatible servers send.

    ``{"error": {"message", "type", "code"}}`` (OpenAI, vLLM, llama.cpp), ``{"error": "text"}``,
    FastAPI's ``{"detail": [...]}`` or ``{"detail": "text"}``, ``{"message": ...}``; anything
    else is quoted.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return preview(body), None
    if not isinstance(data, dict):
        return preview(body), None
    error = data.get("error")
    if isinstance(error, dict):
        code = error.get("type") or error.get("code")
        return str(error.get("message") or preview(orjson.dumps(error))), str(code) if code is not None else None
    if isinstance(error, str):
        return error, None
    detail = data.get("detail")
    if isinstance(detail, list):
        return "; ".join(_fastapi_item(item) for item in detail), "validation_error"
    if isinstance(detail, str):
        return detail, None
    if isinstance(data.get("message"), str):
        return data["message"], None
    return preview(body), None


def _fastapi_item(item: object) -> str:
    if isinstance(item, dict):
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        return f"{location}: {item.get('msg', item)}" if location else str(item.get("msg", item))
    return str(item)


# Pydantic's summary line ("1 validation error for CreateChatCompletionRequest") and FastAPI's
# per-field list ({"detail": [{"loc": ["body", ...], ...}]}).
# A name without "Request" (a response model) is the server failing on its own output: a real 5xx.
_PYDANTIC_SUMMARY = re.compile(r"\b\d+ validation errors? for \w*Request\w*")
# FastAPI's RequestValidationError turned into text: [{'type': ..., 'loc': ('body', ...), ...}]
_BODY_LOCATION = re.compile(r"""['"]loc['"]\s*:\s*[(\[]\s*['"]body['"]""")
_VALIDATION_HINT = " (the server could not validate the request body: not retried)"


def is_request_validation_error(body: bytes) -> bool:
    """True when an error body says the request body failed validation (FastAPI / pydantic)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _names_the_body(body.decode("utf-8", "replace"))
    if isinstance(data, dict) and isinstance(data.get("detail"), list):
        return any(isinstance(item, dict) and (item.get("loc") or [None])[0] == "body" for item in data["detail"])
    message, _ = error_detail(body)
    return _names_the_body(message)


def _names_the_body(text: str) -> bool:
    return bool(_PYDANTIC_SUMMARY.search(text) or _BODY_LOCATION.search(text))


def error_for_status(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    url: str,
    secret: str | Secret | Secrets | None,
    method: str = "POST",
) -> LM15Error:
    """The lm15 error for a non-2xx answer. ``headers`` must be case-insensitive."""
    message, code = error_detail(body)
    request_id = headers.get("x-request-id") or headers.get("request-id")
    text = redact(f"{message} ({method} {url} → HTTP {status})", secret)
    common: ErrorDetails = {"provider": C.PROVIDER, "status": status, "provider_code": code, "request_id": request_id}
    if status in (401, 403):
        return lm15.AuthError(text, credential_hint=_AUTH_HINT, **common)
    if status == 402:
        return lm15.BillingError(text, **common)
    if status == 429:
        return lm15.RateLimitError(text, retry_after=parse_retry_after(headers), **common)
    if status in (408, 504):
        return lm15.TimeoutError(text, **common)
    if 500 <= status <= 599 and is_request_validation_error(body):
        # llama-cpp-python (FastAPI) answers a body it cannot validate with 500: the request is at fault,
        # and sending it again cannot help.
        return lm15.InvalidRequestError(text + _VALIDATION_HINT, **common)
    if 500 <= status <= 599:
        return lm15.ServerError(text, retry_after=parse_retry_after(headers), **common)
    if status == 404 and _UNKNOWN_MODEL_PATTERNS.search(message):
        return lm15.UnsupportedModelError(text, **common)
    if status == 404:
        hint = " Check that the base URL ends with the API prefix, usually /v1."
        return lm15.InvalidRequestError(text + hint, **common)
    if status in (400, 413, 422) and _CONTEXT_PATTERNS.search(f"{message} {code or ''}"):
        return lm15.ContextLengthError(text, **common)
    if 300 <= status <= 399:
        location = headers.get("location", "(no Location header)")
        return lm15.InvalidRequestError(
            redact(f"The server redirected {method} {url} to {location}; use that address as the base URL", secret),
            **common,
        )
    if 400 <= status <= 499:
        return lm15.InvalidRequestError(text, **common)
    return lm15.ProviderError(text, **common)


def unexpected_body(
    url: str, status: int, body: bytes, why: str, secret: str | Secret | Secrets | None, method: str = "POST"
) -> UnexpectedResponseError:
    """A 2xx answer that is not what an OpenAI-compatible endpoint sends, quoted."""
    text = f"{why} from {method} {url} (HTTP {status}); the server sent: {preview(body)}"
    if body.lstrip()[:1] == b"<":
        text += ". An HTML page usually means the base URL points at a website or gateway, not at the API"
    return UnexpectedResponseError(redact(text, secret), provider=C.PROVIDER, status=status)
