"""Where the two real servers speak different dialects, and what the client makes of it (marker
``core_dialects``: these need the core's dialect handling).

llama-cpp-python's server takes JSON mode only in Anyscale's form ``{"type": "json_object", "schema":
...}`` and refuses OpenAI's ``json_schema`` with an HTTP 500 that holds a pydantic validation error;
it answers every request-validation error so; and its streams carry no usage. A recording proxy in
front of the server counts what the client really sends. Every LM here gets a header of its own, so
the dialect it learns is its own (the memory is per cache identity: URL, options, headers)."""

from __future__ import annotations

import logging

import dspy
import pydantic
import pytest
from dspy.utils.exceptions import LMInvalidRequestError

from dspy_anyscale import Anyscale

from ..conftest import SECRET
from ._servers import ALIAS, FRANCE, on_servers, prompt_for

pytestmark = [pytest.mark.integration, pytest.mark.core_dialects]

LOGGER = "dspy_anyscale"


class Capital(pydantic.BaseModel):
    answer: str


def json_mode(recorder) -> list[tuple[str, bool, int]]:
    """(form, carries a schema, status) of each recorded request that asked for JSON mode."""
    seen = []
    for exchange in recorder.posts():
        fmt = exchange.body.get("response_format") if isinstance(exchange.body, dict) else None
        if fmt:
            seen.append((fmt["type"], "schema" in fmt or "json_schema" in fmt, exchange.status))
    return seen


@pytest.fixture
def lm_via(recorder, request):
    """Anyscale LMs through the recording proxy, each with a dialect memory of its own."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("use_chat_api", True)
        kwargs.setdefault("cache", False)
        kwargs.setdefault("max_tokens", 200)
        headers = {"x-dspy-anyscale-test": f"{request.node.nodeid}#{len(made)}"}
        lm = Anyscale(ALIAS, api_base=recorder.base_url, api_key=SECRET, headers=headers, **kwargs)
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close()


def learned(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO and "json_object" in r.message]


# --------------------------------------------------------------------------- (a) the JSON-mode dialect

REFUSED_THEN_ANYSCALE = [("json_schema", True, 500), ("json_object", True, 200)]
ANYSCALE = [("json_object", True, 200)]
OPENAI = [("json_schema", True, 200)]
LCP = ("llama-cpp-python",)


@on_servers()
def test_auto_json_adapter_learns_each_servers_form(lm_via, recorder, server, caplog):
    """llama-cpp-python: one extra request the first time (the refused OpenAI form), none later, and
    one INFO record saying so; llama-server takes the OpenAI form: no extra request, nothing learned."""
    lm = lm_via()
    caplog.set_level(logging.INFO, logger=LOGGER)
    for question in (FRANCE, "What is the capital of Italy? Answer in one word."):
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            prediction = dspy.ChainOfThought("question -> answer")(question=question)
        assert isinstance(prediction.reasoning, str) and prediction.answer
    if server.is_llama_cpp_python:
        assert json_mode(recorder) == REFUSED_THEN_ANYSCALE + ANYSCALE, "one extra request, the first time only"
        (record,) = learned(caplog)
        assert "json_schema" in record.message and "HTTP 500" in record.message
    else:
        assert json_mode(recorder) == OPENAI + OPENAI
        assert not learned(caplog)


@on_servers(servers=LCP)
def test_auto_predict_with_the_default_adapter_falls_back_to_json_mode_and_learns(lm_via, recorder, server, caplog):
    """ChatAdapter's answer does not parse (SmolLM2 ignores its field markers), so DSPy falls back to
    JSONAdapter, whose JSON-mode request is refused once and then sent in the Anyscale form."""
    lm = lm_via()
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(2):
        with dspy.context(lm=lm):
            assert dspy.Predict("question -> answer")(question=FRANCE).answer
    assert json_mode(recorder) == REFUSED_THEN_ANYSCALE + ANYSCALE
    assert len(learned(caplog)) == 1


@on_servers(servers=LCP)
def test_openai_style_is_refused_as_an_invalid_request_without_fallback(lm_via, recorder, server):
    lm = lm_via(response_format_style="openai", num_retries=3, max_tokens=30)
    with pytest.raises(LMInvalidRequestError, match="json_object"):
        lm(FRANCE, response_format=Capital)
    assert json_mode(recorder) == [("json_schema", True, 500)], "not retried, no fallback"


@on_servers()
def test_anyscale_style_works_directly(lm_via, recorder, server):
    """Both servers take Anyscale's form (llama-server too): one request, nothing to learn."""
    lm = lm_via(response_format_style="anyscale", max_tokens=30)
    (text,) = lm(FRANCE, response_format=Capital)
    assert Capital.model_validate_json(text).answer
    assert json_mode(recorder) == ANYSCALE


# --------------------------------------------------------------------------- (b) validation errors in a 5xx


@on_servers(endpoints=True)
def test_a_body_field_of_the_wrong_type_is_an_invalid_request_not_retried(lm_via, recorder, server, chat):
    """llama-cpp-python: HTTP 500 with a pydantic validation error about the body; llama-server: 400."""
    lm = lm_via(use_chat_api=chat, num_retries=3, max_tokens=4)
    with pytest.raises(LMInvalidRequestError, match="repeat_penalty"):
        lm._generate(prompt_for(chat), repeat_penalty="high")  # a provider extra, sent verbatim
    assert [e.status for e in recorder.posts()] == [500 if server.is_llama_cpp_python else 400], "not retried"


# --------------------------------------------------------------------------- (c) unknown stream usage


@on_servers(endpoints=True, servers=LCP)
def test_a_stream_without_usage_records_unknown_tokens_not_zero(lm_via, server, chat):
    lm = lm_via(use_chat_api=chat, max_tokens=8, prices={"input": 1.0, "output": 2.0})
    with dspy.context(track_usage=True), dspy.track_usage() as tracker:
        assert "".join(lm.stream(prompt_for(chat)))
    record = lm.usage[-1]
    assert record.stream and record.status == "ok"
    assert (record.prompt_tokens, record.completion_tokens, record.cost_usd) == (None, None, None)
    history_usage = lm.history[-1].get("usage") or {}
    assert 0 not in (history_usage.get("prompt_tokens"), history_usage.get("completion_tokens"))
    totals = tracker.get_total_tokens().get(ALIAS) or {}
    assert 0 not in (totals.get("prompt_tokens"), totals.get("completion_tokens"))
