"""``Limits``: the five limiter options of ``Anyscale``, validated once, all off by default."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .._constants import BUCKET_SECONDS, MIN_REQUEST_BUCKET
from ..errors import ConfigurationError


@dataclass(frozen=True)
class Limits:
    """What one LM (and every copy of it) may do. ``None`` switches an option off.

    max_concurrency: requests in flight at once (threads, asyncio tasks, streams and DSPy's ``n``
        candidates together); callers beyond it queue in arrival order.
    requests_per_minute / tokens_per_minute: client-side token buckets holding one second's worth.
    budget_usd: a hard cap on spend, from each request's worst case (the most prompt tokens it can
        have x input price + max_tokens x output price, USD per million tokens).
    max_requests: the same cap counted in requests sent, whatever their answer.
    """

    max_concurrency: int | None = None
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    budget_usd: float | None = None
    max_requests: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_concurrency", self.max_concurrency)
        _check_number("requests_per_minute", self.requests_per_minute, "requests per minute")
        _check_number("tokens_per_minute", self.tokens_per_minute, "tokens per minute")
        _check_number("budget_usd", self.budget_usd, "USD")
        _check_int("max_requests", self.max_requests)

    @property
    def enabled(self) -> bool:
        """True when any option is set; an LM with none pays nothing for the limiter."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    @property
    def request_bucket(self) -> tuple[float, float] | None:
        """(capacity, refill per second) of the request bucket, or None."""
        if self.requests_per_minute is None:
            return None
        rate = self.requests_per_minute / 60.0
        return max(MIN_REQUEST_BUCKET, rate * BUCKET_SECONDS), rate

    @property
    def token_bucket(self) -> tuple[float, float] | None:
        """(capacity, refill per second) of the token bucket, or None. A request larger than the
        capacity still goes when the bucket is full, leaving it in debt (see ``TokenBucket``)."""
        if self.tokens_per_minute is None:
            return None
        rate = self.tokens_per_minute / 60.0
        return max(1.0, rate * BUCKET_SECONDS), rate

    def as_kwargs(self) -> dict[str, Any]:
        """The options that are set, as ``Anyscale`` constructor keywords (for dump_state / copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _check_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")


def _check_number(name: str, value: Any, unit: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of {unit} or None, got {value!r}")
