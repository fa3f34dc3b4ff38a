"""Below requests' adapter: urllib3's own connections, subclassed only to learn two facts.

Nothing here changes what goes on the wire or how an answer is read: requests and urllib3 do
all of that with their own code. The subclasses record

- whether a request went out on a socket that had already carried an earlier request (a pooled
  keep-alive connection), which decides whether a failure may be a stale connection the server
  had closed (:func:`last_send_reused`, read by the transport's resend rule); and
- every connection that opened a socket in this process, so that a forked child can release its
  copies of them without sending a byte (:func:`close_inherited`).

Only documented urllib3 API is used, so a new Python or urllib3 cannot change it silently:
``HTTPConnection.connect()`` and ``HTTPConnection.request()`` are overridden to call the
original and count around it; ``HTTPConnection.is_closed`` (whether there is a socket) and
``close()`` are read and called; ``HTTPConnectionPool.ConnectionCls`` (a documented class
attribute) names our classes; and the transport hands the pool classes to urllib3's
``PoolManager.pool_classes_by_scheme`` from requests' documented ``init_poolmanager`` and
``proxy_manager_for`` hooks. No underscored name of urllib3, requests or ``http.client`` is
read, called or copied.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

_last_send = threading.local()

#: Every connection that opened a socket in this process (closed ones drop out when collected).
opened: weakref.WeakSet[HTTPConnection] = weakref.WeakSet()


def last_send_reused() -> bool | None:
    """Whether the request this thread sent last went out on a socket that had carried an earlier one.

    None when no connection was reached since :func:`forget_last_send` (a mocked adapter, or a
    failure before sending, such as a connection that could not be opened).
    """
    return getattr(_last_send, "reused", None)


def forget_last_send() -> None:
    _last_send.reused = None


def close_inherited() -> None:
    """In a forked child: close this process's copy of every socket opened before the fork.

    Closing a socket inherited through ``fork`` only releases the child's descriptor (nothing is
    sent, not even a TLS close_notify): the parent's connection stays open and in use.
    """
    for connection in list(opened):
        with contextlib.suppress(Exception):
            connection.close()
    opened.clear()


class _Connection(HTTPConnection):
    """urllib3's connection, counting the requests sent on its current socket."""

    requests_on_socket = 0

    def connect(self) -> None:
        # Whatever fails from here on (refused, reset during the TLS handshake) failed on a new socket.
        _last_send.reused = False
        super().connect()
        self.requests_on_socket = 0
        opened.add(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        # Without a socket, this request opens one (inside super().request): a fresh connection.
        _last_send.reused = not self.is_closed and self.requests_on_socket > 0
        try:
            super().request(*args, **kwargs)
        finally:
            self.requests_on_socket += 1


class _TLSConnection(_Connection, HTTPSConnection):
    pass


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


POOL_CLASSES: dict[str, type[urllib3.HTTPConnectionPool]] = {"http": _Pool, "https": _TLSPool}
