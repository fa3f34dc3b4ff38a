"""A FIFO gate of N slots shared by threads and asyncio tasks on any event loop.

Callers line up in one queue in arrival order, whichever kind they are. The caller at the head
takes a slot as soon as one is free and stays at the head until the limiter has admitted it
(rate buckets, cool-down, budget), so nobody overtakes it; then it leaves the queue holding its
slot, and the next caller becomes the head. A caller that gives up (asyncio cancellation, a
sync timeout) leaves the queue from wherever it is and frees its slot if it had one.

Waking is targeted: only the head is signalled, and only when it can take a slot, so a release
wakes one waiter, not all of them.

**Never a hang.** The gate knows the event loop of every task in it (threads have none), because
a task can only take its turn or free its slot while its loop runs:

* A *sync* caller on the thread of a running loop blocks that loop. If it would have to wait
  behind a task of that loop in the queue, or for a slot that only that loop's tasks could free
  (they hold ``limit`` slots), it would wait forever: it is refused at once with
  ``LimiterDeadlockError``. Waiting only for other threads and other loops is fine.
* A task whose loop is *not running* (stopped with the task pending, as ``run_until_complete``
  leaves the losers of "first answer wins"; or closed) cannot take its turn: at the head it is
  moved out of the queue ("parked") and woken, so that it rejoins at the back if its loop runs
  again. A slot held by such a task stops counting while its loop is not running, and counts
  again when it resumes. Trade-off: while a stopped loop holds slots, up to ``limit`` other
  requests may go, so the server can briefly see more than ``limit`` (the stalled requests are
  on the wire, or will be when their loop resumes); the alternative was every later caller, in
  every thread, waiting forever.
* Nothing signals a loop stopping, so waiting callers look again every ``GATE_STALL_CHECK_S``.

After ``fork`` the child's gate starts empty (the limiter makes it a new one): the parent's
holders and waiters stay the parent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .._constants import GATE_STALL_CHECK_S
from ..errors import LimiterDeadlockError


class _Signal(Protocol):
    def fire(self) -> None:
        """Wake the waiter; may be called from any thread. RuntimeError: its loop is closed."""


class _ThreadSignal:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def fire(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        fired = self._event.wait(timeout)
        self._event.clear()  # before the caller re-checks the gate, so no later fire is lost
        return fired


class _LoopSignal:
    __slots__ = ("_event", "_loop")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._loop.call_soon_threadsafe(self._event.set)  # asyncio.Event is not thread-safe

    async def wait(self, timeout: float) -> None:
        """Until fired, or ``timeout`` seconds (then the caller looks again for stalled tasks)."""
        timer = self._loop.call_later(timeout, self._event.set)
        try:
            await self._event.wait()
        finally:
            timer.cancel()
        self._event.clear()


class Waiter:
    """One caller's place in the queue, and then its slot. ``signal`` stays None for a caller that
    never had to wait; ``loop`` is the event loop of a task (None for a thread)."""

    __slots__ = ("has_slot", "loop", "parked", "signal")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.signal: _Signal | None = None
        self.has_slot = False
        self.loop = loop
        self.parked = False  # taken out of the queue while its loop was not running

    def stalled(self) -> bool:
        """A task whose loop is not running: it can neither take its turn nor free its slot now."""
        return self.loop is not None and not self.loop.is_running()


# The event loop a sync caller blocks while its request runs as a task elsewhere (``lm.stream`` runs
# it on a background loop): that task must not wait for the blocked loop's own tasks either.
BLOCKED_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "dspy_anyscale_blocked_loop", default=None
)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running on this thread, if any: what a blocking call here would block."""
    return asyncio._get_running_loop()


