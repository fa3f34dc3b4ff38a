"""A Router's own limits (the five options, or ``limits=Limits(...)``), over all its members.

The Router sends no request itself: its limiter is named around each member call
(``limits._outer.counted_against``) and the member's engine admits the request through it too, with
the member's own prices for the estimate. So the limits are checked here against every member that
will send requests under them (a budget needs prices, a token rate needs ``max_tokens``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .._validate import check_lm_fits
from ..errors import ConfigurationError
from ..limits import UNLIMITED, AnyLimiter, Limits
from ..limits._config import LIMIT_NAMES, limits_from
from .members import leaves

LIMIT_KEYS = frozenset({"limits", *LIMIT_NAMES})


def limiter_for(limits: Limits) -> AnyLimiter:
    if not limits.enabled:
        return UNLIMITED
    from ..limits import Limiter

    return Limiter(limits)


def checked_limits(limits: Limits, lms: Mapping[str, Any]) -> Limits:
    """The Router's limits, checked against every member that will send its requests (prices, max_tokens)."""
    if not limits.enabled:
        return limits
    named = ", ".join(limits.as_kwargs())
    for name, member in lms.items():
        for lm in leaves(member):
            try:
                check_lm_fits(limits, lm, named=named)
            except ConfigurationError as exc:  # the Router's limits, and which member cannot give what they need
                raise ConfigurationError(f"the Router's {named}, member {name!r}: {exc}") from None
    return limits


def changed_limits(limits: Limits, changes: Mapping[str, Any]) -> Limits:
    """``limits`` with a copy's changes (``lm.copy(budget_usd=...)`` or ``lm.copy(limits=...)``)."""
    if "limits" in changes:
        return limits_from(changes["limits"], {key: value for key, value in changes.items() if key != "limits"})
    merged = {**limits.as_kwargs(), **changes}
    return Limits(**{key: value for key, value in merged.items() if value is not None})


def candidates(limiter: AnyLimiter, n: Any) -> AbstractContextManager[None]:
    """A call of ``n`` reserves all ``n`` against the Router's limits too (the member's do the same)."""
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return limiter.candidates(n)
    return nullcontext()
