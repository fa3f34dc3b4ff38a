"""The sync HTTP stack: ``requests``' ``HTTPAdapter`` over urllib3, pooled, thread-safe.

Every request goes through ``HTTPAdapter.send`` (requests' documented way to send a
``PreparedRequest``), so ``responses``-based tests apply unchanged. ``requests.Session`` is left
out on purpose: per request it merges cookie jars, looks up ``.netrc`` and re-reads the proxy
variables, none of which an API client with one base URL wants (the environment is read once,
by :mod:`.env`).

Public API only, so that a new Python, requests or urllib3 cannot break it silently:

- requests: ``HTTPAdapter(pool_connections=, pool_maxsize=, max_retries=)`` and ``send``; four
  of the hooks its API reference documents "for use when subclassing the HTTPAdapter"
  (``init_poolmanager``, ``proxy_manager_for``, ``get_connection_with_tls_context``,
  ``request_url``), each overridden to call the original (see :class:`_Adapter`);
  ``PreparedRequest.prepare`` and its documented ``method``/``url``/``headers``/``body``
  attributes; ``Response.raw``, ``headers``, ``iter_content`` and ``close``; requests' exceptions.
- urllib3: ``HTTPResponse.read(decode_content=True)`` and the connection classes of
  :mod:`.urllib3_stack` (documented methods only).

The stale keep-alive resend (:func:`.common.may_resend`: once, at once, only for a failure before
any response byte on a connection that had carried an earlier request) is decided here, with
urllib3 told not to retry at all (``max_retries=0``). urllib3's own ``Retry`` cannot say it: its
``read`` retries also fire after a read timeout (the server was generating) and on a brand-new
connection, and it does not know whether a connection was reused. That fact comes from
:mod:`.urllib3_stack`, whose connections count the requests sent on each socket.

What the stock classes cost per call beyond that stays (a second ``send`` for the body, the
``email`` package parsing each response head, a cookie jar per response): with the memoised pool
lookup, one sync call stays at or below DSPy's native route (``benchmarks/overhead.py``), and the
rest was not worth copying or calling private code of requests, urllib3 or ``http.client``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.client import RemoteDisconnected
from typing import Any, NamedTuple

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, PoolManager
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from .. import _constants as C
from .._config import Endpoint, Timeout
from .._secrets import RotatingSecret, Secrets, key_generation
from . import fork, urllib3_stack
from .common import (
    Failure,
    JsonReply,
    StreamReply,
    Translator,
    build_headers,
    is_json_content_type,
    json_reply,
    log_exchange,
    logger,
    may_resend,
    stream_reply,
)
from .env import read_environment

# The signature of a peer that had closed the connection before answering: resent once at once.
_CLOSED_BY_PEER = (RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# ... unless the connection was being opened: a new connection that fails has nothing stale about it.
_FRESH_CONNECTION_FAILURES = ("NewConnectionError", "ConnectTimeoutError", "NameResolutionError")
_INVALID_URL = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)


# --- the adapter -------------------------------------------------------------------------------


class _Adapter(HTTPAdapter):
    """requests' adapter, its pools built from :mod:`.urllib3_stack`'s connection classes.

    ``send`` is requests' own. Four of the hooks requests documents for subclasses are
    overridden, each around the original: the two that create pool managers, to name the pool
    classes; and the two that answer the same for every request to one URL without a proxy (the
    connection pool, found by building and hashing a pool key; the request path, found by
    parsing the URL), memoised per URL: together about a tenth of the transport's time per call.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._memoised_pools: dict[str, HTTPConnectionPool] = {}
        self._memoised_paths: dict[str, str] = {}
        super().__init__(**kwargs)

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        proxies: dict[str, str] | None = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        if proxies:  # through a proxy manager: left to requests every time
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        url = request.url or ""
        pool = self._memoised_pools.get(url)
        if pool is None:  # one host, one pool (pool_connections=1): never evicted while the adapter lives
            pool = self._memoised_pools[url] = super().get_connection_with_tls_context(request, verify, proxies, cert)
        return pool

    def request_url(self, request: requests.PreparedRequest, proxies: dict[str, str] | None) -> str:
        if proxies:
            return super().request_url(request, proxies)
        url = request.url or ""
        path = self._memoised_paths.get(url)
        if path is None:
            path = self._memoised_paths[url] = super().request_url(request, proxies)
        return path

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = urllib3_stack.POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS managers bring their own connection classes
            manager.pool_classes_by_scheme = urllib3_stack.POOL_CLASSES
        return manager


def _new_adapter(pool_size: int) -> _Adapter:
    # No retries below us: the stale-connection resend is ours (may_resend), every other retry DSPy's.
    return _Adapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)


