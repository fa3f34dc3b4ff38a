"""One resource per running event loop, closed inside its loop when the loop ends, then released.

An HTTP session belongs to the loop that created it, and DSPy users call ``asyncio.run`` many
times. Each entry parks an async generator on its loop; ``loop.shutdown_asyncgens()`` (which
``asyncio.run`` calls before closing the loop) resumes it, and it closes the resource inside its
own loop and removes the entry: a loop that has ended keeps nothing alive. Entries of loops
closed without that step are dropped at the next opening or when the owner goes, and after a
fork every inherited entry is abandoned (left untouched, never reused).

Nothing here may reference the owner (the transport): a session must never sit in a garbage
cycle while its loop runs, because the collector would call aiohttp's "unclosed session"
finalisers before anything could close it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Entries inherited through fork: kept alive so that collecting them never acts on the parent's
# loop (their async generators' finalisers would schedule work on it).
_inherited: list[Any] = []
# Tables whose owner is gone while some of their loops still run: kept reachable until those loops
# end and close what they hold (each entry removes itself; an empty table removes itself).
_orphans: dict[int, dict[Any, Any]] = {}


@dataclass
class _Entry(Generic[T]):
    value: T
    guard: Any  # the parked async generator that closes `value` when the loop shuts down


class PerLoop(Generic[T]):
    def __init__(
        self,
        open_: Callable[[], T],
        close: Callable[[T], Awaitable[None]],
        abandon: Callable[[T], None],
    ) -> None:
        self._open = open_
        self._close = close
        self._abandon = abandon
        self._entries: dict[asyncio.AbstractEventLoop, _Entry[T]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self) -> T:
        """The running loop's resource, opened on first use."""
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is not None:
            return entry.value
        return await self._start(loop)

    async def _start(self, loop: asyncio.AbstractEventLoop) -> T:
        self._drop_closed_loops()
        value = self._open()
        guard = _close_at_loop_shutdown(self._entries, loop, value, self._close)
        # The first step runs to the `yield` without suspending (no other task can interleave) and
        # registers the generator with the loop's shutdown_asyncgens.
        await guard.__anext__()
        self._entries[loop] = _Entry(value, guard)
        return value

    async def close_running(self) -> None:
        """Close the running loop's resource now (the others close when their loop ends)."""
        entry = self._entries.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry.guard.aclose()

    def _drop_closed_loops(self) -> None:
        # A loop closed without shutdown_asyncgens cannot run a close any more; release what it had.
        for loop in [loop for loop in list(self._entries) if loop.is_closed()]:
            self._abandon(self._entries.pop(loop).value)

    def release(self) -> None:
        """The owner is gone: what stopped loops hold is let go; running loops close theirs when they end."""
        for loop in [loop for loop in list(self._entries) if loop.is_closed() or not loop.is_running()]:
            self._abandon(self._entries.pop(loop).value)
        if self._entries:
            _orphans[id(self._entries)] = self._entries

    def forget_inherited(self) -> None:
        """After a fork: abandon every entry (they belong to the parent's loops and sockets)."""
        entries, self._entries = self._entries, {}
        for entry in entries.values():
            self._abandon(entry.value)
        _inherited.extend(entries.values())


async def _close_at_loop_shutdown(
    entries: dict[asyncio.AbstractEventLoop, _Entry[T]],
    loop: asyncio.AbstractEventLoop,
    value: T,
    close: Callable[[T], Awaitable[None]],
) -> AsyncIterator[None]:
    """Parked after its first step; resumed with GeneratorExit by ``shutdown_asyncgens`` (or by
    ``close_running``). Holds the table, not its owner, so an owner nobody references can go."""
    try:
        yield
    finally:
        entry = entries.get(loop)
        if entry is not None and entry.value is value:
            del entries[loop]
        if not entries:
            _orphans.pop(id(entries), None)
        await close(value)
