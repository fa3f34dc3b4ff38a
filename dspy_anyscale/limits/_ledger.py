"""The ledger: rate buckets, the shared cool-down, the budget and the counts of one LM.

``LedgerState`` is the arithmetic, with no lock, no clock and no I/O: every method takes ``now``.
A backend (``_backends.py``, ``_ray.py``) gives it a home and a lock.

Requests are known by *tickets* the client makes up (unique per limiter and process), so a
client that gives up half-way can always tell the ledger to forget what it may have granted.

A call that fans out into n requests (``n`` candidates) reserves them together, as a *block*:
the first of them asks for all n at once (all or nothing), and each one draws its reservation
from the block; what was not drawn when the call ends goes back (``close_block``).

Every request that was sent counts against ``max_requests``, whatever its answer (an HTTP error
is a request the server received); only money the server cannot have charged is given back.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from .._constants import DEFAULT_COOLDOWN_S, MAX_COOLDOWN_S
from ..catalog import Prices
from ..errors import ConfigurationError
from ._bucket import TokenBucket
from ._config import Limits
from ._estimate import cost_pico, pico_to_usd, usd_to_pico
from ._report import SpendReport

Ticket = Hashable
# A call of ``count`` requests reserved together: (the block's ticket, count).
Block = tuple[Ticket, int]


@dataclass(frozen=True)
class Ask:
    """One request's worst case: ``cost`` in pico-USD (None: no price known), ``tokens`` for the token bucket."""

    cost: int | None
    tokens: int
    prices: Prices | None = None  # to price the server's counts when the answer comes
    module: str | None = None  # the DSPy module that asked (``report_by_module``); None: a direct call


@dataclass(frozen=True)
class Refusal:
    """Why a request may not go, with the ledger's figures at that moment (pico-USD)."""

    limit: str  # "budget_usd" or "max_requests"
    spent: int
    reserved: int
    request: int  # the worst case of everything asked for: ``count`` requests
    budget: int | None
    requests: int
    reserved_requests: int
    max_requests: int | None
    count: int = 1  # requests asked for at once (a call's n candidates)
    failed: int = 0  # of ``requests``, those that failed


@dataclass(frozen=True)
class Decision:
    """The answer to a reservation: granted, ask again after ``wait_s`` seconds, or refused."""

    wait_s: float = 0.0
    refusal: Refusal | None = None

    @property
    def granted(self) -> bool:
        return self.refusal is None and self.wait_s <= 0.0


GRANTED = Decision()


