"""A ledger in one Ray actor, shared by every process of a Ray job: ``pip install 'dspy-anyscale[ray]'``.

The actor runs ``LedgerState`` on its own monotonic clock (callers send durations, never
timestamps, so clocks of different machines never meet). A ``RayLedger`` is a handle: pickling
it (inside an LM sent to a Ray actor) carries the handle, so every copy of the LM, in every
worker, reserves from the same budget. Ray runs an actor's calls one at a time, which is the
ledger's lock; calls one process submits run in the order it submitted them.

Reservations wait for the actor's answer (``ray.get``, or ``await`` on an event loop);
settlements are sent without waiting (the reservation stays held at its worst case until the
actor has applied them, which only ever errs safe) and :meth:`RayLedger.flush` waits for them.
``ray`` is imported only when a Ray ledger is made or used.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from .._constants import RAY_LEDGER_NAME_PREFIX, RAY_LEDGER_NUM_CPUS
from ._backends import LedgerBackend
from ._config import Limits
from ._ledger import Ask, Decision, LedgerState, Ticket
from ._report import SpendReport

# Settlements sent and not yet known to be applied; past this many, the finished ones are dropped.
_PENDING_PRUNE_AT = 64


class LedgerActor:
    """The body of the Ray actor (a plain class, so it pickles by reference and tests can run it bare)."""

    def __init__(self, limits: Limits, seed: dict[str, Any] | None = None) -> None:
        self._state = LedgerState(limits)
        if seed is not None:
            self._state.restore(seed, time.monotonic())

    def reserve(self, ticket: Ticket, ask: Ask) -> Decision:
        return self._state.reserve(ticket, ask, time.monotonic())

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self._state.settle(ticket, prompt_tokens, completion_tokens)

    def release(self, ticket: Ticket, billed: bool) -> None:
        self._state.release(ticket, billed=billed)

    def forget(self, ticket: Ticket) -> None:
        self._state.forget(ticket)

    def note_rate_limited(self, seconds: float | None) -> None:
        self._state.note_rate_limited(seconds, time.monotonic())

    def report(self) -> SpendReport:
        return self._state.report(time.monotonic())

    def export(self) -> dict[str, Any]:
        return self._state.export(time.monotonic())


class RayLedger:
    """A ``LedgerBackend`` whose ledger is one Ray actor."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()  # settlements come from many threads

    @classmethod
    def start(cls, limits: Limits, *, seed: dict[str, Any] | None = None, name: str | None = None) -> RayLedger:
        """Start the ledger actor (Ray must be initialised). ``seed``: counts to carry over
        (``LocalLedger.export()``). The actor lives as long as the driver that started it."""
        import ray

        actor = ray.remote(num_cpus=RAY_LEDGER_NUM_CPUS)(LedgerActor)
        name = name or f"{RAY_LEDGER_NAME_PREFIX}-{uuid.uuid4().hex[:12]}"
        return cls(actor.options(name=name).remote(limits, seed))

    def __repr__(self) -> str:
        return f"RayLedger({self.handle!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RayLedger, (self.handle,))  # the handle travels; this process's pending list does not

    def reserve(self, ticket: Ticket, ask: Ask) -> Decision:
        import ray

        return ray.get(self.handle.reserve.remote(ticket, ask))

    async def areserve(self, ticket: Ticket, ask: Ask) -> Decision:
        return await self.handle.reserve.remote(ticket, ask)

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self._send(self.handle.settle.remote(ticket, prompt_tokens, completion_tokens))

    def release(self, ticket: Ticket, *, billed: bool) -> None:
        self._send(self.handle.release.remote(ticket, billed))

    def forget(self, ticket: Ticket) -> None:
        self._send(self.handle.forget.remote(ticket))

    def note_rate_limited(self, seconds: float | None) -> None:
        self._send(self.handle.note_rate_limited.remote(seconds))

    def report(self) -> SpendReport:
        import ray

        self.flush()
        return ray.get(self.handle.report.remote())

    def export(self) -> dict[str, Any]:
        import ray

        self.flush()
        return ray.get(self.handle.export.remote())

    def flush(self) -> None:
        """Wait until the ledger has applied everything this process sent it."""
        import ray

        with self._pending_lock:
            pending, self._pending = self._pending, []
        ray.get(pending)

    def portable(self) -> LedgerBackend:
        return self

    def _send(self, ref: Any) -> None:
        with self._pending_lock:
            self._pending.append(ref)
            if len(self._pending) >= _PENDING_PRUNE_AT:
                import ray

                _, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
