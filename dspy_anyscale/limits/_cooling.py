"""``CoolingLimiter``: the limiter of an LM without limits, which still shares a 429's cool-down.

One 429 with ``Retry-After: 2`` pauses every caller of that LM (threads, tasks, copies) for 2 s,
so a rate limit does not turn into a thundering herd of retries, each earning its own 429. It
admits everything else at once and counts nothing: ``enabled`` is False, as for ``UNLIMITED``, so
the engine builds no estimate and ``lm.spending()`` has nothing to report.

The cost on the path of every request is one attribute read: ``until`` is 0 until the first 429.
"""

from __future__ import annotations

import math
import threading
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._constants import DEFAULT_COOLDOWN_S, MAX_COOLDOWN_S
from ..errors import LimiterTimeoutError
from ._clock import SYSTEM_CLOCK, Clock
from ._config import Limits
from ._permit import _RATE_LIMITED, AnyPermit

if TYPE_CHECKING:
    from ._estimate import Estimate
    from ._report import SpendReport


class CoolingLimiter:
    """An ``AnyLimiter`` that admits every request, except while a 429's ``Retry-After`` runs.

    Shared by reference like ``Limiter`` (copies of the LM pause together); a pickled one arrives
    fresh (a cool-down is about this process's callers, and it is seconds long).
    """

    enabled = False
    needs_estimate = False
    in_flight = 0
    waiting = 0

    def __init__(self, clock: Clock | None = None) -> None:
        self.limits = Limits()
        self._clock = clock or SYSTEM_CLOCK
        self._until = 0.0  # monotonic time before which nobody is admitted; 0: never rate limited
        self._lock = threading.Lock()
        self._permit = _CoolingPermit(self)  # one for all: a permit here holds no state of its own

    def __repr__(self) -> str:
        return "Limiter.disabled(cool-down shared)"

    def _wait_s(self) -> float:
        until = self._until
        return until - self._clock.now() if until else 0.0

    def acquire(self, estimate: Estimate | None = None, *, timeout: float | None = None) -> AnyPermit:
        wait = self._wait_s()
        if wait > 0:
            if timeout is not None and wait > timeout:
                self._clock.sleep(max(timeout, 0.0))
                raise LimiterTimeoutError(
                    f"waited {timeout:g}s for the LM's 429 cool-down (Retry-After) without being admitted; "
                    "nothing was sent"
                )
            self._clock.sleep(wait)
        return self._permit

    async def aacquire(self, estimate: Estimate | None = None) -> AnyPermit:
        wait = self._wait_s()
        if wait > 0:
            await self._clock.asleep(wait)
        return self._permit

    def candidates(self, n: int) -> AbstractContextManager[None]:
        return nullcontext()

    def note_rate_limited(self, seconds: float | None = None) -> None:
        """A 429: nobody is admitted for ``seconds`` (its Retry-After; None: a default second),
        capped as the limits' ledger caps it (a broken header must not park the LM for hours)."""
        pause = DEFAULT_COOLDOWN_S if seconds is None or not math.isfinite(seconds) else seconds
        pause = min(max(pause, 0.0), MAX_COOLDOWN_S)
        with self._lock:
            self._until = max(self._until, self._clock.now() + pause)

    def report(self) -> SpendReport:
        from ._unlimited import UNLIMITED

        return UNLIMITED.report()

    def __copy__(self) -> CoolingLimiter:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CoolingLimiter:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (CoolingLimiter, ())


class _CoolingPermit:
    """What a ``CoolingLimiter`` admits with: its only job is to hear of a 429."""

    __slots__ = ("_limiter",)

    def __init__(self, limiter: CoolingLimiter) -> None:
        self._limiter = limiter

    def answer_started(self) -> None:
        pass

    def settle(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        pass

    def release_failed(
        self, error: BaseException | None = None, *, billed: bool | None = None, sent: bool = True
    ) -> None:
        if isinstance(error, _RATE_LIMITED):
            self._limiter.note_rate_limited(error.retry_after)

    def __enter__(self) -> _CoolingPermit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.release_failed(exc)
