"""HTTP for the sync and async paths, and the one place HTTP failures become ``dspy.lm15`` errors.

Sync uses ``requests`` through a pooled ``HTTPAdapter``; async uses ``httpx`` (one client per
event loop). Both share the same headers, status handling and body checks; only I/O differs.

The sync fast path skips ``requests.Session.request`` (cookie jars, netrc lookups, re-reading
proxy variables and re-parsing the URL on every call) and hands a copy of a pre-built
``PreparedRequest`` straight to ``HTTPAdapter.send``. Proxy and CA-bundle variables are read once,
at construction. Going through the adapter keeps ``responses``-based tests valid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.client import RemoteDisconnected
from typing import TYPE_CHECKING, Any

import orjson
import requests
from dspy import lm15
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from . import _constants as C
from ._config import Endpoint, Timeout
from ._http_errors import PROVIDER, error_for_status, redact, unexpected_body

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(C.LOGGER_NAME)

# Errors that mean "the pooled keep-alive connection was already closed by the server" when
# raised before any response byte: retried once at once, on a fresh connection.
_STALE_CONNECTION_ERRORS = (RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class StreamReply:
    """An open streamed answer: its status, the server's request id, and the byte chunks."""

    status: int
    request_id: str | None
    chunks: Any  # Iterator[bytes] or AsyncIterator[bytes]


@dataclass(frozen=True)
class JsonReply:
    """A parsed 2xx JSON answer and what observability needs from the exchange."""

    data: dict[str, Any]
    status: int
    request_id: str | None
    elapsed: float


def build_headers(api_key: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": C.USER_AGENT,
    }
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def parse_json_body(
    status: int, body: bytes, headers: Mapping[str, str], *, url: str, secret: str | None, method: str
) -> dict[str, Any]:
    """The JSON object of a 2xx answer, or the lm15 error for anything else."""
    if not 200 <= status <= 299:
        raise error_for_status(status, body, headers, url=url, secret=secret, method=method)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise unexpected_body(url, status, body, "Expected a JSON body", secret, method) from None
    if not isinstance(data, dict):
        raise unexpected_body(url, status, body, "Expected a JSON object", secret, method)
    return data


