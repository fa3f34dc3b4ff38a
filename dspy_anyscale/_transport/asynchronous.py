"""The async HTTP stack: one pooled ``aiohttp.ClientSession`` per running event loop.

aiohttp rather than httpx: with 256 requests waiting on a 64-connection pool, httpx took 4.7 s
where aiohttp took 1.3 s (encode/httpx#3215), and aiohttp is installed with DSPy already. It is
imported on the first async request, not with the package.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from .. import _constants as C
from .._config import Endpoint, Timeout
from .._secrets import RotatingSecret, Secrets, key_generation
from . import fork
from .common import (
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
from .loops import PerLoop

if TYPE_CHECKING:
    import aiohttp

_stack: Any = None


def _aiohttp() -> Any:
    """The aiohttp-specific module, imported on first use."""
    global _stack
    if _stack is None:
        from . import aiohttp_stack

        _stack = aiohttp_stack
    return _stack


class _SessionFactory:
    """Opens a loop's session; holds the settings, never the transport (see loops)."""

    def __init__(self, endpoint: Endpoint, timeout: Timeout, headers: dict[str, str], pool_size: int) -> None:
        self._headers = headers
        self._timeout = timeout
        self._pool_size = pool_size
        self._tls = urlsplit(endpoint.base_url).scheme == "https"
        self._environment = read_environment(endpoint.base_url)
        self._base_url = endpoint.base_url
        # session.request keywords (headers, proxy), built with the first session: they need aiohttp.
        self.request_arguments: dict[str, Any] = {}

    def use_headers(self, headers: dict[str, str]) -> None:
        """New headers for every later request of every loop's session (a rotated key)."""
        self._headers = headers
        if self.request_arguments:
            self.request_arguments = {**self.request_arguments, "headers": _aiohttp().CIMultiDict(headers)}

    def __call__(self) -> aiohttp.ClientSession:
        stack = _aiohttp()
        if not self.request_arguments:
            proxy = self._environment.proxy_for(self._base_url)
            self.request_arguments = stack.request_arguments(self._headers, proxy, tls=self._tls)
        session: aiohttp.ClientSession = stack.new_session(  # aiohttp_stack, imported on first use
            self._timeout, self._pool_size, tls=self._tls, ca_path=self._environment.ca_path
        )
        return session


