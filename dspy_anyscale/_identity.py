"""The cache identity of an ``Anyscale`` instance: everything besides the call that decides the answer.

DSPy 3.4 keys a call on the model string, the messages and the generation parameters, and leaves
the endpoint out (stanfordnlp/dspy#10006): two instances serving the same model name from two
deployments would share answers. So every call carries a short digest of what else decides the
answer: the base URL, the endpoint (chat or completions), ``system_prompt``, ``prompt_template``,
``response_format_style``, the provider body parameters, the routing headers and the LoRA adapter
the instance is bound to. It travels in
the call where DSPy's cache key sees it (``metadata`` of a program call, ``config.extensions`` of
a Request) and the engine takes it off before the wire, so the server sees nothing new.

Credentials never enter it (a rotated key keeps hitting the same entries), nor do headers that only
label a request for tracing (``NON_ROUTING_HEADERS``). A secret that also routes (a Portkey virtual
key picks the upstream) must tell two upstreams apart without being readable or guessable from the
cache: it enters as an HMAC keyed with a random per-user key that lives outside the cache
(:func:`identity_key`). Without routing secrets the digest is a pure function of the configuration,
the same on every process and machine, so a saved program re-run tomorrow hits its cache; with
them it is the same wherever the same key file is used. I/O only to read (once, or make) that file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from . import _constants as C
from ._secrets import is_routing_secret_name, is_secret_name
from .errors import ConfigurationError, InvalidParameterError

if TYPE_CHECKING:
    from ._wire import WireOptions

logger = logging.getLogger(C.LOGGER_NAME)

# Bump when what goes into the digest changes meaning: old entries then stop matching.
IDENTITY_VERSION = 1
_DEFAULT_PORTS = {"http": 80, "https": 443}


def cache_identity(base_url: str, options: WireOptions, headers: Mapping[str, str]) -> str:
    """The digest of everything about an instance that decides an answer (hex, 32 characters)."""
    material = {
        "version": IDENTITY_VERSION,
        "base_url": canonical_url(base_url),
        "endpoint": options.endpoint,
        "system_prompt": options.system_prompt,
        "prompt_template": options.prompt_template,
        "response_format_style": options.response_format_style,
        "extra_body": dict(options.extra_body),
        "headers": routing_headers(headers),
    }
    if options.adapter is not None:  # only when set: the digests of LMs without one stay as they were
        material["adapter"] = options.adapter
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def canonical_url(url: str) -> str:
    """One spelling per server: scheme and host lowercased, a default port dropped."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{parts.port}"
    return urlunsplit((scheme, host, parts.path.rstrip("/"), "", ""))


def routing_headers(headers: Mapping[str, str]) -> dict[str, Any]:
    """The headers that can change the answer, by lowercased name: no credentials, no tracing labels.

    A routing secret (``x-portkey-virtual-key``) is kept as its keyed digest. A JSON header value
    (a Portkey config) is kept with its credential fields removed and its routing secrets digested,
    so a gateway route is part of the identity but the target keys in it are not.
    """
    routing: dict[str, Any] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in C.NON_ROUTING_HEADERS:
            continue
        if is_secret_name(name):
            if is_routing_secret_name(name):
                routing[lowered] = keyed_digest(value)
            continue
        routing[lowered] = _json_view(value)
    return routing


def _json_view(value: str) -> Any:
    if not value.lstrip().startswith("{"):
        return value
    try:
        return _identity_view(orjson.loads(value))
    except orjson.JSONDecodeError:
        return value


def _identity_view(data: Any) -> Any:
    """A JSON value as the identity sees it: credential fields removed, routing secrets digested, at any depth."""
    if isinstance(data, Mapping):
        view = {}
        for key, item in data.items():
            if not is_secret_name(str(key)):
                view[key] = _identity_view(item)
            elif is_routing_secret_name(str(key)):
                view[key] = keyed_digest(item if isinstance(item, str) else orjson.dumps(item).decode())
        return view
    if isinstance(data, list):
        return [_identity_view(item) for item in data]
    return data


# --- the keyed digest of a routing secret -------------------------------------------------------

