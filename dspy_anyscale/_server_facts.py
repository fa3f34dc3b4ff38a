"""What the server says about its answer besides the answer: its id, its rate-limit headers.

OpenAI-compatible servers (vLLM, Ray Serve LLM, gateways) send ``x-ratelimit-remaining-requests``,
``x-ratelimit-remaining-tokens``, ``x-ratelimit-reset-requests`` and ``x-ratelimit-reset-tokens``
(and ``x-ratelimit-limit-*``). They are kept as the server wrote them, lower-case and without the
``x-ratelimit-`` prefix (``{"remaining-requests": "0", "reset-requests": "1s"}``), in usage records,
history entries and attempt spans. A remaining count of 0 says the next request would get a 429:
with limits on, the LM's shared cool-down starts at once, for the reset the header gives.

Pure, no I/O. The cached prompt tokens come with the usage block (``_wire.usage_from``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from . import _constants as C

PREFIX = "x-ratelimit-"
# The headers read from every answer (a handful of case-insensitive look-ups, no scan of all headers).
HEADERS = tuple(f"{PREFIX}{kind}-{what}" for kind in ("limit", "remaining", "reset") for what in ("requests", "tokens"))
# OpenAI's durations: "1s", "6m0s", "20ms", "1h2m3.5s"; a bare number is seconds.
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The ``x-ratelimit-*`` headers of an answer (``headers`` case-insensitive), or None without any."""
    found: dict[str, str] | None = None
    for name in HEADERS:
        value = headers.get(name)
        if value is not None:
            if found is None:
                found = {}
            found[name[len(PREFIX) :]] = str(value)[: C.RATE_LIMIT_HEADER_CHARS]
    return found


def duration_s(text: str | None) -> float | None:
    """Seconds in a reset header (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"0.5"``), None if it is not one.

    >>> duration_s("6m0s"), duration_s("20ms"), duration_s("2"), duration_s("soon")
    (360.0, 0.02, 2.0, None)
    """
    if text is None:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            return None
        seconds = sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def cooldown_s(rate_limit: Mapping[str, str] | None) -> float | None:
    """How long every caller should hold off when a remaining count is 0 (the reset it gives, else the
    default cool-down), or None while requests and tokens remain (or the server said nothing).

    >>> cooldown_s({"remaining-requests": "0", "reset-requests": "2s"})
    2.0
    >>> cooldown_s({"remaining-requests": "7", "reset-requests": "2s"}) is None
    True
    """
    if not rate_limit:
        return None
    pauses = []
    for what in ("requests", "tokens"):
        if _exhausted(rate_limit.get(f"remaining-{what}")):
            reset = duration_s(rate_limit.get(f"reset-{what}"))
            pauses.append(C.DEFAULT_COOLDOWN_S if reset is None else reset)
    return max(pauses) if pauses else None


def _exhausted(value: str | None) -> bool:
    try:
        return value is not None and float(value) <= 0
    except ValueError:
        return False


def span_attributes(rate_limit: Mapping[str, str] | None) -> dict[str, Any]:
    """The headers as the HTTP conventions put response headers on a span: ``http.response.header.<name>``,
    a list of strings."""
    return {f"http.response.header.{PREFIX}{name}": [value] for name, value in (rate_limit or {}).items()}


def history_facts(response: Any, call: Any, module: str | None) -> dict[str, Any]:
    """What a history entry adds: the calling ``module``, the answers' ids, the last rate-limit headers
    the call's attempts got (``call``: the ``_observe.Call`` in progress, or None)."""
    attempts = list(getattr(call, "attempts", ()) or ())
    limits = [attempt.rate_limit for attempt in attempts if attempt.rate_limit]
    return {
        "module": module,
        "response_ids": response_ids(response),
        "rate_limit": dict(limits[-1]) if limits else None,
    }


def response_ids(response: Any) -> list[str]:
    """The ids of the answers in a DSPy history entry's ``response`` (lm15 Responses, or one)."""
    items = response if isinstance(response, list | tuple) else [response]
    return [str(item.id) for item in items if isinstance(getattr(item, "id", None), str) and item.id]
