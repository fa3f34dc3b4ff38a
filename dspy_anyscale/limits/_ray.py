"""A ledger in one Ray actor, shared by every process of a Ray job: ``pip install 'dspy-anyscale[ray]'``.

The actor runs ``LedgerState`` on its own monotonic clock (callers send durations, never
timestamps, so clocks of different machines never meet). A ``RayLedger`` is a handle: pickling
it (inside an LM sent to a Ray actor) carries the actor's name, and the copy finds the actor
when first used, so every copy of the LM, in every worker, reserves from the same budget.
Unpickling never touches Ray: a program saved with ``save_program=True`` loads anywhere. Ray
runs an actor's calls one at a time, which is the ledger's lock; calls one process submits run
in the order it submitted them.

Reservations wait for the actor's answer (``ray.get``, or ``await`` on an event loop);
settlements are sent without waiting (the reservation stays held at its worst case until the
actor has applied them, which only ever errs safe) and :meth:`RayLedger.flush` waits for them.
``ray`` is imported only when a Ray ledger is made or used.

A handle never starts Ray: calling an actor without Ray initialised would start a new local Ray
(seconds) in which the actor does not exist. Where Ray is not running (after ``ray.shutdown()``,
or in a process that unpickled the LM without that Ray) or the actor is gone, reservations and
reports raise a ``ConfigurationError`` that says so and names the way out, and settlements are
dropped (the ledger they belong to is gone). ``Limiter.bring_home()`` moves the counts back into
the process before that happens.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any

from .._constants import RAY_LEDGER_NAME_PREFIX, RAY_LEDGER_NUM_CPUS, RAY_LEDGER_PENDING_PRUNE_AT
from ..errors import ConfigurationError
from ._backends import LedgerBackend
from ._config import Limits
from ._ledger import Ask, Block, Decision, LedgerState, Ticket
from ._report import SpendReport


class LedgerActor:
    """The body of the Ray actor (a plain class, so it pickles by reference and tests can run it bare)."""

    def __init__(self, limits: Limits, seed: dict[str, Any] | None = None) -> None:
        self._state = LedgerState(limits)
        if seed is not None:
            self._state.restore(seed, time.monotonic())

    def reserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision:
        return self._state.reserve(ticket, ask, time.monotonic(), block)

    def close_block(self, ticket: Ticket) -> None:
        self._state.close_block(ticket)

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

    def report_by_module(self) -> dict[str | None, SpendReport]:
        return self._state.report_by_module()

    def export(self) -> dict[str, Any]:
        return self._state.export(time.monotonic())


class RayLedger:
    """A ``LedgerBackend`` whose ledger is one named Ray actor. ``limits`` are for messages only."""

    def __init__(self, name: str, namespace: str | None, limits: Limits | None = None, *, handle: Any = None) -> None:
        self.name, self.namespace, self.limits = name, namespace, limits
        self._handle = handle  # found by name when first used, in a process that got this ledger by pickle
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()  # settlements come from many threads

    @classmethod
    def start(cls, limits: Limits, *, seed: dict[str, Any] | None = None, name: str | None = None) -> RayLedger:
        """Start the ledger actor (Ray must be initialised). ``seed``: counts to carry over
        (``LocalLedger.export()``). The actor lives as long as the driver that started it."""
        import ray

        actor = ray.remote(num_cpus=RAY_LEDGER_NUM_CPUS)(LedgerActor)
        name = name or f"{RAY_LEDGER_NAME_PREFIX}-{uuid.uuid4().hex[:12]}"
        handle = actor.options(name=name).remote(limits, seed)  # this driver's handle keeps the actor alive
        return cls(name, ray.get_runtime_context().namespace, limits, handle=handle)

    def __repr__(self) -> str:
        return f"RayLedger(name={self.name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The actor's name travels, never its handle: unpickling a handle needs a running Ray (it
        # fails where none runs), and a handle found by name is the same actor. This process's
        # pending list stays here.
        return (RayLedger, (self.name, self.namespace, self.limits))

    @property
    def handle(self) -> Any:
        """The actor's handle; found by name on first use in a process that unpickled this ledger."""
        if self._handle is None:
            ray = self._ray()
            try:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            except Exception as exc:  # ValueError: no such actor (stopped, or from an ended Ray session)
                raise self._unreachable(f"its actor {self.name!r} cannot be found ({first_line(exc)})") from exc
        return self._handle

    # --- reaching the actor: never by starting Ray ---------------------------------------------------

    def _ray(self) -> Any:
        """The ``ray`` module, if Ray runs in this process; else the error saying the ledger is out of reach."""
        import ray

        if not ray.is_initialized():  # an actor call now would start a new local Ray, without this actor
            raise self._unreachable(
                "Ray is not running in this process (ray.shutdown() was called, or this LM was unpickled "
                "where that Ray does not run: e.g. a program saved with save_program=True and loaded elsewhere)"
            )
        return ray

    def _unreachable(self, why: str) -> ConfigurationError:
        limits = f" ({self.limits.describe()})" if self.limits is not None else ""
        return ConfigurationError(
            f"this LM's limits{limits} are kept by a ledger in a Ray actor, and {why}. What that ledger counted "
            "is not here, and the LM never starts a fresh budget (nor Ray) by itself: give it a ledger of its own "
            f"with {copy_with_limits(self.limits)} (for a loaded program, program.set_lm(...) with that copy; a "
            "program saved as JSON gets one when loaded). To keep a job's counts, bring the ledger home before "
            "ray.shutdown(): lm.limiter.bring_home() (run_program and ProgramPool.close() do it when they finish)"
        )

    def _get(self, method: str, *args: Any) -> Any:
        """Call the actor and wait for its answer; an actor that is gone is a ``ConfigurationError``."""
        ray = self._ray()
        try:
            return ray.get(getattr(self.handle, method).remote(*args))
        except ray.exceptions.RayTaskError:
            raise  # the ledger's own error (e.g. moving it while requests are in flight): it says what it is
        except Exception as exc:  # the actor died, or belongs to a Ray session that has ended
            raise self._unreachable(f"that actor cannot be reached ({first_line(exc)})") from exc

    # --- LedgerBackend --------------------------------------------------------------------------------

    def reserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision:
        decision: Decision = self._get("reserve", ticket, ask, block)  # the actor's Ledger.reserve
        return decision

    async def areserve(self, ticket: Ticket, ask: Ask, block: Block | None = None) -> Decision:
        ray = self._ray()
        try:
            decision: Decision = await self.handle.reserve.remote(ticket, ask, block)  # the actor's Ledger.reserve
            return decision
        except ray.exceptions.RayTaskError:
            raise
        except Exception as exc:
            raise self._unreachable(f"that actor cannot be reached ({first_line(exc)})") from exc

    def close_block(self, ticket: Ticket) -> None:
        self._send("close_block", ticket)

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self._send("settle", ticket, prompt_tokens, completion_tokens)

    def release(self, ticket: Ticket, *, billed: bool) -> None:
        self._send("release", ticket, billed)

    def forget(self, ticket: Ticket) -> None:
        self._send("forget", ticket)

    def note_rate_limited(self, seconds: float | None) -> None:
        self._send("note_rate_limited", seconds)

    def report(self) -> SpendReport:
        self.flush()
        report: SpendReport = self._get("report")  # the actor's Ledger.report
        return report

    def report_by_module(self) -> dict[str | None, SpendReport]:
        self.flush()
        reports: dict[str | None, SpendReport] = self._get("report_by_module")
        return reports

    def export(self) -> dict[str, Any]:
        self.flush()
        state: dict[str, Any] = self._get("export")  # the actor's Ledger.export
        return state

    def flush(self) -> None:
        """Wait until the ledger has applied everything this process sent it (nothing to wait for
        once Ray is gone: the ledger went with it)."""
        import ray

        with self._pending_lock:
            pending, self._pending = self._pending, []
        if pending and ray.is_initialized():
            try:
                ray.get(pending)
            except ray.exceptions.RayTaskError:
                raise
            except Exception as exc:
                raise self._unreachable(f"that actor cannot be reached ({first_line(exc)})") from exc

    def portable(self) -> LedgerBackend:
        return self

    def stop(self) -> None:
        """Stop the actor (what it counted goes with it). Never raises; a no-op once Ray is gone."""
        import ray

        with self._pending_lock:
            self._pending = []
        if ray.is_initialized():
            with contextlib.suppress(Exception):  # already dead, or from an ended session
                ray.kill(self.handle, no_restart=True)
        self._handle = None

    def _send(self, method: str, *args: Any) -> None:
        """Send without waiting. Where Ray is gone, an outcome is dropped: its ledger went with Ray,
        and a request that was answered must not fail on its bookkeeping."""
        import ray

        if not ray.is_initialized():
            return
        try:
            ref = getattr(self.handle, method).remote(*args)
        except Exception:  # the actor is gone: so is the ledger this outcome belonged to
            return
        with self._pending_lock:
            self._pending.append(ref)
            if len(self._pending) >= RAY_LEDGER_PENDING_PRUNE_AT:
                _, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)


def copy_with_limits(limits: Limits | None) -> str:
    """``lm.copy(...)`` giving the LM these limits again, on a new ledger of its own, for messages."""
    if limits is None:
        return "lm.copy(budget_usd=..., max_requests=...)"
    return f"lm.copy({limits.describe()})"


def first_line(exc: BaseException, *, last: bool = False) -> str:
    """Ray's errors run over many lines (tracebacks, ids); a log line or a message needs one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if last else lines[0]
