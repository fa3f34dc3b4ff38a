"""OpenTelemetry GenAI spans and metrics, read back from the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import Message, Request
from dspy.utils.exceptions import LMAuthError

pytest.importorskip("opentelemetry.sdk", reason="the tracing tests need OpenTelemetry: pip install -e '.[test,otel]'")

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dspy_anyscale import Anyscale, ConfigurationError, tracing
from dspy_anyscale.testing import Fault
from dspy_anyscale.tracing import _attributes as A

from ..conftest import MODEL, SECRET

ROOT = Path(__file__).resolve().parents[2]


class Telemetry:
    """A tracer provider and a meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("test")

    def spans(self):
        return list(self.exporter.get_finished_spans())

    def wait_for(self, count: int, timeout: float = 10.0):
        """The finished spans once ``count`` have ended (a cancelled stream's attempt ends later)."""
        deadline = time.monotonic() + timeout
        while len(self.spans()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.spans()

    def calls(self):
        return [s for s in self.spans() if s.name.startswith(("chat ", "text_completion "))]

    def attempts(self):
        return sorted((s for s in self.spans() if s.name.startswith("POST")), key=lambda s: s.start_time)

    def points(self, name: str):
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                found += [p for m in scope.metrics if m.name == name for p in m.data.data_points]
        return found

    def everything(self) -> str:
        """Every span and metric point, serialised as an exporter would send them."""
        data = self.reader.get_metrics_data()
        return "\n".join([s.to_json() for s in self.spans()] + [data.to_json() if data else ""])


@pytest.fixture
def otel():
    telemetry = Telemetry()
    tracing.instrument(telemetry.tracer_provider, telemetry.meter_provider)
    yield telemetry
    tracing.uninstrument()


@pytest.fixture(scope="session")
def global_telemetry():
    """The process's global providers (they can be set only once), for ``tracing=True`` without instrument()."""
    telemetry = Telemetry()
    trace.set_tracer_provider(telemetry.tracer_provider)
    from opentelemetry import metrics

    metrics.set_meter_provider(telemetry.meter_provider)
    return telemetry


def constructor_has_tracing() -> bool:
    return "tracing" in inspect.signature(Anyscale.__init__).parameters


@pytest.fixture
def make_traced(make_lm):
    """An Anyscale with the tracing observer: through ``Anyscale(tracing=...)`` once the constructor has
    the option, else added to its engines the way the constructor will (next to the usage recorder)."""

    def make(tracing_option=None, **kwargs):
        kwargs.setdefault("use_chat_api", True)
        if constructor_has_tracing():
            return make_lm(tracing=tracing_option, **kwargs)
        lm = make_lm(**kwargs)
        observer = tracing.tracing_observer(
            tracing_option, base_url=lm.api_base, endpoint="chat" if lm.use_chat_api else "completions"
        )
        for engine in (lm._engine_spec, lm._async_engine_spec):
            engine.observers = (*engine.observers, observer)
        return lm

    return make


def parent_of(span):
    return span.parent.span_id if span.parent else None


# --- call and attempt spans ------------------------------------------------------------------


def test_a_chat_call_is_a_client_span_with_one_attempt_span(otel, make_traced, stub):
    lm = make_traced(temperature=0.3, max_tokens=64, stop=["\n\n"], seed=7)
    assert lm("Hello there") == ["echo: Hello there"]
    (call,) = otel.calls()
    (attempt,) = otel.attempts()
    assert call.name == f"chat {MODEL}" and call.kind is SpanKind.CLIENT and call.status.status_code is StatusCode.UNSET
    assert parent_of(call) is None and parent_of(attempt) == call.context.span_id
    assert attempt.context.trace_id == call.context.trace_id
    port = stub.port
    assert dict(call.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anyscale",
        "gen_ai.system": "anyscale",
        "gen_ai.request.model": MODEL,
        "dspy_anyscale.endpoint": f"127.0.0.1:{port}",  # the service that answered (a Router's member name)
        "gen_ai.request.stream": False,
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.3,
        "gen_ai.request.seed": 7,
        "gen_ai.request.stop_sequences": ("\n\n",),
        "gen_ai.response.model": MODEL,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": lm.usage[0].prompt_tokens,
        "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.id": lm.usage[0].response_ids[0],  # the answer's own id
        "server.address": "127.0.0.1",
        "server.port": port,
        "dspy_anyscale.attempts": 1,
        "dspy_anyscale.cache_hit": False,
        "dspy_anyscale.status": "ok",
    }
    assert attempt.name == "POST /v1/chat/completions" and attempt.kind is SpanKind.CLIENT
    assert dict(attempt.attributes) == {
        "http.request.method": "POST",
        "url.full": f"http://127.0.0.1:{port}/v1/chat/completions",
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.response.status_code": 200,
        "http.response.header.x-request-id": ("req-1",),
        "gen_ai.response.id": lm.usage[0].response_ids[0],
        "dspy_anyscale.attempt.number": 0,
        "dspy_anyscale.status": "ok",
    }
    # The attempt lies inside the call.
    assert call.start_time <= attempt.start_time <= attempt.end_time <= call.end_time


def test_the_completions_endpoint_is_a_text_completion(otel, make_traced):
    lm = make_traced(use_chat_api=False)
    lm("The capital of France is")
    (call,) = otel.calls()
    (attempt,) = otel.attempts()
    assert call.name == f"text_completion {MODEL}"
    assert call.attributes["gen_ai.operation.name"] == "text_completion"
    assert attempt.name == "POST /v1/completions" and attempt.attributes["url.full"].endswith("/v1/completions")


def test_calls_nest_under_the_users_span(otel, make_traced):
    lm = make_traced()
    with otel.tracer.start_as_current_span("my pipeline") as mine:
        lm("inside")
    (call,) = otel.calls()
    assert parent_of(call) == mine.get_span_context().span_id
    assert call.context.trace_id == mine.get_span_context().trace_id


def test_async_calls_nest_under_the_users_span(otel, make_traced):
    lm = make_traced(cache=False)

    async def run():
        with otel.tracer.start_as_current_span("async pipeline") as mine:
            await asyncio.gather(lm.acall("a"), lm.acall("b"))
        return mine

    mine = asyncio.run(run())
    calls = otel.calls()
    assert len(calls) == 2 and {parent_of(c) for c in calls} == {mine.get_span_context().span_id}
    assert {parent_of(a) for a in otel.attempts()} == {c.context.span_id for c in calls}


def test_a_retry_is_a_second_attempt_span_with_the_wait_before_it(otel, make_traced, stub):
    stub.script(Fault(status=503, headers={"Retry-After": "0"}))
    lm = make_traced()
    lm("try twice")
    (call,) = otel.calls()
    first, second = otel.attempts()
    assert [a.attributes["dspy_anyscale.attempt.number"] for a in (first, second)] == [0, 1]
    assert first.attributes["error.type"] == "ServerError" and first.attributes["http.response.status_code"] == 503
    assert first.status.status_code is StatusCode.ERROR
    assert "dspy_anyscale.attempt.waited_s" not in first.attributes
    assert second.attributes["dspy_anyscale.attempt.waited_s"] >= 0
    assert "error.type" not in second.attributes and second.status.status_code is StatusCode.UNSET
    assert second.start_time >= first.end_time
    assert call.attributes["dspy_anyscale.attempts"] == 2 and "error.type" not in call.attributes
    assert call.status.status_code is StatusCode.UNSET
    assert {parent_of(a) for a in (first, second)} == {call.context.span_id}


def test_n_candidates_are_attempts_of_one_call(otel, make_traced):
    lm = make_traced()
    lm._generate("two please", n=2)
    (call,) = otel.calls()
    attempts = otel.attempts()
    assert [a.attributes["dspy_anyscale.attempt.number"] for a in attempts] == [0, 1]
    assert call.attributes["gen_ai.response.finish_reasons"] == ("stop", "stop")
    assert call.attributes["gen_ai.usage.output_tokens"] == 2 * 3
    assert all(call.start_time <= a.start_time <= a.end_time <= call.end_time for a in attempts)


def test_n_candidates_under_openinference_stay_inside_the_call_span(otel, make_traced):
    instrumentation = pytest.importorskip("openinference.instrumentation.dspy")
    instrumentor = instrumentation.DSPyInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tracer_provider)
    try:
        make_traced()._generate("two please", n=2)  # one DSPy LM call (one LM span) per candidate
    finally:
        instrumentor.uninstrument()
    (call,) = otel.calls()
    first_lm = next(s for s in otel.spans() if s.context.span_id == parent_of(call))
    assert first_lm.name == "Anyscale.__call__"
    assert all(call.start_time <= a.start_time <= a.end_time <= call.end_time for a in otel.attempts())


