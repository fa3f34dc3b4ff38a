"""Which values are secrets, and how they are kept out of text, saved state and cache keys.

Two kinds of secret reach this package: the API key (a :class:`Secret` from where it is read to
the Authorization header the transport builds) and header values that carry credentials
(``x-portkey-api-key``, ``X-Auth-Token``, a Portkey config with target keys, ...). A header is
secret when a word of its name says so, or when its value is a JSON object holding a field whose
name says so. Secret values are never logged, saved with a program or
pickled, and every one the LM sends is redacted from the text of its errors (:class:`Secrets`).
Most never enter a cache identity; the few that also choose where a request goes (a Portkey
virtual key: :func:`is_routing_secret_name`) enter it as a keyed digest (see :mod:`._identity`).
Pure: no I/O (restoring reads the environment, nothing else).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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


def _words(name: str) -> list[str]:
    return [word.lower() for word in _WORD_BREAK.split(name) if word]


def is_secret_name(name: str) -> bool:
    """Whether a header or field name says its value is a credential (``api_key``, ``X-Auth-Token``...)."""
    return any(word in _SECRET_WORDS or word.endswith(("token", "secret", "password")) for word in _words(name))


def is_routing_secret_name(name: str) -> bool:
    """Whether a secret's name says it also chooses where a request goes (``x-portkey-virtual-key``,
    a Portkey config target's ``virtual_key``): two values may reach two upstreams and answer differently."""
    words = tuple(_words(name))
    return any(words[-len(tail) :] == tail for tail in C.ROUTING_SECRET_WORDS)


def is_secret_header(name: str, value: str | None = None) -> bool:
    """Header values that are never logged, saved with a program, pickled or hashed into a cache key."""
    return is_secret_name(name) or (value is not None and _json_holds_secret(value))


def _json_holds_secret(value: str) -> bool:
    if not value.lstrip().startswith("{"):
        return False
    try:
        data: object = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    scrubbed: object = scrub(data)
    return scrubbed != data


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


class RotatingSecret(Secret):
    """A key its issuer may rotate (an Anyscale Service's bearer token): fetched again when the
    server stops accepting it. ``fetch`` returns the current value; it is asked only by
    :meth:`refresh`, at most once per rotation however many requests were refused at once.

    Still a :class:`Secret`: never shown, never pickled. Copies of an LM share the object, so one
    re-fetch serves all of them; ``generation`` counts the values seen, so a transport can tell
    whether the key changed since the request it sent.
    """

    __slots__ = ("_fetch", "_lock", "generation")

    def __init__(self, value: str, fetch: Callable[[], str]) -> None:
        super().__init__(value)
        self._fetch = fetch
        self._lock = threading.Lock()
        self.generation = 0

    def refresh(self, sent_generation: int) -> bool:
        """After a 401 of a request sent with the value of ``sent_generation``: fetch the current value
        unless a newer one is already here. True when the key now differs from the one that was refused."""
        with self._lock:
            if self.generation == sent_generation:
                try:
                    value = self._fetch()
                except Exception as error:  # the 401 is the error the caller sees; say why no new key came
                    logger.warning("could not fetch a rotated key: %s", type(error).__name__)
                    return False
                if value and value != self._value:
                    self._value = value
                    self.generation += 1
            return self.generation != sent_generation


def key_generation(key: Secret) -> int:
    """Which value of a rotating key this is (0 for a key that never rotates)."""
    return key.generation if isinstance(key, RotatingSecret) else 0


def redact(text: str, secret: str | Secret | Secrets | None) -> str:
    """``text`` with the key (or, given :class:`Secrets`, every secret value the LM sends) replaced by ``***``.

    A value of at least ``MIN_REDACTED_INSIDE_WORDS`` characters is removed wherever it appears; a
    shorter one (a local server's "x") only where it stands as a whole token, so that redacting
    it never mangles the words and URLs around it ("exist", "127.0.0.1").
    """
    if isinstance(secret, Secrets):
        return secret.redact(text)
    return _redact_value(text, secret.reveal() if isinstance(secret, Secret) else secret)


