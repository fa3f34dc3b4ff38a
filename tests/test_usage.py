"""Every call accounted for: usage records, cost, the JSON-lines log, the summary CLI, /models,
the catalogue, and Portkey's headers."""

from __future__ import annotations

import asyncio
import json
import pickle
import socket

import dspy
import pytest
from dspy.utils.exceptions import LMAuthError

from dspy_anyscale import (
    PORTKEY_GATEWAY_URL,
    Anyscale,
    ConfigurationError,
    Prices,
    model_info,
    portkey_headers,
    summarize,
)
from dspy_anyscale.cli import main as cli
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


def test_usage_cli_summarises_a_log(make_lm, stub, tmp_path, capsys):
    log = tmp_path / "usage.jsonl"
    lm = make_lm(use_chat_api=True, usage_log=log, cache=False)
    for i in range(4):
        lm(f"call {i}")
    stub.script(Fault(status=401))
    with pytest.raises(LMAuthError):
        lm("denied")
    assert cli(["usage", str(log)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(MODEL))
    calls, errors, cached = row.split()[1:4]
    assert (calls, errors, cached) == ("5", "1", "0")
    total = sum(r.cost_usd for r in lm.usage if r.status == "ok")
    assert f"{total:.6f}" in row and "p50 ms" in out and "p95 ms" in out


def test_usage_cli_on_a_missing_file_says_so(capsys, tmp_path):
    assert cli(["usage", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_summary_percentiles():
    rows = [
        {"model": "m", "status": "ok", "latency_ms": ms, "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.5}
        for ms in range(1, 101)
    ]
    (summary,) = summarize(rows)
    assert (summary.calls, summary.p50_ms, summary.p95_ms, summary.cost_usd) == (100, 50, 95, 50.0)


# --- catalogue and /models ----------------------------------------------------------------------


def test_model_info():
    info = model_info("meta-llama/Llama-2-70b-chat-hf")
    assert (info.context_window, info.prices) == (4096, Prices(1.0, 1.0))
    assert model_info("ANYSCALE/mistralai/Mixtral-8x7B-Instruct-v0.1").context_window == 32768
    assert model_info("my-org/unknown") is None


def test_models_lists_the_endpoint_with_rayllm_model_type(stub):
    stub.models = [
        {
            "id": "meta-llama/Llama-2-70b-chat-hf",
            "object": "model",
            "owned_by": "system",
            "rayllm_metadata": {
                "engine_config": {"model_id": "meta-llama/Llama-2-70b-chat-hf", "model_type": "text-generation"}
            },
        },
        {
            "id": "thenlper/gte-large",
            "object": "model",
            "owned_by": "system",
            "rayllm_metadata": {"engine_config": {"model_type": "embedding"}},
        },
    ]
    models = Anyscale.models(api_base=stub.base_url, api_key=SECRET)
    assert models == [
        {"id": "meta-llama/Llama-2-70b-chat-hf", "owned_by": "system", "model_type": "text-generation"},
        {"id": "thenlper/gte-large", "owned_by": "system", "model_type": "embedding"},
    ]


def test_models_cli(stub, capsys, monkeypatch):
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    assert cli(["models", "--api-base", stub.base_url]) == 0
    assert capsys.readouterr().out.strip() == MODEL


def test_construction_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network during construction")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    lm = Anyscale(MODEL, api_base="http://10.255.255.1:9/v1", api_key="k", use_chat_api=True)
    assert lm.api_base == "http://10.255.255.1:9/v1"


# --- Portkey --------------------------------------------------------------------------------------


def test_portkey_headers(monkeypatch):
    monkeypatch.setenv("PORTKEY_API_KEY", "pk-env")
    headers = portkey_headers(
        custom_host="http://svc:8000/v1/",
        trace_id="run-1",
        metadata={"team": "search"},
        cache="simple",
        retry_count=2,
        virtual_key="vk-1",
    )
    assert headers == {
        "x-portkey-api-key": "pk-env",
        "x-portkey-provider": "anyscale",
        "x-portkey-virtual-key": "vk-1",
        "x-portkey-custom-host": "http://svc:8000/v1",
        "x-portkey-trace-id": "run-1",
        "x-portkey-metadata": '{"team":"search"}',
        "x-portkey-cache": "simple",
        "x-portkey-retry-count": "2",
    }
    config = {"strategy": {"mode": "fallback"}, "targets": [{"provider": "anyscale"}, {"provider": "openai"}]}
    with_config = portkey_headers(api_key="pk-arg", config=config)
    assert json.loads(with_config["x-portkey-config"]) == config and "x-portkey-provider" not in with_config
    assert with_config["x-portkey-api-key"] == "pk-arg"
    assert PORTKEY_GATEWAY_URL == "https://api.portkey.ai/v1"


def test_portkey_without_a_key_sends_none(monkeypatch):
    monkeypatch.delenv("PORTKEY_API_KEY", raising=False)
    assert "x-portkey-api-key" not in portkey_headers()


def test_gateway_headers_go_on_every_request_and_secrets_stay_out_of_saved_state(make_lm, stub, monkeypatch):
    headers = portkey_headers(api_key="pk-secret-9", trace_id="run-7")
    lm = make_lm(use_chat_api=True, headers=headers)
    lm("via gateway")
    sent = stub.posts()[0].headers
    assert sent["x-portkey-api-key"] == "pk-secret-9" and sent["x-portkey-trace-id"] == "run-7"
    state = lm.dump_state()
    assert "pk-secret-9" not in json.dumps(state) and state["secret_headers"] == ["x-portkey-api-key"]
    data = pickle.dumps(lm)
    assert b"pk-secret-9" not in data
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    monkeypatch.setenv("PORTKEY_API_KEY", "pk-from-env")
    restored = pickle.loads(data)
    restored("after unpickling")
    assert stub.posts()[-1].headers["x-portkey-api-key"] == "pk-from-env"
    loaded = Anyscale.load_state(state)
    loaded("after loading")
    assert stub.posts()[-1].headers["x-portkey-api-key"] == "pk-from-env"
    assert stub.posts()[-1].headers["x-portkey-trace-id"] == "run-7"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("Authorization", True),
        ("x-portkey-api-key", True),
        ("X-Api-Key", True),
        ("x_access_token", True),
        ("Cookie", True),
        ("x-portkey-provider", False),
        ("x-portkey-trace-id", False),
        ("X-Team", False),
        ("x-portkey-custom-host", False),
        ("x-portkey-virtual-key", True),
    ],
)
def test_which_header_values_are_secret(name, secret):
    from dspy_anyscale._secrets import is_secret_header

    assert is_secret_header(name) is secret