# --- streams -----------------------------------------------------------------------------------


def assert_stream_spans(otel):
    (call,) = otel.calls()
    (attempt,) = otel.attempts()
    assert call.attributes["gen_ai.request.stream"] is True
    ttft = attempt.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttft <= (attempt.end_time - attempt.start_time) / 1e9
    assert call.attributes["gen_ai.response.time_to_first_chunk"] == ttft
    assert call.attributes["gen_ai.usage.output_tokens"] > 0
    (point,) = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert point.count == 1 and point.sum == pytest.approx(ttft)
    return call, attempt


def test_a_sync_stream_traces_its_call_across_threads(otel, make_traced, stub):
    stub.latency = 0.02
    lm = make_traced(cache=False)
    with otel.tracer.start_as_current_span("consumer") as mine:
        text = "".join(lm.stream("stream this"))
    assert text == "echo: stream this"
    call, attempt = assert_stream_spans(otel)
    # The request ran on the background loop's thread; the call still hangs under the consumer's span.
    assert parent_of(call) == mine.get_span_context().span_id and parent_of(attempt) == call.context.span_id


def test_an_async_stream_traces_its_call_across_tasks(otel, make_traced, stub):
    stub.latency = 0.02
    lm = make_traced(cache=False)

    async def consume():
        with otel.tracer.start_as_current_span("consumer") as mine:
            return "".join([chunk async for chunk in lm.astream("stream async")]), mine

    text, mine = asyncio.run(consume())
    assert text == "echo: stream async"
    call, _ = assert_stream_spans(otel)
    assert parent_of(call) == mine.get_span_context().span_id


