"""aiohttp specifics of the async stack: the session, its connector, and what its exceptions mean.

Imported on the first async request only: importing the package must not import aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import aiohttp
from multidict import CIMultiDict

from .._config import Timeout
from .common import Failure, HiddenHeaderValue
from .env import Proxy, ssl_context

# Everything a request, its body or a stream can raise that is the network's fault, not ours.
ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, asyncio.TimeoutError, OSError)

# aiohttp resends these methods once by itself when a kept-alive connection fails; we add the
# same for the rest (POST), under the stricter rule in common.may_resend.
RESENT_BY_AIOHTTP = frozenset(getattr(aiohttp.client, "IDEMPOTENT_METHODS", ()))

_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})

# Whether the current request got a pooled connection that had carried an earlier request. Set
# by the connector inside the request's own task, read by the transport when the request fails.
REUSED: ContextVar[bool] = ContextVar("dspy_anyscale_reused_connection", default=False)


class Connector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that says whether each request went out on a reused connection."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._carried: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        reused = protocol in self._carried
        if not reused and protocol is not None:
            self._carried.add(protocol)
        REUSED.set(reused)
        return connection

    def abandon(self) -> None:
        """Let go of every connection without closing it through the event loop.

        For a loop that can no longer run a close (closed, or stopped for good), and after a fork,
        where the connections are the parent's: closing would unregister the sockets from the
        loop's selector, which a forked child shares with its parent (one epoll instance), and the
        parent would stop hearing from them. Marked closed, the connector never touches them
        again, not even when collected (nor logs "Unclosed connector"); each transport's own
        finaliser only closes this process's descriptor.
        """
        self._closed = True


def request_arguments(headers: Mapping[str, str], proxy: Proxy | None, *, tls: bool) -> dict[str, Any]:
    """The ``session.request`` keywords every request passes, built once.

    Headers go with each request, never as the session's default headers: aiohttp merges the
    defaults into the proxy's headers too, and then sends our ``Authorization`` to the proxy as
    ``Proxy-Authorization``. Proxy credentials go where the proxy reads them: in the CONNECT
    request for an https endpoint, in the request itself for a plain-http one.
    """
    arguments: dict[str, Any] = {"headers": CIMultiDict(headers), "allow_redirects": False}
    if proxy is None:
        return arguments
    arguments["proxy"] = proxy.url
    if proxy.username is not None:
        # Encoded here: aiohttp's BasicAuth is deprecated from 3.14, its replacement absent before.
        token = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode("latin-1")).decode("ascii")
        credentials = {"Proxy-Authorization": HiddenHeaderValue(f"Basic {token}")}
        if tls:
            arguments["proxy_headers"] = credentials
        else:
            arguments["headers"].update(credentials)
    return arguments


def new_session(timeout: Timeout, pool_size: int, *, tls: bool, ca_path: str | None) -> aiohttp.ClientSession:
    connector = Connector(
        limit=pool_size,
        limit_per_host=pool_size,
        ssl=ssl_context(ca_path) if tls else True,  # plain http: never used
    )
    return aiohttp.ClientSession(
        connector=connector,
        # sock_read is the longest silence between bytes (not a deadline for the whole answer);
        # sock_connect covers the TCP and TLS handshakes; waiting for a free pooled connection is
        # not a connect timeout.
        timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=timeout.connect, sock_read=timeout.read),
        # An API client keeps no cookies (the sync stack keeps none either). The environment
        # (proxies, CA bundle) was read once at construction: trust_env would look up .netrc and
        # the proxy variables in a worker thread on every request, and refuse our Authorization
        # header outright if .netrc had an entry for the host.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=True,
    )


async def close_session(session: aiohttp.ClientSession) -> None:
    await session.close()


def abandon_session(session: aiohttp.ClientSession) -> None:
    connector = session.connector
    if isinstance(connector, Connector):
        connector.abandon()


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Failure.CONNECT_TIMEOUT
    if isinstance(exc, asyncio.TimeoutError):  # SocketTimeoutError: sock_read elapsed
        return Failure.READ_TIMEOUT
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return Failure.INVALID_URL
    return Failure.TRANSPORT


def closed_before_response(exc: BaseException) -> bool:
    """True when the peer closed the connection before a response head: only for errors raised
    while sending or awaiting the head (never for a body, where the answer had begun)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False  # a new connection could not be made: nothing stale about it
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        # With part of a head received, aiohttp hands over what it parsed instead of a text.
        return isinstance(exc.message, str)
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in _RESET_ERRNOS
