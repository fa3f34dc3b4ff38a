"""The cache identity of an ``Anyscale`` instance: everything besides the call that decides the answer.

DSPy 3.4 keys a call on the model string, the messages and the generation parameters, and leaves
the endpoint out (stanfordnlp/dspy#10006): two instances serving the same model name from two
deployments would share answers. So every call carries a short digest of what else decides the
answer: the base URL, the endpoint (chat or completions), ``system_prompt``, ``prompt_template``,
``response_format_style``, the provider body parameters and the routing headers. It travels in
the call where DSPy's cache key sees it (``metadata`` of a program call, ``config.extensions`` of
a Request) and the engine takes it off before the wire, so the server sees nothing new.

Secrets never enter it (a rotated key keeps hitting the same entries), nor do headers that only
label a request for tracing (``NON_ROUTING_HEADERS``). The digest is a pure function of the
configuration: the same on every process and machine, so a saved program re-run tomorrow hits
its cache. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from . import _constants as C
from ._secrets import is_secret_header, scrub

if TYPE_CHECKING:
    from ._wire import WireOptions

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
    """The headers that can change the answer, by lowercased name: no secrets, no tracing labels.

    A JSON header value (a Portkey config) is kept with its secret fields removed, so a gateway
    route is part of the identity but the target keys in it are not.
    """
    routing: dict[str, Any] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in C.NON_ROUTING_HEADERS or is_secret_header(name):
            continue
        routing[lowered] = _scrubbed(value)
    return routing


def _scrubbed(value: str) -> Any:
    if not value.lstrip().startswith("{"):
        return value
    try:
        return scrub(orjson.loads(value))
    except orjson.JSONDecodeError:
        return value


# --- where the identity travels ---------------------------------------------------------------


def with_identity_metadata(metadata: Any, identity: str) -> dict[str, Any]:
    """A program call's ``metadata`` kwarg with the identity added under this package's key."""
    base = dict(metadata) if isinstance(metadata, Mapping) else {}
    base[C.ENGINE_EXTENSION_KEY] = identity
    return base


def strip_identity_metadata(metadata: Any) -> Any:
    """``metadata`` as the user gave it (None when they gave none)."""
    if not isinstance(metadata, Mapping) or C.ENGINE_EXTENSION_KEY not in metadata:
        return metadata
    rest = {key: value for key, value in metadata.items() if key != C.ENGINE_EXTENSION_KEY}
    return rest or None
