"""``Limiter``: admits each request of one LM through its gate (concurrency, FIFO) and its ledger
(rate buckets, cool-down, budget), and hands out a ``Permit`` that frees both when the request ends.

    permit = limiter.acquire(Estimate.for_payload(payload, prices))   # or: await limiter.aacquire(...)
    with permit:                       # leaving the block always frees the slot
        response = send(payload)
        permit.settle(usage.prompt_tokens, usage.completion_tokens)

A limiter is shared by reference: ``copy.copy`` and ``copy.deepcopy`` return the same object, so
``lm.copy()``, ``copy.deepcopy(program)`` and ``dspy.Parallel`` all count against one ledger. A
pickled limiter carries its ledger's *handle* where one exists (a Ray ledger) and otherwise
arrives detached: it refuses to send until attached, never with a fresh budget of its own. In a
child made by ``fork`` the limiter starts with an empty gate (the parent's requests in flight
stay the parent's) and, like a pickled copy, without the parent's local ledger (see
``_backends.for_forked_child``).

A call that fans out into n requests wraps them in ``with limiter.candidates(n):``; its first
request then reserves all n at once, or none (nothing is sent and paid for only to be dropped).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from .._constants import LOGGER_NAME
from ..errors import BudgetExceededError, ConfigurationError, LimiterTimeoutError
from ._backends import LedgerBackend, LocalLedger, for_forked_child
from ._clock import SYSTEM_CLOCK, Clock
from ._config import Limits
from ._estimate import Estimate, pico_to_usd
from ._gate import Gate, Waiter
from ._ledger import Ask, Block, Refusal, Ticket
from ._permit import Permit
from ._protocol import AnyLimiter
from ._report import SpendReport
from ._unlimited import UNLIMITED, UnlimitedLimiter


class Limiter:
    """The limits of one LM and every copy of it. Thread-safe; usable from any event loop."""

    enabled = True

    def __init__(self, limits: Limits, *, backend: LedgerBackend | None = None, clock: Clock | None = None) -> None:
        if not isinstance(limits, Limits):
            raise ConfigurationError(
                f"Limiter needs a Limits, e.g. Limiter(Limits(budget_usd=5.0)); got {type(limits).__name__}"
            )
        self.limits = limits
        self._clock = clock or SYSTEM_CLOCK
        self._backend: LedgerBackend = backend if backend is not None else LocalLedger(limits, self._clock)
        self._gate = Gate(limits.max_concurrency)
        self._client = uuid.uuid4().hex  # tickets stay unique when processes share one ledger
        self._tickets = itertools.count()
        _live.add(self)  # reset in a child made by fork

    @staticmethod
    def disabled() -> UnlimitedLimiter:
        """The limiter of an LM with no limits: every call is a no-op."""
        return UNLIMITED

    @classmethod
    def for_limits(cls, limits: Limits | None, **options: Any) -> AnyLimiter:
        """A limiter for ``limits``, or the no-op one when nothing is set."""
        return cls(limits, **options) if limits is not None and limits.enabled else UNLIMITED

    def __repr__(self) -> str:
        return f"Limiter({self.limits!r}, backend={self._backend!r})"

    # --- what it is -----------------------------------------------------------------------------------

    @property
    def backend(self) -> LedgerBackend:
        return self._backend

    @property
    def needs_estimate(self) -> bool:
        """True when ``acquire`` must be given an ``Estimate`` (a budget or a token rate is set)."""
        return self.limits.budget_usd is not None or self.limits.tokens_per_minute is not None

    @property
    def in_flight(self) -> int:
        """Slots taken in this process (admitted requests, plus the caller being admitted)."""
        return self._gate.in_flight

    @property
    def waiting(self) -> int:
        """Callers of this process in the queue (the one being admitted included)."""
        return self._gate.waiting

    # --- admission ------------------------------------------------------------------------------------

    def acquire(self, estimate: Estimate | None = None, *, timeout: float | None = None) -> Permit:
        """Block until the request may be sent; the permit must be settled or released (``with``).

        Raises ``BudgetExceededError`` if its worst case does not fit a cap (nothing is sent),
        ``LimiterTimeoutError`` if ``timeout`` seconds pass first, ``ConfigurationError`` if a
        budget or token rate is set and ``estimate`` lacks what they need.
        """
        ask = self._ask(estimate)
        deadline = _deadline(self._clock, timeout)
        waiter = self._gate.enter(lambda: None if deadline is None else deadline - self._clock.now())
        if waiter is None:
            raise _timeout_error(timeout)
        ticket = self._ticket()
        try:
            self._admit(ticket, ask, self._block(), deadline, timeout)
        except BaseException:
            self._give_up(ticket, waiter)
            raise
        self._gate.admitted(waiter)
        return Permit(self, ticket, waiter)

    async def aacquire(self, estimate: Estimate | None = None) -> Permit:
        """``acquire`` for a coroutine: waits on the event loop, never blocks it. Cancelling the
        waiting task (``asyncio.timeout``, ``wait_for``, ``task.cancel()``) takes it out of the
        queue with nothing held; that is the async timeout."""
        return await self._aacquire(self._ask(estimate))

    async def _aacquire(self, ask: Ask) -> Permit:
        waiter = await self._gate.aenter()
        ticket = self._ticket()
        block = self._block()
        try:
            while True:
                decision = await self._backend.areserve(ticket, ask, block)
                if decision.refusal is not None:
                    raise budget_error(decision.refusal)
                if decision.granted:
                    break
                await self._clock.asleep(decision.wait_s)
        except BaseException:
            self._give_up(ticket, waiter)
            raise
        self._gate.admitted(waiter)
        return Permit(self, ticket, waiter)

    def _admit(
        self, ticket: Ticket, ask: Ask, block: Block | None, deadline: float | None, timeout: float | None
    ) -> None:
        while True:
            decision = self._backend.reserve(ticket, ask, block)
            if decision.refusal is not None:
                raise budget_error(decision.refusal)
            if decision.granted:
                return
            wait = decision.wait_s
            if deadline is not None:
                left = deadline - self._clock.now()
                if left <= 0:
                    raise _timeout_error(timeout)
                wait = min(wait, left)
            self._clock.sleep(wait)

    def _give_up(self, ticket: Ticket, waiter: Waiter) -> None:
        self._backend.forget(ticket)  # a remote ledger may have granted it while we were cancelled
        self._gate.abandon(waiter)

    def _ask(self, estimate: Estimate | None) -> Ask:
        if estimate is None:
            if self.needs_estimate:
                raise ConfigurationError(f"{self._estimate_user()} needs an Estimate of each request")
            return Ask(cost=None, tokens=0)
        cost = estimate.worst_cost_pico()
        if self.limits.budget_usd is not None and cost is None:
            missing = "prices" if estimate.prices is None else "max_tokens"
            raise ConfigurationError(
                f"budget_usd needs the worst case of every request, and this one has no {missing}: "
                "set prices={'input': ..., 'output': ...} (USD per million tokens) and max_tokens"
            )
        tokens = estimate.worst_tokens
        if self.limits.tokens_per_minute is not None and tokens is None:
            raise ConfigurationError("tokens_per_minute needs max_tokens on every request, to reserve its tokens")
        return Ask(
            cost=cost,
            tokens=estimate.prompt_tokens if tokens is None else tokens,
            prices=estimate.prices,
            module=estimate.module,
        )

    def _estimate_user(self) -> str:
        return "budget_usd" if self.limits.budget_usd is not None else "tokens_per_minute"

    def _ticket(self) -> Ticket:
        return (self._client, next(self._tickets))

    # --- a call of n requests ---------------------------------------------------------------------------

    @contextmanager
    def candidates(self, n: int) -> Iterator[None]:
        """The requests made inside are one call's ``n`` (DSPy's ``n`` candidates): the first of them
        reserves all ``n`` against the caps, or is refused with ``BudgetExceededError`` naming ``n``,
        before anything is sent. What the call did not send (cache hits) goes back when it ends.
        Requests beyond ``n`` (DSPy's retries) must fit on their own. Tasks started inside share it."""
        if n <= 1:
            yield
            return
        # Inside another limiter's call (a Router's limits around a member's): both reserve their n.
        call = _Call(self, (self._client, "call", next(self._tickets)), n, outer=_CALL.get())
        token = _CALL.set(call)
        try:
            yield
        finally:
            _CALL.reset(token)
            if call.asked:
                self._backend.close_block(call.block[0])

    def _block(self) -> Block | None:
        """The block of the call being made in this context, if it is one of this limiter's."""
        call = _CALL.get()
        while call is not None and call.limiter is not self:
            call = call.outer
        if call is None:
            return None
        call.asked = True
        return call.block

    # --- outcomes (Permit reports them: this is its PermitOwner) ------------------------------------

    def settle_permit(
        self, ticket: Ticket, slot: Waiter, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        try:
            self._backend.settle(ticket, prompt_tokens, completion_tokens)
        finally:
            self._gate.release(slot)  # the slot is freed even if the ledger is unreachable

    def release_permit(self, ticket: Ticket, slot: Waiter, *, billed: bool, sent: bool = True) -> None:
        try:
            if sent:
                self._backend.release(ticket, billed=billed)
            else:  # it never left: not a request, nothing spent, tokens and rate given back
                self._backend.forget(ticket)
        finally:
            self._gate.release(slot)

    # --- fork ---------------------------------------------------------------------------------------

    def _after_fork_in_child(self, parent_pid: int) -> None:
        """In a child just forked: an empty gate (the parent's holders and waiters, and the lock some
        thread of the parent may have held, stay the parent's), tickets of its own, and no copy of
        the parent's local ledger."""
        self._gate = Gate(self.limits.max_concurrency)
        self._client = uuid.uuid4().hex
        self._tickets = itertools.count()
        self._backend = for_forked_child(self._backend, self.limits, self._clock, parent_pid)

    # --- everything else ------------------------------------------------------------------------------

    def note_rate_limited(self, seconds: float | None = None) -> None:
        """The server answered 429: every caller of this LM (every process on a shared ledger) waits
        ``seconds`` (the Retry-After; None: a default second) before its next request goes out."""
        self._backend.note_rate_limited(seconds)

    def report(self) -> SpendReport:
        return self._backend.report()

    def report_by_module(self) -> dict[str | None, SpendReport]:
        """:meth:`report` per DSPy module that made the requests (None: direct calls); they add up to it."""
        return self._backend.report_by_module()

    def attach(self, backend: LedgerBackend) -> None:
        """Use another ledger from now on (e.g. a detached copy joining a shared one). Only while idle."""
        if self._gate.in_flight or self._gate.waiting:
            raise ConfigurationError(
                f"cannot change the ledger with {self._gate.in_flight} requests in flight and "
                f"{self._gate.waiting} waiting; do it before the requests start"
            )
        self._backend = backend

    def share_on_ray(self, *, name: str | None = None) -> LedgerBackend:
        """Move the ledger into a Ray actor (Ray initialised) so every process the LM is pickled to
        shares it; what was counted so far moves with it. Idempotent. Returns the Ray ledger.
        ``bring_home()`` moves it back; without that, the ledger ends with the Ray session."""
        from ._ray import RayLedger

        if not isinstance(self._backend, RayLedger):
            self.attach(RayLedger.start(self.limits, seed=self._backend.export(), name=name))
        return self._backend

    def bring_home(self) -> LedgerBackend:
        """Move a ledger shared on Ray back into this process, with what it counted, and stop its
        actor: the job is over, and this LM goes on (after ``ray.shutdown()`` too) on its own ledger.
        Idempotent; only while idle, and while Ray still runs. Returns the local ledger.

        Processes still holding the Ray ledger (a lazy dataset run later) can no longer reserve:
        their requests are refused with a ``ConfigurationError``, never counted twice."""
        from ._ray import RayLedger

        backend = self._backend
        if isinstance(backend, RayLedger):
            self.attach(LocalLedger(self.limits, self._clock, seed=backend.export()))
            backend.stop()  # after the move: a failed move leaves the ledger where it was
        return self._backend

    # Shared by reference: copies of an LM count against one ledger.
    def __copy__(self) -> Limiter:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Limiter:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (self.limits, self._backend.portable()))


def _restore(limits: Limits, backend: LedgerBackend) -> Limiter:
    return Limiter(limits, backend=backend)


class _Call:
    """One call of ``n`` requests in progress (see ``Limiter.candidates``)."""

    __slots__ = ("asked", "block", "limiter", "outer")

    def __init__(self, limiter: Limiter, ticket: Ticket, n: int, outer: _Call | None = None) -> None:
        self.limiter = limiter
        self.outer = outer  # the call of another limiter this one is made inside, if any
        self.block: Block = (ticket, n)
        self.asked = False  # a request asked the ledger: the block may exist and must be closed


# The call being made in this context: threads start without one; tasks inherit their creator's.
_CALL: ContextVar[_Call | None] = ContextVar("dspy_anyscale_limiter_call", default=None)


# --- fork --------------------------------------------------------------------------------------------

_logger = logging.getLogger(LOGGER_NAME)
_live: weakref.WeakSet[Limiter] = weakref.WeakSet()


def _reset_in_child() -> None:
    parent = os.getppid()
    for limiter in list(_live):
        try:
            limiter._after_fork_in_child(parent)
        except Exception:  # a hook must not break the fork itself
            _logger.debug("resetting %r after fork failed", limiter, exc_info=True)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_reset_in_child)


