"""Spans and metrics from the observer hooks, through the OpenTelemetry API.

Imported only when tracing is used (``instrument()``, ``tracing=True``): importing
``dspy_anyscale`` never imports OpenTelemetry.

One :class:`CallTrace` per call lives in ``call.state``; it holds the call span and the open
attempt spans, so nothing depends on which context, thread or task runs a hook. Spans are never
made current (no ``attach``/``detach``): a stream's hooks run in the consumer's context and in
the task that runs the request, and a token attached in one cannot be detached in the other.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .._config import endpoint_name
from .._observe import CANCELLED, Attempt, AttemptStart, Call
from .._version import __version__
from ..usage import call_status
from . import _attributes as A
from ._propagate import carry_context_into_dspy_threads, trace_headers

SCOPE = "dspy_anyscale"  # the instrumentation scope of every span and metric


class Telemetry:
    """The tracer, the three histograms and the content switch of one configuration."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None, record_content: bool = False) -> None:
        # With no provider given these are the global ones, proxies that follow a provider set later.
        self.tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        meter = metrics.get_meter(SCOPE, __version__, meter_provider)
        self.duration = _histogram(meter, A.OPERATION_DURATION, "s", "GenAI operation duration.", A.DURATION_BUCKETS)
        self.tokens = _histogram(
            meter, A.TOKEN_USAGE, "{token}", "Number of input and output tokens used.", A.TOKEN_BUCKETS
        )
        self.first_chunk = _histogram(
            meter,
            A.TIME_TO_FIRST_CHUNK_METRIC,
            "s",
            "Time to receive the first chunk, from when the client issues the request.",
            A.FIRST_CHUNK_BUCKETS,
        )
        self.record_content = bool(record_content)
        carry_context_into_dspy_threads()  # dspy.Parallel / Evaluate workers join the caller's trace

    def start_call(self, call: Call, base_url: str | None, endpoint: str, adapter: str | None = None) -> CallTrace:
        return CallTrace(self, call, base_url, endpoint, adapter)


def _histogram(meter: Any, name: str, unit: str, description: str, buckets: tuple[float, ...]) -> Any:
    try:
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=list(buckets)
        )
    except TypeError:  # an API older than 1.23 has no advisory boundaries: the SDK's defaults apply
        return meter.create_histogram(name, unit=unit, description=description)


def _epoch_ns(perf_counter: float) -> int:
    """A ``time.perf_counter()`` reading as the epoch nanoseconds OpenTelemetry timestamps are."""
    return time.time_ns() - int((time.perf_counter() - perf_counter) * 1e9)