# One key per key file and process; a file is read (or made) once.
_KEYS: dict[str, bytes] = {}


def keyed_digest(value: str) -> str:
    """HMAC-SHA256 of a routing secret under :func:`identity_key`: equal for equal values, and useless
    to whoever reads a cache without the key file (no guess of the value can be checked against it)."""
    return "hmac-sha256:" + hmac.new(identity_key(), value.encode("utf-8"), hashlib.sha256).hexdigest()


def identity_key_path() -> Path:
    """``$DSPY_ANYSCALE_IDENTITY_KEY_FILE``, else ``identity.key`` in the project's cache dir."""
    explicit = os.environ.get(C.ENV_IDENTITY_KEY_FILE)
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get(C.ENV_CACHE_DIR) or C.DEFAULT_CACHE_DIR).expanduser() / C.IDENTITY_KEY_FILE_NAME


def identity_key() -> bytes:
    """The HMAC key for routing secrets: the key file's bytes, the file made (mode 0600) on first use.

    A file that cannot be made (a read-only home) gives this process a random key of its own, with a
    warning: answers are then cached for this process only, never shared with the wrong upstream.
    """
    path = identity_key_path()
    known = _KEYS.get(str(path))
    if known is not None:
        return known
    try:
        key = _read_key(path) if path.exists() else _create_key(path)
    except OSError as exc:
        logger.warning(
            "could not read or create the cache identity key %s (%s); answers for gateway virtual keys are "
            "cached for this process only. Set %s to a writable file to share them",
            path,
            exc,
            C.ENV_IDENTITY_KEY_FILE,
        )
        key = secrets.token_bytes(C.IDENTITY_KEY_MIN_BYTES)
    return _KEYS.setdefault(str(path), key)  # threads racing here all get the first one


def _read_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    if len(key) < C.IDENTITY_KEY_MIN_BYTES:
        raise ConfigurationError(
            f"the cache identity key file {path} holds {len(key)} bytes, fewer than {C.IDENTITY_KEY_MIN_BYTES}: "
            f"delete it (a new one is made) or fill it with random bytes, e.g. "
            f"python -c 'import secrets; print(secrets.token_hex(32))' > {path}"
        )
    return key


def _create_key(path: Path) -> bytes:
    """Write a new random key beside ``path`` and link it into place: atomic, and the first of two
    processes racing wins (the second reads the winner's key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(C.IDENTITY_KEY_MIN_BYTES) + "\n")
        with contextlib.suppress(FileExistsError):  # another process linked its key first: read that one
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return _read_key(path)


# --- where the identity travels ---------------------------------------------------------------


def with_identity_metadata(metadata: Any, identity: str) -> dict[str, Any]:
    """A program call's ``metadata`` kwarg with the identity added under this package's key."""
    check_user_metadata(metadata)
    base = dict(metadata) if isinstance(metadata, Mapping) else {}
    base[C.ENGINE_EXTENSION_KEY] = identity
    return base


def check_user_metadata(metadata: Any) -> None:
    """Refuse a user's own ``metadata[ENGINE_EXTENSION_KEY]``: the engine takes that key off before the
    wire, so the value would never reach the server (and would collide with the cache identity)."""
    if isinstance(metadata, Mapping) and C.ENGINE_EXTENSION_KEY in metadata:
        raise InvalidParameterError(
            f"metadata[{C.ENGINE_EXTENSION_KEY!r}] is reserved: dspy-anyscale carries each call's cache identity "
            "under that key and takes it off before the request is sent, so your value would never reach the "
            "server. Put it under another key",
            parameter="metadata",
            expected=f"a dict without the key {C.ENGINE_EXTENSION_KEY!r}",
        )


def strip_identity_metadata(metadata: Any) -> Any:
    """``metadata`` as the user gave it (None when they gave none)."""
    if not isinstance(metadata, Mapping) or C.ENGINE_EXTENSION_KEY not in metadata:
        return metadata
    rest = {key: value for key, value in metadata.items() if key != C.ENGINE_EXTENSION_KEY}
    return rest or None