def test_an_abandoned_stream_ends_its_call_span_as_cancelled_without_an_exception(otel, make_traced, stub, caplog):
    stub.responder = lambda endpoint, body: " ".join(f"word{i}" for i in range(200))
    lm = make_traced(cache=False)
    caplog.set_level(logging.DEBUG, logger="dspy_anyscale")
    stream = lm.stream("a long answer")
    assert next(stream) == "word0 "
    stream.close()  # what `break` out of a for loop does when the generator goes away
    spans = otel.wait_for(2)
    (call,) = otel.calls()
    (attempt,) = otel.attempts()
    assert call.attributes["dspy_anyscale.status"] == "cancelled"
    assert call.attributes["dspy_anyscale.cache_hit"] is False
    assert call.status.status_code is StatusCode.UNSET and "error.type" not in call.attributes
    assert not call.events and not attempt.events
    # The request may have finished before the cancellation reached it; it is never an error.
    assert attempt.attributes["dspy_anyscale.status"] in ("cancelled", "ok")
    assert attempt.status.status_code is StatusCode.UNSET and "error.type" not in attempt.attributes
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert otel.points("gen_ai.client.operation.duration") == [], "a stopped stream is no operation to time"
    assert len(spans) == 2


# --- failures, cache hits, unknown counts ------------------------------------------------------


def test_an_auth_error_marks_both_spans(otel, make_traced):
    lm = make_traced(api_key="wrong-key")
    with pytest.raises(LMAuthError):
        lm("no entry")
    (call,) = otel.calls()
    (attempt,) = otel.attempts()
    assert call.attributes["error.type"] == "LMAuthError" and call.status.status_code is StatusCode.ERROR
    assert call.status.description == "LMAuthError"  # no message: it may quote the server's reply
    assert call.attributes["dspy_anyscale.status"] == "LMAuthError"
    assert attempt.attributes["error.type"] == "AuthError" and attempt.attributes["http.response.status_code"] == 401
    assert attempt.status.status_code is StatusCode.ERROR
    assert "gen_ai.usage.input_tokens" not in call.attributes and "gen_ai.response.model" not in call.attributes
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes["error.type"] == "LMAuthError" and point.count == 1
    assert otel.points("gen_ai.client.token.usage") == []