class LedgerState:
    """Not thread-safe: its owner serialises calls."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._budget = None if limits.budget_usd is None else usd_to_pico(limits.budget_usd)
        self._request_bucket = TokenBucket(*limits.request_bucket) if limits.request_bucket else None
        self._token_bucket = TokenBucket(*limits.token_bucket) if limits.token_bucket else None
        self._held: dict[Ticket, Ask] = {}
        self._blocks: dict[Ticket, _Block] = {}
        self._cooldown_until = -math.inf
        self.counts = _Counts()
        # The same counts per DSPy module that asked: each request is in exactly one, so they add up.
        self.modules: dict[str | None, _Counts] = {}

    # --- admission --------------------------------------------------------------------------------

    def reserve(self, ticket: Ticket, ask: Ask, now: float, block: Block | None = None) -> Decision:
        """Grant ``ticket``, ask again after ``wait_s``, or refuse. With ``block``, the request is one
        of a call's ``count``: the first of them reserves all of them, or is refused for all."""
        if ticket in self._held:
            return GRANTED  # a repeated ask (a client retrying after a lost reply) is the same grant
        if block is not None and block[0] not in self._blocks:
            refusal = self._open_block(block, ask)
            if refusal is not None:
                return Decision(refusal=refusal)
        unit = self._unit(block, ask)
        if unit is None:
            refusal = self._refusal(ask)
            if refusal is not None:
                for counts in self._counts_of(ask):
                    counts.refused += 1
                return Decision(refusal=refusal)
        wait = self._wait(ask, now)
        if wait > 0.0:
            return Decision(wait_s=wait)
        if unit is not None:
            ask = self._draw(block, ask)
        self._grant(ticket, ask)
        return GRANTED

    def _refusal(self, ask: Ask, count: int = 1) -> Refusal | None:
        counts = self.counts
        cost = (ask.cost or 0) * count
        over_budget = self._budget is not None and counts.spent + counts.reserved + cost > self._budget
        max_requests = self.limits.max_requests
        reserved_requests = self._reserved_requests()
        over_requests = max_requests is not None and counts.requests + reserved_requests + count > max_requests
        if not (over_budget or over_requests):
            return None
        return Refusal(
            limit="budget_usd" if over_budget else "max_requests",
            spent=counts.spent,
            reserved=counts.reserved,
            request=cost,
            budget=self._budget,
            requests=counts.requests,
            reserved_requests=reserved_requests,
            max_requests=max_requests,
            count=count,
            failed=counts.failed,
        )

    def _reserved_requests(self) -> int:
        """Requests in flight, plus those a call has reserved and not yet sent."""
        return len(self._held) + sum(block.units for block in self._blocks.values())

    # --- a call's n requests, reserved together ---------------------------------------------------

    def _open_block(self, block: Block, ask: Ask) -> Refusal | None:
        ticket, count = block
        refusal = self._refusal(ask, count)
        if refusal is not None:
            for counts in self._counts_of(ask):
                counts.refused += 1
            return refusal
        self._blocks[ticket] = _Block(ask, count)
        self.counts.reserved += (ask.cost or 0) * count
        return None

    def _unit(self, block: Block | None, ask: Ask) -> Ask | None:
        """The block's reservation this request can draw on, if any is left and covers its worst case."""
        found = None if block is None else self._blocks.get(block[0])
        if found is None or found.units <= 0 or (ask.cost or 0) > (found.ask.cost or 0):
            return None
        return found.ask

    def _draw(self, block: Block | None, ask: Ask) -> Ask:
        """Move one request's reservation out of the block; the request holds the block's worst case."""
        assert block is not None
        found = self._blocks[block[0]]
        found.units -= 1
        self.counts.reserved -= found.ask.cost or 0
        return Ask(cost=found.ask.cost, tokens=ask.tokens, prices=ask.prices, module=ask.module)

    def close_block(self, ticket: Ticket) -> None:
        """The call is over: what it reserved and did not send (cache hits, a failure) goes back."""
        found = self._blocks.pop(ticket, None)
        if found is not None:
            self.counts.reserved -= (found.ask.cost or 0) * found.units

    def _wait(self, ask: Ask, now: float) -> float:
        wait = max(0.0, self._cooldown_until - now)
        if self._request_bucket is not None:
            self._request_bucket.refill(now)
            wait = max(wait, self._request_bucket.wait_for(1, now))
        if self._token_bucket is not None:
            self._token_bucket.refill(now)
            wait = max(wait, self._token_bucket.wait_for(ask.tokens, now))
        return wait

    def _grant(self, ticket: Ticket, ask: Ask) -> None:
        if self._request_bucket is not None:
            self._request_bucket.take(1)
        if self._token_bucket is not None:
            self._token_bucket.take(ask.tokens)
        self._held[ticket] = ask
        for counts in self._counts_of(ask):
            counts.reserved += ask.cost or 0

    def _counts_of(self, ask: Ask) -> tuple[_Counts, _Counts]:
        """The LM's counts and those of the module that asked: every change to one is made to both."""
        module = self.modules.get(ask.module)
        if module is None:
            module = self.modules[ask.module] = _Counts()
        return self.counts, module

    # --- outcomes ---------------------------------------------------------------------------------

    def settle(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """The answer came: the reservation becomes its actual cost (the worst case if counts are missing)."""
        ask = self._held.pop(ticket, None)
        if ask is None:
            return
        if prompt_tokens is not None and completion_tokens is not None:
            self._correct_tokens(ask.tokens, prompt_tokens + completion_tokens)
        for counts in self._counts_of(ask):
            self._settle_counts(counts, ask, prompt_tokens, completion_tokens)

    @staticmethod
    def _settle_counts(counts: _Counts, ask: Ask, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        counts.reserved -= ask.cost or 0
        counts.requests += 1
        if prompt_tokens is None or completion_tokens is None:
            _book_worst_case(counts, ask)
            return
        counts.prompt_tokens += prompt_tokens
        counts.completion_tokens += completion_tokens
        if ask.prices is None:
            counts.unpriced += 1
            return
        actual = cost_pico(ask.prices, prompt_tokens, completion_tokens)  # priced with or without a budget
        counts.spent += actual
        counts.overruns += ask.cost is not None and actual > ask.cost

    def release(self, ticket: Ticket, *, billed: bool) -> None:
        """The request failed. It was sent, so it counts against ``max_requests`` whatever the answer.
        ``billed``: the server may have done (and charged) the work, so the worst case is kept as
        spent; otherwise the money and the tokens are given back."""
        ask = self._held.pop(ticket, None)
        if ask is None:
            return
        for counts in self._counts_of(ask):
            counts.reserved -= ask.cost or 0
            counts.failed += 1
            counts.requests += 1
            if billed:
                _book_worst_case(counts, ask)
        if not billed and self._token_bucket is not None:
            self._token_bucket.give_back(ask.tokens)

    def forget(self, ticket: Ticket) -> None:
        """A grant the client never used (it gave up before sending): everything goes back."""
        ask = self._held.pop(ticket, None)
        if ask is None:
            return
        for counts in self._counts_of(ask):
            counts.reserved -= ask.cost or 0
        if self._request_bucket is not None:
            self._request_bucket.give_back(1)
        if self._token_bucket is not None:
            self._token_bucket.give_back(ask.tokens)

    def _correct_tokens(self, reserved: int, actual: int) -> None:
        if self._token_bucket is None:
            return
        if actual < reserved:
            self._token_bucket.give_back(reserved - actual)
        else:
            self._token_bucket.take(actual - reserved)  # may leave the bucket in debt: later requests wait

    def note_rate_limited(self, seconds: float | None, now: float) -> None:
        """A 429: every caller waits until ``now + seconds`` (a later 429 can only extend the pause)."""
        pause = DEFAULT_COOLDOWN_S if seconds is None or not math.isfinite(seconds) else seconds
        pause = min(max(pause, 0.0), MAX_COOLDOWN_S)
        self._cooldown_until = max(self._cooldown_until, now + pause)
        self.counts.rate_limited += 1

    # --- reading and moving -----------------------------------------------------------------------

    def report_by_module(self) -> dict[str | None, SpendReport]:
        """The counts per DSPy module that asked (None: direct calls). Limits are the LM's, not a module's:
        budget and request caps are None here; cool-downs and 429s are counted for the LM only."""
        in_flight: dict[str | None, int] = {}
        for ask in self._held.values():
            in_flight[ask.module] = in_flight.get(ask.module, 0) + 1
        return {
            module: SpendReport(
                spent_usd=None if counts.unpriced else pico_to_usd(counts.spent),
                reserved_usd=pico_to_usd(counts.reserved),
                budget_usd=None,
                remaining_usd=None,
                requests=counts.requests,
                in_flight=in_flight.get(module, 0),
                max_requests=None,
                remaining_requests=None,
                prompt_tokens=counts.prompt_tokens,
                completion_tokens=counts.completion_tokens,
                unknown_usage=counts.unknown_usage,
                failed=counts.failed,
                refused=counts.refused,
                overruns=counts.overruns,
            )
            for module, counts in self.modules.items()
        }

    def report(self, now: float) -> SpendReport:
        counts, limits = self.counts, self.limits
        remaining = None if self._budget is None else max(0, self._budget - counts.spent - counts.reserved)
        remaining_requests = None
        if limits.max_requests is not None:
            remaining_requests = max(0, limits.max_requests - counts.requests - self._reserved_requests())
        return SpendReport(
            spent_usd=None if counts.unpriced else pico_to_usd(counts.spent),
            reserved_usd=pico_to_usd(counts.reserved),
            budget_usd=limits.budget_usd,
            remaining_usd=None if remaining is None else pico_to_usd(remaining),
            requests=counts.requests,
            in_flight=len(self._held),
            max_requests=limits.max_requests,
            remaining_requests=remaining_requests,
            prompt_tokens=counts.prompt_tokens,
            completion_tokens=counts.completion_tokens,
            unknown_usage=counts.unknown_usage,
            failed=counts.failed,
            refused=counts.refused,
            overruns=counts.overruns,
            rate_limited=counts.rate_limited,
            cooldown_s=max(0.0, self._cooldown_until - now),
        )

    def export(self, now: float) -> dict[str, Any]:
        """The counts and the cool-down left, to seed a ledger elsewhere. Only when nothing is in flight:
        a reservation cannot move (its client would settle it here)."""
        if self._held or self._blocks:
            raise ConfigurationError(
                f"cannot move the ledger while {self._reserved_requests()} requests are in flight or reserved; "
                "move it before the job starts"
            )
        return {
            "counts": vars(self.counts).copy(),
            "cooldown_s": max(0.0, self._cooldown_until - now),
            "modules": {module: vars(counts).copy() for module, counts in self.modules.items()},
        }

    def restore(self, state: dict[str, Any], now: float) -> None:
        for name, value in state["counts"].items():
            setattr(self.counts, name, value)
        self._cooldown_until = now + state["cooldown_s"]
        for module, values in state.get("modules", {}).items():
            counts = self.modules[module] = _Counts()
            for name, value in values.items():
                setattr(counts, name, value)


def _book_worst_case(counts: _Counts, ask: Ask) -> None:
    counts.unknown_usage += 1
    if ask.cost is None:
        counts.unpriced += 1
    else:
        counts.spent += ask.cost


class _Block:
    """What a call of several requests reserved: ``units`` requests of worst case ``ask`` not yet sent."""

    __slots__ = ("ask", "units")

    def __init__(self, ask: Ask, units: int) -> None:
        self.ask = ask
        self.units = units


class _Counts:
    """Integers only (money in pico-USD), so totals are exact."""

    def __init__(self) -> None:
        self.spent = 0
        self.reserved = 0
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.unknown_usage = 0
        self.unpriced = 0
        self.failed = 0
        self.refused = 0
        self.overruns = 0
        self.rate_limited = 0
