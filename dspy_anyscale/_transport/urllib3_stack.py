"""Below requests' adapter: urllib3 connections tuned for an API client that sends one small JSON
request at a time.

Three per-request costs of the stock classes are cut, and one fact is recorded:

- the request head and a bytes body leave in one ``send`` (one syscall and one packet instead of
  two, and the server is not woken up between them);
- header lines repeated from the connection's previous requests are reused as validated bytes;
- the response head is parsed without the ``email`` package (http.client builds a MIME parser
  for every response: ~40 µs); anything unusual (folded lines, malformed names) still goes
  through the stock parser, so the result is the same ``HTTPMessage``;
- each connection records whether it is carrying its first request on its socket, which decides
  whether a failure may be a stale kept-alive connection (``sent_on_fresh_socket``).
"""

from __future__ import annotations

import email.parser
import http.client
import re
import threading
from typing import Any

import urllib3
from urllib3.util import SKIP_HEADER

# http.client's own limits (unchanged from 3.10 to 3.13).
_MAXLINE = 65536
_MAXHEADERS = 100
# A header line the email parser would read exactly like this: a token, a colon, a value.
_SIMPLE_HEADER = re.compile(rb"[!-9;-~]+:")

_last_send = threading.local()


def sent_on_fresh_socket() -> bool | None:
    """Whether the request this thread sent last went out on a newly opened socket.

    None when no connection was reached since :func:`forget_last_send` (a mocked adapter, or a
    failure before sending).
    """
    return getattr(_last_send, "fresh", None)


def forget_last_send() -> None:
    _last_send.fresh = None


def _read_head_lines(fp: Any) -> list[bytes]:
    """The header lines up to and including the blank line, with http.client's limits."""
    lines = []
    while True:
        line = fp.readline(_MAXLINE + 1)
        if len(line) > _MAXLINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > _MAXHEADERS:
            raise http.client.HTTPException(f"got more than {_MAXHEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            return lines


def parse_head(lines: list[bytes]) -> http.client.HTTPMessage:
    """The headers of a response, exactly as ``http.client.parse_headers`` returns them."""
    if lines[-1] == b"" or not all(_SIMPLE_HEADER.match(line) for line in lines[:-1]):
        # Folded lines, malformed names, a head cut short: the email package's reading of them.
        return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(b"".join(lines).decode("iso-8859-1"))
    message = http.client.HTTPMessage()
    for line in lines[:-1]:
        name, _, value = line.decode("iso-8859-1").partition(":")
        message.set_raw(name, value.lstrip(" \t").rstrip("\r\n"))  # what compat32 keeps of a value
    message.set_payload("")
    return message


class _Response(http.client.HTTPResponse):
    def begin(self) -> None:
        """``http.client.HTTPResponse.begin`` (identical from 3.10 to 3.13), reading headers with :func:`parse_head`."""
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_head_lines(self.fp)  # the headers of a 100 Continue: skipped
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = parse_head(_read_head_lines(self.fp))
        if self.debuglevel > 0:
            for name, value in self.headers.items():
                print("header:", name + ":", value)
        transfer_encoding = self.headers.get("transfer-encoding")
        if transfer_encoding and transfer_encoding.lower() == "chunked":
            self.chunked = True
            self.chunk_left = None
        else:
            self.chunked = False
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        bodiless = status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200
        if bodiless or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class _ConnectionMixin:
    """Coalesces the head with a bytes body into one ``send``; records whether the socket is new."""

    response_class: type[http.client.HTTPResponse] = _Response
    _sockets_opened = 0
    _sockets_used = 0
    _hold_head = False
    _held: bytes | None = None
    _header_lines: dict[tuple[str, str], bytes] | None = None

    def connect(self) -> None:
        hold, self._hold_head = self._hold_head, False  # a proxy's CONNECT goes out on its own
        try:
            super().connect()  # type: ignore[misc]
        finally:
            self._hold_head = hold
        self._sockets_opened += 1

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kwargs: Any) -> None:
        _last_send.fresh = self.sock is None or self._sockets_opened != self._sockets_used  # type: ignore[attr-defined]
        self._hold_head = isinstance(body, bytes) and bool(body) and not kwargs.get("chunked")
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)  # type: ignore[misc]
            if self._held is not None:  # no body followed after all
                held, self._held = self._held, None
                super().send(held)  # type: ignore[misc]
        finally:
            self._sockets_used = self._sockets_opened
            self._hold_head, self._held = False, None

    def putheader(self, header: str, *values: str) -> None:
        """A header line this connection has sent before is reused as bytes, already validated.

        Every request repeats the same headers (only Content-Length changes); encoding and checking
        each of them again was half the cost of writing a request head.
        """
        value = values[0] if len(values) == 1 else None
        if type(header) is not str or not isinstance(value, str) or value == SKIP_HEADER or header == "Content-Length":
            super().putheader(header, *values)  # type: ignore[misc]
            return
        lines = self._header_lines
        if lines is None:
            lines = self._header_lines = {}
        line = lines.get((header, value))
        if line is None:
            super().putheader(header, value)  # type: ignore[misc]  # validates, or raises
            lines[(header, value)] = header.encode("ascii") + b": " + value.encode("latin-1")
        else:
            self._output(line)  # type: ignore[attr-defined]

    def send(self, data: Any) -> None:
        if self._hold_head:  # the head: wait for the body
            self._hold_head, self._held = False, data
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        super().send(data)  # type: ignore[misc]


# putheader takes str values only, as urllib3's own override does (mypy: a narrower signature).
class _Connection(_ConnectionMixin, urllib3.connection.HTTPConnection):  # type: ignore[misc]
    pass


class _TLSConnection(_ConnectionMixin, urllib3.connection.HTTPSConnection):  # type: ignore[misc]
    pass


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


POOL_CLASSES = {"http": _Pool, "https": _TLSPool}
