"""Every call accounted for: usage records, cost, the JSON-lines log and its summary."""

from __future__ import annotations

import asyncio
import json
import sys

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
    assert (record.model, record.api, record.status) == (MODEL, "chat", "ok")
    assert record.endpoint == f"127.0.0.1:{stub.port}", "the service that answered: host:port for a plain LM"
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
    assert (record.status, record.attempts, record.retries, record.cost_usd) == ("LMAuthError", 1, 0, 0.0), (
        "refused, not retried"
    )


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
        "api",
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


# --- streams stopped before their end ---------------------------------------------------------------


@pytest.fixture
def held_stream():
    """A server that streams two chunks, then holds the rest until the test ends (at most 10 s)."""
    import threading

    from .raw_server import RawServer, Reply, chat_chunk

    release = threading.Event()
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

    def events():
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "one "}}]}\n\n'
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "two "}}]}\n\n'
        release.wait(10)
        yield f"data: {json.dumps(chat_chunk('three', finish='stop', usage=usage))}\n\ndata: [DONE]\n\n".encode()

    with RawServer(lambda seen: Reply(headers={"Content-Type": "text/event-stream"}, chunks=events())) as raw:
        yield raw
        release.set()


def _stream_lm(server, **kwargs):
    from dspy_anyscale import Anyscale

    return Anyscale(
        "my-org/unpriced", api_base=server.base_url, api_key=SECRET, use_chat_api=True, cache=False, **kwargs
    )


def test_a_sync_stream_stopped_after_two_chunks_is_one_request_and_no_retry(held_stream):
    lm = _stream_lm(held_stream, prices={"input": 1.0, "output": 1.0})
    chunks = lm.stream("q")
    assert [next(chunks), next(chunks)] == ["one ", "two "]
    chunks.close()
    (record,) = lm.usage  # there when close() returns, with the attempt it made
    assert (record.status, record.attempts, record.retries, record.stream) == ("cancelled", 1, 0, True)
    # The server generated tokens it never counted for us: unknown, even with prices; never 0.
    assert (record.prompt_tokens, record.completion_tokens, record.cost_usd) == (None, None, None)
    assert record.ttft_ms is not None


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_an_astream_stopped_after_its_first_chunk_records_its_attempt(held_stream, how):
    lm = _stream_lm(held_stream)

    async def main():
        if how == "aclose":
            stream = lm.astream("q")
            assert await stream.__anext__() == "one "
            await stream.aclose()
        else:
            first = asyncio.Event()

            async def consume():
                async for _ in lm.astream("q"):
                    first.set()

            task = asyncio.ensure_future(consume())
            await asyncio.wait_for(first.wait(), 10)
            task.cancel()
            await asyncio.wait({task})
        return list(lm.usage)

    (record,) = asyncio.run(asyncio.wait_for(main(), 20))
    assert (record.status, record.attempts, record.retries) == ("cancelled", 1, 0)
    assert record.cost_usd is None, "no prices, tokens generated: unknown, never 0"


@pytest.mark.parametrize(
    "group", ["gather", pytest.param("taskgroup", marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="3.11+"))]
)
def test_a_stream_torn_down_by_asyncio_run_after_a_sibling_raised_is_cancelled_and_unknown(held_stream, group):
    lm = _stream_lm(held_stream)

    async def main():
        first = asyncio.Event()

        async def consume():
            async for _ in lm.astream("q"):
                first.set()

        async def sibling():
            await asyncio.wait_for(first.wait(), 10)
            raise ValueError("the sibling failed")

        if group == "gather":
            await asyncio.gather(consume(), sibling())
        else:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(consume())
                tasks.create_task(sibling())

    with pytest.raises(Exception) as caught:  # the sibling's error, alone or in an ExceptionGroup
        asyncio.run(main())
    assert "the sibling failed" in repr(caught.value)
    (record,) = lm.usage
    assert (record.status, record.attempts, record.retries) == ("cancelled", 1, 0)
    assert (record.completion_tokens, record.cost_usd) == (None, None)