def test_a_cache_hit_is_a_call_span_without_attempts(otel, make_traced):
    lm = make_traced()
    lm("same question")
    lm("same question")
    miss, hit = sorted(otel.calls(), key=lambda s: s.start_time)
    assert (miss.attributes["dspy_anyscale.cache_hit"], hit.attributes["dspy_anyscale.cache_hit"]) == (False, True)
    assert hit.attributes["dspy_anyscale.status"] == "cached" and hit.attributes["dspy_anyscale.attempts"] == 0
    assert hit.name == miss.name and hit.kind is SpanKind.CLIENT
    assert hit.attributes["server.address"] == "127.0.0.1" and hit.attributes["gen_ai.operation.name"] == "chat"
    assert "gen_ai.usage.input_tokens" not in hit.attributes, "no request: no tokens, not 0"
    assert len(otel.attempts()) == 1
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.count == 1, "a cache hit is no provider operation: it would drag the latency histogram to 0"


def test_unknown_token_counts_are_absent_not_zero(otel, make_traced, stub):
    no_usage = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
    stub.script(Fault(status=200, body=no_usage))
    lm = make_traced()
    assert lm("count me") == ["hi"]
    (call,) = otel.calls()
    assert "gen_ai.usage.input_tokens" not in call.attributes and "gen_ai.usage.output_tokens" not in call.attributes
    assert call.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert otel.points("gen_ai.client.token.usage") == []
    assert len(otel.points("gen_ai.client.operation.duration")) == 1


# --- metrics -----------------------------------------------------------------------------------


def test_duration_and_token_metrics_follow_the_conventions(otel, make_traced, stub):
    lm = make_traced(cache=False)
    lm("one")
    lm("two")
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 2 and duration.sum > 0
    assert tuple(duration.explicit_bounds) == A.DURATION_BUCKETS
    assert dict(duration.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anyscale",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "server.address": "127.0.0.1",
        "server.port": stub.port,
    }
    tokens = {p.attributes["gen_ai.token.type"]: p for p in otel.points("gen_ai.client.token.usage")}
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].sum == sum(r.prompt_tokens for r in lm.usage) and tokens["input"].count == 2
    assert tokens["output"].sum == sum(r.completion_tokens for r in lm.usage)
    assert tuple(tokens["output"].explicit_bounds) == A.TOKEN_BUCKETS
    assert otel.points("gen_ai.client.operation.time_to_first_chunk") == [], "streams only"
    meter_units = {
        m.name: m.unit
        for r in otel.reader.get_metrics_data().resource_metrics
        for s in r.scope_metrics
        for m in s.metrics
    }
    assert meter_units == {"gen_ai.client.operation.duration": "s", "gen_ai.client.token.usage": "{token}"}


# --- secrets and content -----------------------------------------------------------------------


def test_no_key_and_no_header_value_in_any_span_or_metric(make_traced, stub):
    telemetry = Telemetry()
    tracing.instrument(telemetry.tracer_provider, telemetry.meter_provider, record_content=True)
    try:
        stub.script(Fault(status=503, headers={"Retry-After": "0"}))
        lm = make_traced(headers={"X-Gateway-Key": "gw-secret-1", "X-Team": "a"}, cache=False)
        lm("plain call")
        "".join(lm.stream("streamed call"))
        with pytest.raises(LMAuthError):
            make_traced(api_key="esecret_WRONG_KEY_9f8e7d6c")("refused call")
    finally:
        tracing.uninstrument()
    dump = telemetry.everything()
    assert "plain call" in dump, "content was recorded (record_content=True): the dump is the real thing"
    for secret in (SECRET, "esecret_WRONG_KEY_9f8e7d6c", "gw-secret-1", "Bearer", "Authorization"):
        assert secret not in dump


def question(text: str) -> Request:
    return Request(model=MODEL, system="Be terse.", messages=(Message.user(text),))


def test_content_is_not_recorded_unless_asked(otel, make_traced, stub):
    lm = make_traced(api_key="wrong-key")
    with pytest.raises(LMAuthError):
        lm("secret question one")
    make_traced()(question("secret question two"))
    dump = otel.everything()
    for text in ("secret question", "Be terse", "echo:", "Invalid API key"):
        assert text not in dump
    for span in otel.calls():
        assert not {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"} & set(
            span.attributes
        )


