"""Joining the engine's HTTP attempts to the user's call, and telling the observers (usage, tracing).

A public entry point (``lm(...)``, ``lm.acall``, ``lm.stream``) opens a :class:`Call`; every attempt
the engine makes inside it (DSPy's retries, ``n`` candidates, in threads or tasks that inherit the
context) is reported to it; when the call ends, every observer hears of it. An attempt made with
no call open (DSPy reaching the engine by another path) is a call of its own.

Observers are bookkeeping. One that raises is logged and skipped: it never fails the call, whose
answer the server has already sent (and may have been paid for).

A stream is a generator, which can be abandoned between two chunks and closed later from another
context. So a stream never sets the context variable in its consumer's context: it opens its call
with :func:`open_call`, sets it only inside the task that runs the request (:func:`within`), and
closes it with :func:`finish_call`.

A call is over when its caller is done with it *and* every attempt it started has ended: a
stream closed by its consumer (or torn down with its event loop) may still have its request in
flight, being cancelled in another thread or task. The observers hear ``call_finished`` once,
after the last of the two, so a record always counts the attempts the call made.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _constants as C
from ._attribution import current_module

if TYPE_CHECKING:
    from ._dspy_types import Request

logger = logging.getLogger(C.LOGGER_NAME)

# The status of a call or an attempt its consumer stopped (a stream closed early, a cancelled task): no failure.
CANCELLED = "cancelled"


@dataclass(frozen=True)
class AttemptStart:
    """What is known when an HTTP attempt begins."""

    endpoint: str  # "chat" or "completions"
    model: str  # the request's model
    url: str
    stream: bool
    started: float  # time.perf_counter()
    number: int  # 0 for the call's first attempt, then 1, 2, ... (retries and candidates)
    waited_s: float | None  # time since the call's previous attempt ended (DSPy's backoff), None for the first
    request: Request | None = field(default=None, repr=False, compare=False)  # the prompt text: opt-in only


@dataclass(frozen=True)
class Attempt:
    """One HTTP exchange as the engine saw it, when it is over."""

    start: AttemptStart
    ok: bool
    latency_s: float
    error: str | None = None  # the lm15 error class name (or "cancelled")
    status: int | None = None  # the HTTP status, when one came back
    ttft_s: float | None = None
    prompt_tokens: int | None = None  # None: the server did not say
    completion_tokens: int | None = None
    request_id: str | None = None
    response_model: str | None = None
    finish_reason: str | None = None
    output_text: str | None = field(default=None, repr=False)  # the completion (record it only when opted in)
    response_id: str | None = None  # the answer's own id (its JSON "id")
    cached_tokens: int | None = None  # prompt tokens the server served from its prompt cache (None: not said)
    rate_limit: Mapping[str, str] | None = None  # the answer's x-ratelimit-* headers, lower-case names

    @property
    def endpoint(self) -> str:
        return self.start.endpoint

    @property
    def model(self) -> str:
        return self.start.model

    @property
    def stream(self) -> bool:
        return self.start.stream


class Observer:
    """Hooks around one call and its attempts. All are no-ops here; each must be quick."""

    def call_started(self, call: Call) -> None:
        """A public call began (before any attempt)."""

    def attempt_started(self, call: Call, attempt: AttemptStart) -> None:
        """An HTTP attempt of ``call`` is about to be sent."""

    def attempt_headers(self, call: Call, attempt: AttemptStart) -> Mapping[str, str] | None:
        """Headers this observer adds to the attempt's HTTP request (tracing: ``traceparent``), or None.
        Asked right after :meth:`attempt_started`; never part of the cache identity."""
        return None

    def attempt_finished(self, call: Call, attempt: Attempt) -> None:
        """An HTTP attempt of ``call`` is over (answered, failed, or its stream was closed)."""

    def call_answered(self, call: Call) -> None:
        """DSPy has an answer for ``call`` (from the server or from its cache), and is still inside its own
        LM call: the one moment a cache hit, which makes no attempt, runs code of ours in there."""

    def call_finished(self, call: Call, error: BaseException | None) -> None:
        """The call is over; ``error`` is what it raised (``GeneratorExit`` for a stream closed early)."""


@dataclass(eq=False)
class Call:
    """One public call in progress: its attempts so far, and a slot per observer for its own state."""

    model: str
    observers: tuple[Observer, ...]
    stream: bool = False  # lm.stream / lm.astream: its request runs in another task than the caller's
    routed_as: str | None = None  # the member name a Router called this LM under (None: not routed)
    module: str | None = None  # the DSPy module that made the call (``generate_query.predict``), None: direct
    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)
    state: dict[int, Any] = field(default_factory=dict)  # id(observer) -> what that observer keeps
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last_end: float | None = None
    _started_attempts: int = 0
    _in_flight: int = 0  # attempts started and not yet ended
    _ending: tuple[BaseException | None] | None = None  # the caller's end, held until the attempts end
    _finished: bool = False

    def _begin(self, start: float) -> tuple[int, float | None]:
        with self._lock:  # candidates of one call may run concurrently
            number = self._started_attempts
            self._started_attempts += 1
            self._in_flight += 1
            return number, (start - self._last_end) if self._last_end is not None else None

    def _add(self, attempt: Attempt) -> tuple[BaseException | None] | None:
        """Record an ended attempt; the caller's held end when this was the last attempt it waited for."""
        with self._lock:
            self.attempts.append(attempt)
            self._last_end = attempt.start.started + attempt.latency_s
            self._in_flight -= 1
            return self._take_end() if self._in_flight == 0 else None

    def _end(self, error: BaseException | None) -> bool:
        """The caller is done: True when the call is over now, False when attempts in flight hold it open."""
        with self._lock:
            if self._finished or self._ending is not None:
                return False  # told once
            self._ending = (error,)
            return self._in_flight == 0 and self._take_end() is not None

    def _take_end(self) -> tuple[BaseException | None] | None:
        if self._ending is None or self._finished:
            return None
        self._finished = True
        return self._ending


