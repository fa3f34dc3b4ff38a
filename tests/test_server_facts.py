"""The server's own facts: the answer's id, its cached prompt tokens (priced at prices["cached_input"]) and
its x-ratelimit-* headers, in usage records, history and spans; a remaining count of 0 holds the next caller."""

from __future__ import annotations

import time

import pytest

from dspy_anyscale import Anyscale
from dspy_anyscale._server_facts import cooldown_s, duration_s, rate_limit_headers
from dspy_anyscale.catalog import Prices
from dspy_anyscale.errors import ConfigurationError

from .conftest import MODEL, SECRET

PRICES = {"input": 1.0, "output": 2.0, "cached_input": 0.25}
RATE_HEADERS = {
    "x-ratelimit-limit-requests": "100",
    "x-ratelimit-remaining-requests": "42",
    "x-ratelimit-remaining-tokens": "9000",
    "x-ratelimit-reset-requests": "6m0s",
}


def test_cached_prompt_tokens_are_recorded_and_priced(make_lm, stub):
    stub.cached_tokens = 3
    lm = make_lm(use_chat_api=True, prices=PRICES, cache=False)
    lm("one two three four five six")
    (record,) = lm.usage
    assert record.cached_tokens == 3 and record.prompt_tokens > 3
    expected = ((record.prompt_tokens - 3) * 1.0 + 3 * 0.25 + record.completion_tokens * 2.0) / 1e6
    assert record.cost_usd == pytest.approx(expected)
    entry = lm.history[-1]
    assert entry["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    assert entry["cost"] == pytest.approx(expected)  # history and usage priced alike
    assert entry["cost_details"]["metadata"]["usd_per_million_tokens"]["cached_input"] == 0.25


def test_without_a_cached_price_cached_tokens_cost_the_input_price(make_lm, stub):
    stub.cached_tokens = 3
    lm = make_lm(use_chat_api=True, prices={"input": 1.0, "output": 2.0}, cache=False)
    lm("one two three four")
    (record,) = lm.usage
    assert record.cost_usd == pytest.approx((record.prompt_tokens * 1.0 + record.completion_tokens * 2.0) / 1e6)


def test_the_answers_id_and_rate_limit_headers_are_recorded(make_lm, stub):
    stub.response_headers = dict(RATE_HEADERS)
    lm = make_lm(use_chat_api=True, cache=False)
    lm("hello")
    list(lm.stream("a stream"))
    plain, streamed = lm.usage
    for record in (plain, streamed):
        assert record.response_ids and record.response_ids[0].startswith("cmpl-")
        assert record.rate_limit == {
            "limit-requests": "100",
            "remaining-requests": "42",
            "remaining-tokens": "9000",
            "reset-requests": "6m0s",
        }
    entry = lm.history[0]
    assert entry["response_ids"] == list(plain.response_ids) and entry["rate_limit"] == plain.rate_limit
    assert '"response_ids":["cmpl-' in plain.to_json() and '"remaining-requests":"42"' in plain.to_json()


def test_the_attempt_span_carries_the_servers_facts(make_lm, stub):
    pytest.importorskip("opentelemetry.sdk")
    from dspy_anyscale import tracing

    from .tracing.test_tracing import Telemetry

    telemetry = Telemetry()
    tracing.instrument(telemetry.tracer_provider, telemetry.meter_provider)
    try:
        stub.response_headers = dict(RATE_HEADERS)
        stub.cached_tokens = 2
        lm = make_lm(use_chat_api=True, cache=False)
        lm("hello world again")
    finally:
        tracing.uninstrument()
    (attempt,) = telemetry.attempts()
    (call,) = telemetry.calls()
    response_id = lm.usage[0].response_ids[0]
    assert attempt.attributes["gen_ai.response.id"] == call.attributes["gen_ai.response.id"] == response_id
    assert attempt.attributes["gen_ai.usage.cache_read.input_tokens"] == 2
    assert call.attributes["gen_ai.usage.cache_read.input_tokens"] == 2
    assert attempt.attributes["http.response.header.x-ratelimit-remaining-requests"] == ("42",)


def test_a_remaining_count_of_zero_holds_the_next_caller(make_lm, stub):
    reset = 0.4
    stub.response_headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{reset}s"}
    lm = make_lm(use_chat_api=True, cache=False, max_concurrency=4)
    lm("first")
    assert lm.spending().cooldown_s > 0  # no 429 came: the headers started the cool-down
    started = time.monotonic()
    lm("second")
    assert time.monotonic() - started >= reset * 0.9  # it waited for the reset before sending
    assert len(stub.posts()) == 2


def test_remaining_requests_or_no_limits_hold_nobody(make_lm, stub):
    stub.response_headers = {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "30s"}
    limited = make_lm(use_chat_api=True, cache=False, max_concurrency=4)
    limited("first")
    assert limited.spending().cooldown_s == 0
    stub.response_headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}
    unlimited = make_lm(use_chat_api=True, cache=False)  # no limits: only a 429 starts a cool-down
    unlimited("first")
    started = time.monotonic()
    unlimited("second")
    assert time.monotonic() - started < 30


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("soon", None), ("-1", None)],
)
def test_reset_durations(text, seconds):
    assert duration_s(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_cooldown_from_headers():
    assert cooldown_s({"remaining-tokens": "0", "reset-tokens": "250ms", "remaining-requests": "3"}) == 0.25
    assert cooldown_s({"remaining-requests": "0", "reset-requests": "junk"}) == 1.0  # the default second
    assert cooldown_s({"remaining-requests": "many"}) is None and cooldown_s(None) is None


def test_rate_limit_headers_are_read_case_insensitively_and_kept_short():
    from requests.structures import CaseInsensitiveDict

    headers = CaseInsensitiveDict({"X-RateLimit-Remaining-Requests": "7", "X-Other": "x"})
    assert rate_limit_headers(headers) == {"remaining-requests": "7"}
    assert rate_limit_headers(CaseInsensitiveDict({"x-ratelimit-reset-tokens": "9" * 500}))["reset-tokens"] == "9" * 64
    assert rate_limit_headers({}) is None


def test_cached_input_prices_are_checked_and_saved(stub, monkeypatch):
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)  # a loaded LM reads its key from the environment
    assert Prices.parse(PRICES).cached_input == 0.25
    with pytest.raises(ConfigurationError, match="cached_input"):
        Prices.parse({"input": 1.0, "output": 1.0, "cached_input": 2.0})
    with pytest.raises(ConfigurationError, match="cached_input"):
        Prices.parse({"input": 1.0, "output": 1.0, "cache": 0.5})
    lm = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, prices=PRICES)
    assert lm.dump_state()["prices"] == PRICES
    assert Anyscale.load_state(lm.dump_state())._settings.prices == Prices(1.0, 2.0, 0.25)
