"""The order in which one call tries a Router's members. Pure: the Router says who is available,
how busy and how fast each is, and gives the draw; these functions only sort.

* ``fallback``: in the order given.
* ``weighted``: the first member drawn by weight (``u`` in [0, 1): a random draw, or a stable hash of
  the call's routing key, so one example stays on one member), then the others by weight, heaviest
  first, as fallbacks.
* ``least_busy``: fewest calls in flight first; ties in the order given.
* ``latency``: members never measured first (in order), so that each gets measured; then the lowest
  moving p50 latency.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Literal

Strategy = Literal["fallback", "weighted", "least_busy", "latency"]
STRATEGIES: tuple[Strategy, ...] = ("fallback", "weighted", "least_busy", "latency")


def order(
    strategy: Strategy,
    names: Sequence[str],
    *,
    weights: Mapping[str, float],
    in_flight: Mapping[str, int],
    p50: Mapping[str, float | None],
    u: float,
) -> list[str]:
    """``names`` (the available members, in the order the Router was given them) in the order to try."""
    if strategy == "weighted":
        return weighted(names, weights, u)
    if strategy == "least_busy":
        return least_busy(names, in_flight)
    if strategy == "latency":
        return fastest(names, p50)
    return list(names)


def weighted(names: Sequence[str], weights: Mapping[str, float], u: float) -> list[str]:
    """The member whose share of the total weight holds ``u``, then the rest, heaviest first.

    >>> weighted(["primary", "canary"], {"primary": 0.95, "canary": 0.05}, 0.97)
    ['canary', 'primary']
    """
    total = sum(weights.get(name, 0.0) for name in names)
    rest = sorted(names, key=lambda name: -weights.get(name, 0.0))  # stable: ties keep the given order
    if total <= 0:
        return rest
    point, reached = u * total, 0.0
    for name in names:
        reached += weights.get(name, 0.0)
        if point < reached:
            return [name, *(other for other in rest if other != name)]
    return rest  # u * total rounded up to the total: the heaviest


def least_busy(names: Sequence[str], in_flight: Mapping[str, int]) -> list[str]:
    """Fewest calls in flight first; ties keep the given order.

    >>> least_busy(["a", "b", "c"], {"a": 2, "b": 0, "c": 0})
    ['b', 'c', 'a']
    """
    return sorted(names, key=lambda name: in_flight.get(name, 0))


def fastest(names: Sequence[str], p50: Mapping[str, float | None]) -> list[str]:
    """Never measured first (so each gets measured), then the lowest p50.

    >>> fastest(["a", "b", "c"], {"a": 0.4, "b": None, "c": 0.1})
    ['b', 'c', 'a']
    """

    def key(name: str) -> float:
        value = p50.get(name)
        return -math.inf if value is None else value

    return sorted(names, key=key)


def key_point(key: str) -> float:
    """A stable point in [0, 1) for a routing key: the same key draws the same member in every process.

    >>> key_point("example-17") == key_point("example-17")
    True
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