def _is_stale_connection(exc: BaseException) -> bool:
    """True when a send failed because a reused connection had been closed by the server."""
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        if isinstance(current, _STALE_CONNECTION_ERRORS):
            return True
        if type(current).__name__ in ("NewConnectionError", "ConnectTimeoutError", "NameResolutionError"):
            return False  # a fresh connection failed: nothing stale about it
        pending.extend(current.args)
        pending.extend((current.__cause__, current.__context__))
    return False


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an HTTP library error, falling back to its cause (resets often carry no text)."""
    text = str(exc) or str(exc.__cause__ or exc.__context__ or "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _log(method: str, url: str, status: int | str, started: float) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s %s -> %s in %.1f ms", method, url, status, (time.perf_counter() - started) * 1000)


# --- sync ------------------------------------------------------------------------------------


class _OneHostAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` for a client that only ever talks to one base URL.

    ``send`` is the base class's (so ``responses`` mocks still apply); two per-request costs it
    pays are skipped: the connection-pool lookup (parsing the URL and normalising a pool key on
    every call; memoised per URL when no proxy is involved) and cookie extraction (an API client
    keeps no cookie jar).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pools: dict[str, Any] = {}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):  # type: ignore[override]
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        pool = self._pools.get(request.url)
        if pool is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pools[request.url] = pool
        return pool

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


class SyncTransport:
    """Thread-safe, pooled HTTP to one base URL. The API key lives here and nowhere else."""

    def __init__(
        self,
        endpoint: Endpoint,
        timeout: Timeout,
        *,
        headers: Mapping[str, str] | None = None,
        pool_size: int = C.DEFAULT_POOL_SIZE,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.pool_size = pool_size
        self._secret = endpoint.api_key
        self._headers = build_headers(endpoint.api_key, headers)
        self._adapter = _OneHostAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._proxies = requests.utils.get_environ_proxies(endpoint.base_url)
        self._verify: bool | str = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._templates: dict[tuple[str, str], requests.PreparedRequest] = {}
        # An LM nobody closes still releases its sockets when collected (no ResourceWarning).
        weakref.finalize(self, self._adapter.close)

    def __repr__(self) -> str:
        return f"SyncTransport(base_url={self.endpoint.base_url!r})"

    def _prepared(self, method: str, path: str, body: bytes | None) -> requests.PreparedRequest:
        template = self._templates.get((method, path))
        if template is None:
            template = requests.PreparedRequest()
            template.prepare(method=method, url=self.endpoint.url(path), headers=self._headers)
            self._templates[(method, path)] = template  # racing threads build equal templates: harmless
        prepared = template.copy()
        if body is not None:
            prepared.body = body
            prepared.headers["Content-Length"] = str(len(body))
        return prepared

    def _send(self, prepared: requests.PreparedRequest, *, stream: bool) -> requests.Response:
        for attempt in (0, 1):
            try:
                return self._adapter.send(
                    prepared, stream=stream, timeout=self.timeout.as_tuple(), verify=self._verify, proxies=self._proxies
                )
            except requests.ConnectionError as exc:
                if attempt == 0 and _is_stale_connection(exc):
                    logger.debug("retrying %s on a fresh connection after a stale keep-alive one", prepared.url)
                    continue
                raise self._translate(exc, prepared) from exc
            except requests.RequestException as exc:
                raise self._translate(exc, prepared) from exc
        raise AssertionError("unreachable")

    def _translate(self, exc: requests.RequestException, prepared: requests.PreparedRequest) -> lm15.LM15Error:
        where = f"{prepared.method} {prepared.url}"
        detail = redact(_describe(exc), self._secret)
        if isinstance(exc, requests.Timeout):
            phase = "connect" if isinstance(exc, requests.ConnectTimeout) else "read"
            limit = self.timeout.connect if phase == "connect" else self.timeout.read
            return lm15.TimeoutError(f"{where} timed out ({phase} timeout {limit:g}s): {detail}", provider=PROVIDER)
        if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
            return lm15.ConfigurationError(f"{where}: invalid URL: {detail}", provider=PROVIDER)
        return lm15.TransportError(f"{where} failed: {detail}", provider=PROVIDER)

    def request_json(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> JsonReply:
        body = orjson.dumps(payload) if payload is not None else None
        prepared = self._prepared(method, path, body)
        started = time.perf_counter()
        response = self._send(prepared, stream=False)
        try:
            content = response.content
        except requests.RequestException as exc:
            raise self._translate(exc, prepared) from exc
        _log(method, prepared.url, response.status_code, started)
        data = parse_json_body(
            response.status_code, content, response.headers, url=prepared.url, secret=self._secret, method=method
        )
        return JsonReply(
            data, response.status_code, response.headers.get("x-request-id"), time.perf_counter() - started
        )

    @contextmanager
    def stream(self, path: str, payload: Mapping[str, Any]) -> Iterator[StreamReply]:
        """Open a streamed POST; yields a :class:`StreamReply` whose chunks arrive as they are sent."""
        prepared = self._prepared("POST", path, orjson.dumps(payload))
        started = time.perf_counter()
        response = self._send(prepared, stream=True)
        try:
            if not 200 <= response.status_code <= 299:
                content = response.content
                _log("POST", prepared.url, response.status_code, started)
                raise error_for_status(
                    response.status_code, content, response.headers, url=prepared.url, secret=self._secret
                )
            yield StreamReply(
                response.status_code, response.headers.get("x-request-id"), self._chunks(response, prepared)
            )
        finally:
            response.close()

    def _chunks(self, response: requests.Response, prepared: requests.PreparedRequest) -> Iterator[bytes]:
        try:
            # requests turns urllib3's mid-stream failures (reset, timeout, bad chunk) into its own errors.
            yield from response.iter_content(chunk_size=65536)
        except requests.RequestException as exc:
            raise self._translate(exc, prepared) from exc

    def close(self) -> None:
        self._adapter.close()


# --- async -----------------------------------------------------------------------------------


class AsyncTransport:
    """Async twin of :class:`SyncTransport` on httpx: one pooled client per running event loop.

    A client is bound to the loop that created it, and DSPy users call ``asyncio.run`` many
    times; clients of loops that have closed are dropped.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        timeout: Timeout,
        *,
        headers: Mapping[str, str] | None = None,
        pool_size: int = C.DEFAULT_POOL_SIZE,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.pool_size = pool_size
        self._secret = endpoint.api_key
        self._headers = build_headers(endpoint.api_key, headers)
        # Per loop: the client and the async generator that closes it when the loop shuts down.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"AsyncTransport(base_url={self.endpoint.base_url!r})"

    async def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None:
            client = self._new_client()
            closer = _close_at_loop_shutdown(client)
            await closer.__anext__()
            entry = self._clients.setdefault(loop, (client, closer))
            if entry[0] is not client:  # another task of this loop won the race
                await closer.aclose()
        return entry[0]

    def _new_client(self) -> httpx.AsyncClient:
        import httpx  # only the async path needs it

        timeout = self.timeout
        return httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(connect=timeout.connect, read=timeout.read, write=timeout.read, pool=timeout.read),
            limits=httpx.Limits(max_connections=self.pool_size, max_keepalive_connections=self.pool_size),
            trust_env=True,
        )

    def _translate(self, exc: Exception, method: str, url: str) -> lm15.LM15Error:
        import httpx

        where = f"{method} {url}"
        detail = redact(_describe(exc), self._secret)
        if isinstance(exc, httpx.TimeoutException):
            phase = "connect" if isinstance(exc, httpx.ConnectTimeout) else "read"
            limit = self.timeout.connect if phase == "connect" else self.timeout.read
            return lm15.TimeoutError(f"{where} timed out ({phase} timeout {limit:g}s): {detail}", provider=PROVIDER)
        if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
            return lm15.ConfigurationError(f"{where}: invalid URL: {detail}", provider=PROVIDER)
        return lm15.TransportError(f"{where} failed: {detail}", provider=PROVIDER)

    async def _send(self, method: str, url: str, body: bytes | None, *, stream: bool) -> httpx.Response:
        import httpx

        client = await self._client()
        for attempt in (0, 1):
            try:
                request = client.build_request(method, url, content=body)
                return await client.send(request, stream=stream)
            except httpx.RemoteProtocolError as exc:
                if attempt == 0:
                    logger.debug("retrying %s on a fresh connection after a stale keep-alive one", url)
                    continue
                raise self._translate(exc, method, url) from exc
            except httpx.HTTPError as exc:
                raise self._translate(exc, method, url) from exc
        raise AssertionError("unreachable")

    async def request_json(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> JsonReply:
        import httpx

        url = self.endpoint.url(path)
        body = orjson.dumps(payload) if payload is not None else None
        started = time.perf_counter()
        response = await self._send(method, url, body, stream=False)
        _log(method, url, response.status_code, started)
        try:
            content = response.content
        except httpx.HTTPError as exc:
            raise self._translate(exc, method, url) from exc
        data = parse_json_body(
            response.status_code, content, response.headers, url=url, secret=self._secret, method=method
        )
        return JsonReply(
            data, response.status_code, response.headers.get("x-request-id"), time.perf_counter() - started
        )

    @asynccontextmanager
    async def stream(self, path: str, payload: Mapping[str, Any]) -> AsyncIterator[StreamReply]:
        url = self.endpoint.url(path)
        response = await self._send("POST", url, orjson.dumps(payload), stream=True)
        try:
            if not 200 <= response.status_code <= 299:
                content = await response.aread()
                raise error_for_status(
                    response.status_code, content, CaseInsensitiveDict(response.headers), url=url, secret=self._secret
                )
            yield StreamReply(response.status_code, response.headers.get("x-request-id"), self._chunks(response, url))
        finally:
            await response.aclose()

    async def _chunks(self, response: httpx.Response, url: str) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as exc:
            raise self._translate(exc, "POST", url) from exc

    async def aclose(self) -> None:
        """Close the client of the running loop (those of other loops close when their loop shuts down)."""
        entry = self._clients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()


async def _close_at_loop_shutdown(client: httpx.AsyncClient) -> AsyncIterator[None]:
    """Parked after its first step; ``loop.shutdown_asyncgens()`` (which ``asyncio.run`` calls before
    closing the loop) resumes it with GeneratorExit, and the client is closed inside its own loop."""
    try:
        yield
    finally:
        await client.aclose()
