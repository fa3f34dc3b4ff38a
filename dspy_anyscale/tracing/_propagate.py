"""Trace context beyond this process and thread: to the server, and into DSPy's worker threads.

Imported only when tracing is used (it imports OpenTelemetry).

* **To the server.** Each HTTP attempt of a traced call carries its attempt span's context in the
  headers OpenTelemetry's propagator writes (W3C ``traceparent`` and ``tracestate`` by default,
  as ``OTEL_PROPAGATORS`` selects), so a server that reads them (vLLM, Ray Serve) puts its spans
  in the caller's trace. Nothing is added to an untraced call, and the headers are never part of
  the cache identity (they are not in the request DSPy keys its cache on).
* **Into DSPy's threads.** ``dspy.Parallel``, ``dspy.Evaluate`` and the optimizers run their work
  on ``dspy.utils.parallelizer.ParallelExecutor``, which copies DSPy's settings into each worker
  thread but not the context variables OpenTelemetry keeps the current span in: every LM call
  there would start a trace of its own. While tracing is on, ``ParallelExecutor.execute`` runs
  each item inside the context of the code that called it, so those calls join that trace, as
  ``asyncio.gather`` tasks do.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

_CARRIES = "_dspy_anyscale_carries_context"  # marks the wrapped execute, so it is wrapped once
_patch_lock = threading.Lock()


def trace_headers(span: Any) -> dict[str, str] | None:
    """The headers that carry ``span``'s context to the server, or None when the propagator writes none."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier or None


def carry_context_into_dspy_threads() -> None:
    """Make ``ParallelExecutor.execute`` run each item in its caller's OpenTelemetry context. Idempotent;
    a DSPy without the executor is left alone (tracing still works, without the joining)."""
    try:
        from dspy.utils.parallelizer import ParallelExecutor
    except ImportError:
        return
    with _patch_lock:
        execute = ParallelExecutor.execute
        if getattr(execute, _CARRIES, False):
            return
        ParallelExecutor.execute = _carrying(execute)


def _carrying(execute: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(execute)
    def carrying_execute(self: Any, function: Callable[[Any], Any], data: Any) -> Any:
        return execute(self, in_context(otel_context.get_current(), function), data)

    setattr(carrying_execute, _CARRIES, True)
    return carrying_execute


def in_context(parent: otel_context.Context, function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``function``, run with ``parent`` as the current OpenTelemetry context, in whichever thread."""

    @functools.wraps(function)
    def run(item: Any) -> Any:
        token = otel_context.attach(parent)
        try:
            return function(item)
        finally:
            otel_context.detach(token)

    return run
