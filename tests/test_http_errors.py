"""HTTP status and body → the lm15 error class DSPy's retry loop reads; Retry-After parsing."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from dspy import lm15
from dspy.utils.exceptions import is_retryable_lm_error
from requests.structures import CaseInsensitiveDict

from dspy_anyscale._http_errors import error_detail, error_for_status, parse_retry_after
from dspy_anyscale._secrets import redact
from dspy_anyscale._text import preview

URL = "https://svc.anyscaleuserdata.com/v1/chat/completions"
SECRET = "esecret_abcdef"


def err(status, body=b"", headers=None):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return error_for_status(status, body, CaseInsensitiveDict(headers or {}), url=URL, secret=SECRET)


OPENAI_400 = {"error": {"message": "bad temperature", "type": "invalid_request_error"}}
VLLM_CONTEXT = {
    "object": "error",
    "message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens",
    "type": "BadRequestError",
    "code": 400,
}
LLAMACPP_CONTEXT = {
    "error": {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
    }
}


@pytest.mark.parametrize(
    ("status", "body", "expected", "retried"),
    [
        (401, {"error": {"message": "Invalid API key"}}, lm15.AuthError, False),
        (403, b"Forbidden", lm15.AuthError, False),
        (402, {"error": "pay up"}, lm15.BillingError, False),
        (429, {"error": {"message": "slow down"}}, lm15.RateLimitError, True),
        (400, OPENAI_400, lm15.InvalidRequestError, False),
        (400, LLAMACPP_CONTEXT, lm15.ContextLengthError, False),
        (400, VLLM_CONTEXT, lm15.ContextLengthError, False),
        (422, {"detail": [{"loc": ["body", "temperature"], "msg": "must be <= 2"}]}, lm15.InvalidRequestError, False),
        (404, {"error": {"message": "The model `x` does not exist."}}, lm15.UnsupportedModelError, False),
        (404, b"<html>Not Found</html>", lm15.InvalidRequestError, False),
        (408, b"", lm15.TimeoutError, True),
        (500, {"error": {"message": "boom"}}, lm15.ServerError, True),
        (502, b"<html><body>Bad Gateway</body></html>", lm15.ServerError, True),
        (503, b"", lm15.ServerError, True),
        (504, b"", lm15.TimeoutError, True),
        (307, b"", lm15.InvalidRequestError, False),
    ],
)
def test_status_table(status, body, expected, retried):
    error = err(status, body)
    assert type(error) is expected
    assert error.status == status
    assert URL in str(error)
    # DSPy retries exactly the transient ones, judged on its own public projection.
    from dspy.clients.errors import wrap_error

    assert is_retryable_lm_error(wrap_error(error, model="m")) is retried


def test_context_error_is_dspys_context_window_error():
    from dspy.clients.errors import wrap_error
    from dspy.utils.exceptions import ContextWindowExceededError

    assert isinstance(wrap_error(err(400, LLAMACPP_CONTEXT), model="m"), ContextWindowExceededError)


def test_rate_limit_carries_retry_after():
    assert err(429, b"", {"Retry-After": "7"}).retry_after == 7.0
    assert err(503, b"", {"retry-after": "2"}).retry_after == 2.0


def test_messages_quote_the_server_and_404_hints_at_the_prefix():
    assert "bad temperature" in str(err(400, OPENAI_400))
    assert "temperature: must be <= 2" in str(
        err(422, {"detail": [{"loc": ["body", "temperature"], "msg": "must be <= 2"}]})
    )
    assert "/v1" in str(err(404, b"Not Found"))
    assert "Bad Gateway" in str(err(502, b"<html><body>Bad Gateway</body></html>"))


def test_the_key_is_redacted_even_when_a_server_echoes_it():
    error = err(401, {"error": {"message": f"key {SECRET} is not valid"}})
    assert SECRET not in str(error) and "***" in str(error)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "3"}, 3.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "inf"}, math.inf),  # non-finite: "too long", never an exception
        ({"Retry-After": "1e400"}, math.inf),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "1e308"}, 1e308),
        ({"Retry-After": "Thu, 01 Jan 2099 00:00:00 GMT"}, pytest.approx(2.294e9, rel=0.1)),
    ],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(CaseInsensitiveDict(headers)) == expected


def test_parse_retry_after_http_date():
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    seconds = parse_retry_after(CaseInsensitiveDict({"Retry-After": format_datetime(when, usegmt=True)}))
    assert 25 <= seconds <= 31
    past = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(CaseInsensitiveDict({"Retry-After": past})) == 0.0


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        (b'{"error": {"message": "m", "type": "t"}}', "m", "t"),
        (b'{"error": "plain"}', "plain", None),
        (b'{"detail": "nope"}', "nope", None),
        (b'{"message": "flat"}', "flat", None),
        (b"not json at all", "not json at all", None),
        (b"", "(empty body)", None),
    ],
)
def test_error_detail_shapes(body, message, code):
    assert error_detail(body) == (message, code)


def test_preview_strips_html_and_truncates():
    page = b"<html><head><title>Endpoints shut down</title></head><body>" + b"x" * 1000 + b"</body></html>"
    text = preview(page)
    assert text.startswith("Endpoints shut down") and text.endswith("…") and len(text) < 320


def test_redact():
    assert redact(f"Bearer {SECRET}", SECRET) == "Bearer ***"
    assert redact("nothing", None) == "nothing"


def test_every_secret_value_sent_is_redacted_when_a_server_echoes_the_headers():
    from dspy_anyscale._http_errors import unexpected_body
    from dspy_anyscale._secrets import Secrets

    secrets = Secrets.sent_with(SECRET, {"x-portkey-virtual-key": "vk-upstream-1", "X-Auth-Token": "tok-abc-123"})
    echo = f"Authorization: Bearer {SECRET}, x-portkey-virtual-key: vk-upstream-1, X-Auth-Token: tok-abc-123"
    for error in (
        error_for_status(
            400, json.dumps({"error": {"message": echo}}).encode(), CaseInsensitiveDict(), url=URL, secret=secrets
        ),
        error_for_status(
            302, b"", CaseInsensitiveDict({"Location": "https://x/?t=tok-abc-123"}), url=URL, secret=secrets
        ),
        unexpected_body(URL, 200, echo.encode(), "Expected a JSON body", secrets),
    ):
        text = str(error)
        assert "***" in text
        assert not any(value in text for value in (SECRET, "vk-upstream-1", "tok-abc-123")), text
