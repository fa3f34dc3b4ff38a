"""``Limiter.disabled()``: the limiter of an LM with no limits, which costs (next to) nothing."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from ._config import Limits
from ._permit import NO_PERMIT, AnyPermit

if TYPE_CHECKING:
    from ._estimate import Estimate
    from ._report import SpendReport


class UnlimitedLimiter:
    """The limiter of an LM with no limits: an ``AnyLimiter`` like ``Limiter``, does nothing, counts nothing."""

    enabled = False
    needs_estimate = False
    in_flight = 0
    waiting = 0

    def __init__(self) -> None:
        self.limits = Limits()

    def __repr__(self) -> str:
        return "Limiter.disabled()"

    def acquire(self, estimate: Estimate | None = None, *, timeout: float | None = None) -> AnyPermit:
        return NO_PERMIT

    async def aacquire(self, estimate: Estimate | None = None) -> AnyPermit:
        return NO_PERMIT

    def candidates(self, n: int) -> AbstractContextManager[None]:
        return nullcontext()

    def note_rate_limited(self, seconds: float | None = None) -> None:
        pass

    def report(self) -> SpendReport:
        from ._report import SpendReport

        return SpendReport(
            spent_usd=None,
            reserved_usd=0.0,
            budget_usd=None,
            remaining_usd=None,
            requests=0,
            in_flight=0,
            max_requests=None,
            remaining_requests=None,
            prompt_tokens=0,
            completion_tokens=0,
        )

    def __copy__(self) -> UnlimitedLimiter:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> UnlimitedLimiter:
        return self

    def __reduce__(self) -> str:
        return "UNLIMITED"  # the module-level singleton, by name


UNLIMITED = UnlimitedLimiter()
