"""Network failures in the user's words: what happened, and with which host. No library class names.

Both stacks end with the same operating-system and ``ssl`` errors at the bottom of their exception
chains (urllib3 and aiohttp only wrap them differently: ``_Pool(host=...): Max retries exceeded``,
``Cannot connect to host ... ssl:default``), so the words come from those, and the sync and async
stacks say the same thing for the same failure. Pure: no I/O, no imports of either stack.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

# Failures some libraries report with their own classes only (no OS error beneath), by class name so
# that this module imports neither stack.
_CLOSED_WITHOUT_ANSWER = frozenset({"RemoteDisconnected", "ServerDisconnectedError"})
_CUT_SHORT = frozenset({"IncompleteRead", "ClientPayloadError", "ContentLengthError", "TransferEncodingError"})
_INVALID_URL = frozenset(
    {
        "InvalidURL",
        "InvalidUrlClientError",
        "MissingSchema",
        "InvalidSchema",
        "LocationParseError",
        "NonHttpUrlClientError",
    }
)
_NAME_NOT_RESOLVED = frozenset({"NameResolutionError", "ClientConnectorDNSError"})
_TIMEOUTS = (TimeoutError, socket.timeout)
# Errors that come from opening a connection (the others happen on one that was open).
_CONNECT_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EHOSTDOWN}
)


def explain(exc: BaseException, url: str) -> str:
    """What went wrong talking to ``url``, e.g. ``could not connect to 127.0.0.1:9: connection refused``."""
    try:
        return _explain(exc, url)
    except Exception:  # an error path must not fail on its own message
        return f"the exchange with {url} failed"


def _explain(exc: BaseException, url: str) -> str:
    target = _target(url, proxied=any("Proxy" in type(cause).__name__ for cause in causes(exc)))
    for words in _RULES:  # the most specific failure anywhere in the chain: wrappers only repeat it
        for cause in causes(exc):
            said = words(cause, target)
            if said is not None:
                return said
    return f"the exchange with {target} failed: {_plain(_innermost(exc))}"


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything behind it: causes, contexts, and the errors libraries keep in their
    arguments or attributes (urllib3's ``reason``, aiohttp's ``os_error``), outermost first."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = (_attribute(current, "reason"), _attribute(current, "os_error"))
        pending.extend((*current.args, *inner, current.__cause__, current.__context__))


def _attribute(exc: BaseException, name: str) -> object:
    try:  # some are properties that raise when unset (aiohttp's ``reason`` on a connector error)
        return getattr(exc, name, None)
    except Exception:
        return None


def _target(url: str, *, proxied: bool) -> str:
    parts = urlsplit(url)
    host = parts.hostname or url
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return host
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"the proxy for {target}" if proxied else target


# --- one rule per failure, most specific first ---------------------------------------------------


def _invalid_url(cause: BaseException, target: str) -> str | None:
    return _plain(cause) if type(cause).__name__ in _INVALID_URL else None


def _certificate(cause: BaseException, target: str) -> str | None:
    if not isinstance(cause, ssl.SSLCertVerificationError):
        return None
    why = _attribute(cause, "verify_message") or _plain(cause)
    return (
        f"the TLS certificate of {target} could not be verified ({why}); for a private CA, point "
        "REQUESTS_CA_BUNDLE or SSL_CERT_FILE at its bundle"
    )


def _tls(cause: BaseException, target: str) -> str | None:
    if not isinstance(cause, ssl.SSLError):
        return None
    reason = _attribute(cause, "reason")  # OpenSSL's words ("WRONG_VERSION_NUMBER"); aiohttp's wrapper has none
    if not isinstance(reason, str):
        if type(cause).__module__ != "ssl":
            return None  # a library's wrapper: the ssl.SSLError behind it says it
        reason = _plain(cause)
    reason = reason.replace("_", " ").lower()
    hint = " (is it a plain http:// server?)" if reason == "wrong version number" else ""
    return f"the TLS handshake with {target} failed: {reason}{hint}"


def _name(cause: BaseException, target: str) -> str | None:
    if not isinstance(cause, socket.gaierror) and type(cause).__name__ not in _NAME_NOT_RESOLVED:
        return None
    lookup = next((c for c in causes(cause) if isinstance(c, socket.gaierror)), None)
    why = _strerror(lookup) if lookup is not None else "the lookup failed"
    return f"could not resolve the host name {target.rsplit(':', 1)[0]}: {why}"


def _refused(cause: BaseException, target: str) -> str | None:
    if not isinstance(cause, OSError) or cause.errno not in _CONNECT_ERRNOS:
        return None
    return f"could not connect to {target}: {_strerror(cause)}"


def _timed_out(cause: BaseException, target: str) -> str | None:
    return f"no answer from {target} in time" if isinstance(cause, _TIMEOUTS) else None


def _reset(cause: BaseException, target: str) -> str | None:
    if isinstance(cause, ConnectionResetError):
        return f"the connection to {target} was reset"
    if isinstance(cause, BrokenPipeError | ConnectionAbortedError):
        return f"the connection to {target} was closed while the request was being sent"
    return None


def _closed(cause: BaseException, target: str) -> str | None:
    name = type(cause).__name__
    if name in _CLOSED_WITHOUT_ANSWER:
        return f"{target} closed the connection without answering"
    if name in _CUT_SHORT:
        return f"{target} closed the connection before the answer was complete"
    return None


def _other_os_error(cause: BaseException, target: str) -> str | None:
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"the exchange with {target} failed: {_strerror(cause)}"
    return None


_RULES: tuple[Callable[[BaseException, str], str | None], ...] = (
    _invalid_url,
    _certificate,
    _tls,
    _name,
    _refused,
    _timed_out,
    _closed,  # before _reset: http.client's RemoteDisconnected is a ConnectionResetError
    _reset,
    _other_os_error,
)


# --- text ----------------------------------------------------------------------------------------


def _strerror(error: OSError) -> str:
    """The system's words for an OS error, lower-cased: ``connection refused``, ``name or service not known``.

    From the error number where there is one: libraries put their own text in ``strerror``
    (asyncio's "Connect call failed ('127.0.0.1', 9)").
    """
    if isinstance(error, socket.gaierror) or not isinstance(error.errno, int) or error.errno <= 0:
        text = error.strerror or _plain(error)
    else:
        text = os.strerror(error.errno)
    return text[:1].lower() + text[1:]


def _innermost(exc: BaseException) -> BaseException:
    chain = list(causes(exc))
    return chain[-1]


def _plain(exc: BaseException) -> str:
    """An exception's own message, without its class: the last resort when no rule knows it."""
    return str(exc) or "no details"