_current: ContextVar[Call | None] = ContextVar("dspy_anyscale_call", default=None)


# --- routes: a Router's call to one of its members -----------------------------------------------


@dataclass(eq=False)
class Route:
    """A Router's call to one of its members, in progress: the name the member's accounting goes
    under (the ``endpoint`` of history entries, usage records and spans), and the history entries
    answered under it, which the Router adds to its own history. ``with route:`` makes it current."""

    endpoint: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    _token: Any = field(default=None, repr=False)

    # A class, not @contextmanager: it is on the path of every routed call.
    def __enter__(self) -> Route:
        self._token = _route.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _route.reset(self._token)


_route: ContextVar[Route | None] = ContextVar("dspy_anyscale_route", default=None)


def current_route() -> Route | None:
    """The Router member call this code runs in (threads and tasks started inside inherit it), or None."""
    return _route.get()


def routed(endpoint: str) -> Route:
    """``with routed(name) as route:``: the calls made inside are a Router's call to its member ``name``."""
    return Route(endpoint)


def _routed_as() -> str | None:
    route = _route.get()
    return None if route is None else route.endpoint


def _notify(observers: tuple[Observer, ...], hook: str, *args: Any) -> None:
    for observer in observers:
        try:
            getattr(observer, hook)(*args)
        except Exception:  # bookkeeping never costs the caller an answer
            logger.warning("%s.%s failed; the call goes on", type(observer).__name__, hook, exc_info=True)


# --- calls -------------------------------------------------------------------------------------


def open_call(observers: tuple[Observer, ...], model: str, *, stream: bool = False) -> Call | None:
    """A new call, or None when there is nothing to observe or a call is open already (nested entry points)."""
    if not observers or _current.get() is not None:
        return None
    call = Call(model, observers, stream, _routed_as(), current_module())
    _notify(observers, "call_started", call)
    return call


def finish_call(call: Call | None, error: BaseException | None = None) -> None:
    """The caller is done with ``call``; the observers hear of it once its attempts in flight have ended too."""
    if call is not None and call._end(error):
        _notify(call.observers, "call_finished", call, error)


def current_call() -> Call | None:
    """The call in progress in this context, or None."""
    return _current.get()


def calling_module() -> str | None:
    """The DSPy module making the call in progress here (as its call recorded it), or None."""
    call = _current.get()
    return call.module if call is not None else current_module()


def call_answered() -> None:
    """Inside DSPy's call (while it writes the history entry): tell the current call's observers."""
    call = _current.get()
    if call is not None:
        _notify(call.observers, "call_answered", call)


