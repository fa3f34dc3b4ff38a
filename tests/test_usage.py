"""Every call accounted for: usage records, cost, the JSON-lines log and its summary."""

from __future__ import annotations

import asyncio
import json

import dspy
import pytest
from dspy.utils.exceptions import LMAuthError

from dspy_anyscale import (
    ConfigurationError,
    summarize,
)
from dspy_anyscale.testing import Fault

from .conftest import MODEL, SECRET

LLAMA_70B_PRICE = 1.00  # USD per million tokens, input and output


def cost_of(record, usd_per_million=LLAMA_70B_PRICE):
    return (record.prompt_tokens + record.completion_tokens) * usd_per_million / 1_000_000


def test_a_call_is_one_record_with_the_servers_tokens_and_the_catalogue_price(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    lm("Hello there")
    (record,) = lm.usage
    assert (record.model, record.endpoint, record.status) == (MODEL, "chat", "ok")
    sent = stub.posts()[0].body
    assert record.prompt_tokens == len(sent["messages"][0]["content"].split())
    assert record.completion_tokens == 3  # "echo: Hello there"
    assert record.cost_usd == pytest.approx(cost_of(record))
    assert (record.attempts, record.retries) == (1, 0)
    assert record.request_ids == ("req-1",) and record.latency_ms > 0 and record.ttft_ms is None


def test_retries_and_candidates_are_counted_in_one_record(make_lm, stub):
    stub.script(Fault(status=503, headers={"Retry-After": "0"}))
    lm = make_lm(use_chat_api=True)
    lm("Count me", n=2)
    (record,) = lm.usage
    assert (record.attempts, record.retries, record.status) == (3, 1, "ok")
    assert record.completion_tokens == 2 * 3  # two candidates of "echo: Count me"


def test_a_program_call_and_its_cache_hit(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    dspy.configure(lm=lm, track_usage=True)
    program = dspy.ChainOfThought("question -> answer")
    first = program(question="once")
    second = program(question="once")
    ok, cached = lm.usage
    assert ok.status == "ok" and ok.prompt_tokens > 0
    assert (cached.status, cached.prompt_tokens, cached.completion_tokens, cached.cost_usd) == ("cached", 0, 0, 0.0)
    assert first.get_lm_usage()[MODEL]["prompt_tokens"] == ok.prompt_tokens
    assert second.get_lm_usage() == {}, "cache hits add no usage"


def test_history_entries_carry_cost(make_lm):
    lm = make_lm(use_chat_api=True)
    dspy.configure(lm=lm)
    dspy.Predict("question -> answer")(question="what does it cost?")
    (record,) = lm.usage
    assert lm.history[-1]["cost"] == pytest.approx(record.cost_usd) and record.cost_usd > 0


def test_prices_for_a_self_hosted_deployment(make_lm):
    lm = make_lm(use_chat_api=True, model="my-org/finetuned-llama", prices={"input": 0.5, "output": 2.0})
    lm("price me")
    (record,) = lm.usage
    assert record.cost_usd == pytest.approx((record.prompt_tokens * 0.5 + record.completion_tokens * 2.0) / 1e6)


def test_unknown_price_is_unknown_not_zero(make_lm):
    lm = make_lm(use_chat_api=True, model="my-org/no-price")
    lm("who pays?")
    assert lm.usage[0].cost_usd is None
    assert summarize(lm.usage)[0].cost_usd is None


@pytest.mark.parametrize("bad", [{"input": 1}, {"input": -1, "output": 1}, {"input": "1", "output": 1}, 3])
def test_bad_prices_are_refused(make_lm, bad):
    with pytest.raises(ConfigurationError, match="prices"):
        make_lm(prices=bad)


def test_errors_are_recorded(make_lm):
    lm = make_lm(use_chat_api=True, api_key="wrong")
    with pytest.raises(LMAuthError):
        lm("no entry")
    (record,) = lm.usage
    assert (record.status, record.attempts, record.retries, record.cost_usd) == ("LMAuthError", 1, 1, 0.0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_streams_record_time_to_first_token(make_lm, stub, mode):
    stub.latency = 0.05
    lm = make_lm(use_chat_api=True, cache=False)
    if mode == "sync":
        text = "".join(lm.stream("first token please"))
    else:

        async def collect():
            return "".join([chunk async for chunk in lm.astream("first token please")])

        text = asyncio.run(collect())
    assert text == "echo: first token please"
    (record,) = lm.usage
    assert record.stream and record.status == "ok" and record.completion_tokens > 0
    assert 0 < record.ttft_ms <= record.latency_ms


def test_async_gather_makes_one_record_per_call(make_lm):
    lm = make_lm(use_chat_api=True, cache=False)

    async def many():
        await asyncio.gather(*(lm.acall(f"q{i}") for i in range(5)))

    asyncio.run(many())
    assert [r.status for r in lm.usage] == ["ok"] * 5 and all(r.attempts == 1 for r in lm.usage)


def test_usage_log_has_one_json_line_per_call_and_no_secrets(make_lm, stub, tmp_path):
    log = tmp_path / "usage.jsonl"
    lm = make_lm(use_chat_api=True, usage_log=log, headers={"X-Gateway-Key": "gw-secret-1", "X-Team": "a"})
    lm("one")
    lm("two")
    stub.script(Fault(status=400, body={"error": {"message": "nope"}}))
    with pytest.raises(Exception):  # noqa: B017 - the error itself is tested elsewhere
        lm("three")
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok", "LMInvalidRequestError"]
    assert {
        "model",
        "endpoint",
        "latency_ms",
        "ttft_ms",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "retries",
        "request_ids",
    } <= set(lines[0])
    assert SECRET not in text and "gw-secret-1" not in text


def test_usage_log_from_the_environment(make_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSCALE_USAGE_LOG", str(tmp_path / "env.jsonl"))
    make_lm(use_chat_api=True)("logged")
    assert len((tmp_path / "env.jsonl").read_text().splitlines()) == 1


def test_summary_percentiles():
    rows = [
        {"model": "m", "status": "ok", "latency_ms": ms, "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.5}
        for ms in range(1, 101)
    ]
    (summary,) = summarize(rows)
    assert (summary.calls, summary.p50_ms, summary.p95_ms, summary.cost_usd) == (100, 50, 95, 50.0)
