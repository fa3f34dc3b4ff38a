"""``Limits``: the five limiter options of ``Anyscale``, as one value: validated here only, all off by default.

Every place that takes limits (``Anyscale(limits=...)`` or its five keywords, ``ProgramPool``,
``run_program``, ``evaluate``) builds a ``Limits`` with :func:`limits_from` or :func:`job_limits`,
so a wrong value is refused by ``Limits.__post_init__`` with a ``ConfigurationError`` naming the
option, wherever it was given.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .._constants import BUCKET_SECONDS, MIN_REQUEST_BUCKET, MIN_TOKEN_BUCKET
from .._validate import check_optional_amount, check_optional_count, fail
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
        check_optional_count("max_concurrency", self.max_concurrency)
        check_optional_amount("requests_per_minute", self.requests_per_minute, "requests per minute")
        check_optional_amount("tokens_per_minute", self.tokens_per_minute, "tokens per minute")
        check_optional_amount("budget_usd", self.budget_usd, "USD")
        check_optional_count("max_requests", self.max_requests)

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
        return max(MIN_TOKEN_BUCKET, rate * BUCKET_SECONDS), rate

    def as_kwargs(self) -> dict[str, Any]:
        """The options that are set, as ``Anyscale`` constructor keywords (for dump_state / copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def describe(self) -> str:
        """The options that are set, as keywords, for messages: ``budget_usd=5.0, max_requests=10``."""
        return ", ".join(f"{name}={value!r}" for name, value in self.as_kwargs().items())


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def limits_from(limits: Any, keywords: Mapping[str, Any]) -> Limits:
    """The limits given either as ``limits=Limits(...)`` or as ``Limits``' fields as keywords
    (``budget_usd=...``; None is unset); both at once is refused, saying which to keep."""
    given = {name: value for name, value in keywords.items() if value is not None}
    if limits is None:
        return Limits(**given)
    if not isinstance(limits, Limits):
        fail("limits", "None or a dspy_anyscale.limits.Limits(...)", limits, show=False)
    if given:
        spelled = ", ".join(f"{name}={value!r}" for name, value in given.items())
        raise ConfigurationError(
            f"limits=Limits({limits.describe()}) and {spelled} both set limits: keep one, either "
            "limits=Limits(...) with every limit in it, or the keywords alone"
        )
    return limits


def job_limits(limits: Any, keywords: Mapping[str, Any], *, where: str) -> Limits:
    """The limits a Ray entry point (``where``) was given: ``limits=Limits(...)``, or ``Limits``' fields as
    keywords, still taken for one release with a ``DeprecationWarning`` that names the new spelling.
    Any other keyword is Python's TypeError, as for any function.

    The one helper for every entry point's old spelling; call it from the entry point's own body,
    so that the warning points at the entry point's caller.
    """
    unknown = [name for name in keywords if name not in LIMIT_NAMES]
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    if keywords:
        spelled = ", ".join(f"{name}={value!r}" for name, value in keywords.items())
        warnings.warn(
            f"{where}({spelled}) is deprecated and will be removed in the next release: pass "
            f"limits=Limits({spelled}) (from dspy_anyscale.limits import Limits)",
            DeprecationWarning,
            stacklevel=3,
        )
    return limits_from(limits, keywords)
