"""Where a ledger lives: the ``LedgerBackend`` interface, and its in-process implementations.

The limiter speaks to its ledger through ``LedgerBackend`` and nothing else, so a new home for
the ledger is one small class: ``LocalLedger`` (this process, behind a lock), ``DetachedLedger``
(what a pickled local ledger becomes, and what a forked child gets) and ``RayLedger`` (``_ray.py``,
one Ray actor per job).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol

from ..errors import ConfigurationError
from ._clock import Clock
from ._config import Limits
from ._ledger import Ask, Block, Decision, LedgerState, Ticket
from ._report import SpendReport


class LedgerBackend(Protocol):
    """Where a limiter's ledger lives. Calls may come from any thread; ``areserve`` from an event loop."""

    def reserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision: ...

    async def areserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision: ...

    def close_block(self, ticket: Ticket) -> None:
        """A call of several requests is over: give back what it reserved and did not send."""

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None: ...

    def release(self, ticket: Ticket, *, billed: bool) -> None: ...

    def forget(self, ticket: Ticket) -> None: ...

    def note_rate_limited(self, seconds: float | None) -> None: ...

    def report(self) -> SpendReport: ...

    def report_by_module(self) -> dict[str | None, SpendReport]:
        """The report per DSPy module that made the requests (``LedgerState.report_by_module``)."""

    def export(self) -> dict[str, Any]: ...

    def portable(self) -> LedgerBackend:
        """What a pickled limiter carries instead of this backend."""


class LocalLedger:
    """The ledger in this process, behind one lock; every call is a few microseconds of arithmetic,
    so ``areserve`` runs it inline on the event loop."""

    def __init__(self, limits: Limits, clock: Clock, *, seed: dict[str, Any] | None = None) -> None:
        self._state = LedgerState(limits)
        self._clock = clock
        self._lock = threading.Lock()
        if seed is not None:  # counts carried over from another ledger (``export()``): a ledger moving home
            self._state.restore(seed, clock.now())

    def __repr__(self) -> str:
        return f"LocalLedger(pid={os.getpid()})"

    def reserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision:
        with self._lock:
            return self._state.reserve(ticket, ask, self._clock.now(), block)

    async def areserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision:
        return self.reserve(ticket, ask, block)

    def close_block(self, ticket: Ticket) -> None:
        with self._lock:
            self._state.close_block(ticket)

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

    def report_by_module(self) -> dict[str | None, SpendReport]:
        with self._lock:
            return self._state.report_by_module()

    def export(self) -> dict[str, Any]:
        with self._lock:
            return self._state.export(self._clock.now())

    def portable(self) -> LedgerBackend:
        # The counts cannot travel: two processes each holding the whole budget could spend it twice.
        return DetachedLedger(self._state.limits, os.getpid())


class DetachedLedger:
    """What an unpickled limiter with a local ledger holds: the ledger stayed in the process that
    made it, so this copy refuses to send anything until it is attached to a shared ledger.
    ``forked``: this process is a child forked from that one (it inherited a copy of the ledger,
    which it must not spend from)."""

    def __init__(self, limits: Limits, origin_pid: int, *, forked: bool = False) -> None:
        self.limits = limits
        self.origin_pid = origin_pid
        self.forked = forked

    def __repr__(self) -> str:
        return f"DetachedLedger(origin_pid={self.origin_pid}{', forked=True' if self.forked else ''})"

    def _error(self) -> ConfigurationError:
        if self.forked:
            return self._forked_error()
        return ConfigurationError(
            f"this LM's limits ({self.limits.describe()}) are kept by a ledger in the process that created it "
            f"(pid {self.origin_pid}); a pickled copy does not get a fresh budget of its own. Before sending "
            "the LM to other processes, share its ledger (the limiter's share_on_ray() for Ray workers), or "
            "attach this copy to a ledger (the limiter's attach(backend)). A copy loaded from a program saved "
            f"with save_program=True gets a ledger of its own with lm.copy({self.limits.describe()}) (then "
            "program.set_lm(...) with that copy), as a program saved as JSON gets when loaded"
        )

    def _forked_error(self) -> ConfigurationError:
        return ConfigurationError(
            f"this process was forked from pid {self.origin_pid} after this LM was made there; its limits "
            f"({self.limits.describe()}) are kept by the parent's ledger, and a forked child must not spend "
            "from a copy of it (each child would get the whole budget again). Build the LM in each child "
            "instead, with its share of the limits: with multiprocessing, in the Pool's initializer (or the "
            "worker function); with gunicorn, in a post_fork hook, or run without --preload. Or share one "
            "ledger across processes on Ray (the limiter's share_on_ray())"
        )

    def reserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision:
        raise self._error()

    async def areserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision:
        raise self._error()

    def close_block(self, ticket: Ticket) -> None:
        return None  # nothing was ever reserved here

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

    def report_by_module(self) -> dict[str | None, SpendReport]:
        raise self._error()

    def export(self) -> dict[str, Any]:
        raise self._error()

    def portable(self) -> LedgerBackend:
        return self


def for_forked_child(backend: LedgerBackend, limits: Limits, clock: Clock, parent_pid: int) -> LedgerBackend:
    """The ledger of a limiter in a child just forked from ``parent_pid``.

    A local ledger stays with the parent: the child refuses to send (``DetachedLedger``), since a
    copy of the budget, the request cap or the rate buckets in every child would multiply them.
    An LM whose only limit is ``max_concurrency`` (a bound per process anyway) gets an empty
    ledger and goes on. A shared ledger's handle (Ray) is kept: it is the same ledger."""
    if not isinstance(backend, LocalLedger):
        return backend
    if set(limits.as_kwargs()) <= {"max_concurrency"}:
        return LocalLedger(limits, clock)
    return DetachedLedger(limits, parent_pid, forked=True)
