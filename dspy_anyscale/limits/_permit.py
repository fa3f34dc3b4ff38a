"""``Permit``: one admitted request, and what its outcome does to the ledger.

A permit reports its outcome to the :class:`PermitOwner` that admitted it (the ``Limiter``), a
protocol defined here: this module never imports the limiter, which imports it.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from .._dspy_types import LMRateLimitError, lm15
    from ._gate import Waiter
    from ._ledger import Ticket
else:
    from dspy import lm15
    from dspy.utils.exceptions import LMRateLimitError

# Failures after which the server may still have done (and billed) the work: a timed-out or
# abandoned request may have been generated in full. The others (4xx, 429, 5xx, connection
# refused) mean no answer was produced.
_MAYBE_BILLED = (TimeoutError, asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)
# A 429 as the engine raises it (lm15) or as DSPy re-raises it; both carry ``retry_after``.
_RATE_LIMITED = (lm15.RateLimitError, LMRateLimitError)


def may_have_been_billed(error: BaseException | None) -> bool:
    return isinstance(error, _MAYBE_BILLED)


class PermitOwner(Protocol):
    """What a :class:`Permit` reports its outcome to: the limiter that admitted it."""

    def settle_permit(
        self, ticket: Ticket, slot: Waiter, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        """The request was answered, with the server's counts (None: unknown)."""

    def release_permit(self, ticket: Ticket, slot: Waiter, *, billed: bool, sent: bool = True) -> None:
        """The request failed; ``billed``: keep its worst case as spent; ``sent=False``: it never left."""

    def note_rate_limited(self, seconds: float | None = None) -> None:
        """A 429: every caller waits ``seconds`` (the Retry-After) before its next request."""


class AnyPermit(Protocol):
    """A permit as the engine uses it: :class:`Permit`, or ``NO_PERMIT`` from a limiter without limits."""

    def answer_started(self) -> None: ...

    def settle(self, prompt_tokens: int | None, completion_tokens: int | None) -> None: ...

    def release_failed(
        self, error: BaseException | None = None, *, billed: bool | None = None, sent: bool = True
    ) -> None: ...

    def __enter__(self) -> AnyPermit: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class Permit:
    """One admitted request. Exactly one of :meth:`settle` / :meth:`release_failed` takes effect
    (later calls are ignored); leaving a ``with`` block without either frees it too.

    Once admitted, a request counts against ``max_requests`` whatever becomes of it (an answer, an
    HTTP error, a timeout, a reset), unless ``release_failed(..., sent=False)`` says it never left."""

    __slots__ = ("_answer_started", "_limiter", "_open", "_slot", "_ticket")

    def __init__(self, limiter: PermitOwner, ticket: Ticket, slot: Waiter) -> None:
        self._limiter = limiter
        self._ticket = ticket
        self._slot = slot  # its place in the gate: freed with the permit
        self._open = True
        self._answer_started = False

    def __repr__(self) -> str:
        return f"Permit({self._ticket!r}, open={self._open})"

    def answer_started(self) -> None:
        """The server began answering (a stream's first event): a failure from now on may have been billed."""
        self._answer_started = True

    def settle(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """The answer came, with the server's counts (None: not reported, booked at the worst case)."""
        if self._close():
            self._limiter.settle_permit(self._ticket, self._slot, _count(prompt_tokens), _count(completion_tokens))

    def release_failed(
        self, error: BaseException | None = None, *, billed: bool | None = None, sent: bool = True
    ) -> None:
        """The request failed. It still counts as a request (it was sent); ``billed`` (default: decided
        from ``error`` and whether the answer had started) keeps its worst case as spent, otherwise
        its money and tokens are given back. ``sent=False``: it never left this process (e.g. the
        connection was refused), so everything is given back, the request too. A 429
        (``RateLimitError``) also starts the shared cool-down, for its Retry-After."""
        if billed is None:
            billed = self._answer_started or may_have_been_billed(error)
        if not self._close():
            return
        try:
            if isinstance(error, _RATE_LIMITED):
                self._limiter.note_rate_limited(error.retry_after)
        finally:
            self._limiter.release_permit(self._ticket, self._slot, billed=billed and sent, sent=sent)

    def _close(self) -> bool:
        was_open, self._open = self._open, False
        return was_open

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._open:
            return
        if exc is None:
            self.settle(None, None)  # ended without counts: booked at its worst case (errs safe)
        else:
            self.release_failed(exc)


def _count(value: Any) -> int | None:
    """A token count from the server; anything that is not one is treated as unknown (worst case)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class _NoPermit:
    __slots__ = ()

    def answer_started(self) -> None:
        pass

    def settle(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        pass

    def release_failed(
        self, error: BaseException | None = None, *, billed: bool | None = None, sent: bool = True
    ) -> None:
        pass

    def __enter__(self) -> _NoPermit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def __repr__(self) -> str:
        return "NO_PERMIT"


NO_PERMIT: AnyPermit = _NoPermit()
