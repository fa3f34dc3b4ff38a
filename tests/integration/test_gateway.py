"""Through the real open-source Portkey gateway (npm @portkey-ai/gateway 1.15.2) on 127.0.0.1, in
front of llama-server: routing headers, both endpoints, /models, a fallback config, streaming (with
this project's preload fixing the gateway's Node 20 bug), and errors."""

from __future__ import annotations

import asyncio
import socket

import dspy
import pytest
from dspy.utils.exceptions import ContextWindowExceededError, LMAuthError, LMServerError

from dspy_anyscale import Anyscale, portkey_headers

from ..conftest import SECRET

pytestmark = pytest.mark.integration

ALIAS = "smollm2-135m-instruct"
ENDPOINTS = [pytest.param(False, id="completions"), pytest.param(True, id="chat")]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe closes


@pytest.fixture
def via_gateway(portkey_gateway, llama_server):
    made = []

    def make(provider: str = "openai", config=None, api_key: str = SECRET, **kwargs):
        headers = portkey_headers(
            provider=provider,
            custom_host=None if config else llama_server.base_url,
            config=config,
            trace_id="dspy-anyscale-tests",
        )
        lm = Anyscale(
            ALIAS,
            api_base=portkey_gateway.url,
            api_key=api_key,
            headers=headers,
            max_tokens=kwargs.pop("max_tokens", 16),
            **kwargs,
        )
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close()


@pytest.mark.parametrize("provider", ["openai", "anyscale"])
@pytest.mark.parametrize("chat", ENDPOINTS)
def test_generate_through_the_gateway(via_gateway, provider, chat):
    lm = via_gateway(provider, use_chat_api=chat)
    prompt = "What is the capital of France? Answer in one word." if chat else "The capital of France is"
    (choice,) = lm._generate(prompt)["choices"]
    assert "Paris" in choice["text"]
    (record,) = lm.usage
    assert record.status == "ok" and record.prompt_tokens > 0 and record.completion_tokens > 0


def test_a_program_through_the_gateway(via_gateway):
    lm = via_gateway("openai", use_chat_api=True, max_tokens=200)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = dspy.ChainOfThought("question -> answer")(question="What is the capital of France?")
    assert "Paris" in prediction.answer


def test_models_through_the_gateway(portkey_gateway, llama_server):
    headers = portkey_headers(provider="openai", custom_host=llama_server.base_url)
    assert ALIAS in [m["id"] for m in Anyscale.models(portkey_gateway.url, SECRET, headers=headers)]


def test_fallback_config_skips_a_dead_target(via_gateway, llama_server):
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    config = {
        "strategy": {"mode": "fallback"},
        "targets": [
            {"provider": "openai", "custom_host": dead, "api_key": "unused"},
            {"provider": "openai", "custom_host": llama_server.base_url, "api_key": SECRET},
        ],
    }
    lm = via_gateway(config=config, api_key="", use_chat_api=True)
    assert "Paris" in lm("What is the capital of France? Answer in one word.")[0]


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_streaming_through_the_gateway_with_usage(via_gateway, chat):
    lm = via_gateway("openai", use_chat_api=chat, cache=False)
    prompt = "What is the capital of France? Answer in one word." if chat else "The capital of France is"
    chunks = list(lm.stream(prompt))
    assert len(chunks) > 1 and "Paris" in "".join(chunks)
    (record,) = lm.usage
    assert record.stream and record.completion_tokens > 0, "the usage chunk came through"


def test_streaming_with_the_anyscale_provider_loses_usage_but_not_text(via_gateway):
    """The gateway's `anyscale` provider drops stream_options, so no usage chunk comes back."""
    lm = via_gateway("anyscale", use_chat_api=True, cache=False)

    async def collect():
        return "".join([chunk async for chunk in lm.astream("What is the capital of France? Answer in one word.")])

    assert "Paris" in asyncio.run(collect())
    assert (lm.usage[0].status, lm.usage[0].completion_tokens) == ("ok", None), "unknown, not 0"


def test_errors_through_the_gateway_keep_their_meaning(via_gateway):
    with pytest.raises(LMAuthError):
        via_gateway("openai", api_key="wrong-key", use_chat_api=True)("hi")
    with pytest.raises(ContextWindowExceededError):
        via_gateway("openai", use_chat_api=True)("hello " * 3000)


def test_an_unreachable_upstream_is_a_retried_server_error(portkey_gateway):
    headers = portkey_headers(provider="openai", custom_host=f"http://127.0.0.1:{closed_port()}/v1")
    lm = Anyscale(ALIAS, api_base=portkey_gateway.url, api_key=SECRET, headers=headers, num_retries=1)
    with pytest.raises(LMServerError, match="ECONNREFUSED"):
        lm("hi")
    assert lm.usage[0].attempts == 2, "DSPy retried the 500"
