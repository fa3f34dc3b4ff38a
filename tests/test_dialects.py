"""Server dialects: a refusal of OpenAI's JSON-mode form is resent at once in Anyscale's form and
remembered; a 5xx that is a request-validation error is an invalid request, not a server fault."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import dspy
import pytest
from dspy.utils.exceptions import LMInvalidRequestError, LMServerError

from dspy_anyscale._dialects import MEMO
from dspy_anyscale._http_errors import error_for_status, is_request_validation_error
from dspy_anyscale.testing import Fault

# How llama-cpp-python's server refuses {"type": "json_schema"}: an HTTP 500 carrying pydantic's message.
LLAMA_CPP_PYTHON_REFUSAL = {
    "error": {
        "message": "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input should be "
        "'text' or 'json_object' [type=literal_error, input_value='json_schema', input_type=str]",
        "type": "internal_server_error",
    }
}
FASTAPI_REFUSAL = {
    "detail": [
        {
            "type": "literal_error",
            "loc": ["body", "response_format", "type"],
            "msg": "Input should be 'text' or 'json_object'",
            "input": "json_schema",
        }
    ]
}
# What llama-cpp-python 0.3.36 really sends (seen in the integration tests): FastAPI's error list as text.
LLAMA_CPP_PYTHON_REAL = {
    "error": {
        "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
        "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}\n\n  File "
        '"/venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in create_chat_completion',
        "type": "internal_server_error",
    }
}
REFUSALS = {
    "llama-cpp-python 500": Fault(status=500, body=LLAMA_CPP_PYTHON_REFUSAL),
    "llama-cpp-python 500 as sent": Fault(status=500, body=LLAMA_CPP_PYTHON_REAL),
    "FastAPI 422": Fault(status=422, body=FASTAPI_REFUSAL),
    "plain 400": Fault(status=400, body={"error": {"message": "response_format json_schema is not supported"}}),
}


@pytest.fixture(autouse=True)
def _fresh_memo():
    MEMO.forget()
    yield
    MEMO.forget()


def _formats(stub):
    return [post.body.get("response_format", {}).get("type") for post in stub.posts()]


def _json_predict(lm, question="q"):
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        return dspy.Predict("question -> answer")(question=question).answer


@pytest.mark.parametrize("refusal", list(REFUSALS.values()), ids=list(REFUSALS))
def test_auto_resends_in_the_anyscale_form_and_remembers(make_lm, stub, caplog, refusal):
    stub.script(refusal)
    lm = make_lm(use_chat_api=True, num_retries=3)
    with caplog.at_level(logging.INFO, logger="dspy_anyscale"):
        assert _json_predict(lm, "first") == "answer for first"
    assert _formats(stub) == ["json_schema", "json_object"], "one refusal, one resend: no DSPy retry"
    assert stub.posts()[1].body["response_format"]["schema"]["properties"].keys() == {"answer"}
    learned = [r for r in caplog.records if "json_object+schema" in r.getMessage()]
    assert len(learned) == 1 and learned[0].levelno == logging.INFO
    assert _json_predict(lm, "second") == "answer for second"
    assert _json_predict(lm.copy(temperature=0.3), "third") == "answer for third"
    assert _formats(stub)[2:] == ["json_object", "json_object"], "the LM and its copies remember the dialect"
    assert [r.status for r in lm.usage] == ["ok", "ok", "ok"]


def test_auto_learns_on_async_calls_and_streams(make_lm, stub):
    stub.script(REFUSALS["llama-cpp-python 500"])
    lm = make_lm(use_chat_api=True)

    async def run():
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            return (await dspy.Predict("question -> answer").acall(question="async")).answer

    assert asyncio.run(run()) == "answer for async"
    MEMO.forget()
    stub.script(REFUSALS["llama-cpp-python 500"])
    text = "".join(lm.stream("streamed", response_format={"type": "json_schema", "json_schema": {"schema": {}}}))
    assert text == "echo: streamed"
    assert _formats(stub) == ["json_schema", "json_object", "json_schema", "json_object"]


@pytest.mark.parametrize("style", ["openai", "anyscale"])
def test_a_forced_style_never_resends(make_lm, stub, style):
    stub.script(REFUSALS["llama-cpp-python 500"])
    lm = make_lm(use_chat_api=True, response_format_style=style, num_retries=3)
    if style == "openai":
        with pytest.raises(LMInvalidRequestError, match="validation error"):
            _json_predict(lm)
        assert _formats(stub) == ["json_schema"], "refused once, not retried, not resent"
    else:
        stub.reset()
        assert _json_predict(lm) == "answer for q"
        assert _formats(stub) == ["json_object"]


def test_a_resend_that_also_fails_raises_and_learns_nothing(make_lm, stub):
    stub.script(REFUSALS["plain 400"], Fault(status=400, body={"error": {"message": "bad schema"}}))
    lm = make_lm(use_chat_api=True, num_retries=0)
    with pytest.raises(LMInvalidRequestError, match="bad schema"):
        _json_predict(lm)
    assert _json_predict(lm) == "answer for q"
    assert _formats(stub) == ["json_schema", "json_object", "json_schema"], "nothing was learned"


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=401, body={"error": {"message": "bad key"}}),
        Fault(status=400, body={"error": {"message": "the request exceeds the available context size"}}),
        Fault(status=500, body={"error": {"message": "CUDA out of memory"}}, headers={"Retry-After": "0"}),
    ],
    ids=["auth", "context", "server fault"],
)
def test_other_failures_are_not_dialect_refusals(make_lm, stub, fault):
    stub.script(fault)
    lm = make_lm(use_chat_api=True, num_retries=1)
    with contextlib.suppress(Exception):
        _json_predict(lm)
    assert _formats(stub)[:2] != ["json_schema", "json_object"]


# --- 5xx that are request-validation errors ------------------------------------------------------------


@pytest.mark.parametrize("body", [LLAMA_CPP_PYTHON_REFUSAL, FASTAPI_REFUSAL], ids=["pydantic text", "FastAPI detail"])
def test_a_5xx_validation_error_is_an_invalid_request_and_not_retried(make_lm, stub, body):
    stub.script(Fault(status=500, body=body))
    lm = make_lm(use_chat_api=True, num_retries=3)
    with pytest.raises(LMInvalidRequestError, match="not retried"):
        lm._generate("q", min_p="not a number")
    assert len(stub.posts()) == 1


def test_other_5xx_stay_retried_server_errors(make_lm, stub):
    stub.script(*[Fault(status=500, body={"error": {"message": "1 validation error for ChatCompletionResponse"}})] * 2)
    lm = make_lm(use_chat_api=True, num_retries=1)
    with pytest.raises(LMServerError):
        lm._generate("q")
    assert len(stub.posts()) == 2, "a server failing on its own output is a server fault: retried"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"detail": [{"loc": ["body", "temperature"], "msg": "bad"}]}', True),
        (b'{"detail": [{"loc": ["query", "x"], "msg": "bad"}]}', False),
        (b'{"error": {"message": "2 validation errors for CreateCompletionRequest"}}', True),
        (b"{\"error\": {\"message\": \"[{'type': 'x', 'loc': ('body', 'n'), 'msg': 'bad'}]\"}}", True),
        (b'{"error": {"message": "1 validation error for Response"}}', False),
        (b"Internal Server Error", False),
    ],
)
def test_request_validation_error_detection(body, expected):
    assert is_request_validation_error(body) is expected
    error = error_for_status(500, body, {}, url="http://h/v1/chat/completions", secret=None)
    assert (type(error).__name__ == "InvalidRequestError") is expected