# --- errors ----------------------------------------------------------------------------------------


def budget_error(refusal: Refusal) -> BudgetExceededError:
    spent, reserved, request = (pico_to_usd(v) for v in (refusal.spent, refusal.reserved, refusal.request))
    budget = None if refusal.budget is None else pico_to_usd(refusal.budget)
    asked = "this request" if refusal.count == 1 else f"this call's {refusal.count} requests (n={refusal.count})"
    not_sent = "the request was not sent" if refusal.count == 1 else "none of them was sent"
    if refusal.limit == "budget_usd":
        message = (
            f"budget_usd exceeded: {asked} could cost up to ${request:.6f}, and ${spent:.6f} is spent "
            f"+ ${reserved:.6f} reserved by requests in flight, of a ${budget:g} budget; {not_sent}"
        )
    else:
        failed = f" ({refusal.failed} of them failed)" if refusal.failed else ""
        needs = "" if refusal.count == 1 else f"{asked} do not fit: "
        message = (
            f"max_requests reached: {needs}{refusal.requests} requests made{failed} + {refusal.reserved_requests} "
            f"in flight of max_requests={refusal.max_requests} (every request sent counts, whatever its answer); "
            f"{not_sent}"
        )
    return BudgetExceededError(
        message,
        limit=refusal.limit,
        spent_usd=spent,
        reserved_usd=reserved,
        request_usd=request,
        budget_usd=budget,
        requests=refusal.requests,
        reserved_requests=refusal.reserved_requests,
        max_requests=refusal.max_requests,
    )


def _deadline(clock: Clock, timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout) or timeout < 0:
        raise ConfigurationError(f"timeout must be a non-negative number of seconds or None, got {timeout!r}")
    return clock.now() + timeout


def _timeout_error(timeout: float | None) -> LimiterTimeoutError:
    return LimiterTimeoutError(
        f"waited {timeout:g}s for the LM's limits (max_concurrency, rate, cool-down) without being admitted; "
        "nothing was sent"
    )
