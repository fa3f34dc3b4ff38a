"""Connecting engine attempts to the user's call, through a context variable.

A public entry point (``lm(...)``, ``lm.acall``, ``lm.stream``) opens a call; every attempt the
engine makes inside it (retries, ``n`` candidates, in threads or tasks that inherit the
context) is added to it; when the call ends, its recorder turns it into one UsageRecord. An
attempt made with no call open (DSPy reaching the engine by another path) is its own call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .usage import Attempt, CallStats, UsageRecorder

_current: ContextVar[CallStats | None] = ContextVar("dspy_anyscale_call", default=None)


@contextmanager
def observed_call(recorder: UsageRecorder | None, model: str) -> Iterator[CallStats | None]:
    """Open a call unless one is open already (nested entry points are one call)."""
    if recorder is None or _current.get() is not None:
        yield None
        return
    stats = CallStats()
    token = _current.set(stats)
    try:
        yield stats
    except BaseException as exc:
        recorder.finish(model, stats, exc)
        raise
    else:
        recorder.finish(model, stats)
    finally:
        _current.reset(token)


def report_attempt(recorder: UsageRecorder | None, attempt: Attempt) -> None:
    if recorder is None:
        return
    stats = _current.get()
    if stats is not None:
        stats.add(attempt)
        return
    single = CallStats(started=time.perf_counter() - attempt.latency_s)
    single.add(attempt)
    recorder.finish(attempt.model, single)
