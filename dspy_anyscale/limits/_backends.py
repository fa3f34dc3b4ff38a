"""Where a ledger lives: the ``LedgerBackend`` interface, and its in-process implementations.

The limiter speaks to its ledger through ``LedgerBackend`` and nothing else, so a new home for
the ledger is one small class: ``LocalLedger`` (this process, behind a lock), ``DetachedLedger``
(what a pickled local ledger becomes) and ``RayLedger`` (``_ray.py``, one Ray actor per job).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol

from ..errors import ConfigurationError
from ._clock import Clock
from ._config import Limits
from ._ledger import Ask, Decision, LedgerState, Ticket
from ._report import SpendReport


class LedgerBackend(Protocol):
    """Where a limiter's ledger lives. Calls may come from any thread; ``areserve`` from an event loop."""

    def reserve(self, ticket: Ticket, ask: Ask) -> Decision: ...

    async def areserve(self, ticket: Ticket, ask: Ask) -> Decision: ...

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None: ...

    def release(self, ticket: Ticket, *, billed: bool) -> None: ...

    def forget(self, ticket: Ticket) -> None: ...

    def note_rate_limited(self, seconds: float | None) -> None: ...

    def report(self) -> SpendReport: ...

    def export(self) -> dict[str, Any]: ...

    def portable(self) -> LedgerBackend:
        """What a pickled limiter carries instead of this backend."""


class LocalLedger:
    """The ledger in this process, behind one lock; every call is a few microseconds of arithmetic,
    so ``areserve`` runs it inline on the event loop."""

    def __init__(self, limits: Limits, clock: Clock) -> None:
        self._state = LedgerState(limits)
        self._clock = clock
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalLedger(pid={os.getpid()})"

    def reserve(self, ticket: Ticket, ask: Ask) -> Decision:
        with self._lock:
            return self._state.reserve(ticket, ask, self._clock.now())

    async def areserve(self, ticket: Ticket, ask: Ask) -> Decision:
        return self.reserve(ticket, ask)

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        with self._lock:
            self._state.settle(ticket, prompt_tokens, completion_tokens)

    def release(self, ticket: Ticket, *, billed: bool) -> None:
        with self._lock:
            self._state.release(ticket, billed=billed)

    def forget(self, ticket: Ticket) -> None:
        with self._lock:
            self._state.forget(ticket)

    def note_rate_limited(self, seconds: float | None) -> None:
        with self._lock:
            self._state.note_rate_limited(seconds, self._clock.now())

    def report(self) -> SpendReport:
        with self._lock:
            return self._state.report(self._clock.now())

    def export(self) -> dict[str, Any]:
        with self._lock:
            return self._state.export(self._clock.now())

    def portable(self) -> LedgerBackend:
        # The counts cannot travel: two processes each holding the whole budget could spend it twice.
        return DetachedLedger(self._state.limits, os.getpid())


class DetachedLedger:
    """What an unpickled limiter with a local ledger holds: the ledger stayed in the process that
    made it, so this copy refuses to send anything until it is attached to a shared ledger."""

    def __init__(self, limits: Limits, origin_pid: int) -> None:
        self.limits = limits
        self.origin_pid = origin_pid

    def __repr__(self) -> str:
        return f"DetachedLedger(origin_pid={self.origin_pid})"

    def _error(self) -> ConfigurationError:
        return ConfigurationError(
            f"this LM's limits ({_describe(self.limits)}) are kept by a ledger in the process that created it "
            f"(pid {self.origin_pid}); a pickled copy does not get a fresh budget of its own. Before sending "
            "the LM to other processes, share its ledger (the limiter's share_on_ray() for Ray workers), or "
            "attach this copy to a ledger (the limiter's attach(backend))"
        )

    def reserve(self, ticket: Ticket, ask: Ask) -> Decision:
        raise self._error()

    async def areserve(self, ticket: Ticket, ask: Ask) -> Decision:
        raise self._error()

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        return None  # nothing was ever reserved here

    def release(self, ticket: Ticket, *, billed: bool) -> None:
        return None

    def forget(self, ticket: Ticket) -> None:
        return None

    def note_rate_limited(self, seconds: float | None) -> None:
        return None

    def report(self) -> SpendReport:
        raise self._error()

    def export(self) -> dict[str, Any]:
        raise self._error()

    def portable(self) -> LedgerBackend:
        return self


def _describe(limits: Limits) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in limits.as_kwargs().items())
