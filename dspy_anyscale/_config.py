"""Resolving where to send requests and with which key.

Precedence, for each setting: explicit argument > process environment > a ``.env`` file found
from the working directory (as python-dotenv finds it) > an error naming the variable. The
``.env`` file is read, never loaded into ``os.environ``: a value there never overrides a
variable that is set, and nothing happens at import time.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from . import _constants as C
from ._secrets import Secret
from .errors import ConfigurationError, MissingConfigurationError


@dataclass(frozen=True)
class Timeout:
    """Connect and read timeouts in seconds; both always finite."""

    connect: float = C.DEFAULT_CONNECT_TIMEOUT
    read: float = C.DEFAULT_READ_TIMEOUT

    def as_tuple(self) -> tuple[float, float]:
        return (self.connect, self.read)


@dataclass(frozen=True)
class Endpoint:
    """A resolved server: base URL and credential. The key is kept out of ``repr``."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    # Where each value came from ("argument", "ANYSCALE_API_BASE", ".env: ANYSCALE_API_KEY", ...),
    # for error messages that say which setting to fix.
    base_url_origin: str = "argument"
    api_key_origin: str | None = None
    base_url_explicit: bool = False

    def url(self, path: str) -> str:
        return self.base_url + path


def _dotenv_values() -> Mapping[str, str | None]:
    # Imported here: python-dotenv is only needed when a setting is missing from the environment.
    from dotenv import dotenv_values, find_dotenv

    path = find_dotenv(usecwd=True)
    return dotenv_values(path) if path else {}


