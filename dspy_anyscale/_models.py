"""``GET /models``: which models an endpoint serves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dspy.clients.errors import wrap_error
from dspy.lm15 import LM15Error

from . import _constants as C
from ._config import Endpoint, Timeout
from ._http_errors import unexpected_body
from ._transport import SyncTransport


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
    return [_entry(item) for item in entries if isinstance(item, dict) and item.get("id")]


def _entry(item: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": str(item["id"]), "owned_by": item.get("owned_by")}
    metadata = item.get("rayllm_metadata")
    if isinstance(metadata, dict):
        engine_config = metadata.get("engine_config") or {}
        entry["model_type"] = engine_config.get("model_type")
    return entry
