"""What the sync and async HTTP stacks share, so that each of them only does I/O.

The :class:`Transport` protocols the engines are typed against, headers, the replies handed to
the engine, status and body checks, the translation of a failure into a ``dspy.lm15`` error (one
message per kind, the same ``METHOD URL`` wording, redaction), the rule for resending a request on
a stale kept-alive connection, and the scrubbing that keeps the API key out of the frames of a
failed request. No I/O here.
"""

from __future__ import annotations

import enum
import logging
import time
import traceback
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .. import _constants as C
from .._config import Endpoint, Timeout
from .._http_errors import error_for_status, unexpected_body
from .._secrets import Secret, Secrets, is_secret_header, redact  # a Secret's repr and str say ***
from .._server_facts import rate_limit_headers
from .wording import explain

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from .._dspy_types import LM15Error, lm15
else:
    from dspy import lm15

logger = logging.getLogger(C.LOGGER_NAME)


class HiddenHeaderValue(str):
    """A header value whose ``repr`` is masked: header dicts are locals of many library frames.

    It is still a ``str`` with the real value, so every HTTP library sends it unchanged.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


@dataclass(frozen=True)
class StreamReply:
    """An open streamed answer: its status, the server's request id, and the byte chunks."""

    status: int
    request_id: str | None
    chunks: Any  # Iterator[bytes] or AsyncIterator[bytes]
    rate_limit: Mapping[str, str] | None = None  # the answer's x-ratelimit-* headers (_server_facts)


@dataclass(frozen=True)
class JsonReply:
    """A parsed 2xx JSON answer and what observability needs from the exchange."""

    data: dict[str, Any] = field(repr=False)  # a body may echo the request's headers: not in captured locals
    status: int
    request_id: str | None
    elapsed: float
    rate_limit: Mapping[str, str] | None = None  # the answer's x-ratelimit-* headers (_server_facts)


class Transport(Protocol):
    """What every transport is, sync or async: where it sends, with which limits and pool, and
    which secret values it sends (for redacting them from text that quotes the server).

    The engine's shared code is typed against this; :class:`BlockingTransport` and
    :class:`AwaitableTransport` add the I/O of each side. ``SyncTransport`` and
    ``AsyncTransport`` satisfy them structurally, as would a test double.
    """

    @property
    def endpoint(self) -> Endpoint: ...
    @property
    def timeout(self) -> Timeout: ...
    @property
    def pool_size(self) -> int: ...
    @property
    def secrets(self) -> Secrets: ...