def test_content_is_recorded_when_asked(make_traced):
    telemetry = Telemetry()
    tracing.instrument(telemetry.tracer_provider, telemetry.meter_provider, record_content=True)
    try:
        assert make_traced()(question("What is 2+2?")).text == "echo: What is 2+2?"
        with pytest.raises(LMAuthError):
            make_traced(api_key="wrong-key")("refused")
    finally:
        tracing.uninstrument()
    ok, refused = sorted(telemetry.calls(), key=lambda s: s.start_time)
    assert json.loads(ok.attributes["gen_ai.system_instructions"]) == [{"type": "text", "content": "Be terse."}]
    assert json.loads(ok.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "What is 2+2?"}]}
    ]
    assert json.loads(ok.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "echo: What is 2+2?"}], "finish_reason": "stop"}
    ]
    assert refused.status.description.startswith("LMAuthError: ") and "Invalid API key" in refused.status.description


# --- switching it on and off -------------------------------------------------------------------


def test_instrument_reaches_instances_made_before_and_uninstrument_stops(make_traced):
    lm = make_traced(cache=False)
    telemetry = Telemetry()
    lm("before")
    tracing.instrument(telemetry.tracer_provider, telemetry.meter_provider)
    assert tracing.is_instrumented()
    try:
        lm("during")
    finally:
        tracing.uninstrument()
    lm("after")
    assert not tracing.is_instrumented()
    assert len(telemetry.calls()) == 1 and len(telemetry.attempts()) == 1


def test_tracing_false_never_traces_and_tracing_true_always_does(otel, make_traced, global_telemetry):
    make_traced(tracing_option=False)("off")
    assert otel.spans() == []
    make_traced(tracing_option=True)("on")  # instrumented: instrument()'s providers
    assert len(otel.calls()) == 1
    tracing.uninstrument()
    global_telemetry.exporter.clear()
    make_traced(tracing_option=True)("on, not instrumented")  # the global providers
    make_traced(tracing_option=None)("follows instrument(): off")
    (call,) = [s for s in global_telemetry.spans() if s.name.startswith("chat ")]
    assert "dspy_anyscale.cache_hit" in call.attributes and len(otel.calls()) == 1


@pytest.mark.parametrize("bad", ["yes", 1, 0])
def test_the_tracing_option_is_true_false_or_none(bad):
    for check in (tracing.check_tracing, tracing.tracing_observer):
        with pytest.raises(ConfigurationError, match="tracing must be True, False or None"):
            check(bad)
    if constructor_has_tracing():
        with pytest.raises(ConfigurationError, match="tracing must be"):
            Anyscale(MODEL, api_base="http://127.0.0.1:1/v1", api_key="k", tracing=bad)


def test_check_tracing_accepts_the_three_values():
    assert [tracing.check_tracing(v) for v in (True, False, None)] == [True, False, None]


def test_copies_share_the_instances_tracing(otel, make_traced):
    lm = make_traced(tracing_option=False)
    lm.copy(temperature=0.5)("a copy on the same connection")
    assert otel.spans() == []


wired = pytest.mark.skipif(not constructor_has_tracing(), reason="until Anyscale(tracing=...) is wired")


@wired
def test_a_copy_can_change_the_tracing_option(otel, make_lm):
    lm = make_lm(use_chat_api=True, tracing=False)
    lm("not traced")
    lm.copy(tracing=None)("traced")  # a connection setting: new engines, new observer
    lm.copy(temperature=0.5)("shares the original's: not traced")
    (call,) = otel.calls()
    assert call.attributes["dspy_anyscale.status"] == "ok" and len(otel.attempts()) == 1


@wired
def test_a_saved_program_leaves_tracing_to_the_loading_environment(make_lm, monkeypatch):
    import pickle

    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)  # an unpickled LM reads its key from the environment
    lm = make_lm(use_chat_api=True, tracing=True)
    assert "tracing" not in lm.dump_state()
    clone = pickle.loads(pickle.dumps(lm))  # a Ray task's copy keeps the instance's choice
    try:
        (observer,) = [o for o in clone._observers() if isinstance(o, tracing.TracingObserver)]
        assert observer.mode is True
    finally:
        clone.close()


