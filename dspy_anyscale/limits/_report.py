"""``SpendReport``: what a limiter's ledger has counted, frozen, with a readable ``str``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpendReport:
    """A snapshot of one LM's ledger (shared by its copies, and by a Ray job's actors on a Ray ledger).

    spent_usd: the cost of answered requests (the server's counts x prices, with or without a
        budget; the worst case for an answer without counts or a failure that may have been
        billed). None when a request had no price, or no counts and no worst case (possible only
        without ``budget_usd``).
    reserved_usd: worst cases of the requests in flight (and of those a call of n reserved).
    remaining_usd: what new requests may still reserve now: budget - spent - reserved (>= 0).
    requests: requests sent, which count against ``max_requests`` whatever their answer.
    in_flight: requests admitted and not yet answered.
    prompt_tokens / completion_tokens: as the server reported them (answers without counts add 0).
    unknown_usage: requests booked at their worst case for want of counts.
    failed: requests sent that failed (counted in ``requests``; their money goes back unless the
        server may have billed them).
    refused: requests refused by ``budget_usd`` or ``max_requests`` (never sent).
    overruns: answers that cost more than their reservation (a prompt over its bound: an image,
        a chat template longer than the allowance): the budget holds exactly while this is 0.
    rate_limited: 429s reported to the ledger; cooldown_s: what is left of the shared cool-down.
    """

    spent_usd: float | None
    reserved_usd: float
    budget_usd: float | None
    remaining_usd: float | None
    requests: int
    in_flight: int
    max_requests: int | None
    remaining_requests: int | None
    prompt_tokens: int
    completion_tokens: int
    unknown_usage: int = 0
    failed: int = 0
    refused: int = 0
    overruns: int = 0
    rate_limited: int = 0
    cooldown_s: float = 0.0

    def __str__(self) -> str:
        return "; ".join(part for part in (self._money(), self._requests(), self._tokens(), self._events()) if part)

    def _money(self) -> str:
        spent = "unknown" if self.spent_usd is None else f"${self.spent_usd:.6f}"
        text = f"spent {spent}"
        if self.budget_usd is not None:
            text += f" of ${self.budget_usd:g}, ${self.remaining_usd:.6f} left"
        if self.reserved_usd or self.in_flight:
            text += f" (${self.reserved_usd:.6f} reserved by {self.in_flight} in flight)"
        return text

    def _requests(self) -> str:
        text = f"{self.requests} request{'' if self.requests == 1 else 's'}"
        if self.max_requests is not None:
            text += f" of {self.max_requests}, {self.remaining_requests} left"
        return text

    def _tokens(self) -> str:
        text = f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens"
        if self.unknown_usage:
            text += f" ({self.unknown_usage} without counts, booked at worst case)"
        return text

    def _events(self) -> str:
        counts = (
            (self.refused, "refused"),
            (self.failed, "failed"),
            (self.overruns, "over their reservation"),
            (self.rate_limited, "rate-limited (429)"),
        )
        text = ", ".join(f"{count} {what}" for count, what in counts if count)
        if self.cooldown_s > 0:
            text += f"{', ' if text else ''}cooling down {self.cooldown_s:.1f}s"
        return text
