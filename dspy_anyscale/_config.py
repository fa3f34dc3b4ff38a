"""Resolving where to send requests and with which key.

Precedence, for each setting: explicit argument > process environment > a ``.env`` file found
from the working directory (as python-dotenv finds it) > an error naming the variable. The
``.env`` file is read, never loaded into ``os.environ``: a value there never overrides a
variable that is set, and nothing happens at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

from . import _constants as C
from ._secrets import Secret
from ._validate import check_timeout, check_usage_log_path
from ._validate import normalize_base_url as normalize_base_url  # re-exported: the CLI and tests import it here
from .errors import ConfigurationError, MissingConfigurationError


@dataclass(frozen=True)
class Timeout:
    """Connect and read timeouts in seconds; both always finite."""

    connect: float = C.DEFAULT_CONNECT_TIMEOUT
    read: float = C.DEFAULT_READ_TIMEOUT

    def as_tuple(self) -> tuple[float, float]:
        return (self.connect, self.read)


_NO_KEY = Secret("")


@dataclass(frozen=True)
class Endpoint:
    """A resolved server: base URL and credential.

    The key stays a :class:`Secret` from where it is read (the argument, the environment, ``.env``)
    to the one place that reveals it, the ``Authorization`` header (``_transport.build_headers``);
    an empty ``Secret`` means no key. Whatever needs the key (a copy of the LM) carries the Secret.
    """

    base_url: str
    api_key: Secret = field(default=_NO_KEY, repr=False)
    # Where each value came from ("argument", "ANYSCALE_API_BASE", ".env: ANYSCALE_API_KEY", ...),
    # for error messages that say which setting to fix.
    base_url_origin: str = "argument"
    api_key_origin: str | None = None
    base_url_explicit: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.api_key, Secret):
            raise TypeError(
                f"Endpoint.api_key must be a Secret (wrap the key: Secret(key); Secret('') for none), "
                f"got {type(self.api_key).__name__}"
            )

    def url(self, path: str) -> str:
        return self.base_url + path


@lru_cache(maxsize=64)  # an LM names its one endpoint on every call: parse each URL once
def endpoint_name(base_url: str) -> str:
    """What accounting calls a plain LM's service (history and usage ``endpoint``, spans): the base
    URL's ``host[:port]``, the port left out when it is the scheme's default.

    >>> endpoint_name("http://127.0.0.1:8080/v1"), endpoint_name("https://svc.anyscaleuserdata.com/v1")
    ('127.0.0.1:8080', 'svc.anyscaleuserdata.com')
    """
    try:
        parts = urlsplit(base_url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return base_url
    if not host:
        return base_url
    host = f"[{host}]" if ":" in host else host
    return host if port is None or port == _DEFAULT_PORTS.get(parts.scheme) else f"{host}:{port}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


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
        api_key=key,
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
    connect, read = check_timeout(timeout)
    return Timeout(connect=connect, read=read)


def resolve_usage_log(usage_log: str | os.PathLike[str] | None) -> str | None:
    """The usage log path (argument, else ``ANYSCALE_USAGE_LOG``), ``~`` expanded; refuse what cannot be a file."""
    if usage_log is not None:
        return check_usage_log_path(usage_log, "usage_log")
    from_env = os.environ.get(C.ENV_USAGE_LOG) or None
    return None if from_env is None else check_usage_log_path(from_env, C.ENV_USAGE_LOG)