def _redact_value(text: str, value: str | None) -> str:
    if not value or value not in text:
        return text
    if len(value) >= C.MIN_REDACTED_INSIDE_WORDS:
        return text.replace(value, "***")
    return re.sub(rf"(?<![\w.\-]){re.escape(value)}(?![\w.\-])", "***", text)


class Secrets:
    """Every secret value one LM sends: the key, and each secret header's value (whole, after its
    auth scheme, and each secret field of a JSON value). A server may quote any of them back in an
    error; :func:`redact` removes them all. Like :class:`Secret`, it never shows or pickles them.
    """

    __slots__ = ("_values",)

    def __init__(self, *values: str | None) -> None:
        # Each value also as a JSON string spells it (a body may quote a header inside JSON text), and
        # the longest first: a value that contains another (a header and its token) goes whole.
        spellings = {spelling for value in values if value for spelling in (value, _json_escaped(value))}
        self._values = tuple(sorted(spellings, key=len, reverse=True))

    @classmethod
    def sent_with(cls, api_key: str | Secret | None, headers: Mapping[str, str] | None = None) -> Secrets:
        """The secrets of a transport that sends ``api_key`` as a bearer token and ``headers`` on every request."""
        key = api_key.reveal() if isinstance(api_key, Secret) else api_key
        values = [value for name, text in (headers or {}).items() for value in secret_header_values(name, text)]
        return cls(key, *values)

    def plus(self, key: Secret) -> Secrets:
        """These secrets and ``key`` (a rotated key: the old value stays redacted too)."""
        merged = Secrets()
        merged._values = tuple(sorted({*self._values, *Secrets.sent_with(key)._values}, key=len, reverse=True))
        return merged

    def redact(self, text: str) -> str:
        for value in self._values:
            text = _redact_value(text, value)
        return text

    def __bool__(self) -> bool:
        return bool(self._values)

    def __repr__(self) -> str:
        return "Secrets('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("Secrets are never pickled; they are read again from the environment")


def _json_escaped(value: str) -> str:
    return orjson.dumps(value).decode()[1:-1]


@contextmanager
def redacting(secrets: Secrets) -> Iterator[None]:
    """An error raised inside leaves with its text redacted: for code that quotes what the server
    sent without knowing the secrets (the parser of a 2xx body that echoes the request's headers)."""
    try:
        yield
    except Exception as error:
        if isinstance(getattr(error, "message", None), str):
            error.message = secrets.redact(error.message)  # type: ignore[attr-defined]  # lm15 errors keep it
        error.args = tuple(secrets.redact(arg) if isinstance(arg, str) else arg for arg in error.args)
        # The finished frames below held the unredacted text (reporters record locals); running ones stay.
        traceback.clear_frames(error.__traceback__)
        raise


def secret_header_values(name: str, value: str) -> list[str]:
    """The secret pieces of one header: all of a secret-named header's value, the credential after
    its scheme (``Bearer <token>``), and the value of every secret field of a JSON value."""
    pieces = _json_secret_values(value)
    if is_secret_name(name):
        pieces.append(value)
        _scheme, _, credential = value.strip().partition(" ")
        pieces.append(credential.strip())
    return [piece for piece in pieces if piece]


def _json_secret_values(value: str) -> list[str]:
    if not value.lstrip().startswith("{"):
        return []
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return []
    return list(_secret_leaves(data, inside=False))


def _secret_leaves(data: Any, *, inside: bool) -> Iterator[str]:
    """Every string under a secret-named field, at any depth (a credential may be a nested object)."""
    if isinstance(data, Mapping):
        for key, item in data.items():
            yield from _secret_leaves(item, inside=inside or is_secret_name(str(key)))
    elif isinstance(data, list):
        for item in data:
            yield from _secret_leaves(item, inside=inside)
    elif inside and isinstance(data, str):  # not numbers: redacting "3" would mangle counts and statuses
        yield data


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