def test_a_failing_hook_never_fails_the_call(otel, make_traced, monkeypatch, caplog):
    from dspy_anyscale.tracing import _otel

    def broken(self, call, start):
        raise RuntimeError("exporter on fire")

    monkeypatch.setattr(_otel.CallTrace, "attempt_started", broken)
    monkeypatch.setattr(tracing, "_hook_failed", False)
    lm = make_traced(cache=False)
    caplog.set_level(logging.DEBUG, logger="dspy_anyscale")
    assert lm("still answered") == ["echo: still answered"]
    assert lm("and again") == ["echo: and again"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "tracing hook" in r.getMessage()]
    assert len(warnings) == 1, "logged once, then at debug level"
    assert len(otel.calls()) == 2 and lm.usage[-1].status == "ok"


# --- context from elsewhere: Ray workers, OpenInference ----------------------------------------


def test_a_call_under_a_context_extracted_from_a_carrier_is_its_child(otel, make_traced):
    lm = make_traced()
    with otel.tracer.start_as_current_span("driver") as driver:
        carrier = tracing.inject()
    assert carrier["traceparent"].split("-")[2] == format(driver.get_span_context().span_id, "016x")
    assert tracing.inject() == {}, "no span current: nothing to propagate"

    def worker():  # a thread starts with an empty context, as a Ray worker does
        token = otel_context.attach(propagate.extract(carrier))
        try:
            lm("from a worker")
        finally:
            otel_context.detach(token)
        with tracing.attach(carrier):
            lm("from a worker, with the helper")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    calls = otel.calls()
    assert len(calls) == 2
    for call in calls:
        assert parent_of(call) == driver.get_span_context().span_id
        assert call.context.trace_id == driver.get_span_context().trace_id


def test_our_call_span_nests_under_openinferences_lm_span(otel, make_traced):
    instrumentation = pytest.importorskip("openinference.instrumentation.dspy")
    instrumentor = instrumentation.DSPyInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tracer_provider)
    try:
        dspy.configure(lm=make_traced())
        prediction = dspy.Predict("question -> answer")(question="What is the capital of France?")
    finally:
        instrumentor.uninstrument()
    assert prediction.answer == "answer for What is the capital of France?"
    spans = {s.context.span_id: s for s in otel.spans()}
    (call,) = otel.calls()
    (attempt,) = otel.attempts()
    lm_span = spans[parent_of(call)]
    assert lm_span.name == "Anyscale.__call__" and lm_span.attributes["openinference.span.kind"] == "LLM"
    assert lm_span.start_time <= call.start_time <= call.end_time <= lm_span.end_time
    assert parent_of(attempt) == call.context.span_id
    chain = [lm_span]
    while parent_of(chain[-1]) in spans:
        chain.append(spans[parent_of(chain[-1])])
    assert any(s.name.startswith("Predict") for s in chain[1:]), [s.name for s in chain]


@pytest.mark.parametrize("entry", ["program", "direct", "async"])
def test_a_cache_hit_nests_under_openinferences_lm_span_like_a_miss(otel, make_traced, entry):
    instrumentation = pytest.importorskip("openinference.instrumentation.dspy")
    instrumentor = instrumentation.DSPyInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tracer_provider)
    lm = make_traced()
    try:
        for _ in range(2):  # a miss, then the same call answered from DSPy's cache
            if entry == "program":
                with dspy.context(lm=lm):
                    dspy.Predict("question -> answer")(question="What is the capital of France?")
            elif entry == "direct":
                lm("What is the capital of France?")
            else:
                asyncio.run(lm.acall("What is the capital of France?"))
    finally:
        instrumentor.uninstrument()
    spans = {s.context.span_id: s for s in otel.spans()}
    miss, hit = sorted(otel.calls(), key=lambda s: s.start_time)
    assert hit.attributes["dspy_anyscale.cache_hit"] is True
    for call in (miss, hit):
        lm_span = spans[parent_of(call)]
        assert lm_span.name in ("Anyscale.__call__", "Anyscale.acall"), lm_span.name
        assert lm_span.start_time <= call.start_time <= call.end_time <= lm_span.end_time
    assert spans[parent_of(miss)].context.span_id != spans[parent_of(hit)].context.span_id, "each under its own"