class _AdapterSlot:
    """The adapter in use, in a box the finalizer can close without holding the transport."""

    __slots__ = ("adapter",)

    def __init__(self, adapter: _Adapter) -> None:
        self.adapter = adapter

    def close(self) -> None:
        self.adapter.close()


class _Template(NamedTuple):
    """A request line and its headers, prepared by requests once per (method, path)."""

    method: str
    url: str
    headers: dict[str, str | bytes]  # a plain dict: requests merged the headers case-insensitively once

    @classmethod
    def of(cls, method: str, url: str, headers: Mapping[str, str]) -> _Template:
        prepared = requests.PreparedRequest()
        prepared.prepare(method=method, url=url, headers=headers)
        return cls(prepared.method or method, prepared.url or url, dict(prepared.headers.items()))

    def request(self, body: bytes | None, extra: Mapping[str, str] | None = None) -> requests.PreparedRequest:
        """A request for ``body``, its documented attributes set from the template: preparing the
        same URL and headers again would re-parse and re-validate them on every call. ``extra``:
        this request's own headers (trace context), never secret."""
        request = requests.PreparedRequest()
        request.method, request.url = self.method, self.url
        headers = self.headers.copy()
        if extra:
            headers.update(extra)
        if body is not None:
            request.body = body
            headers["Content-Length"] = str(len(body))
        request.headers = headers  # type: ignore[assignment]  # annotated CaseInsensitiveDict; send takes any mapping
        return request


# --- failures ----------------------------------------------------------------------------------


def _classify(exc: requests.RequestException) -> Failure:
    if isinstance(exc, requests.ConnectTimeout):
        return Failure.CONNECT_TIMEOUT
    # requests reports a read timeout in the body as a ConnectionError around urllib3's error.
    if isinstance(exc, requests.Timeout) or (exc.args and isinstance(exc.args[0], ReadTimeoutError)):
        return Failure.READ_TIMEOUT
    if isinstance(exc, _INVALID_URL):
        return Failure.INVALID_URL
    return Failure.TRANSPORT


def _closed_before_response(exc: BaseException) -> bool:
    """True when a send failed because the peer had closed the connection before any response byte.

    ``RemoteDisconnected`` is http.client finding no status line at all; a reset or broken pipe
    before the response head arrived is the same thing told by TCP.
    """
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        if isinstance(current, _CLOSED_BY_PEER):
            return True
        if type(current).__name__ in _FRESH_CONNECTION_FAILURES:
            return False
        pending.extend(current.args)
        pending.extend((current.__cause__, current.__context__))
    return False


# --- the transport -----------------------------------------------------------------------------


