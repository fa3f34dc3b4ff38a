"""Against a real OpenAI-compatible server written by others: llama.cpp's llama-server serving
SmolLM2-135M-Instruct on 127.0.0.1 (see dspy_anyscale.servers.llama_server). Both endpoints, sync and async."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from dspy.utils.exceptions import ContextWindowExceededError, LMAuthError

from dspy_anyscale import Anyscale

from ..conftest import SECRET

pytestmark = pytest.mark.integration

ENDPOINTS = [pytest.param(False, id="completions"), pytest.param(True, id="chat")]
ALIAS = "smollm2-135m-instruct"
FRANCE = "What is the capital of France? Answer in one word."
CONTINUE = "The capital of France is"  # /completions: a chat model answers a bare question with EOS


def prompt_for(chat: bool) -> str:
    return FRANCE if chat else CONTINUE


@pytest.fixture
def real_lm(llama_server):
    made = []

    def make(**kwargs):
        kwargs.setdefault("api_base", llama_server.base_url)
        kwargs.setdefault("api_key", SECRET)
        kwargs.setdefault("max_tokens", 48)
        lm = Anyscale(ALIAS, **kwargs)
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close()


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_generate_both_endpoints(real_lm, chat):
    result = real_lm(use_chat_api=chat)._generate("The capital of France is", max_tokens=8)
    (choice,) = result["choices"]
    assert result["prompt"] == "The capital of France is"
    assert choice["text"].strip() and choice["finish_reason"] in ("stop", "length")


def test_direct_call_answers_paris(real_lm):
    assert "Paris" in real_lm(use_chat_api=True, temperature=0.0)(FRANCE)[0]


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_stream_matches_the_whole_answer(real_lm, chat):
    lm = real_lm(use_chat_api=chat, cache=False)
    chunks = list(lm.stream(prompt_for(chat)))
    assert len(chunks) > 1, "the answer arrived in pieces"
    assert "".join(chunks) == lm._generate(prompt_for(chat))["choices"][0]["text"]


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_async_stream(real_lm, chat):
    lm = real_lm(use_chat_api=chat, cache=False)

    async def collect():
        return [chunk async for chunk in lm.astream(prompt_for(chat))]

    assert "Paris" in "".join(asyncio.run(collect()))


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_requests_after_a_stream_reuse_a_closed_connection_transparently(real_lm, chat):
    """llama-server closes the connection after every streamed response although it advertised
    keep-alive; the next request on the pooled connection must not fail."""
    lm = real_lm(use_chat_api=chat, cache=False)
    for _ in range(3):
        assert "".join(lm.stream("Count: 1, 2,", max_tokens=4))
        assert lm._generate("Count: 1, 2,", max_tokens=4)["choices"][0]["text"]


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_concurrent_acalls(real_lm, chat):
    lm = real_lm(use_chat_api=chat, cache=False, max_tokens=12)
    prompts = [f"Write the number {i} in words:" for i in range(6)]

    async def many():
        return await asyncio.gather(*(lm.acall(p) for p in prompts))

    results = asyncio.run(many())
    assert len(results) == 6 and all(r and r[0].strip() for r in results)


def test_wrong_key_is_an_auth_error(real_lm):
    with pytest.raises(LMAuthError, match="ANYSCALE_API_KEY"):
        real_lm(api_key="wrong-key")._generate("hi")


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_over_long_prompt_is_a_context_window_error(real_lm, chat):
    with pytest.raises(ContextWindowExceededError, match="context size"):
        real_lm(use_chat_api=chat)._generate("hello " * 3000)


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_logprobs_both_endpoints(real_lm, chat):
    lm = real_lm(use_chat_api=chat)
    choice = lm._generate(prompt_for(chat), logprobs=True, top_logprobs=2, max_tokens=4)["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert tokens and all(t["logprob"] <= 0 for t in tokens)
    assert "".join(t["token"] for t in tokens) == choice["text"]


def test_usage_is_the_servers_token_count(real_lm):
    lm = real_lm(use_chat_api=True)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter(), track_usage=True):
        prediction = dspy.Predict("question -> answer")(question=FRANCE)
    usage = prediction.get_lm_usage()[ALIAS]
    last = lm.history[-1]["response"]
    assert usage["prompt_tokens"] == last.usage.input_tokens > 100
    assert usage["completion_tokens"] == last.usage.output_tokens > 0


def test_json_adapter_chain_of_thought_parses_thanks_to_schema_constrained_decoding(real_lm):
    lm = real_lm(use_chat_api=True, max_tokens=200)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = dspy.ChainOfThought("question -> answer")(question=FRANCE)
    assert isinstance(prediction.reasoning, str) and isinstance(prediction.answer, str) and prediction.answer


def test_models_lists_the_served_model(llama_server):
    assert ALIAS in [m["id"] for m in Anyscale.models(llama_server.base_url, SECRET)]