@contextmanager
def within(call: Call | None) -> Iterator[None]:
    """Make ``call`` the current call for the attempts made inside (in this context only)."""
    if call is None:
        yield
        return
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def observed_call(observers: tuple[Observer, ...], model: str) -> Iterator[Call | None]:
    """Open, make current and finish a call around a non-generator entry point."""
    call = open_call(observers, model)
    if call is None:
        yield None
        return
    try:
        with within(call):
            yield call
    except BaseException as exc:
        finish_call(call, exc)
        raise
    finish_call(call, None)


# --- attempts ----------------------------------------------------------------------------------


class AttemptScope:
    """The engine's handle on one attempt: what came back, told to the observers when it ends."""

    __slots__ = ("_call", "_fields", "_own_call", "_start", "headers", "ttft_s")

    def __init__(self, call: Call, start: AttemptStart, own_call: bool) -> None:
        self._call = call
        self._start = start
        self._own_call = own_call
        self._fields: dict[str, Any] = {}
        self.ttft_s: float | None = None
        self.headers: dict[str, str] | None = None  # what observers add to the request (trace context)

    def replied(self, status: int, request_id: str | None, rate_limit: Mapping[str, str] | None = None) -> None:
        self._fields.update(status=status, request_id=request_id, rate_limit=rate_limit or None)

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self._start.started

    def succeeded(
        self,
        prompt_tokens: Any,
        completion_tokens: Any,
        response_model: str | None,
        finish: str | None,
        text: str | None = None,
        *,
        response_id: str | None = None,
        cached_tokens: Any = None,
    ) -> None:
        self._fields.update(
            ok=True,
            prompt_tokens=_count(prompt_tokens),
            completion_tokens=_count(completion_tokens),
            response_model=response_model,
            finish_reason=finish,
            output_text=text,
            response_id=response_id,
            cached_tokens=_count(cached_tokens),
        )

    def _finish(self, error: BaseException | None) -> None:
        fields = self._fields
        if error is not None and not fields.get("ok"):
            fields["ok"] = False
            fields["error"] = error_name(error)
            fields.setdefault("status", getattr(error, "status", None))
        attempt = Attempt(
            start=self._start,
            latency_s=time.perf_counter() - self._start.started,
            ttft_s=self.ttft_s,
            **{"ok": False, **fields},
        )
        held = self._call._add(attempt)
        _notify(self._call.observers, "attempt_finished", self._call, attempt)
        if self._own_call:
            finish_call(self._call, None if attempt.ok else error)
        elif held is not None:  # the caller was done already, waiting for this attempt to end
            _notify(self._call.observers, "call_finished", self._call, held[0])


def _headers(observers: tuple[Observer, ...], call: Call, start: AttemptStart) -> dict[str, str] | None:
    """The headers the observers add to one attempt's request (None: none, the common case)."""
    headers: dict[str, str] | None = None
    for observer in observers:
        try:
            extra = observer.attempt_headers(call, start)
        except Exception:  # bookkeeping never costs the caller an answer
            logger.warning("%s.attempt_headers failed; the call goes on", type(observer).__name__, exc_info=True)
            continue
        if extra:
            headers = {**(headers or {}), **extra}
    return headers


def _count(value: Any) -> int | None:
    """A token count as the server sent it, or None when it is missing or nonsense (a string, negative)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def error_name(error: BaseException) -> str:
    """``cancelled`` for a stream closed early or a cancelled task (not a failure of the server), else the class."""
    if isinstance(error, GeneratorExit | asyncio.CancelledError | KeyboardInterrupt):
        return CANCELLED
    return type(error).__name__


@contextmanager
def attempt(
    observers: tuple[Observer, ...],
    *,
    endpoint: str,
    model: str,
    url: str,
    stream: bool = False,
    request: Request | None = None,
) -> Iterator[AttemptScope | None]:
    """Observe one HTTP attempt: inside the current call, or as a call of its own."""
    if not observers:
        yield None
        return
    call, own = _current.get(), False
    if call is None:
        call, own = Call(model, observers, routed_as=_routed_as(), module=current_module()), True
        _notify(observers, "call_started", call)
    started = time.perf_counter()
    number, waited = call._begin(started)
    start = AttemptStart(endpoint, model, url, stream, started, number, waited, request)
    _notify(observers, "attempt_started", call, start)
    scope = AttemptScope(call, start, own)
    scope.headers = _headers(observers, call, start)
    try:
        yield scope
    except BaseException as exc:
        scope._finish(exc)
        raise
    scope._finish(None)
