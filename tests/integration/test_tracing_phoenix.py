"""Spans exported over OTLP/HTTP to a real Arize Phoenix and read back through its REST API.

Phoenix is installed on first use into its own environment in the cache (~80 s, ~850 MB; see
dspy_anyscale.servers.phoenix) and started once per session (~20 s). The LM talks to the stub
server: what is under test is the receiver seeing what our spans say.
"""

from __future__ import annotations

import inspect

import dspy
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs OpenTelemetry: pip install -e '.[test,otel]'")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="needs opentelemetry-exporter-otlp-proto-http")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from dspy_anyscale import Anyscale, tracing
from dspy_anyscale.testing import Fault

from ..conftest import MODEL, SECRET

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def phoenix(pytestconfig):
    """A real Phoenix on 127.0.0.1, installed on first use."""
    from dspy_anyscale.servers import phoenix

    # The first install takes a minute or more: let its progress reach the terminal.
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        phoenix.ensure_installed()
    with phoenix.start() as server:
        yield server


@pytest.fixture
def exported(phoenix):
    """Tracing on, every span sent to Phoenix as it ends."""
    provider = TracerProvider(resource=Resource.create({"service.name": "dspy-anyscale-tests"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=phoenix.otlp_traces_url, timeout=10)))
    tracing.instrument(tracer_provider=provider)
    yield provider
    tracing.uninstrument()
    provider.shutdown()


def traced_lm(stub, **kwargs):
    lm = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, use_chat_api=True, **kwargs)
    if "tracing" not in inspect.signature(Anyscale.__init__).parameters:  # until the constructor has the option
        observer = tracing.tracing_observer(None, base_url=lm.api_base, endpoint="chat")
        for engine in (lm._engine_spec, lm._async_engine_spec):
            engine.observers = (*engine.observers, observer)
    return lm


def test_phoenix_receives_a_chain_of_thought_call_with_a_retry(exported, phoenix, stub):
    stub.script(Fault(status=503, headers={"Retry-After": "0"}))
    lm = traced_lm(stub)
    dspy.configure(lm=lm)
    tracer = exported.get_tracer("tests")
    try:
        with tracer.start_as_current_span("answer a question") as root:
            prediction = dspy.ChainOfThought("question -> answer")(question="Which ocean is the largest?")
    finally:
        lm.close()
    assert prediction.answer == "answer for Which ocean is the largest?"
    trace_id = format(root.get_span_context().trace_id, "032x")

    spans = phoenix.wait_for_spans(4, trace_id=trace_id)
    by_name = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    assert sorted(by_name) == sorted(["answer a question", f"chat {MODEL}", "POST /v1/chat/completions"]), by_name
    (stored_root,) = by_name["answer a question"]
    (call,) = by_name[f"chat {MODEL}"]
    first, second = sorted(by_name["POST /v1/chat/completions"], key=lambda s: s["start_time"])

    assert call["parent_id"] == stored_root["context"]["span_id"]
    assert first["parent_id"] == second["parent_id"] == call["context"]["span_id"]
    assert {s["context"]["trace_id"] for s in spans} == {trace_id}

    attributes = flat(call["attributes"])
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "anyscale"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == MODEL
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["dspy_anyscale.attempts"] == 2 and attributes["dspy_anyscale.cache_hit"] is False
    assert call["status_code"] == "UNSET"

    assert flat(first["attributes"])["error.type"] == "ServerError" and first["status_code"] == "ERROR"
    assert flat(first["attributes"])["http.response.status_code"] == 503
    assert flat(second["attributes"])["dspy_anyscale.attempt.number"] == 1
    assert flat(second["attributes"])["dspy_anyscale.attempt.waited_s"] >= 0
    assert flat(second["attributes"])["http.response.status_code"] == 200

    stored = repr(phoenix.spans(limit=1000))
    assert SECRET not in stored and "Which ocean" not in stored, "no key, and no prompt without record_content"


def flat(attributes: dict, prefix: str = "") -> dict:
    """Phoenix nests attributes by the dots in their names; the conventions' names are the dotted ones."""
    result = {}
    for key, value in attributes.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            result.update(flat(value, f"{name}."))
        else:
            result[name] = value
    return result
