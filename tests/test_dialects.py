"""Server dialects: a refusal of OpenAI's JSON-mode form is resent at once in Anyscale's form and
remembered; a 5xx that is a request-validation error is an invalid request, not a server fault."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import dspy
import pytest
from dspy.utils.exceptions import LMAuthError, LMInvalidRequestError, LMServerError

from dspy_anyscale._dialects import MEMO
from dspy_anyscale._http_errors import error_for_status, is_request_validation_error
from dspy_anyscale.errors import BudgetExceededError
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


# --- a changed server is relearned; both forms refused is said once; other errors are not resent ----

# vLLM's error shape, refusing the json_object+schema spelling a llama-cpp-python server took.
VLLM_REFUSAL = Fault(
    status=400,
    body={"object": "error", "message": "response_format.schema: Extra inputs are not permitted", "code": 400},
)


def _learn_anyscale(lm, stub, question="first"):
    stub.reset()
    stub.script(REFUSALS["llama-cpp-python 500"])
    assert _json_predict(lm, question) == f"answer for {question}"
    assert _formats(stub) == ["json_schema", "json_object"]


def test_a_server_replaced_behind_the_same_url_is_relearned(make_lm, stub, caplog):
    lm = make_lm(use_chat_api=True, num_retries=0)
    _learn_anyscale(lm, stub)
    stub.script(VLLM_REFUSAL)  # the server behind the URL is now vLLM
    with caplog.at_level(logging.INFO, logger="dspy_anyscale"):
        assert _json_predict(lm, "second") == "answer for second"
    assert _formats(stub)[2:] == ["json_object", "json_schema"], "the remembered form refused: the other one sent"
    assert _json_predict(lm, "third") == "answer for third"
    assert _formats(stub)[4:] == ["json_schema"], "relearned: the OpenAI form first again"
    relearned = [r.getMessage() for r in caplog.records if "from now on" in r.getMessage()]
    assert len(relearned) == 1 and "took the OpenAI json_schema form" in relearned[0]


SCHEMA = {"type": "json_schema", "json_schema": {"schema": {}}}
RELEARNING_CALLS = {
    "stream": lambda lm: "".join(lm.stream("q", response_format=SCHEMA)),
    "async stream": lambda lm: asyncio.run(_joined(lm.astream("q", response_format=SCHEMA))),
    "async call": lambda lm: asyncio.run(lm.acall("q", response_format=SCHEMA))[0],
}


async def _joined(chunks):
    return "".join([chunk async for chunk in chunks])


@pytest.mark.parametrize("kind", list(RELEARNING_CALLS))
def test_a_replaced_server_is_relearned_by_streams_and_async_calls(make_lm, stub, kind):
    lm = make_lm(use_chat_api=True, num_retries=0)
    _learn_anyscale(lm, stub)
    stub.script(VLLM_REFUSAL)
    assert RELEARNING_CALLS[kind](lm) == "echo: q"
    assert _formats(stub)[2:] == ["json_object", "json_schema"]
    assert lm("after", response_format=SCHEMA) == ["echo: after"]
    assert _formats(stub)[4:] == ["json_schema"]


def test_a_server_refusing_both_forms_says_so_once_with_the_first_refusal(make_lm, stub):
    first = "response_format json_schema is not supported by this deployment"
    second = "response_format.schema: Extra inputs are not permitted"
    stub.script(
        Fault(status=400, body={"error": {"message": first}}), Fault(status=400, body={"error": {"message": second}})
    )
    lm = make_lm(use_chat_api=True, num_retries=3)
    with pytest.raises(LMInvalidRequestError) as caught:
        _json_predict(lm)
    text = str(caught.value)
    assert "refused response_format in both JSON-mode forms" in text
    assert text.count(first) == 1 and text.count(second) == 1 and text.index(first) < text.index(second)
    assert "supports_response_schema=False" in text
    assert _formats(stub) == ["json_schema", "json_object"], "one resend, no DSPy retry of a refusal"
    assert _json_predict(lm) == "answer for q"
    assert _formats(stub)[2:] == ["json_schema"], "nothing was learned"


@pytest.mark.parametrize(
    "message",
    ["Only one system message can be specified", "temperature must be between 0 and 2"],
)
def test_an_unrelated_400_on_a_json_call_is_not_resent(make_lm, stub, message):
    stub.script(Fault(status=400, body={"error": {"message": message}}))
    lm = make_lm(use_chat_api=True, num_retries=3)
    with pytest.raises(LMInvalidRequestError, match=message):
        _json_predict(lm)
    assert _formats(stub) == ["json_schema"]


def test_a_resend_failing_for_another_reason_raises_that_error(make_lm, stub):
    stub.script(REFUSALS["plain 400"], Fault(status=401, body={"error": {"message": "key revoked"}}))
    lm = make_lm(use_chat_api=True, num_retries=0)
    with pytest.raises(LMAuthError, match="key revoked"):
        _json_predict(lm)


def test_two_gateway_virtual_keys_learn_their_dialects_apart(make_lm, stub, tmp_path, monkeypatch):
    """A virtual key picks the upstream behind a gateway: what one upstream takes says nothing of another."""
    monkeypatch.setenv("DSPY_ANYSCALE_IDENTITY_KEY_FILE", str(tmp_path / "identity.key"))
    one = make_lm(use_chat_api=True, headers={"x-portkey-virtual-key": "vk-llama-cpp-python"})
    two = make_lm(use_chat_api=True, headers={"x-portkey-virtual-key": "vk-vllm"})
    _learn_anyscale(one, stub)
    assert _json_predict(two, "other upstream") == "answer for other upstream"
    assert _formats(stub)[2:] == ["json_schema"]


# --- a resend is a request: the LM's limits count it and admit it ---------------------------------


@pytest.mark.parametrize("kind", ["call", "async call", "stream", "async stream"])
def test_a_resend_is_a_request_of_its_own_under_max_requests(make_lm, stub, kind):
    lm = make_lm(use_chat_api=True, max_requests=2, cache=False)
    form = {"type": "json_schema", "json_schema": {"schema": {}}}

    def ask(prompt):
        if kind == "call":
            return lm(prompt, response_format=form)[0]
        if kind == "async call":
            return asyncio.run(lm.acall(prompt, response_format=form))[0]
        if kind == "stream":
            return "".join(lm.stream(prompt, response_format=form))

        async def consume():
            return "".join([chunk async for chunk in lm.astream(prompt, response_format=form)])

        return asyncio.run(consume())

    stub.script(REFUSALS["llama-cpp-python 500"])
    assert ask("first") == "echo: first"
    assert _formats(stub) == ["json_schema", "json_object"]
    report = lm.spending()
    assert (report.requests, report.remaining_requests, report.in_flight) == (2, 0, 0), "refusal and resend both count"
    with pytest.raises(BudgetExceededError):
        ask("second")
    assert len(stub.posts()) == 2, "nothing sent past max_requests"


def test_a_resend_that_does_not_fit_max_requests_is_not_sent(make_lm, stub):
    lm = make_lm(use_chat_api=True, max_requests=1, cache=False)
    stub.script(REFUSALS["llama-cpp-python 500"])
    with pytest.raises(BudgetExceededError, match="max_requests"):
        lm("first", response_format={"type": "json_schema", "json_schema": {"schema": {}}})
    assert _formats(stub) == ["json_schema"], "the refused request counted; the resend was not admitted"
    assert lm.spending().in_flight == 0
