"""Gateways in front of the endpoint: the headers that route a request through Portkey.

from dspy_anyscale import Anyscale, PORTKEY_GATEWAY_URL, portkey_headers

lm = Anyscale(
    "meta-llama/Llama-2-70b-chat-hf",
    api_base=PORTKEY_GATEWAY_URL,                      # or your self-hosted gateway's /v1
    api_key=os.environ["ANYSCALE_API_KEY"],            # forwarded to the provider
    headers=portkey_headers(provider="anyscale", trace_id="run-42", metadata={"team": "search"}),
)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from . import _constants as C
from .errors import ConfigurationError

PORTKEY_GATEWAY_URL = C.PORTKEY_GATEWAY_URL
_PORTKEY_CACHE_MODES = ("simple", "semantic")


def portkey_headers(
    api_key: str | None = None,
    provider: str = "anyscale",
    virtual_key: str | None = None,
    custom_host: str | None = None,
    config: Mapping[str, Any] | str | None = None,
    trace_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    cache: str | None = None,
    retry_count: int | None = None,
) -> dict[str, str]:
    """The ``x-portkey-*`` headers routing a request through a Portkey gateway.

    Args:
        api_key: Portkey API key; else ``PORTKEY_API_KEY`` from the environment. The hosted gateway
            requires one; a self-hosted open-source gateway does not, and then none is sent.
        provider: the provider behind the gateway (``"anyscale"``, or ``"openai"`` for any
            OpenAI-compatible server reached through ``custom_host``).
        virtual_key: a Portkey virtual key holding the provider's credential. It is a secret (never
            saved, pickled or shown in errors) that also picks the upstream, so it joins the cache
            identity as a keyed digest, never as its value (see ``_identity``); so does a config
            target's ``virtual_key``. The Portkey and provider keys do not: they route nowhere.
        custom_host: the provider's base URL, for a self-hosted endpoint (an Anyscale Service, vLLM).
        config: a Portkey config (fallbacks, load balancing, retries), as a dict or a saved config id.
        trace_id: groups the requests of one run in Portkey's logs.
        metadata: string key/values attached to the request in Portkey's logs.
        cache: ``"simple"`` or ``"semantic"``, Portkey's own cache.
        retry_count: Portkey's retries (DSPy retries too; prefer one of the two).
    """
    headers: dict[str, str] = {}
    _check_arguments(locals())
    key = api_key if api_key is not None else os.environ.get(C.PORTKEY_API_KEY_ENV)
    if key:
        headers["x-portkey-api-key"] = key
    if config is None:
        headers["x-portkey-provider"] = provider
    else:
        headers["x-portkey-config"] = config if isinstance(config, str) else _json(config, "config")
    optional = {
        "x-portkey-virtual-key": virtual_key,
        "x-portkey-custom-host": custom_host.rstrip("/") if custom_host else None,
        "x-portkey-trace-id": trace_id,
        "x-portkey-metadata": _json(metadata, "metadata") if metadata is not None else None,
        "x-portkey-cache": cache,
        "x-portkey-retry-count": str(retry_count) if retry_count is not None else None,
    }
    headers.update({name: value for name, value in optional.items() if value is not None})
    return headers


def _json(value: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"portkey_headers({what}=...) must be JSON-serialisable: {exc}") from exc


# The type each argument takes (all optional), for an error that names the argument.
_ARGUMENT_TYPES: dict[str, tuple[type, ...]] = {
    "api_key": (str,),
    "provider": (str,),
    "virtual_key": (str,),
    "custom_host": (str,),
    "config": (Mapping, str),
    "trace_id": (str,),
    "metadata": (Mapping,),
    "cache": (str,),
    "retry_count": (int,),
}


def _check_arguments(arguments: Mapping[str, Any]) -> None:
    for name, types in _ARGUMENT_TYPES.items():
        value = arguments[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("a dict" if t is Mapping else f"a {t.__name__}" for t in types)
            raise ConfigurationError(f"portkey_headers({name}=...) must be {expected}, got {type(value).__name__}")
        empty_allowed = name == "api_key"  # "": send no Portkey key (a self-hosted gateway needs none)
        if isinstance(value, str) and ((not value.strip() and not empty_allowed) or any(c in value for c in "\r\n\0")):
            raise ConfigurationError(f"portkey_headers({name}=...) must be a non-empty single-line string")
    if arguments["cache"] is not None and arguments["cache"] not in _PORTKEY_CACHE_MODES:
        raise ConfigurationError(
            f"portkey_headers(cache=...) must be 'simple' or 'semantic', got {arguments['cache']!r}"
        )
    if arguments["retry_count"] is not None and arguments["retry_count"] < 0:
        raise ConfigurationError("portkey_headers(retry_count=...) must be a non-negative integer")
    host = arguments["custom_host"]
    if host is not None and not host.startswith(("http://", "https://")):
        raise ConfigurationError(f"portkey_headers(custom_host=...) must be an http(s) URL, got {host!r}")
