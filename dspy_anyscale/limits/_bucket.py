"""A token bucket that never deadlocks on a request bigger than itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._constants import LEVEL_EPSILON


@dataclass
class TokenBucket:
    """``capacity`` units, refilled at ``rate`` units per second; starts full. Not thread-safe:
    the ledger that owns it holds the lock.

    A request needing more than the capacity (a long prompt against a small tokens_per_minute)
    waits until the bucket is full, then goes and leaves the bucket in debt: the level goes
    negative and later requests wait for it to refill. So nothing waits forever, and over any
    long window no more than ``rate`` units per second go out.
    """

    capacity: float
    rate: float
    level: float = field(init=False)
    stamp: float | None = field(default=None, init=False)  # the clock at the last refill

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self, now: float) -> None:
        if self.stamp is None:
            self.stamp = now
            return
        elapsed = max(0.0, now - self.stamp)  # a clock that steps back never drains the bucket
        self.level = min(self.capacity, self.level + elapsed * self.rate)
        self.stamp = max(self.stamp, now)

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` may be taken (0.0: now). Call after :meth:`refill`."""
        need = min(amount, self.capacity)  # an oversize request waits for a full bucket only
        missing = need - self.level
        return 0.0 if missing <= LEVEL_EPSILON else missing / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """A refund (the answer used less than reserved); never above capacity."""
        self.level = min(self.capacity, self.level + amount)