class CallTrace:
    """One call's spans. The call span opens at the first attempt, or when DSPy has the answer (a cache
    hit), or at the end (a refusal before any attempt)."""

    __slots__ = (
        "_adapter",
        "_attempts",
        "_base_url",
        "_endpoint",
        "_inner",
        "_lock",
        "_parent",
        "_span",
        "_start_ns",
        "_tel",
    )

    def __init__(
        self, telemetry: Telemetry, call: Call, base_url: str | None, endpoint: str, adapter: str | None = None
    ) -> None:
        self._tel = telemetry
        self._adapter = adapter
        self._parent = otel_context.get_current()  # whatever span is current when the call starts
        self._start_ns = _epoch_ns(call.started)
        self._base_url = base_url
        self._endpoint = endpoint
        self._span: Span | None = None
        self._attempts: dict[int, Span] = {}
        self._inner: Any = None  # the span begun inside the call that the call span nests under, if any
        self._lock = threading.Lock()  # candidates of one call may start attempts concurrently

    # --- the call span ---------------------------------------------------------------------------

    def _parent_for(self, call: Call, inside: bool) -> tuple[Any, int]:
        """The parent context and the call span's start: the call-start context, or a span begun inside
        the call that is current where the span opens (``inside``: at the first attempt, or where DSPy
        has a cache hit's answer).

        DSPy's LM span (OpenInference's ``LM.__call__``, MLflow's) starts inside our call, after
        the call opened: nesting under it keeps the trace reading program -> LM -> our call ->
        HTTP attempts, for a cache hit as for a miss, and the call span then starts no earlier
        than that parent. Only for a plain call, whose hooks run in the call's own context; a
        stream's run in another task, so a stream keeps the context it started in.
        """
        if not inside or call.stream:
            return self._parent, self._start_ns
        current = otel_context.get_current()
        inner_span = trace.get_current_span(current)
        inner = inner_span.get_span_context()
        outer = trace.get_current_span(self._parent).get_span_context()
        same_trace = not outer.is_valid or inner.trace_id == outer.trace_id
        if not (inner.is_valid and inner.span_id != outer.span_id and same_trace):
            return self._parent, self._start_ns
        self._inner = inner_span
        inner_start = getattr(inner_span, "start_time", None)  # the SDK's spans know it; the API's do not
        return current, max(self._start_ns, inner_start) if isinstance(inner_start, int) else self._start_ns

    def _open(self, call: Call, start: AttemptStart | None, *, inside: bool) -> Span:
        endpoint = start.endpoint if start is not None else self._endpoint
        url = start.url if start is not None else self._base_url
        attributes = A.merged(
            A.base_attributes(endpoint, call.model),
            {A.SYSTEM: A.PROVIDER_NAME},
            A.server(url),
        )
        service = call.routed_as or (endpoint_name(url) if url else None)
        if service:  # a Router's member tries are a span each, named by this attribute
            attributes[A.ENDPOINT] = service
        if call.module is not None:
            attributes[A.MODULE] = call.module
        if self._adapter is not None:
            attributes[A.ADAPTER] = self._adapter
        if start is not None:
            attributes[A.REQUEST_STREAM] = start.stream
            attributes.update(A.request_attributes(start.request))
            if self._tel.record_content:
                attributes.update(A.content_attributes(start.request))
        parent, start_ns = self._parent_for(call, inside)
        self._span = self._tel.tracer.start_span(
            A.span_name(endpoint, call.model),
            context=parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=start_ns,
        )
        self._endpoint = endpoint
        return self._span

    # --- hooks -------------------------------------------------------------------------------------

    def attempt_started(self, call: Call, start: AttemptStart) -> None:
        with self._lock:
            parent = self._span or self._open(call, start, inside=not start.stream)
            # The parent is passed explicitly: the current context at attempt time may be another task's.
            self._attempts[start.number] = self._tel.tracer.start_span(
                A.attempt_name(start),
                context=trace.set_span_in_context(parent),
                kind=SpanKind.CLIENT,
                attributes=A.attempt_start_attributes(start),
                start_time=_epoch_ns(start.started),
            )

    def attempt_headers(self, call: Call, start: AttemptStart) -> dict[str, str] | None:
        """The attempt span's W3C trace context (``traceparent``, ``tracestate``), for the server to join."""
        with self._lock:
            span = self._attempts.get(start.number)
        return trace_headers(span) if span is not None else None

    def call_answered(self, call: Call) -> None:
        """A cache hit's span opens here, inside DSPy's LM call, where a miss's opens at its first attempt."""
        with self._lock:
            if self._span is None:
                self._open(call, None, inside=True)

    def attempt_finished(self, call: Call, attempt: Attempt) -> None:
        with self._lock:
            span = self._attempts.pop(attempt.start.number, None)
        if span is None:
            return
        span.set_attributes(A.attempt_end_attributes(attempt))
        if not attempt.ok and attempt.error != CANCELLED:
            span.set_status(Status(StatusCode.ERROR, attempt.error))
        span.end(end_time=_epoch_ns(attempt.start.started + attempt.latency_s))

    def call_finished(self, call: Call, error: BaseException | None) -> None:
        duration = time.perf_counter() - call.started
        attempts = list(call.attempts)
        with self._lock:
            span = self._span or self._open(call, None, inside=False)  # a refusal before any attempt
        status = call_status(error, bool(attempts))
        outcome = A.outcome_attributes(attempts)
        span.set_attributes(
            {
                **outcome,
                A.ATTEMPTS: len(attempts),
                A.CACHE_HIT: status == "cached",
                A.STATUS: status,
            }
        )
        if self._tel.record_content:
            span.set_attributes(A.output_content(attempts))
        failed = error is not None and status != CANCELLED  # a consumer that stopped reading is no failure
        if failed:
            assert error is not None
            span.set_attribute(A.ERROR_TYPE, A.error_type(error))
            span.set_status(Status(StatusCode.ERROR, self._description(error)))
        span.end(end_time=self._end_ns(attempts))
        if attempts and status != CANCELLED:
            self._record_metrics(call, attempts, outcome, error if failed else None, duration)

    def _end_ns(self, attempts: list[Attempt]) -> int:
        """Now, or the end of the span begun inside the call that we nest under, when it ended already
        (DSPy's LM span closes a few microseconds before our call does): a child within its parent.
        Never before an attempt's end (``n`` candidates are one LM span each: we nest under the first)."""
        now = time.time_ns()
        inner_end = getattr(self._inner, "end_time", None)
        if not isinstance(inner_end, int) or inner_end >= now:
            return now
        last = max((_epoch_ns(a.start.started + a.latency_s) for a in attempts), default=0)
        return inner_end if inner_end >= last else now

    def _description(self, error: BaseException) -> str:
        # Error messages may quote the server's body, which may echo the prompt: text only when opted in.
        return f"{A.error_type(error)}: {error}"[:1000] if self._tel.record_content else A.error_type(error)

    # --- metrics -----------------------------------------------------------------------------------

    def _record_metrics(
        self,
        call: Call,
        attempts: list[Attempt],
        outcome: dict[str, Any],
        error: BaseException | None,
        duration: float,
    ) -> None:
        last = attempts[-1]
        point = A.merged(A.base_attributes(last.endpoint, call.model), A.server(last.start.url))
        if A.RESPONSE_MODEL in outcome:
            point[A.RESPONSE_MODEL] = outcome[A.RESPONSE_MODEL]
        if error is not None:
            point[A.ERROR_TYPE] = A.error_type(error)
        self._tel.duration.record(duration, point)
        for kind, name in (("input", A.INPUT_TOKENS), ("output", A.OUTPUT_TOKENS)):
            if name in outcome:
                self._tel.tokens.record(outcome[name], {**point, A.TOKEN_TYPE: kind})
        first_chunk = outcome.get(A.TIME_TO_FIRST_CHUNK)
        if first_chunk is not None:  # streams only, as the conventions ask
            self._tel.first_chunk.record(first_chunk, point)
