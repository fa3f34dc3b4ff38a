"""The sync HTTP stack: ``requests``' ``HTTPAdapter`` over urllib3, pooled, thread-safe.

The fast path skips ``requests.Session.request`` (cookie jars, netrc lookups, re-reading proxy
variables and re-parsing the URL on every call) and hands a pre-built ``PreparedRequest``
straight to ``HTTPAdapter.send``; going through the adapter keeps ``responses``-based tests
valid. The connections below the adapter are ours (``urllib3_stack``).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.client import RemoteDisconnected
from typing import Any, NamedTuple

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError

from .. import _constants as C
from .._config import Endpoint, Timeout
from . import fork, urllib3_stack
from .common import (
    Failure,
    JsonReply,
    Secret,
    Secrets,
    StreamReply,
    Translator,
    build_headers,
    is_json_content_type,
    json_reply,
    log_exchange,
    logger,
    may_resend,
)
from .env import read_environment

# The signature of a peer that had closed the connection before answering: resent once at once.
_CLOSED_BY_PEER = (RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# ... unless the connection was being opened: a new connection that fails has nothing stale about it.
_FRESH_CONNECTION_FAILURES = ("NewConnectionError", "ConnectTimeoutError", "NameResolutionError")
_INVALID_URL = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema)


# --- the adapter -------------------------------------------------------------------------------


class _OneHostAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` for a client that only ever talks to one base URL.

    ``send`` is the base class's (so ``responses`` mocks still apply); per-request work that
    gives the same answer for every request is done once: the connection-pool lookup and the
    request path (parsing the URL each time; memoised per URL when no proxy is involved) and the
    CA-bundle checks. No cookies are extracted (an API client keeps no cookie jar). Every pool
    handed out is remembered, to drop it after a fork.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._pools: dict[str, Any] = {}
        self._paths: dict[str, str] = {}
        self._verified: set[tuple[Any, ...]] = set()
        self.handed_out: dict[int, Any] = {}
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = urllib3_stack.POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS managers bring their own connection classes
            manager.pool_classes_by_scheme = urllib3_stack.POOL_CLASSES
        return manager

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: Any, proxies: Any = None, cert: Any = None
    ) -> Any:
        pool: Any
        if proxies:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self.handed_out[id(pool)] = pool
            return pool
        pool = self._pools.get(request.url or "")
        if pool is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pools[request.url or ""] = self.handed_out[id(pool)] = pool
        return pool

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        if proxies:
            return super().request_url(request, proxies)
        path = self._paths.get(request.url or "")
        if path is None:  # parsing the URL twice per request, for the same URL every time
            path = self._paths[request.url or ""] = super().request_url(request, proxies)
        return path

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # What it sets on the pool depends on these alone; it would stat() the CA bundle per request.
        key = (id(conn), url[:8].lower() == "https://", verify, cert)
        if key not in self._verified:
            super().cert_verify(conn, url, verify, cert)
            self._verified.add(key)

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        # urllib3's header dict is already case-insensitive; bodies are bytes here, never decoded text.
        response.headers = resp.headers
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response


def _forget_inherited(adapter: _OneHostAdapter) -> None:
    """In a forked child: let go of the parent's pooled sockets without a byte sent on them.

    Closing a socket inherited through ``fork`` only releases the child's descriptor; the parent's
    connection stays open. The pool's lock is not taken: a parent thread may have held it at the
    fork, and it would never be released in the child.
    """
    for pool in list(adapter.handed_out.values()):
        for conn in list(getattr(pool.pool, "queue", None) or ()):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


class _Template(NamedTuple):
    """A request line and its headers, prepared once per (method, path)."""

    method: str
    url: str
    headers: Any  # a plain dict: requests merged the headers case-insensitively; a copy takes 0.1 µs

    @classmethod
    def of(cls, method: str, url: str, headers: Mapping[str, str]) -> _Template:
        prepared = requests.PreparedRequest()
        prepared.prepare(method=method, url=url, headers=headers)
        return cls(prepared.method or method, prepared.url or url, dict(prepared.headers.items()))


class _AdapterSlot:
    """The adapter in use, in a box the finalizer can close without holding the transport."""

    __slots__ = ("adapter",)

    def __init__(self, adapter: _OneHostAdapter) -> None:
        self.adapter = adapter

    def close(self) -> None:
        self.adapter.close()


def _new_adapter(pool_size: int) -> _OneHostAdapter:
    return _OneHostAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)


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
    """Thread-safe, pooled HTTP to one base URL. The API key lives here and nowhere else.

    ``pool_size`` is the number of connections kept open for reuse (requests' ``pool_maxsize``):
    more threads than that still run at once, each extra one on a connection closed after use.
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
        self._secret = Secret(endpoint.api_key or "")
        # Every secret value sent (the key, secret header values): redacted from every error's text.
        self._secrets = Secrets.sent_with(self._secret, headers)
        self._translator = Translator(timeout, self._secrets)
        self._headers = build_headers(self._secret, headers)
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

    def _prepared(self, method: str, path: str, body: bytes | None) -> requests.PreparedRequest:
        template = self._templates.get((method, path))
        if template is None:
            template = self._templates[(method, path)] = _Template.of(method, self.endpoint.url(path), self._headers)
        # Built by hand rather than PreparedRequest.copy(), which copies a cookie jar and re-keys a
        # case-insensitive dict on every call.
        request = requests.PreparedRequest()
        request.method, request.url = template.method, template.url
        headers = template.headers.copy()
        if body is not None:
            request.body = body
            headers["Content-Length"] = str(len(body))
        request.headers = headers
        return request

    def _send(self, prepared: requests.PreparedRequest, *, stream: bool) -> requests.Response:
        for attempt in (0, 1):
            urllib3_stack.forget_last_send()
            try:
                return self._slot.adapter.send(
                    prepared, stream=stream, timeout=self._timeouts, verify=self._verify, proxies=self._proxies
                )
            except requests.ConnectionError as exc:
                fresh = urllib3_stack.sent_on_fresh_socket()
                reused = None if fresh is None else not fresh
                if may_resend(attempt, reused=reused, closed_before_response=_closed_before_response(exc)):
                    logger.debug("resending %s on a fresh connection after a stale keep-alive one", prepared.url)
                    continue
                raise self._failure(exc, prepared) from exc
            except requests.RequestException as exc:
                raise self._failure(exc, prepared) from exc
        raise AssertionError("unreachable")

    def _failure(self, exc: requests.RequestException, prepared: requests.PreparedRequest) -> Exception:
        return self._translator.failure(_classify(exc), prepared.method or "POST", prepared.url or "", exc)

    def _prepare(self, method: str, path: str, body: bytes | None) -> requests.PreparedRequest:
        try:
            return self._prepared(method, path, body)
        except requests.RequestException as exc:  # a base URL requests cannot parse
            raise self._translator.failure(_classify(exc), method, self.endpoint.url(path), exc) from exc

    def _read(self, response: requests.Response, prepared: requests.PreparedRequest) -> bytes:
        """The whole body, decompressed; urllib3's own read, without requests' chunk generator."""
        try:
            return response.raw.read(decode_content=True)
        except (Urllib3Error, OSError) as exc:
            kind = Failure.READ_TIMEOUT if isinstance(exc, ReadTimeoutError | TimeoutError) else Failure.TRANSPORT
            raise self._translator.failure(kind, prepared.method or "POST", prepared.url or "", exc) from exc

    def request_json(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> JsonReply:
        body = orjson.dumps(payload) if payload is not None else None
        prepared = self._prepare(method, path, body)
        started = time.perf_counter()
        response = self._send(prepared, stream=False)
        status, url = response.status_code, prepared.url or ""
        log_exchange(method, url, status, started)
        if not 200 <= status <= 299:
            raise self._translator.status(status, self._read(response, prepared), response.headers, method, url)
        data = self._translator.json(status, self._read(response, prepared), response.headers, method, url)
        return json_reply(data, status, response.headers, started)

    @contextmanager
    def stream(self, path: str, payload: Mapping[str, Any]) -> Iterator[StreamReply]:
        """Open a streamed POST; yields a :class:`StreamReply` whose chunks arrive as they are sent."""
        prepared = self._prepare("POST", path, orjson.dumps(payload))
        started = time.perf_counter()
        response = self._send(prepared, stream=True)
        try:
            status, url = response.status_code, prepared.url or ""
            if not 200 <= status <= 299:
                log_exchange("POST", url, status, started)
                raise self._translator.status(status, self._read(response, prepared), response.headers, "POST", url)
            if is_json_content_type(response.headers.get("content-type")):
                raise self._translator.not_a_stream(status, self._read(response, prepared), "POST", url)
            yield StreamReply(status, response.headers.get("x-request-id"), self._chunks(response, prepared))
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
        inherited, self._slot.adapter = self._slot.adapter, _new_adapter(self.pool_size)
        _forget_inherited(inherited)
