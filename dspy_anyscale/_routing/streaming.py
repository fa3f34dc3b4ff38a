"""A Router's direct streams (``lm.stream``, ``lm.astream``): the text of the first member that starts
answering. A member that fails before its first chunk moves the stream on, as a call would; after its
first chunk, a failure is the caller's (another member's text must never follow, nor repeat, what the
caller already has), though the member's health still learns of it.

(DSPy's field streaming, ``dspy.streamify``, goes through the ordinary call path: there, a counting
sink around ``send_stream`` tells whether the member sent anything, see ``calling.Step``.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from .calling import Plan
from .shape import RouterParts


def stream(router: RouterParts, prompt: str, kwargs: dict[str, Any], key: str | None) -> Iterator[str]:
    plan = Plan(router, key)
    while True:
        step = plan.next()
        try:
            with step:  # the member's request starts here, in the routed context
                chunks = step.lm.stream(prompt, **kwargs)
                first = next(chunks)
        except StopIteration:  # an empty answer: answered all the same
            plan.succeeded(step)
            return
        except BaseException as exc:
            plan.failed(step, exc)  # raises unless the stream moves on
            continue
        break
    try:
        yield first
        yield from chunks
    except BaseException as exc:  # after the first chunk: the caller's error, never another member's text
        plan.ended_after_start(step, exc)
        raise
    finally:
        chunks.close()  # a consumer that stopped early stops the member's request now
    plan.succeeded(step)


async def astream(router: RouterParts, prompt: str, kwargs: dict[str, Any], key: str | None) -> AsyncIterator[str]:
    plan = Plan(router, key)
    while True:
        step = plan.next()
        try:
            with step:
                chunks = step.lm.astream(prompt, **kwargs)
                first = await chunks.__anext__()
        except StopAsyncIteration:
            plan.succeeded(step)
            return
        except BaseException as exc:
            plan.failed(step, exc)
            continue
        break
    try:
        yield first
        async for chunk in chunks:
            yield chunk
    except BaseException as exc:
        plan.ended_after_start(step, exc)
        raise
    finally:
        await chunks.aclose()
    plan.succeeded(step)