class BlockingTransport(Transport, Protocol):
    """A transport whose calls block the calling thread (``SyncTransport``)."""

    def request_json(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> JsonReply: ...
    def stream(
        self, path: str, payload: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> AbstractContextManager[StreamReply]: ...
    def close(self) -> None: ...


class AwaitableTransport(Transport, Protocol):
    """A transport whose calls are awaited on the caller's event loop (``AsyncTransport``)."""

    async def request_json(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> JsonReply: ...
    def stream(
        self, path: str, payload: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> AbstractAsyncContextManager[StreamReply]: ...
    async def aclose(self) -> None: ...


def build_headers(api_key: Secret, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers of every request. Both stacks send exactly these (compression included).

    The one place the key is revealed: into the ``Authorization`` value, itself masked in reprs.
    An empty key sends no ``Authorization`` (a local server without auth).
    """
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        # Stated here rather than left to each library's default, so both stacks ask the same.
        "Accept-Encoding": "gzip, deflate",
        "User-Agent": C.USER_AGENT,
    }
    if api_key:
        headers["Authorization"] = HiddenHeaderValue(f"Bearer {api_key.reveal()}")
    for name, value in (extra or {}).items():
        headers[name] = HiddenHeaderValue(value) if is_secret_header(name, value) else value
    return headers


def parse_json_body(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    url: str,
    secret: Secrets | Secret | str | None,
    method: str,
) -> dict[str, Any]:
    """The JSON object of a 2xx answer, or the lm15 error for anything else (``secret``: what to redact)."""
    data: Any = None
    if 200 <= status <= 299:
        why = "Expected a JSON body"
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(data, dict):
                return data
            why = "Expected a JSON object"
        error: Exception = unexpected_body(url, status, body, why, secret, method)
    else:
        error = error_for_status(status, body, headers, url=url, secret=secret, method=method)
    # A server may quote the key back; error reporters record frame locals, so the raw answer goes.
    del body, data
    raise error


def is_json_content_type(content_type: str | None) -> bool:
    """Whether a streamed 2xx answer came back as one JSON document instead of an event stream."""
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/json"


def json_reply(data: dict[str, Any], status: int, headers: Mapping[str, str], started: float) -> JsonReply:
    elapsed = time.perf_counter() - started
    return JsonReply(data, status, headers.get("x-request-id"), elapsed, rate_limit_headers(headers))


def stream_reply(status: int, headers: Mapping[str, str], chunks: Any) -> StreamReply:
    return StreamReply(status, headers.get("x-request-id"), chunks, rate_limit_headers(headers))


def log_exchange(method: str, url: str, status: int | str, started: float) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s %s -> %s in %.1f ms", method, url, status, (time.perf_counter() - started) * 1000)


# --- failures --------------------------------------------------------------------------------


class Failure(enum.Enum):
    """What went wrong, as each stack classifies its own exceptions."""

    CONNECT_TIMEOUT = "connect"
    READ_TIMEOUT = "read"
    INVALID_URL = "invalid URL"
    TRANSPORT = "transport"


class Translator:
    """The one place an HTTP failure of either stack becomes a ``dspy.lm15`` error.

    Holds what every message needs (the limits, every secret value sent, to redact) so the stacks
    pass only the failure, the request line and the exception.
    """

    __slots__ = ("_secrets", "_timeout")

    def __init__(self, timeout: Timeout, secrets: Secrets) -> None:
        self._timeout = timeout
        self._secrets = secrets

    def failure(self, kind: Failure, method: str, url: str, exc: BaseException) -> LM15Error:
        where = f"{method} {url}"
        detail = redact(describe(exc, url), self._secrets)
        scrub_frames(exc)
        if kind is Failure.CONNECT_TIMEOUT or kind is Failure.READ_TIMEOUT:
            limit = self._timeout.connect if kind is Failure.CONNECT_TIMEOUT else self._timeout.read
            return lm15.TimeoutError(
                f"{where} timed out ({kind.value} timeout {limit:g}s): {detail}", provider=C.PROVIDER
            )
        if kind is Failure.INVALID_URL:
            return lm15.ConfigurationError(f"{where}: invalid URL: {detail}", provider=C.PROVIDER)
        return lm15.TransportError(f"{where} failed: {detail}", provider=C.PROVIDER)

    def json(self, status: int, body: bytes, headers: Mapping[str, str], method: str, url: str) -> dict[str, Any]:
        try:
            return parse_json_body(status, body, headers, url=url, secret=self._secrets, method=method)
        except Exception:
            del body  # error reporters record frame locals: the raw answer may quote a secret
            raise

    def status(self, status: int, body: bytes, headers: Mapping[str, str], method: str, url: str) -> LM15Error:
        """The error for a non-2xx answer (``headers`` case-insensitive)."""
        return error_for_status(status, body, headers, url=url, secret=self._secrets, method=method)

    def not_a_stream(self, status: int, body: bytes, method: str, url: str) -> Exception:
        """A streamed request answered with one JSON document (a server that ignored ``stream``)."""
        return unexpected_body(url, status, body, "Expected an event stream", self._secrets, method)


def describe(exc: BaseException, url: str) -> str:
    """What an HTTP library's error means, in the user's words (``could not connect to host:port:
    connection refused``), never its class names (see :mod:`.wording`)."""
    return explain(exc, url)


def scrub_frames(exc: BaseException) -> None:
    """Drop the locals of the finished library frames behind a failure (the exception and its chain).

    Those frames hold the request's headers and the serialised request, ``Authorization``
    included; error reporters that capture locals would record the key. The frames stay in the
    traceback (file, line, function); only their variables go. Frames still running, ours among
    them, are left alone by ``clear_frames``.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        pending += (current.__cause__, current.__context__, *getattr(current, "exceptions", ()))


# --- resending on a stale kept-alive connection ------------------------------------------------


def may_resend(attempt: int, *, reused: bool | None, closed_before_response: bool) -> bool:
    """Whether a failed request is sent again at once, without counting as one of DSPy's retries.

    Only the first attempt, only when the server closed the connection before any byte of a
    response (it never saw, or never answered, the request: a pooled keep-alive connection it had
    already closed), and only on a connection that had carried an earlier request. Once a response
    has started, the server has started generating: resending would pay for the answer twice.
    ``reused=None`` means the connection layer could not tell (a mocked adapter): the exception's
    signature decides alone.
    """
    return attempt == 0 and closed_before_response and reused is not False
