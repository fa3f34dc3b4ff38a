"""Each member's circuit breaker and load figures: what ``Router.health()`` reports, what strategies read.

A member is *healthy* (closed: every call may try it), *cooling* (open: skipped until ``until``),
or *down* (open because nothing listened: connection refused). Opening:

* a 429 cools the member for its ``Retry-After`` (``cooldown_s`` without one; capped at
  ``MAX_COOLDOWN_S``, as the limiter caps a cool-down);
* ``allowed_fails`` consecutive failures (5xx, timeouts, resets, 429s) cool it for ``cooldown_s``;
* a refused connection marks it down for ``cooldown_s`` at once.

When ``until`` has passed, the next call that picks the member is its one *trial* (half-open):
other calls keep skipping it while the trial runs; an answer (or any reply of the service, even an
error about the request) closes the breaker, a failure opens it again for ``cooldown_s``. An active
probe (``GET /models``) that succeeds closes it too.

Thread-safe (one lock per member; threads and event loops alike), with an injectable clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from .. import _constants as C

HealthState = Literal["healthy", "cooling", "down"]
HEALTHY: HealthState = "healthy"
COOLING: HealthState = "cooling"
DOWN: HealthState = "down"


class Outcome(Enum):
    """What one try of a member says about the member's health (see ``policy.outcome_of``)."""

    ANSWERED = "answered"  # an answer: closes the breaker, and a latency sample
    REPLIED = "replied"  # an error about the request (4xx, context length): the service is up
    RATE_LIMITED = "rate_limited"  # a 429: cooling for its Retry-After
    FAILED = "failed"  # 5xx, timeout, reset: one more consecutive failure
    REFUSED = "refused"  # nothing listening: down at once
    CANCELLED = "cancelled"  # the caller stopped: no verdict


@dataclass(frozen=True)
class MemberHealth:
    """One member of a Router, as ``lm.health()`` reports it.

    state: ``"healthy"``, ``"cooling"`` (skipped after a 429 or ``allowed_fails`` failures) or
        ``"down"`` (nothing listened at its address).
    in_flight: calls the Router has sent it that have not ended.
    failures: consecutive failures (0 after an answer).
    p50_ms: median latency of its latest answers (None before its first).
    until: when a cooling or down member may be tried again, as ``time.time()`` (None when healthy;
        in the past once it may be, until its trial request has answered).
    """

    state: HealthState
    in_flight: int
    failures: int
    p50_ms: float | None
    until: float | None


class Breaker:
    """The circuit breaker and load figures of one member."""

    def __init__(
        self,
        *,
        allowed_fails: int = C.ROUTER_ALLOWED_FAILS,
        cooldown_s: float = C.ROUTER_COOLDOWN_S,
        window: int = C.ROUTER_LATENCY_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.allowed_fails = allowed_fails
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._state: HealthState = HEALTHY
        self._until = -math.inf  # clock() time from which an open breaker may be tried again
        self._failures = 0
        self._trial = False  # the half-open trial request is in flight
        self._in_flight = 0
        self._latencies: deque[float] = deque(maxlen=window)

    def __repr__(self) -> str:
        return f"Breaker(state={self._state!r}, failures={self._failures}, in_flight={self._in_flight})"

    # --- what strategies and the Router read --------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def until(self) -> float:
        """When an open breaker may be tried again (``clock()`` time); -inf when closed."""
        return self._until

    def available(self) -> bool:
        """Closed, or open with its cool-down over and no trial in flight."""
        if self._state == HEALTHY:  # the common case, read without the lock (a stale read is harmless)
            return True
        with self._lock:
            return self._state == HEALTHY or (not self._trial and self.clock() >= self._until)

    def p50_s(self) -> float | None:
        """The median of the latest answers' latencies (nearest rank), None before the first."""
        with self._lock:
            latencies = sorted(self._latencies)
        return latencies[(len(latencies) - 1) // 2] if latencies else None

    def snapshot(self) -> MemberHealth:
        p50 = self.p50_s()
        with self._lock:
            until = None if self._state == HEALTHY else self.wall() + (self._until - self.clock())
            return MemberHealth(
                state=self._state,
                in_flight=self._in_flight,
                failures=self._failures,
                p50_ms=None if p50 is None else round(p50 * 1000, 3),
                until=until,
            )

    # --- a try ----------------------------------------------------------------------------------------------

    def start(self, *, force: bool = False) -> bool | None:
        """A call would try the member. None: skip it (open, and cooling or its trial taken by another call),
        unless ``force`` (every member is open: the call tries the one that may be tried soonest). Else the try
        is counted in flight, and the result says whether it is the open breaker's one trial."""
        with self._lock:
            if self._state == HEALTHY:
                self._in_flight += 1
                return False
            trial = not self._trial and self.clock() >= self._until
            if not trial and not force:
                return None
            self._in_flight += 1
            self._trial = self._trial or trial
            return trial

    def end(
        self, outcome: Outcome, *, trial: bool, latency_s: float | None = None, retry_after: float | None = None
    ) -> None:
        """The try that :meth:`start` began is over, with ``outcome``."""
        with self._lock:
            self._in_flight -= 1
            if trial:
                self._trial = False
            if outcome is Outcome.ANSWERED:
                self._close()
                if latency_s is not None:
                    self._latencies.append(latency_s)
            elif outcome is Outcome.REPLIED:
                if self._state != HEALTHY:
                    self._close()  # it answered, if only to refuse the request: it is up
            elif outcome is Outcome.REFUSED:
                self._failures += 1
                self._open(DOWN, self.cooldown_s)
            elif outcome is Outcome.RATE_LIMITED:
                self._failures += 1
                self._open(COOLING, _pause(retry_after, self.cooldown_s))
            elif outcome is Outcome.FAILED:
                self._failures += 1
                if trial or self._failures >= self.allowed_fails:
                    self._open(COOLING, self.cooldown_s)

    def probe_answered(self) -> None:
        """An active probe got an answer: the member is up."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        self._state = HEALTHY
        self._until = -math.inf
        self._failures = 0

    def _open(self, state: HealthState, seconds: float) -> None:
        until = self.clock() + seconds
        # A later cool-down already running (a longer Retry-After) is kept.
        self._until = until if self._state == HEALTHY else max(self._until, until)
        self._state = state


def _pause(retry_after: float | None, default: float) -> float:
    """A 429's cool-down: its Retry-After, else ``default``, within [0, MAX_COOLDOWN_S]."""
    seconds = default if retry_after is None or not math.isfinite(retry_after) else retry_after
    return min(max(seconds, 0.0), C.MAX_COOLDOWN_S)
