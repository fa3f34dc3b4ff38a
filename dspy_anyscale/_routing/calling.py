"""One routed call: the members it may try and in which order (:class:`Plan`), the context of each try
(:class:`Step`), and the loop that moves a failed call on (:func:`run`, :func:`arun`).

A try is the member's own full call, made inside ``routed(name)`` (its accounting names the member)
and, when the Router has limits, inside ``counted_against(router limits)`` (its engine admits the
request through them too). A member that is not the last one a call may try is called through a copy
without DSPy's retries, so a failure moves on at once: a fallback adds no wait beyond the failed
attempt itself. When a call must not move on, or nobody is left, the error is raised with a note
naming what each member tried said.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any, NoReturn, TypeVar

import dspy
from dspy.dsp.utils import settings
from dspy.utils.exceptions import ContextWindowExceededError

from .. import _constants as C
from .._observe import Route, current_route, routed
from ..limits import AnyLimiter
from ..limits._outer import counted_against
from .accounting import remember
from .health import Breaker, Outcome
from .members import context_window
from .policy import context_window_in, outcome_of, retry_after_of
from .shape import RouterParts
from .strategies import key_point, order

T = TypeVar("T")


def run(router: RouterParts, call: Callable[[Any], T], key: str | None) -> T:
    """Try the members in the plan's order until one answers, or an error must be raised."""
    plan = Plan(router, key)
    while True:
        step = plan.next()
        try:
            with step:
                result = call(step.lm)
        except BaseException as exc:
            plan.failed(step, exc)  # raises unless the call moves on
            continue
        plan.succeeded(step)
        return result


async def arun(router: RouterParts, call: Callable[[Any], Awaitable[T]], key: str | None) -> T:
    """:func:`run` for a coroutine."""
    plan = Plan(router, key)
    while True:
        step = plan.next()
        try:
            with step:
                result = await call(step.lm)
        except BaseException as exc:
            plan.failed(step, exc)
            continue
        plan.succeeded(step)
        return result


def members_in_order(router: RouterParts, key: str | None) -> list[str]:
    """The available members, in the order this call tries them."""
    breakers = router._breakers
    names = [name for name, breaker in breakers.items() if breaker.available()]
    if router._strategy == "fallback" or len(names) < 2:
        return names
    return order(
        router._strategy,
        names,
        weights=router._weights,
        in_flight={name: breakers[name].in_flight for name in names},
        p50={name: breakers[name].p50_s() for name in names},
        u=key_point(key) if key is not None else router._random.random(),
    )


def soonest(router: RouterParts) -> str:
    """The member whose cool-down ends first (every member cools: it is the one a call tries)."""
    breakers = router._breakers
    return min(breakers, key=lambda name: breakers[name].until)


def quick_member(router: RouterParts, name: str) -> Any:
    """The member called without DSPy's retries (a DSPy-level copy: the same connection pools, limits,
    usage recorder and dialect memo; its history is the member's), rebuilt when the member's defaults change."""
    lm = router._lms[name]
    quick = router._quick.get(name)
    if quick is None or quick.kwargs is not lm.kwargs or quick.history is not lm.history or quick.cache != lm.cache:
        quick = lm.copy(num_retries=0)
        quick.kwargs = lm.kwargs  # the member's defaults, the same dict: a change to them is the copy's too
        quick.history = lm.history  # DSPy records the entry in the member's own history
        router._quick[name] = quick
    return quick


class Step:
    """One try of one member within a call; ``with step:`` is the member call's context."""

    __slots__ = ("_extra", "breaker", "limiter", "lm", "name", "route", "sink", "started", "trial")

    def __init__(self, name: str, lm: Any, breaker: Breaker, trial: bool, limiter: AnyLimiter) -> None:
        self.name = name
        self.lm = lm  # the member, or its copy without retries when another member may follow
        self.breaker = breaker
        self.trial = trial
        self.limiter = limiter
        self.started = 0.0
        self.route: Route | None = None
        self.sink: CountingSink | None = None
        self._extra: ExitStack | None = None

    # A class, not @contextmanager: this is on the path of every routed call.
    def __enter__(self) -> None:
        """The member's name for its accounting; the Router's limits; a counting sink for a DSPy stream."""
        self.started = time.perf_counter()
        self.route = routed(self.name).__enter__()
        stream = settings.send_stream
        if not self.limiter.enabled and stream is None:
            return
        self._extra = stack = ExitStack()
        stack.enter_context(counted_against(self.limiter))
        if stream is not None:  # dspy.streamify: a member that already sent a chunk must not be replaced
            self.sink = CountingSink(stream)
            stack.enter_context(dspy.context(send_stream=self.sink))

    def __exit__(self, *exc: object) -> None:
        try:
            if self._extra is not None:
                self._extra.close()
        finally:
            assert self.route is not None
            self.route.__exit__()

    @property
    def emitted(self) -> bool:
        """True once the member sent a chunk through DSPy's stream: the call is no longer another member's."""
        return self.sink is not None and self.sink.sent > 0