def _lookup(names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(value, origin) of the first of ``names`` set in the environment, else in ``.env``."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value, name
    values = _dotenv_values()
    for name in names:
        value = values.get(name)
        if value:
            return value, f".env: {name}"
    return None, None


def base_url_configured() -> bool:
    """Whether a base URL is set in the environment or a ``.env`` file (an argument aside)."""
    return _lookup(C.ENV_API_BASE_NAMES)[0] is not None


def _missing_base_url() -> MissingConfigurationError:
    examples = "; ".join(C.BASE_URL_EXAMPLES)
    return MissingConfigurationError(
        f"No Anyscale base URL configured. Pass api_base=... or set {C.ENV_API_BASE} (alias "
        f"{C.ENV_BASE_URL_ALIAS}) in the environment or a .env file. A base URL ends in /v1, e.g. {examples}. "
        f"(The public Anyscale Endpoints API at {C.RETIRED_ENDPOINTS_URL} closed on 2024-08-01.)"
    )


def normalize_base_url(url: str, origin: str = "api_base") -> str:
    """Check a base URL and strip its trailing slash; refuse what cannot be a base URL."""
    if not isinstance(url, str):
        raise ConfigurationError(f"{origin} must be a string URL, got {type(url).__name__}")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    _check_url_parts(url, parts, origin)
    for suffix in (C.CHAT_PATH, C.COMPLETIONS_PATH):
        if parts.path.endswith(suffix):
            base = url[: -len(suffix)]
            raise ConfigurationError(
                f"{origin} should be the base URL, not an endpoint: use {base!r} instead of {url!r}"
            )
    if url == C.RETIRED_ENDPOINTS_URL:
        warnings.warn(
            f"{C.RETIRED_ENDPOINTS_URL} is the public Anyscale Endpoints API, which closed on 2024-08-01 "
            "and now answers with an HTML notice. Point api_base at your own deployment "
            f"({'; '.join(C.BASE_URL_EXAMPLES)}).",
            UserWarning,
            stacklevel=4,
        )
    return url


def _check_url_parts(url: str, parts: SplitResult, origin: str) -> None:
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{origin} must be an http(s) URL such as http://host:port/v1, got {url!r}")
    if parts.username or parts.password:
        # Credentials in the URL would end up in logs and error messages.
        raise ConfigurationError(
            f"{origin} contains credentials (user:password@host); remove them and pass the key as "
            f"api_key=... or {C.ENV_API_KEY}"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{origin} must not carry a query string or fragment: {url!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in url) or not url.isascii():
        raise ConfigurationError(
            f"{origin} must be an ASCII URL without spaces or control characters, got {url!r} "
            "(percent-encode a path segment that needs them)"
        )
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigurationError(f"{origin} has an invalid port (1-65535): {url!r}")


def check_api_key(key: Secret, origin: str) -> None:
    """A bearer token is one word of visible ASCII; say where it is wrong without showing it.

    The key stays inside its :class:`Secret` here (no local holds the text), so a traceback that
    captures frame locals (Sentry) finds nothing to show.
    """
    for position, ch in enumerate(key.reveal(), 1):
        if ch.isspace() or not ch.isprintable() or not ch.isascii():
            what = (
                "whitespace (a trailing newline or space from a file?)"
                if ch.isspace()
                else ("a non-ASCII character" if ch.isprintable() else "a control character")
            )
            raise ConfigurationError(
                f"The API key from {origin} contains {what} at position {position} of {len(key.reveal())}. A "
                "bearer token is one word of visible ASCII characters: remove it (e.g. key.strip()) and check the key."
            )


def resolve_endpoint(api_base: str | None = None, api_key: str | Secret | None = None) -> Endpoint:
    """Resolve the base URL and key with argument > environment > ``.env`` > error.

    ``api_key=""`` means "no key": no Authorization header is sent (a local server without auth).
    """
    base: str | None
    base_origin: str | None
    if api_base is not None:
        base, base_origin = api_base, "argument"
    else:
        base, base_origin = _lookup(C.ENV_API_BASE_NAMES)
        if base is None:
            raise _missing_base_url()
    base_url = normalize_base_url(base, "api_base" if base_origin == "argument" else base_origin or "api_base")

    key, key_origin = _resolve_key(api_key, base_url)
    check_api_key(key, "api_key=..." if key_origin == "argument" else key_origin)
    return Endpoint(
        base_url=base_url,
        api_key=key.reveal() or None,
        base_url_origin=base_origin or "argument",
        api_key_origin=key_origin,
        base_url_explicit=api_base is not None,
    )


def _resolve_key(api_key: str | Secret | None, base_url: str) -> tuple[Secret, str]:
    """(the key, where it came from); the key is wrapped as soon as it is found."""
    if isinstance(api_key, Secret):
        return api_key, "argument"
    if api_key is not None:
        if not isinstance(api_key, str):
            raise ConfigurationError(f"api_key must be a string, got {type(api_key).__name__}")
        return Secret(api_key), "argument"
    found, origin = _lookup((C.ENV_API_KEY,))
    if found is None:
        raise MissingConfigurationError(
            f"No API key configured for {base_url}. Pass api_key=... or set {C.ENV_API_KEY} in the "
            "environment or a .env file (an Anyscale Service uses its bearer token). For a local server "
            "that needs no key, pass api_key=''."
        )
    return Secret(found), origin or C.ENV_API_KEY


def resolve_timeout(timeout: float | tuple[float, float] | Timeout) -> Timeout:
    """A number sets connect and read; a pair is (connect, read). ``None`` is refused: timeouts stay on."""
    if isinstance(timeout, Timeout):
        return timeout
    if timeout is None:
        raise ConfigurationError(
            "timeout=None would let a stalled server hang the program forever; pass seconds, "
            "e.g. timeout=60 or timeout=(5, 600) for (connect, read)"
        )
    if isinstance(timeout, tuple | list):
        if len(timeout) != 2:
            raise ConfigurationError(f"timeout pair must be (connect, read), got {timeout!r}")
        connect, read = timeout
    else:
        connect = read = timeout
    for name, value in (("connect", connect), ("read", read)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= C.MAX_TIMEOUT:
            raise ConfigurationError(
                f"timeout {name} must be a positive number of seconds up to {C.MAX_TIMEOUT:g} (a day), got {value!r}"
            )
    return Timeout(connect=float(connect), read=float(read))


def resolve_usage_log(usage_log: str | os.PathLike[str] | None) -> str | None:
    """The usage log path (argument, else ``ANYSCALE_USAGE_LOG``), ``~`` expanded; refuse what cannot be a file."""
    origin = "usage_log"
    if usage_log is None:
        usage_log, origin = os.environ.get(C.ENV_USAGE_LOG) or None, C.ENV_USAGE_LOG
        if usage_log is None:
            return None
    if not isinstance(usage_log, str | os.PathLike):
        raise ConfigurationError(f"usage_log must be a file path (str or os.PathLike), got {type(usage_log).__name__}")
    path = os.path.expanduser(os.fspath(usage_log))
    if not path or "\0" in path:
        raise ConfigurationError(f"{origin} must be a file path, got {usage_log!r}")
    if os.path.isdir(path):
        raise ConfigurationError(f"{origin} is a directory ({path}); give a file path such as {path}/usage.jsonl")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ConfigurationError(f"{origin} cannot be created: {parent} is a file, not a directory")
    return path


# RFC 9110 field names; values are visible ASCII, space and tab (no CR/LF: no header injection).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
# Headers that frame the HTTP message: the transport sets them, a user value would corrupt it.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection"})


def check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Extra headers as a plain dict, refused (without quoting values, which may be secret) when unsendable."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigurationError(f"headers must be a dict of header name to value, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ConfigurationError(f"headers: {name!r} is not a valid header name")
        if name.lower() in _FRAMING_HEADERS:
            raise ConfigurationError(f"headers: {name} is set by the HTTP client and cannot be overridden")
        if not isinstance(value, str):
            raise ConfigurationError(f"headers[{name!r}] must be a string, got {type(value).__name__}")
        if not _HEADER_VALUE.match(value):
            raise ConfigurationError(
                f"headers[{name!r}] contains a line break, a control or a non-ASCII character; header values "
                "are single-line visible ASCII (JSON-encode structured values)"
            )
    return dict(headers)
