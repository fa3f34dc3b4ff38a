"""``AnyLimiter``: what "a limiter" is to the engine, the LM and the Ray entry points.

Both :class:`~dspy_anyscale.limits.Limiter` and the no-op ``UnlimitedLimiter`` (``UNLIMITED``,
``Limiter.disabled()``) satisfy it; code that only admits requests and reads the ledger takes an
``AnyLimiter``, and code that moves a ledger (Ray) checks for a ``Limiter``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._config import Limits
    from ._estimate import Estimate
    from ._permit import AnyPermit
    from ._report import SpendReport


class AnyLimiter(Protocol):
    """The limits of one LM and its copies: admission (``acquire``), outcomes (through the permit), the ledger."""

    @property
    def enabled(self) -> bool:
        """False for the no-op limiter of an LM without limits."""

    @property
    def limits(self) -> Limits: ...

    @property
    def needs_estimate(self) -> bool:
        """True when ``acquire`` must be given an ``Estimate`` (a budget or a token rate is set)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    def acquire(self, estimate: Estimate | None = None, *, timeout: float | None = None) -> AnyPermit:
        """Block until the request may be sent; the permit must be settled or released (``with``)."""

    async def aacquire(self, estimate: Estimate | None = None) -> AnyPermit:
        """``acquire`` for a coroutine: waits on the event loop, never blocks it."""

    def candidates(self, n: int) -> AbstractContextManager[None]:
        """The requests made inside are one call's ``n``: reserved all at once, or refused."""

    def note_rate_limited(self, seconds: float | None = None) -> None:
        """A 429: every caller waits ``seconds`` (the Retry-After) before its next request."""

    def report(self) -> SpendReport:
        """Spent, reserved and left: USD, requests, tokens, refusals."""
