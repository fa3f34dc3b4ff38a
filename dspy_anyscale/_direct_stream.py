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
import os
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import dspy
from dspy.lm15 import Response

_END = object()


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
        return chunk["choices"][0]["delta"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


async def astream_text(call: Callable[[], Awaitable[Response]]) -> AsyncIterator[str]:
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
        if not task.done():
            task.cancel()


class _BackgroundLoop:
    """One event loop in a daemon thread per process, shared by all sync streams.

    Sync streams run their coroutine here, so the loop's pooled HTTP client (and its TLS setup)
    is built once, not once per call. Recreated after a fork; shut down cleanly at exit, which
    closes the client inside its own loop.
    """

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _pid: int | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._pid != os.getpid() or cls._loop.is_closed():
                cls._loop, cls._pid = asyncio.new_event_loop(), os.getpid()
                threading.Thread(target=cls._loop.run_forever, name="dspy-anyscale-loop", daemon=True).start()
                atexit.register(cls._shutdown, cls._loop)
            return cls._loop

    @staticmethod
    def _shutdown(loop: asyncio.AbstractEventLoop) -> None:
        if loop.is_closed() or not loop.is_running():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)


def stream_text(call: Callable[[], Awaitable[Response]]) -> Iterator[str]:
    """Sync twin of :func:`astream_text`: the coroutine runs on the background loop, in the caller's context."""
    items: queue.Queue[Any] = queue.Queue()
    loop = _BackgroundLoop.get()
    context = contextvars.copy_context()  # dspy.context(...) overrides, usage tracking, the open call
    task: list[asyncio.Task[None]] = []

    async def pump() -> None:
        try:
            async for text in astream_text(call):
                items.put(text)
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(exc)
        finally:
            items.put(_END)

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
        if not finished:  # the consumer stopped early: stop the request
            loop.call_soon_threadsafe(lambda: task and task[0].cancel())