class Gate:
    def __init__(self, limit: int | None) -> None:
        self._limit: float = math.inf if limit is None else limit
        self._lock = threading.Lock()
        self._queue: deque[Waiter] = deque()
        self._holders: set[Waiter] = set()
        # Slots held per event loop (None: threads), so telling stalled slots apart costs one step per loop.
        self._held_by: dict[asyncio.AbstractEventLoop | None, int] = {}

    @property
    def in_flight(self) -> int:
        """Slots taken: admitted requests not yet settled, plus the head while it is being admitted."""
        return len(self._holders)

    @property
    def waiting(self) -> int:
        """Callers in the queue, the head included (not tasks parked while their loop is stopped)."""
        return len(self._queue)

    # --- joining ------------------------------------------------------------------------------------

    def enter(self, time_left: Callable[[], float | None]) -> Waiter | None:
        """Block until this thread is at the head with a slot; None if ``time_left()`` ran out first.

        Raises ``LimiterDeadlockError`` at once if this thread runs an event loop whose own tasks
        it would have to wait for."""
        waiter, ready = self._join(Waiter(), _ThreadSignal, home=_running_loop())
        if ready:
            return waiter
        signal = waiter.signal
        assert isinstance(signal, _ThreadSignal)
        try:
            while True:
                left = time_left()
                if left is not None and left <= 0:
                    if self._take_slot(waiter):
                        return waiter
                    self.abandon(waiter)
                    return None
                signal.wait(GATE_STALL_CHECK_S if left is None else min(left, GATE_STALL_CHECK_S))
                if self._take_slot(waiter):
                    return waiter
        except BaseException:
            self.abandon(waiter)
            raise

    async def aenter(self) -> Waiter:
        """Wait (without blocking the loop) until this task is at the head with a slot."""
        waiter, ready = self._join(Waiter(asyncio.get_running_loop()), _LoopSignal, home=BLOCKED_LOOP.get())
        if ready:
            return waiter
        signal = waiter.signal
        assert isinstance(signal, _LoopSignal)
        try:
            while True:
                await signal.wait(GATE_STALL_CHECK_S)
                if self._take_slot(waiter):
                    return waiter
        except BaseException:  # cancelled while queued: leave the queue, give the turn on
            self.abandon(waiter)
            raise

    def _join(
        self,
        waiter: Waiter,
        make_signal: type[_ThreadSignal] | type[_LoopSignal],
        home: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[Waiter, bool]:
        with self._lock:
            self._queue.append(waiter)
            if self._take_slot_locked(waiter):
                return waiter, True
            if home is not None and self._waits_for(home, waiter):
                self._queue.remove(waiter)
                raise _deadlock_error(self._limit)
            waiter.signal = make_signal()  # set under the lock, so a wake-up never misses it
        return waiter, False

    def _waits_for(self, loop: asyncio.AbstractEventLoop, waiter: Waiter) -> bool:
        """Whether ``waiter`` (a sync caller blocking ``loop``) could only get a slot after ``loop`` ran:
        a task of it is ahead in the queue, or its tasks hold every slot. Neither can change while
        the caller blocks the loop, so checking once, on joining, is enough."""
        if any(other.loop is loop for other in self._queue if other is not waiter):
            return True  # everyone else in the queue is ahead of a caller that just joined
        return self._held_by.get(loop, 0) >= self._limit

    def _take_slot(self, waiter: Waiter) -> bool:
        with self._lock:
            return self._take_slot_locked(waiter)

    def _take_slot_locked(self, waiter: Waiter) -> bool:
        if waiter.has_slot:
            return True
        if waiter.parked:  # its loop runs again: back in the queue, behind those who waited meanwhile
            waiter.parked = False
            self._queue.append(waiter)
        self._park_stalled_heads()
        if self._queue[0] is waiter and self._slot_free():
            waiter.has_slot = True
            self._holders.add(waiter)
            self._held_by[waiter.loop] = self._held_by.get(waiter.loop, 0) + 1
            return True
        return False

    def _free_slot_of(self, waiter: Waiter) -> None:
        waiter.has_slot = False
        if waiter in self._holders:
            self._holders.discard(waiter)
            left = self._held_by[waiter.loop] - 1
            if left:
                self._held_by[waiter.loop] = left
            else:
                del self._held_by[waiter.loop]

    def _slot_free(self) -> bool:
        if len(self._holders) < self._limit:
            return True
        # Only when the gate looks full: slots held by tasks of stopped loops do not count meanwhile.
        live = sum(count for loop, count in self._held_by.items() if loop is None or loop.is_running())
        return live < self._limit

    def _park_stalled_heads(self) -> None:
        """Move heads that cannot take their turn (their loop is not running) out of the queue."""
        while self._queue and self._queue[0].stalled():
            self._park(self._queue.popleft())

    @staticmethod
    def _park(waiter: Waiter) -> None:
        waiter.parked = True
        if waiter.signal is not None:
            with contextlib.suppress(RuntimeError):  # closed: it never runs again
                waiter.signal.fire()  # runs when its loop does: the task then rejoins the queue

    # --- leaving ------------------------------------------------------------------------------------

    def admitted(self, waiter: Waiter) -> None:
        """The head was admitted: it leaves the queue with its slot; the next caller becomes the head."""
        with self._lock:
            with contextlib.suppress(ValueError):  # parked while its loop was stopped
                self._queue.remove(waiter)  # the head: found at once
            waiter.parked = False
            self._wake_head()

    def abandon(self, waiter: Waiter) -> None:
        """The caller gave up or was refused: out of the queue, its slot (if any) freed."""
        with self._lock:
            with contextlib.suppress(ValueError):  # already gone, or parked
                self._queue.remove(waiter)
            waiter.parked = False
            if waiter.has_slot:
                self._free_slot_of(waiter)
            self._wake_head()

    def release(self, waiter: Waiter) -> None:
        """An admitted request is over: its slot goes to the head of the queue, if anyone waits.
        A slot this gate does not hold (taken before a fork, in the parent) is ignored."""
        with self._lock:
            if waiter in self._holders:
                self._free_slot_of(waiter)
                self._wake_head()
            waiter.has_slot = False

    def _wake_head(self) -> None:
        while self._queue:
            head = self._queue[0]
            if head.stalled():
                self._park(self._queue.popleft())
                continue
            if head.has_slot or head.signal is None or not self._slot_free():
                return  # it is being admitted already, or it must wait for a release
            try:
                head.signal.fire()
                return
            except RuntimeError:  # its event loop closed just now: it can never run, so it must not block the queue
                self._queue.popleft()


def _deadlock_error(limit: float) -> LimiterDeadlockError:
    return LimiterDeadlockError(
        f"this synchronous call runs on the thread of a running asyncio event loop, and the LM's "
        f"max_concurrency={limit:g} is taken up, or queued for, by tasks of that same loop, which cannot run "
        "while this call blocks it: waiting would never end, so nothing was sent. Inside async code use "
        "`await lm.acall(...)`, or run the plain call in a thread: `await asyncio.to_thread(lm, ...)`"
    )