def _attempt(ok=False, error=None, status=None, ttft=None, tokens=(None, None)):
    from dspy_anyscale._observe import Attempt, AttemptStart

    start = AttemptStart("chat", MODEL, "http://127.0.0.1/v1/chat/completions", True, 0.0, 0, None)
    return Attempt(start, ok, 0.1, error, status, ttft, tokens[0], tokens[1])


@pytest.mark.parametrize(
    ("attempts", "error", "expected"),
    [
        ([_attempt(ok=True, status=200, tokens=(10, 5))], None, (0, 15e-6)),
        ([_attempt(error="LMAuthError", status=401)], LMAuthError("no"), (0, 0.0)),
        ([_attempt(error="ServerError", status=503), _attempt(ok=True, status=200, tokens=(10, 5))], None, (1, 15e-6)),
        ([_attempt(error="ServerError", status=503)] * 3, RuntimeError("gave up"), (2, 0.0)),
        ([_attempt(error="cancelled")], asyncio.CancelledError(), (0, None)),  # in flight: maybe generating
        ([_attempt(error="cancelled", status=200, ttft=0.01)], GeneratorExit(), (0, None)),
        ([_attempt(error="TransportError", status=200, ttft=0.01)], RuntimeError("cut"), (0, None)),
        ([_attempt(ok=True, status=200, tokens=(10, 5))], GeneratorExit(), (0, 15e-6)),  # closed after the end
    ],
)
def test_retries_and_cost_of_a_record(attempts, error, expected):
    from dspy_anyscale.usage import CostTable, build_record

    record = build_record(MODEL, attempts, 0.0, error, CostTable().cost)
    assert record.retries == expected[0]
    assert record.cost_usd == (pytest.approx(expected[1]) if expected[1] else expected[1])


# --- DSPy's history: cost and cost_details agree ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "prices", "table"),
    [
        ("my-org/finetuned-llama", {"input": 0.5, "output": 2.0}, "prices="),
        (MODEL, None, "catalogue"),
    ],
)
def test_a_history_entry_with_a_cost_says_where_the_cost_came_from(make_lm, model, prices, table):
    lm = make_lm(use_chat_api=True, model=model, prices=prices)
    dspy.configure(lm=lm)
    dspy.Predict("question -> answer")(question="what does it cost?")
    lm("a direct call")
    (record, direct) = lm.usage
    for entry, usage in zip(lm.history, (record, direct), strict=True):
        details = entry["cost_details"]
        assert entry["cost"] == pytest.approx(usage.cost_usd) and entry["cost"] > 0
        assert (details["kind"], details["currency"], details["provider"], details["model"]) == (
            "estimate",
            "USD",
            "anyscale",
            model,
        )
        assert table in details["metadata"]["source"]
        expected = prices or {"input": 1.0, "output": 1.0}
        assert details["metadata"]["usd_per_million_tokens"] == expected


def test_a_history_entry_without_a_price_is_unknown_in_both_and_says_why(make_lm):
    lm = make_lm(use_chat_api=True, model="my-org/no-price")
    lm("who pays?")
    entry = lm.history[-1]
    assert entry["cost"] is None
    assert entry["cost_details"]["kind"] == "unknown" and "prices=" in entry["cost_details"]["reason"]


def test_a_cache_hit_entry_is_unknown_in_both(make_lm):
    lm = make_lm(use_chat_api=True)
    lm("twice")
    lm("twice")
    first, hit = lm.history
    assert first["cost"] > 0 and first["cost_details"]["kind"] == "estimate"
    assert hit["cost"] is None and hit["cost_details"]["kind"] == "unknown"


def test_a_summary_counts_a_stream_stopped_mid_answer_as_unknown_not_free():
    rows = [
        {"model": "m", "status": "ok", "latency_ms": 5, "prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 1e-5},
        {
            "model": "m",
            "status": "LMAuthError",
            "latency_ms": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": 0.0,
        },
        {
            "model": "m",
            "status": "cancelled",
            "latency_ms": 9,
            "prompt_tokens": None,
            "completion_tokens": None,
            "cost_usd": None,
        },
    ]
    (summary,) = summarize(rows)
    assert (summary.cost_usd, summary.unknown_tokens, summary.prompt_tokens) == (None, 1, 10)
    assert summarize(rows[:2])[0].cost_usd == pytest.approx(1e-5), "a refusal costs nothing: still known"
