"""Gateways in front of the endpoint: Portkey's headers, and which header values are secrets.

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
import logging
import os
from collections.abc import Mapping
from typing import Any

from . import _constants as C
from .errors import ConfigurationError

PORTKEY_GATEWAY_URL = "https://api.portkey.ai/v1"
PORTKEY_API_KEY_ENV = "PORTKEY_API_KEY"

# Secret headers a rebuilt LM (unpickled, loaded) can get back from the environment.
SECRET_HEADER_ENV = {"x-portkey-api-key": PORTKEY_API_KEY_ENV}
# Secret when a word of the name (split on - and _) is one of these; "x-portkey-provider" is not.
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

logger = logging.getLogger(C.LOGGER_NAME)


def is_secret_header(name: str) -> bool:
    """Header names whose values are never logged, saved with a program or pickled."""
    words = name.lower().replace("_", "-").split("-")
    return any(word in _SECRET_WORDS or word.endswith(("token", "secret", "password")) for word in words)


def redacted_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers with secret values replaced, for display."""
    return {name: ("***" if is_secret_header(name) else value) for name, value in headers.items()}


def restore_secret_headers(names: tuple[str, ...]) -> dict[str, str]:
    """Secret headers dropped when an LM was saved or pickled, read back from the environment."""
    restored = {}
    for name in names:
        variable = SECRET_HEADER_ENV.get(name.lower())
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
        virtual_key: a Portkey virtual key holding the provider's credential.
        custom_host: the provider's base URL, for a self-hosted endpoint (an Anyscale Service, vLLM).
        config: a Portkey config (fallbacks, load balancing, retries), as a dict or a saved config id.
        trace_id: groups the requests of one run in Portkey's logs.
        metadata: string key/values attached to the request in Portkey's logs.
        cache: ``"simple"`` or ``"semantic"``, Portkey's own cache.
        retry_count: Portkey's retries (DSPy retries too; prefer one of the two).
    """
    headers: dict[str, str] = {}
    key = api_key if api_key is not None else os.environ.get(PORTKEY_API_KEY_ENV)
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
