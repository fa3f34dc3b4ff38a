"""Limits that hold over several LMs: a ``Router``'s, counted by whichever member sends the request.

A Router does not send requests; its members' engines do. So the Router names its limiter for the
member call it makes (``counted_against(limiter)``, a context variable), and the member's engine
admits each request through its own limiter *and* through every limiter named around it
(:func:`admit` / :func:`aadmit`), with the member's prices for the estimate. The permits are held
and settled together (:class:`PermitGroup`). Outer limiters are acquired first, outermost first,
and the member's own last: every caller takes them in that one order, so two callers never wait
for each other's slots in a cycle.

An LM called with no Router around it pays one context-variable read (``outer_limiters()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING

from ._permit import AnyPermit, may_have_been_billed
from ._protocol import AnyLimiter

if TYPE_CHECKING:
    from ._estimate import Estimate

# The limiters the requests made in this context also count against, outermost first.
_OUTER: ContextVar[tuple[AnyLimiter, ...]] = ContextVar("dspy_anyscale_outer_limiters", default=())


def outer_limiters() -> tuple[AnyLimiter, ...]:
    return _OUTER.get()


@contextmanager
def counted_against(limiter: AnyLimiter) -> Iterator[None]:
    """Requests made inside (in this context, and in threads and tasks started from it) also count
    against ``limiter``. A limiter without limits is not added: it would admit everything anyway."""
    if not limiter.enabled or limiter in _OUTER.get():
        yield
        return
    token = _OUTER.set((*_OUTER.get(), limiter))
    try:
        yield
    finally:
        _OUTER.reset(token)


Estimator = Callable[[AnyLimiter], "Estimate | None"]


def admit(own: AnyLimiter, outer: tuple[AnyLimiter, ...], estimate: Estimator) -> AnyPermit:
    """Block until every limiter admits the request: ``outer`` ones first, then ``own``."""
    held: list[AnyPermit] = []
    try:
        for limiter in (*outer, own):
            held.append(limiter.acquire(estimate(limiter)))
    except BaseException:
        _give_back(held)
        raise
    return PermitGroup(held[-1], tuple(held[:-1]))


async def aadmit(own: AnyLimiter, outer: tuple[AnyLimiter, ...], estimate: Estimator) -> AnyPermit:
    """:func:`admit` for a coroutine."""
    held: list[AnyPermit] = []
    try:
        for limiter in (*outer, own):
            held.append(await limiter.aacquire(estimate(limiter)))
    except BaseException:
        _give_back(held)
        raise
    return PermitGroup(held[-1], tuple(held[:-1]))


def _give_back(held: list[AnyPermit]) -> None:
    """A later limiter refused (or the wait was cancelled): the earlier permits were never used."""
    for permit in held:
        permit.release_failed(None, billed=False, sent=False)


class PermitGroup:
    """The permits of one request: the member's own and its Router's, settled or released together.

    A 429 cools the member's own limiter only: it is that service's rate limit, and a Router's
    other members are not rate limited by it (the Router's health cools the member instead).
    """

    __slots__ = ("_open", "_outer", "_own", "_started")

    def __init__(self, own: AnyPermit, outer: tuple[AnyPermit, ...]) -> None:
        self._own = own
        self._outer = outer
        self._started = False
        self._open = True

    def answer_started(self) -> None:
        self._started = True
        for permit in (*self._outer, self._own):
            permit.answer_started()

    def settle(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        if self._close():
            for permit in (self._own, *self._outer):
                permit.settle(prompt_tokens, completion_tokens)

    def release_failed(
        self, error: BaseException | None = None, *, billed: bool | None = None, sent: bool = True
    ) -> None:
        if not self._close():
            return
        if billed is None:
            billed = self._started or may_have_been_billed(error)
        try:
            self._own.release_failed(error, billed=billed, sent=sent)
        finally:
            for permit in self._outer:  # no error: an outer limiter does not cool down for a member's 429
                permit.release_failed(None, billed=billed, sent=sent)

    def _close(self) -> bool:
        was_open, self._open = self._open, False
        return was_open

    def __enter__(self) -> PermitGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._open:
            return
        if exc is None:
            self.settle(None, None)
        else:
            self.release_failed(exc)
