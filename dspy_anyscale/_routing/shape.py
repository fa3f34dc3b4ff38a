"""What the parts of a Router (the call loop, streams, accounting, saving) read of the Router itself.

A Protocol rather than the class: ``router.py`` imports these parts, and none of them imports it back.
The names are the Router's own attributes (its private state, shared with its parts only).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..limits import AnyLimiter, Limits
from .health import Breaker
from .policy import Policy
from .strategies import Strategy


class RouterParts(Protocol):
    model: str
    history: list[dict[str, Any]]
    _lms: dict[str, Any]
    _breakers: dict[str, Breaker]
    _quick: dict[str, Any]
    _strategy: Strategy
    _weights: dict[str, float]
    _random: random.Random
    _policy: Policy
    _limiter: AnyLimiter
    _limits: Limits
    _allowed_fails: int
    _cooldown_s: float
    _interval_s: float | None
    _routing_key: str | Callable[[Any], Any] | None

    @property
    def members(self) -> Mapping[str, Any]: ...
