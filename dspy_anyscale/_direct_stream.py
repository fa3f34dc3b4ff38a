"""``lm.stream(prompt)`` / ``lm.astream(prompt)``: text chunks as they arrive, through DSPy's own call.

The request runs as an ordinary ``await lm.acall(Request)`` with DSPy's ``send_stream`` pointed
at a queue, so DSPy still owns retries (before the first chunk only), the cache (a cached
answer arrives as one chunk), history, usage tracking and callbacks. The sync generator runs
that coroutine on one background event loop (a daemon thread), with the caller's context.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import logging
import os
import queue
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import dspy

from . import _constants as C

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none)
    from ._dspy_types import Response

_END = object()
_LOOP_THREAD_NAME = "dspy-anyscale-loop"
logger = logging.getLogger(C.LOGGER_NAME)


class _QueueSink:
    """What DSPy's ``send_stream`` must be: something with ``async send(chunk)``."""

    def __init__(self, chunks: asyncio.Queue[Any]) -> None:
        self._chunks = chunks
        self.sent = 0

    async def send(self, chunk: Any) -> None:
        text = _chunk_text(chunk)
        if text:
            self.sent += 1
            await self._chunks.put(text)


def _chunk_text(chunk: Any) -> str | None:
    try:
        text: str | None = chunk["choices"][0]["delta"].get("content")  # an OpenAI-style chunk from DSPy
        return text
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


async def astream_text(call: Callable[[], Awaitable[Response]]) -> AsyncGenerator[str, None]:
    """Run ``call`` (an ``acall`` of one Request) with DSPy streaming into a queue; yield its text."""
    chunks: asyncio.Queue[Any] = asyncio.Queue()
    sink = _QueueSink(chunks)

    async def run() -> Response:
        try:
            with dspy.context(send_stream=sink):
                return await call()
        finally:
            await chunks.put(_END)

    task = asyncio.ensure_future(run())
    try:
        while (item := await chunks.get()) is not _END:
            yield item
        response = await task
        if not sink.sent and response.text:
            yield response.text  # served from DSPy's cache: no chunks, the whole answer at once
    finally:
        await _stopped(task)


async def _stopped(task: asyncio.Future[Any]) -> None:
    """Cancel the request if it still runs, and wait until it has stopped: its attempt is over (and
    recorded) when the stream is, not some time later."""
    if task.done() or task.get_loop().is_closed():
        return
    task.cancel()
    await asyncio.wait({task})  # never raises the task's own end: the stream's is already under way


class _BackgroundLoop:
    """One event loop in a daemon thread per process, shared by all sync streams.

    Sync streams run their coroutine here, so the loop's pooled HTTP session (and its TLS setup)
    is built once, not once per call. Shut down cleanly at exit, which closes the session inside
    its own loop. A forked child starts its own loop on first use and never touches the
    parent's: that loop's selector (one epoll instance) and wake-up pipe are shared with the
    parent, so closing or waking it from the child would disturb the parent's loop.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=_LOOP_THREAD_NAME, daemon=True)
                thread.start()
                atexit.register(cls._shutdown, loop, thread, os.getpid())
                cls._loop = loop
            return cls._loop

    @classmethod
    def _after_fork_in_child(cls) -> None:
        # The parent's loop thread does not exist here, and a parent thread may have held the lock.
        cls._lock = threading.Lock()
        cls._loop = None

    @staticmethod
    def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, pid: int) -> None:
        if os.getpid() != pid or loop.is_closed() or not thread.is_alive():
            return  # an inherited loop: never run, stop or close it from a forked child
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_BackgroundLoop._after_fork_in_child)


def stream_text(call: Callable[[], Awaitable[Response]]) -> Iterator[str]:
    """Sync twin of :func:`astream_text`: the coroutine runs on the background loop, in the caller's context."""
    items: queue.Queue[Any] = queue.Queue()
    loop = _BackgroundLoop.get()
    context = contextvars.copy_context()  # dspy.context(...) overrides, usage tracking, the open call
    # This thread blocks on the queue below: if it runs an event loop, the request must not wait for that loop.
    context.run(_blocks_loop, asyncio._get_running_loop())
    task: list[asyncio.Task[None]] = []
    stopped = threading.Event()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(astream_text(call)) as texts:
                async for text in texts:
                    items.put(text)
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(exc)
        finally:
            items.put(_END)
            stopped.set()

    def start() -> None:
        task.append(loop.create_task(pump()))  # a task copies the current context: the caller's

    loop.call_soon_threadsafe(context.run, start)
    finished = False
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
        finished = True
    finally:
        if not finished:  # the consumer stopped early: stop the request, and see it stopped
            loop.call_soon_threadsafe(lambda: task and task[0].cancel())
            _wait_stopped(stopped)


def _blocks_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    if loop is not None:
        from .limits._gate import BLOCKED_LOOP  # loaded only by a sync stream read inside async code

        BLOCKED_LOOP.set(loop)


def _wait_stopped(stopped: threading.Event) -> None:
    """Wait (bounded) for a cancelled request to stop, so that its attempt is over when ``close()`` returns.

    Never on the loop's own thread, which would wait for itself. A request that takes longer to stop
    is left to end on its own: the call's record then follows when its attempt ends.
    """
    if threading.current_thread().name != _LOOP_THREAD_NAME and not stopped.wait(C.STREAM_STOP_WAIT_S):
        logger.debug("a closed stream's request did not stop within %s s; it ends on its own", C.STREAM_STOP_WAIT_S)
