"""``lm.stream(prompt)`` / ``lm.astream(prompt)``: text chunks as they arrive, through DSPy's own call.

The request runs as an ordinary ``await lm.acall(Request)`` with DSPy's ``send_stream`` pointed
at a queue, so DSPy still owns retries (before the first chunk only), the cache (a cached
answer arrives as one chunk), history, usage tracking and callbacks. The sync generator runs
that coroutine on a private event loop in a worker thread, with the caller's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
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


def stream_text(call: Callable[[], Awaitable[Response]]) -> Iterator[str]:
    """Sync twin of :func:`astream_text`: the coroutine runs on a private loop in a worker thread."""
    items: queue.Queue[Any] = queue.Queue()
    loop = asyncio.new_event_loop()
    context = contextvars.copy_context()  # dspy.context(...) overrides and usage tracking carry over
    task: list[asyncio.Task[None]] = []

    async def pump() -> None:
        try:
            async for text in astream_text(call):
                items.put(text)
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(exc)
        finally:
            items.put(_END)

    def worker() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(pump()))
        try:
            loop.run_until_complete(task[0])
            loop.run_until_complete(loop.shutdown_asyncgens())  # closes the loop's HTTP client
        finally:
            loop.close()

    thread = threading.Thread(target=context.run, args=(worker,), name="dspy-anyscale-stream", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if task and not task[0].done():  # the consumer stopped early: stop the request
            with contextlib.suppress(RuntimeError):  # the loop finished meanwhile
                loop.call_soon_threadsafe(task[0].cancel)
        thread.join()