class Plan:
    """The members one call may try, in order, and what became of each try."""

    def __init__(self, router: RouterParts, key: str | None) -> None:
        self.router = router
        self.parent = current_route()  # a Router's call to this one, when it is a member
        self.pending = members_in_order(router, key)
        self.tried: list[tuple[str, BaseException]] = []
        self.context_window: int | None = None  # after a context-length error: a member must take more

    def next(self) -> Step:
        router = self.router
        while self.pending:
            name = self.pending.pop(0)
            if self._too_small(name):
                continue
            trial = router._breakers[name].start()
            if trial is not None:  # None: another call took its trial meanwhile
                return self._step(name, trial)
        if self.tried:  # the members left were taken for other calls' trials meanwhile
            self._raise(self.tried[-1][1])
        # Every member cools: never fail a call without trying one, the one that may be tried soonest.
        name = soonest(router)
        trial = router._breakers[name].start(force=True)
        return self._step(name, bool(trial))

    def _step(self, name: str, trial: bool) -> Step:
        router = self.router
        last = all(self._too_small(other) for other in self.pending)  # True too when nobody is pending
        lm = router._lms[name] if last else quick_member(router, name)
        return Step(name, lm, router._breakers[name], trial, router._limiter)

    def _too_small(self, name: str) -> bool:
        """After a context-length error: a member whose known context window is not larger is skipped."""
        if self.context_window is None:
            return False
        window = context_window(self.router._lms[name])
        return window is not None and window <= self.context_window

    def failed(self, step: Step, error: BaseException) -> None:
        """Record a failed try; return to move on to the next member, or raise ``error`` (with a note
        naming what each member tried said) when it must not move on or nobody is left."""
        outcome = outcome_of(error)
        step.breaker.end(outcome, trial=step.trial, retry_after=retry_after_of(error))
        self.tried.append((step.name, error))
        if step.emitted or not self.router._policy.moves_on(error, outcome):
            self._raise(error)
        if isinstance(error, ContextWindowExceededError):
            known = context_window_in(error) or context_window(self.router._lms[step.name])
            if known is not None:
                self.context_window = max(self.context_window or 0, known)
        if all(self._too_small(name) for name in self.pending):
            self._raise(error)

    def ended_after_start(self, step: Step, error: BaseException) -> None:
        """A stream failed after its first chunk: the caller's error; the member's health still learns of it."""
        step.breaker.end(outcome_of(error), trial=step.trial, retry_after=retry_after_of(error))

    def succeeded(self, step: Step) -> None:
        step.breaker.end(Outcome.ANSWERED, trial=step.trial, latency_s=time.perf_counter() - step.started)
        remember(self.router, step.route.entries if step.route is not None else [], self.parent)

    def _raise(self, error: BaseException) -> NoReturn:
        if len(self.tried) > 1:
            said = "; ".join(f"{name}: {_said(exc)}" for name, exc in self.tried)
            _add_note(error, f"{self.router.model} tried {len(self.tried)} members: {said}")
        raise error


class CountingSink:
    """DSPy's ``send_stream`` for a member call, counting what the member sent through it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sent = 0

    async def send(self, item: Any) -> None:
        self.sent += 1
        await self._inner.send(item)

    def send_nowait(self, item: Any) -> None:
        self.sent += 1
        self._inner.send_nowait(item)

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


def _said(error: BaseException) -> str:
    """What a member's error said, short (the members' errors never hold a key)."""
    text = f"{type(error).__name__}: {getattr(error, 'message', None) or error}"
    return text if len(text) <= C.ROUTER_NOTE_CHARS else text[: C.ROUTER_NOTE_CHARS - 3] + "..."


def _add_note(error: BaseException, note: str) -> None:
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(note)
    else:  # Python 3.10: kept where 3.11's traceback would print it
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]  # 3.10 has no notes
