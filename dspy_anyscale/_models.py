"""``GET /models``: which models an endpoint serves, and the LoRA adapters it holds.

Adapters are listed where the server says so. Ray Serve LLM lists each adapter it can load as a
model ``<base>:<adapter>`` next to its base. llama.cpp's llama-server (``owned_by: "llamacpp"``)
lists them at ``GET /lora-adapters`` (beside ``/v1``), by index and file: an entry per adapter
then says which ``lora`` index selects it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from dspy.clients.errors import wrap_error
from dspy.lm15 import LM15Error

from . import _constants as C
from ._config import Endpoint, Timeout
from ._http_errors import unexpected_body
from ._transport import SyncTransport
from ._transport.common import build_headers


def list_models(endpoint: Endpoint, timeout: Timeout, headers: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The ``data`` entries of ``GET /models``; errors are DSPy's LM errors, as for calls."""
    transport = SyncTransport(endpoint, timeout, headers=headers, pool_size=1)
    try:
        reply = transport.request_json("GET", C.MODELS_PATH)
    except LM15Error as exc:
        raise wrap_error(exc, model="(models)", provider=C.PROVIDER) from exc
    finally:
        transport.close()
    entries = reply.data.get("data")
    if not isinstance(entries, list):
        import orjson

        error = unexpected_body(
            endpoint.url(C.MODELS_PATH),
            reply.status,
            orjson.dumps(reply.data),
            "Expected a 'data' list",
            transport.secrets,  # the key and any secret header values
            method="GET",
        )
        raise wrap_error(error, model="(models)", provider=C.PROVIDER) from error
    models = [_entry(item) for item in entries if isinstance(item, dict) and item.get("id")]
    _mark_model_adapters(models)
    if any(entry["owned_by"] == C.LLAMA_CPP_OWNER for entry in models):
        models += _llama_cpp_adapters(endpoint, timeout, headers, models)
    return models


def _mark_model_adapters(models: list[dict[str, Any]]) -> None:
    """Ray Serve LLM's ``<base>:<adapter>`` ids: the adapter and its base, named in the entry."""
    bases = {entry["id"] for entry in models}
    for entry in models:
        base, sep, adapter = entry["id"].rpartition(":")
        if sep and base in bases and adapter:
            entry["base"], entry["adapter"] = base, adapter


def _llama_cpp_adapters(
    endpoint: Endpoint, timeout: Timeout, headers: Mapping[str, str] | None, models: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """llama-server's ``GET /lora-adapters``: an entry per adapter, with the ``lora`` index that selects it.

    The adapter's name is its file's stem. A server that cannot say (an older build, a proxy in front)
    lists no adapters rather than failing the listing.
    """
    import requests

    url = endpoint.base_url.removesuffix("/").removesuffix("/v1") + C.LLAMA_CPP_ADAPTERS_PATH
    try:  # a JSON array, which the transports (made for OpenAI's objects) refuse: a plain GET
        response = requests.get(
            url, headers=build_headers(endpoint.api_key, headers), timeout=timeout.as_tuple(), allow_redirects=False
        )
        adapters = response.json() if response.status_code == 200 else []
    except (requests.RequestException, ValueError):
        return []
    if not isinstance(adapters, list):
        return []
    base = models[0]["id"]
    return [
        {
            "id": base,
            "owned_by": C.LLAMA_CPP_OWNER,
            "base": base,
            "adapter": PurePosixPath(str(item.get("path", ""))).stem or str(item["id"]),
            "lora_id": item["id"],
        }
        for item in adapters
        if isinstance(item, dict) and isinstance(item.get("id"), int)
    ]


def _entry(item: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": str(item["id"]), "owned_by": item.get("owned_by")}
    metadata = item.get("rayllm_metadata")
    if isinstance(metadata, dict):
        engine_config = metadata.get("engine_config") or {}
        entry["model_type"] = engine_config.get("model_type")
    return entry
