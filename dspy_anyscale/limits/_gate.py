"""A FIFO gate of N slots shared by threads and asyncio tasks on any event loop.

Callers line up in one queue in arrival order, whichever kind they are. The caller at the head
takes a slot as soon as one is free and stays at the head until the limiter has admitted it
(rate buckets, cool-down, budget), so nobody overtakes it; then it leaves the queue holding its
slot, and the next caller becomes the head. A caller that gives up (asyncio cancellation, a
sync timeout) leaves the queue from wherever it is and frees its slot if it had one.

Waking is targeted: only the head is signalled, and only when it can take a slot, so a release
wakes one waiter, not all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol


class _Signal(Protocol):
    def fire(self) -> None:
        """Wake the waiter; may be called from any thread. RuntimeError: its loop is closed."""


class _ThreadSignal:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def fire(self) -> None:
        self._event.set()

    def wait(self, timeout: float | None) -> bool:
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

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()


class Waiter:
    """One caller's place in the queue. ``signal`` stays None for a caller that never had to wait."""

    __slots__ = ("has_slot", "signal")

    def __init__(self) -> None:
        self.signal: _Signal | None = None
        self.has_slot = False


class Gate:
    def __init__(self, limit: int | None) -> None:
        self._limit: float = math.inf if limit is None else limit
        self._lock = threading.Lock()
        self._queue: deque[Waiter] = deque()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Slots taken: admitted requests not yet settled, plus the head while it is being admitted."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers in the queue, the head included."""
        return len(self._queue)

    # --- joining ------------------------------------------------------------------------------------

    def enter(self, time_left: Callable[[], float | None]) -> Waiter | None:
        """Block until this thread is at the head with a slot; None if ``time_left()`` ran out first."""
        waiter, ready = self._join(_ThreadSignal)
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
                signal.wait(left)
                if self._take_slot(waiter):
                    return waiter
        except BaseException:
            self.abandon(waiter)
            raise

    async def aenter(self) -> Waiter:
        """Wait (without blocking the loop) until this task is at the head with a slot."""
        waiter, ready = self._join(_LoopSignal)
        if ready:
            return waiter
        signal = waiter.signal
        assert isinstance(signal, _LoopSignal)
        try:
            while True:
                await signal.wait()
                if self._take_slot(waiter):
                    return waiter
        except BaseException:  # cancelled while queued: leave the queue, give the turn on
            self.abandon(waiter)
            raise

    def _join(self, make_signal: type[_ThreadSignal] | type[_LoopSignal]) -> tuple[Waiter, bool]:
        waiter = Waiter()
        with self._lock:
            self._queue.append(waiter)
            if self._take_slot_locked(waiter):
                return waiter, True
            waiter.signal = make_signal()  # set under the lock, so a wake-up never misses it
        return waiter, False

    def _take_slot(self, waiter: Waiter) -> bool:
        with self._lock:
            return self._take_slot_locked(waiter)

    def _take_slot_locked(self, waiter: Waiter) -> bool:
        if waiter.has_slot:
            return True
        if self._queue[0] is waiter and self._in_flight < self._limit:
            self._in_flight += 1
            waiter.has_slot = True
            return True
        return False

    # --- leaving ------------------------------------------------------------------------------------

    def admitted(self, waiter: Waiter) -> None:
        """The head was admitted: it leaves the queue with its slot; the next caller becomes the head."""
        with self._lock:
            self._queue.remove(waiter)  # the head: found at once
            self._wake_head()

    def abandon(self, waiter: Waiter) -> None:
        """The caller gave up or was refused: out of the queue, its slot (if any) freed."""
        with self._lock:
            with contextlib.suppress(ValueError):  # already gone
                self._queue.remove(waiter)
            if waiter.has_slot:
                waiter.has_slot = False
                self._in_flight -= 1
            self._wake_head()

    def release(self) -> None:
        """An admitted request is over: its slot goes to the head of the queue, if anyone waits."""
        with self._lock:
            self._in_flight -= 1
            self._wake_head()

    def _wake_head(self) -> None:
        while self._queue:
            head = self._queue[0]
            if head.has_slot or head.signal is None or self._in_flight >= self._limit:
                return  # it is being admitted already, or it must wait for a release
            try:
                head.signal.fire()
                return
            except RuntimeError:  # its event loop is closed: it can never run, so it must not block the queue
                self._queue.popleft()
