"""Which values are secrets, and how they are kept out of text, saved state and cache keys.

Two kinds of secret reach this package: the API key (owned by the transport) and header values
that carry credentials (``x-portkey-api-key``, a Portkey config with target keys, ...). A header
is secret when a word of its name says so, or when its value is a JSON object holding a field
whose name says so. Secret values are never logged, saved with a program, pickled or put in a
cache identity. Pure: no I/O (restoring reads the environment, nothing else).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import orjson

from . import _constants as C

logger = logging.getLogger(C.LOGGER_NAME)

# Secret when a word of the name (split on -, _ and case changes) is one of these; "x-portkey-provider" is not.
_SECRET_WORDS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "authorization",
        "auth",
        "password",
        "cookie",
        "credential",
        "credentials",
        "signature",
    }
)
_WORD_BREAK = re.compile(r"[-_\s.]+|(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """Whether a header or field name says its value is a credential (``api_key``, ``X-Auth-Token``...)."""
    words = [word.lower() for word in _WORD_BREAK.split(name) if word]
    return any(word in _SECRET_WORDS or word.endswith(("token", "secret", "password")) for word in words)


def is_secret_header(name: str, value: str | None = None) -> bool:
    """Header values that are never logged, saved with a program, pickled or hashed into a cache key."""
    return is_secret_name(name) or (value is not None and _json_holds_secret(value))


def _json_holds_secret(value: str) -> bool:
    if not value.lstrip().startswith("{"):
        return False
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return scrub(data) != data


def scrub(data: Any) -> Any:
    """A JSON value with every field whose name looks secret removed, at any depth."""
    if isinstance(data, Mapping):
        return {key: scrub(item) for key, item in data.items() if not is_secret_name(str(key))}
    if isinstance(data, list):
        return [scrub(item) for item in data]
    return data


class Secret:
    """A credential that never shows itself: ``repr``, ``str`` and a traceback's captured locals say ``***``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is never pickled; the key is read again from the environment")


def redact(text: str, secret: str | Secret | None) -> str:
    """``text`` with the key replaced by ``***``.

    A key of at least ``MIN_REDACTED_INSIDE_WORDS`` characters is removed wherever it appears; a
    shorter one (a local server's "x") only where it stands as a whole token, so that redacting
    it never mangles the words and URLs around it ("exist", "127.0.0.1").
    """
    value = secret.reveal() if isinstance(secret, Secret) else secret
    if not value or value not in text:
        return text
    if len(value) >= C.MIN_REDACTED_INSIDE_WORDS:
        return text.replace(value, "***")
    return re.sub(rf"(?<![\w.\-]){re.escape(value)}(?![\w.\-])", "***", text)


def redacted_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers with secret values replaced, for display."""
    return {name: ("***" if is_secret_header(name, value) else value) for name, value in headers.items()}


def restore_secret_headers(names: tuple[str, ...]) -> dict[str, str]:
    """Secret headers dropped when an LM was saved or pickled, read back from the environment."""
    restored = {}
    for name in names:
        variable = C.SECRET_HEADER_ENV.get(name.lower())
        value = os.environ.get(variable) if variable else None
        if value:
            restored[name] = value
        else:
            logger.warning(
                "header %s was not saved with the LM because its value is secret; pass headers={%r: ...} again%s",
                name,
                name,
                f" or set {variable}" if variable else "",
            )
    return restored
