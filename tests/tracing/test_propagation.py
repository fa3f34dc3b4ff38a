"""Trace context to the server (traceparent on each HTTP attempt, only with tracing on, never in the cache
key) and through DSPy's worker threads (dspy.Parallel / dspy.Evaluate spans join the caller's trace)."""

from __future__ import annotations

import asyncio

import dspy
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing tests need OpenTelemetry: pip install -e '.[test,otel]'")

from dspy_anyscale import tracing
from dspy_anyscale.testing import Fault
from dspy_anyscale.tracing import _attributes as A

from ..test_attribution import TwoStep
from .test_tracing import Telemetry


@pytest.fixture
def otel():
    telemetry = Telemetry()
    tracing.instrument(telemetry.tracer_provider, telemetry.meter_provider)
    yield telemetry
    tracing.uninstrument()


def traceparent(request) -> tuple[str, str]:
    """(trace id, parent span id) of a recorded request's W3C traceparent."""
    headers = {name.lower(): value for name, value in request.headers.items()}
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00" and len(flags) == 2
    return trace_id, span_id


def ids(span) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def test_each_attempt_sends_its_own_span_as_traceparent(otel, make_lm, stub):
    lm = make_lm(use_chat_api=True, num_retries=1, cache=False)
    stub.script(Fault(status=503, headers={"Retry-After": "0"}))
    with otel.tracer.start_as_current_span("program"):
        lm("hello")
    first, second = stub.posts()
    attempts = otel.attempts()
    assert [traceparent(first), traceparent(second)] == [ids(span) for span in attempts]
    # All in the caller's trace: the server's spans join it.
    (program,) = [s for s in otel.spans() if s.name == "program"]
    assert {traceparent(r)[0] for r in (first, second)} == {ids(program)[0]}


def test_async_and_streamed_attempts_send_it_too(otel, make_lm, stub):
    lm = make_lm(use_chat_api=True, cache=False)

    async def main() -> None:
        await lm.acall("hello")
        async for _ in lm.astream("again"):
            pass

    asyncio.run(asyncio.wait_for(main(), 30))
    otel.wait_for(4)  # two calls, two attempts
    sent = [traceparent(request) for request in stub.posts()]
    assert len(sent) == 2 and sorted(sent) == sorted(ids(span) for span in otel.attempts())


def test_without_tracing_no_trace_header_is_sent(make_lm, stub):
    from opentelemetry.sdk.trace import TracerProvider

    lm = make_lm(use_chat_api=True, tracing=False, cache=False)
    with TracerProvider().get_tracer("t").start_as_current_span("user's own span"):
        lm("hello")
    headers = {name.lower() for name in stub.posts()[0].headers}
    assert not headers & {"traceparent", "tracestate", "baggage"}


def test_the_trace_context_is_not_part_of_the_cache_key(otel, make_lm, stub):
    untraced = make_lm(use_chat_api=True, tracing=False)
    traced = make_lm(use_chat_api=True, tracing=True)
    assert untraced.engine.cache_identity == traced.engine.cache_identity
    untraced("the same question")
    traced("the same question")  # answered by DSPy's cache: nothing sent, whatever the span
    assert len(stub.posts()) == 1 and traced.usage[-1].status == "cached"


def test_the_call_span_names_its_module(otel, make_lm, stub):
    lm = make_lm(use_chat_api=True, cache=False)
    dspy.configure(lm=lm)
    TwoStep()(question="what")
    assert [span.attributes.get(A.MODULE) for span in otel.calls()] == ["generate_query.predict", "answer"]


@pytest.mark.parametrize("runner", ["parallel", "evaluate"])
def test_spans_from_dspy_worker_threads_join_the_callers_trace(otel, make_lm, stub, runner):
    lm = make_lm(use_chat_api=True, cache=False)
    dspy.configure(lm=lm)
    program = TwoStep()
    examples = [dspy.Example(question=f"q {i}").with_inputs("question") for i in range(3)]
    with otel.tracer.start_as_current_span("caller") as caller:
        if runner == "parallel":
            dspy.Parallel(num_threads=3, disable_progress_bar=True)([(program, ex) for ex in examples])
        else:
            dspy.Evaluate(devset=examples, metric=lambda ex, pred, trace=None: 1.0, num_threads=3)(program)
    calls = otel.calls()
    assert len(calls) == 6
    assert {span.context.trace_id for span in calls} == {caller.get_span_context().trace_id}
    assert {span.parent.span_id for span in calls} == {caller.get_span_context().span_id}