class SyncTransport:
    """Thread-safe, pooled HTTP to one base URL; the endpoint's key is revealed only in its headers.

    ``pool_size`` is the number of connections kept open for reuse (requests' ``pool_maxsize``):
    more threads than that still run at once, each extra one on a connection closed after use.
    ``secrets`` is every secret value this transport sends (the key, secret header values), for
    redacting them from any text that quotes the server.
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
        self.secrets = Secrets.sent_with(endpoint.api_key, headers)
        self._translator = Translator(timeout, self.secrets)
        self._extra_headers = dict(headers or {})
        self._headers = build_headers(endpoint.api_key, headers)
        self._key_generation = key_generation(endpoint.api_key)  # which value of a rotating key they hold
        environment = read_environment(endpoint.base_url)
        self._proxies = environment.proxies
        self._verify = environment.verify
        self._timeouts = timeout.as_tuple()
        self._templates: dict[tuple[str, str], _Template] = {}
        self._slot = _AdapterSlot(_new_adapter(pool_size))
        # An LM nobody closes still releases its sockets when collected (no ResourceWarning).
        weakref.finalize(self, self._slot.close)
        fork.track(self)

    def __repr__(self) -> str:
        return f"SyncTransport(base_url={self.endpoint.base_url!r})"

    def _prepare(
        self, method: str, path: str, body: bytes | None, extra: Mapping[str, str] | None = None
    ) -> requests.PreparedRequest:
        template = self._templates.get((method, path))
        if template is None:
            try:
                template = _Template.of(method, self.endpoint.url(path), self._headers)
            except requests.RequestException as exc:  # a base URL requests cannot parse
                raise self._translator.failure(_classify(exc), method, self.endpoint.url(path), exc) from exc
            self._templates[(method, path)] = template
        return template.request(body, extra)

    def _current_key(self) -> int:
        """The key generation the next request sends: the headers are rebuilt first when a rotating
        key moved on since they were built (another copy of the LM fetched the new value)."""
        key = self.endpoint.api_key
        generation = key_generation(key)
        if generation != self._key_generation:
            self._headers = build_headers(key, self._extra_headers)
            self._templates = {}  # they hold the old Authorization
            self.secrets = self.secrets.plus(key)  # the old value stays redacted too
            self._translator = Translator(self.timeout, self.secrets)
            self._key_generation = generation
        return generation

    def _rotated(self, status: int, sent_generation: int) -> bool:
        """A 401 with a rotating key (an Anyscale Service's token): fetch the new key once and use it;
        True when the request should be sent again with it (once: a second 401 is the error)."""
        key = self.endpoint.api_key
        if status != 401 or not isinstance(key, RotatingSecret) or not key.refresh(sent_generation):
            return False
        self._current_key()
        return True

    def _send(self, prepared: requests.PreparedRequest, *, stream: bool) -> requests.Response:
        for attempt in (0, 1):
            urllib3_stack.forget_last_send()
            try:
                return self._slot.adapter.send(
                    prepared, stream=stream, timeout=self._timeouts, verify=self._verify, proxies=self._proxies
                )
            except requests.ConnectionError as exc:
                reused = urllib3_stack.last_send_reused()
                if may_resend(attempt, reused=reused, closed_before_response=_closed_before_response(exc)):
                    logger.debug("resending %s on a fresh connection after a stale keep-alive one", prepared.url)
                    continue
                raise self._failure(exc, prepared) from exc
            except requests.RequestException as exc:
                raise self._failure(exc, prepared) from exc
        raise AssertionError("unreachable")

    def _failure(self, exc: BaseException, prepared: requests.PreparedRequest) -> Exception:
        kind = _classify(exc) if isinstance(exc, requests.RequestException) else _read_failure(exc)
        return self._translator.failure(kind, prepared.method or "POST", prepared.url or "", exc)

    def _read(self, response: requests.Response, prepared: requests.PreparedRequest) -> bytes:
        """The whole body, decompressed: urllib3's documented read, without requests' chunk generator."""
        try:
            body: bytes = response.raw.read(decode_content=True)
        except (Urllib3Error, OSError) as exc:
            raise self._failure(exc, prepared) from exc
        return body

    def request_json(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> JsonReply:
        body = orjson.dumps(payload) if payload is not None else None
        generation = self._current_key()
        prepared = self._prepare(method, path, body, headers)
        started = time.perf_counter()
        response = self._send(prepared, stream=False)
        if self._rotated(response.status_code, generation):  # once: a second 401 is the error
            response.close()
            prepared = self._prepare(method, path, body, headers)
            response = self._send(prepared, stream=False)
        status, url = response.status_code, prepared.url or ""
        log_exchange(method, url, status, started)
        if not 200 <= status <= 299:
            raise self._translator.status(status, self._read(response, prepared), response.headers, method, url)
        data = self._translator.json(status, self._read(response, prepared), response.headers, method, url)
        return json_reply(data, status, response.headers, started)

    @contextmanager
    def stream(
        self, path: str, payload: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> Iterator[StreamReply]:
        """Open a streamed POST; yields a :class:`StreamReply` whose chunks arrive as they are sent."""
        body = orjson.dumps(payload)
        generation = self._current_key()
        prepared = self._prepare("POST", path, body, headers)
        started = time.perf_counter()
        response = self._send(prepared, stream=True)
        if self._rotated(response.status_code, generation):  # once: a second 401 is the error
            response.close()
            prepared = self._prepare("POST", path, body, headers)
            response = self._send(prepared, stream=True)
        try:
            status, url = response.status_code, prepared.url or ""
            if not 200 <= status <= 299:
                log_exchange("POST", url, status, started)
                raise self._translator.status(status, self._read(response, prepared), response.headers, "POST", url)
            if is_json_content_type(response.headers.get("content-type")):
                raise self._translator.not_a_stream(status, self._read(response, prepared), "POST", url)
            yield stream_reply(status, response.headers, self._chunks(response, prepared))
        finally:
            response.close()

    def _chunks(self, response: requests.Response, prepared: requests.PreparedRequest) -> Iterator[bytes]:
        try:
            # requests turns urllib3's mid-stream failures (reset, timeout, bad chunk) into its own errors.
            yield from response.iter_content(chunk_size=65536)
        except requests.RequestException as exc:
            raise self._failure(exc, prepared) from exc

    def close(self) -> None:
        self._slot.close()

    def _after_fork_in_child(self) -> None:
        # The inherited adapter is dropped unused; its sockets are the parent's (closed here for the child only).
        self._slot.adapter = _new_adapter(self.pool_size)
        urllib3_stack.close_inherited()


def _read_failure(exc: BaseException) -> Failure:
    """A body that stopped coming: the read timeout, or the connection's failure."""
    return Failure.READ_TIMEOUT if isinstance(exc, ReadTimeoutError | TimeoutError) else Failure.TRANSPORT
