"""The checks of a Router's own options: each wrong value is a ``ConfigurationError`` that names the
option, says what it takes and how to fix it, raised before anything is built or sent.

Built on the package's one validation layer (``_validate``: same messages, same error family).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._validate import check_choice, check_count, fail, is_number
from ..errors import BudgetExceededError, ConfigurationError
from .policy import DEFAULT_POLICY, Policy
from .strategies import STRATEGIES, Strategy

# routing_key="prompt": the whole prompt (or messages, or Request) is the key.
PROMPT_KEY = "prompt"
RoutingKey = Callable[[Any], Any]


def check_strategy(strategy: Any) -> Strategy:
    value: Strategy = check_choice("strategy", strategy, STRATEGIES)
    return value


def check_name(name: Any, where: str) -> str:
    """A member's name: it names the member in health(), history, usage and spans."""
    if not isinstance(name, str) or not name.strip():
        fail(where, "a non-empty name, e.g. 'primary'", name)
    return name


def check_weights(weights: Any, names: Iterable[str], strategy: Strategy) -> dict[str, float]:
    """Every member's weight (equal when none is given), for ``strategy="weighted"`` only."""
    names = list(names)
    if weights is None:
        return dict.fromkeys(names, 1.0)
    if strategy != "weighted":
        raise ConfigurationError(
            f"weights= applies to strategy='weighted' (this Router's is {strategy!r}): pass strategy='weighted', "
            "or drop weights"
        )
    if not isinstance(weights, Mapping):
        fail("weights", "a dict of member name -> weight, e.g. {'primary': 0.95, 'canary': 0.05}", weights, show=False)
    unknown = [name for name in weights if name not in names]
    missing = [name for name in names if name not in weights]
    if unknown or missing:
        raise ConfigurationError(
            f"weights must give every member a weight and name no other: "
            f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else ''}"
            f"{'; ' if unknown and missing else ''}{'missing ' + ', '.join(map(repr, missing)) if missing else ''} "
            f"(the members: {', '.join(map(repr, names))})"
        )
    for name, weight in weights.items():
        if not is_number(weight) or weight < 0:
            fail(f"weights[{name!r}]", "a number >= 0 (a share: the weights need not add up to 1)", weight)
    if not any(weights.values()):
        raise ConfigurationError("weights are all 0: give at least one member a positive weight")
    return {name: float(weights[name]) for name in names}


def check_fallback_on(fallback_on: Any) -> Policy:
    """``fallback_on=``: error classes and/or HTTP statuses; None keeps the default set."""
    if fallback_on is None:
        return DEFAULT_POLICY
    if isinstance(fallback_on, str | bytes | Mapping) or not isinstance(fallback_on, Iterable):
        fail(
            "fallback_on",
            "None or a list of error classes and/or HTTP statuses, e.g. [LMRateLimitError, 500, 503]",
            fallback_on,
        )
    classes: list[type[BaseException]] = []
    statuses: set[int] = set()
    for index, entry in enumerate(fallback_on):
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not 100 <= entry <= 599:
                fail(f"fallback_on[{index}]", "an HTTP status from 100 to 599", entry)
            statuses.add(entry)
        elif isinstance(entry, type) and issubclass(entry, BaseException):
            if issubclass(entry, BudgetExceededError):
                raise ConfigurationError(
                    f"fallback_on[{index}]: BudgetExceededError is never a reason to try another member: it is "
                    "your own limit (every member would be refused as well). Remove it"
                )
            classes.append(entry)
        else:
            fail(f"fallback_on[{index}]", "an error class (e.g. LMServerError) or an HTTP status (e.g. 503)", entry)
    return Policy(tuple(classes), frozenset(statuses))


def check_allowed_fails(value: Any) -> int:
    return check_count("allowed_fails", value, 1)


def check_cooldown(value: Any) -> float:
    if not is_number(value) or value < 0:
        fail("cooldown_s", "a number of seconds >= 0", value)
    return float(value)


def check_health_check_interval(value: Any) -> float | None:
    if value is not None and (not is_number(value) or value <= 0):
        fail("health_check_interval_s", "None (no probes) or a number of seconds > 0", value)
    return None if value is None else float(value)


def check_routing_key(value: Any, strategy: Strategy) -> str | RoutingKey | None:
    if value is None:
        return None
    if value != PROMPT_KEY and not callable(value):
        fail(
            "routing_key",
            f"None, {PROMPT_KEY!r} (the call's prompt or messages) or a callable(prompt_or_messages) -> str",
            value,
        )
    if strategy != "weighted":
        raise ConfigurationError(
            f"routing_key= chooses the member drawn by weight: it applies to strategy='weighted' "
            f"(this Router's is {strategy!r})"
        )
    key: str | RoutingKey = value
    return key


def check_call_routing_key(value: Any) -> str | None:
    """A call's own ``routing_key="..."`` (None: the Router's ``routing_key``, else a random draw)."""
    if value is not None and not isinstance(value, str):
        fail("routing_key", "a string (or None), e.g. the example's id", value)
    return value


def routing_point(key: Any) -> str | None:
    """What a routing key callable returned, as the text to hash (None: no key)."""
    if key is None:
        return None
    if isinstance(key, float) and math.isnan(key):
        return None
    return key if isinstance(key, str) else repr(key)