@pytest.mark.ray
def test_a_ray_task_joins_the_drivers_trace(otel, stub):
    ray = pytest.importorskip("ray")
    from ..ray.test_ray import start_local_ray

    start_local_ray()

    @ray.remote
    def traced_call(carrier, api_base):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from dspy_anyscale import Anyscale, tracing

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing.instrument(tracer_provider=provider)
        lm = Anyscale(MODEL, api_base=api_base, use_chat_api=True, cache=False)
        observer = tracing.tracing_observer(None, base_url=api_base, endpoint="chat")
        for engine in (lm._engine_spec, lm._async_engine_spec):  # until the constructor adds it
            if not any(isinstance(o, tracing.TracingObserver) for o in engine.observers):
                engine.observers = (*engine.observers, observer)
        with tracing.attach(carrier):
            lm("from an actor")
        spans = exporter.get_finished_spans()
        return [(s.name, s.context.trace_id, s.parent.span_id if s.parent else None) for s in spans]

    with otel.tracer.start_as_current_span("driver job") as driver:
        spans = ray.get(traced_call.remote(tracing.inject(), stub.base_url))
    context = driver.get_span_context()
    (call,) = [s for s in spans if s[0].startswith("chat ")]
    assert call[1:] == (context.trace_id, context.span_id)


# --- without OpenTelemetry ---------------------------------------------------------------------

_WITHOUT_OTEL = r"""
import sys

class NoOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoOpenTelemetry())
import dspy_anyscale
from dspy_anyscale import Anyscale, ConfigurationError, tracing
from dspy_anyscale.testing import StubServer

assert not [m for m in sys.modules if m.startswith("opentelemetry")]
observer = tracing.tracing_observer(None, endpoint="chat")
with StubServer(api_key="k") as server:
    lm = Anyscale("m", api_base=server.base_url, api_key="k", use_chat_api=True, cache=False)
    for engine in (lm._engine_spec, lm._async_engine_spec):
        if not any(isinstance(o, tracing.TracingObserver) for o in engine.observers):
            engine.observers = (*engine.observers, observer)
    assert lm("works") == ["echo: works"] and "".join(lm.stream("streams")) == "echo: streams"
assert tracing.inject() == {}
with tracing.attach({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}):
    pass
try:
    tracing.instrument()
except ImportError as exc:
    assert "pip install 'dspy-anyscale[otel]'" in str(exc), exc
else:
    raise AssertionError("instrument() without OpenTelemetry")
try:
    tracing.check_tracing(True)
except ConfigurationError as exc:
    assert "dspy-anyscale[otel]" in str(exc), exc
else:
    raise AssertionError("tracing=True without OpenTelemetry")
# An instance unpickled with tracing=True where OpenTelemetry is missing still answers.
observer = tracing.tracing_observer(True, endpoint="chat")
with StubServer(api_key="k") as server:
    lm = Anyscale("m", api_base=server.base_url, api_key="k", use_chat_api=True, cache=False)
    for engine in (lm._engine_spec, lm._async_engine_spec):
        engine.observers = (*[o for o in engine.observers if not isinstance(o, tracing.TracingObserver)], observer)
    assert lm("still works") == ["echo: still works"]
assert not [m for m in sys.modules if m.startswith("opentelemetry")]
print("ok")
"""


def test_everything_works_without_opentelemetry_installed():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OTEL],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_importing_the_package_imports_no_opentelemetry():
    code = "import sys, dspy_anyscale, dspy_anyscale.tracing; print([m for m in sys.modules if 'opentelemetry' in m])"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "[]", result.stderr[-3000:]


# --- the pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://svc.anyscaleuserdata.com/v1", {"server.address": "svc.anyscaleuserdata.com", "server.port": 443}),
        ("http://127.0.0.1:8000/v1", {"server.address": "127.0.0.1", "server.port": 8000}),
        ("http://[::1]:9000/v1", {"server.address": "::1", "server.port": 9000}),
        ("not a url", {}),
        (None, {}),
    ],
)
def test_server_attributes(url, expected):
    assert A.server(url) == expected


def test_url_full_never_carries_credentials_or_a_query():
    assert A.safe_url("https://user:pw@host:8443/v1/completions?api-key=k") == "https://host:8443/v1/completions"
    assert A.safe_url("http://[::1]:9000/v1/chat/completions") == "http://[::1]:9000/v1/chat/completions"