class AsyncTransport:
    """Async twin of :class:`SyncTransport`: one pooled session per running event loop; the
    endpoint's key is revealed only in its headers, ``secrets`` is what to redact.

    ``pool_size`` is the most connections open at once to the endpoint, per event loop
    (aiohttp's ``limit`` and ``limit_per_host``): calls beyond it wait for a free connection.
    A loop's session is closed when the loop ends and released with it.
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
        # Every secret value sent (the key, secret header values): redacted from every error's text.
        self.secrets = Secrets.sent_with(endpoint.api_key, headers)
        self._translator = Translator(timeout, self.secrets)
        self._extra_headers = dict(headers or {})
        self._key_generation = key_generation(endpoint.api_key)  # which value of a rotating key is sent
        self._factory = _SessionFactory(endpoint, timeout, build_headers(endpoint.api_key, headers), pool_size)
        self._sessions: PerLoop[aiohttp.ClientSession] = PerLoop(self._factory, _close_session, _abandon_session)
        # A transport nobody closes: running loops close its sessions when they end, stopped ones let go.
        weakref.finalize(self, self._sessions.release)
        fork.track(self)

    def __repr__(self) -> str:
        return f"AsyncTransport(base_url={self.endpoint.base_url!r})"

    async def _send(
        self, method: str, url: str, body: bytes | None, extra: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """The response, its head read; a stale kept-alive connection is retried once on a new one.
        ``extra``: this request's own headers (trace context), never secret."""
        stack = _aiohttp()
        session = await self._sessions.get()
        arguments = self._factory.request_arguments
        if extra:
            arguments = {**arguments, "headers": arguments["headers"].copy()}
            arguments["headers"].update(extra)
        for attempt in (0, 1):
            stack.REUSED.set(False)
            try:
                return await session.request(method, url, data=body, **arguments)
            except stack.ERRORS as exc:
                stale = stack.closed_before_response(exc)
                # aiohttp resends idempotent methods itself; the rule here is for the others (POST).
                if method not in stack.RESENT_BY_AIOHTTP and may_resend(
                    attempt, reused=stack.REUSED.get(), closed_before_response=stale
                ):
                    logger.debug("resending %s on a fresh connection after a stale keep-alive one", url)
                    continue
                raise self._failure(exc, method, url) from exc
        raise AssertionError("unreachable")

    def _current_key(self) -> int:
        """The key generation the next request sends: the headers are rebuilt first when a rotating
        key moved on since they were built (another copy of the LM fetched the new value)."""
        key = self.endpoint.api_key
        generation = key_generation(key)
        if generation != self._key_generation:
            self._factory.use_headers(build_headers(key, self._extra_headers))
            self.secrets = self.secrets.plus(key)  # the old value stays redacted too
            self._translator = Translator(self.timeout, self.secrets)
            self._key_generation = generation
        return generation

    async def _rotated(self, status: int, sent_generation: int) -> bool:
        """A 401 with a rotating key (an Anyscale Service's token): fetch the new key once and use it;
        True when the request should be sent again with it (once: a second 401 is the error). The
        fetch (the Anyscale SDK, synchronous) runs in a worker thread, never on the loop."""
        key = self.endpoint.api_key
        if status != 401 or not isinstance(key, RotatingSecret):
            return False
        if not await asyncio.to_thread(key.refresh, sent_generation):
            return False
        self._current_key()
        return True

    def _failure(self, exc: BaseException, method: str, url: str) -> Exception:
        return self._translator.failure(_aiohttp().classify(exc), method, url, exc)

    async def _read(self, response: aiohttp.ClientResponse, method: str, url: str) -> bytes:
        try:
            return await response.read()
        except _aiohttp().ERRORS as exc:
            raise self._failure(exc, method, url) from exc

    async def request_json(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> JsonReply:
        url = self.endpoint.url(path)
        body = orjson.dumps(payload) if payload is not None else None
        generation = self._current_key()
        started = time.perf_counter()
        response = await self._send(method, url, body, headers)
        if await self._rotated(response.status, generation):  # once: a second 401 is the error
            response.release()
            response = await self._send(method, url, body, headers)
        try:
            status = response.status
            log_exchange(method, url, status, started)
            if not 200 <= status <= 299:
                raise self._translator.status(
                    status, await self._read(response, method, url), response.headers, method, url
                )
            data = self._translator.json(status, await self._read(response, method, url), response.headers, method, url)
        finally:
            response.release()
        return json_reply(data, status, response.headers, started)

    @asynccontextmanager
    async def stream(
        self, path: str, payload: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[StreamReply]:
        """Open a streamed POST; yields a :class:`StreamReply` whose chunks arrive as they are sent."""
        url = self.endpoint.url(path)
        body = orjson.dumps(payload)
        generation = self._current_key()
        started = time.perf_counter()
        response = await self._send("POST", url, body, headers)
        if await self._rotated(response.status, generation):  # once: a second 401 is the error
            response.release()
            response = await self._send("POST", url, body, headers)
        try:
            status = response.status
            if not 200 <= status <= 299:
                log_exchange("POST", url, status, started)
                raise self._translator.status(
                    status, await self._read(response, "POST", url), response.headers, "POST", url
                )
            if is_json_content_type(response.headers.get("Content-Type")):
                raise self._translator.not_a_stream(status, await self._read(response, "POST", url), "POST", url)
            yield stream_reply(status, response.headers, self._chunks(response, url))
        finally:
            # An unfinished body closes the connection instead of returning it to the pool.
            response.release()

    async def _chunks(self, response: aiohttp.ClientResponse, url: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except _aiohttp().ERRORS as exc:
            raise self._failure(exc, "POST", url) from exc

    async def aclose(self) -> None:
        """Close the running loop's session (those of other loops close when their loop ends)."""
        await self._sessions.close_running()

    def _after_fork_in_child(self) -> None:
        self._sessions.forget_inherited()


async def _close_session(session: aiohttp.ClientSession) -> None:
    await _aiohttp().close_session(session)


def _abandon_session(session: aiohttp.ClientSession) -> None:
    _aiohttp().abandon_session(session)
