"""Against real OpenAI-compatible servers written by others, each case once per server: llama.cpp's
llama-server and llama-cpp-python's server, both serving SmolLM2-135M-Instruct on 127.0.0.1 (see
conftest.py). Both endpoints, sync and async, streams, concurrency, errors, logprobs, usage, DSPy
programs. What a server cannot do is a strict xfail that names it."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from dspy import lm15
from dspy.utils.exceptions import ContextWindowExceededError, LMAuthError

from dspy_anyscale import Anyscale

from ..conftest import SECRET
from ._servers import (
    ALIAS,
    FRANCE,
    LCP_INTERRUPTS_STREAMS,
    LCP_NO_STREAM_USAGE,
    LLAMA_SERVER_NO_TOOLS,
    on_servers,
    prompt_for,
)

pytestmark = pytest.mark.integration

WEATHER_TOOL = lm15.FunctionTool(
    name="get_weather",
    description="The weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@on_servers(endpoints=True)
def test_generate_both_endpoints(real_lm, server, chat):
    result = real_lm(use_chat_api=chat)._generate("The capital of France is", max_tokens=8)
    (choice,) = result["choices"]
    assert result["prompt"] == "The capital of France is"
    assert choice["text"].strip() and choice["finish_reason"] in ("stop", "length")


@on_servers()
def test_direct_call_answers_paris(real_lm, server):
    assert "Paris" in real_lm(use_chat_api=True, temperature=0.0)(FRANCE)[0]


@on_servers(endpoints=True)
def test_stream_matches_the_whole_answer(real_lm, server, chat):
    lm = real_lm(use_chat_api=chat, cache=False)
    chunks = list(lm.stream(prompt_for(chat)))
    assert len(chunks) > 1, "the answer arrived in pieces"
    assert "".join(chunks) == lm._generate(prompt_for(chat))["choices"][0]["text"]


@on_servers(endpoints=True)
def test_async_stream(real_lm, server, chat):
    lm = real_lm(use_chat_api=chat, cache=False)

    async def collect():
        return [chunk async for chunk in lm.astream(prompt_for(chat))]

    assert "Paris" in "".join(asyncio.run(collect()))


@on_servers(endpoints=True)
def test_requests_after_a_stream_reuse_a_closed_connection_transparently(real_lm, server, chat):
    """llama-server closes the connection after every streamed response although it advertised
    keep-alive; the next request on the pooled connection must not fail."""
    lm = real_lm(use_chat_api=chat, cache=False)
    for _ in range(3):
        assert "".join(lm.stream("Count: 1, 2,", max_tokens=4))
        assert lm._generate("Count: 1, 2,", max_tokens=4)["choices"][0]["text"]


@on_servers(endpoints=True)
def test_concurrent_acalls(real_lm, server, chat):
    lm = real_lm(use_chat_api=chat, cache=False, max_tokens=12)
    prompts = [f"Write the number {i} in words:" for i in range(6)]

    async def many():
        return await asyncio.gather(*(lm.acall(p) for p in prompts))

    results = asyncio.run(many())
    assert len(results) == 6 and all(r and r[0].strip() for r in results)


@on_servers(endpoints=True, xfail={"llama-cpp-python": LCP_INTERRUPTS_STREAMS})
def test_a_stream_runs_to_the_end_while_another_request_comes_in(real_lm, server, chat):
    lm = real_lm(use_chat_api=chat, cache=False, max_tokens=24)

    async def collect(prompt):
        return [chunk async for chunk in lm.astream(prompt)]

    async def overlapping():
        first = lm.astream("Count from 1 to 100: 1, 2, 3,")
        head = await anext(first)  # the first stream is running...
        second = asyncio.ensure_future(collect("List the letters of the alphabet: A, B, C,"))  # ...when this comes
        return [head, *[chunk async for chunk in first]], await second

    first, second = asyncio.run(overlapping())
    assert len(first) >= 20 and len(second) >= 20, "24 tokens each, in pieces"


@on_servers()
def test_n_candidates_come_back_on_every_server(real_lm, server):
    """DSPy fans ``n`` out into n requests, so it works whether the server honours n (llama-server)
    or ignores it (llama-cpp-python)."""
    lm = real_lm(use_chat_api=True, cache=False, max_tokens=6, temperature=1.0)
    # only_completed=False: a sampled candidate cut at max_tokens must count too.
    assert len(lm("Name a color.", n=2, only_completed=False)) == 2


@on_servers()
def test_wrong_key_is_an_auth_error(real_lm, server):
    with pytest.raises(LMAuthError, match="ANYSCALE_API_KEY"):
        real_lm(api_key="wrong-key")._generate("hi")


@on_servers(endpoints=True)
def test_over_long_prompt_is_a_context_window_error(real_lm, server, chat):
    # llama-server: "exceeds the available context size"; llama-cpp-python: "maximum context length".
    with pytest.raises(ContextWindowExceededError, match=r"context (size|length)"):
        real_lm(use_chat_api=chat)._generate("hello " * 3000)


@on_servers(endpoints=True)
def test_logprobs_both_endpoints(real_lm, server, chat):
    lm = real_lm(use_chat_api=chat)
    choice = lm._generate(prompt_for(chat), logprobs=True, top_logprobs=2, max_tokens=4)["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert tokens and all(t["logprob"] <= 0 for t in tokens)
    assert "".join(t["token"] for t in tokens) == choice["text"]


@on_servers()
def test_usage_is_the_servers_token_count(real_lm, server):
    lm = real_lm(use_chat_api=True)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter(), track_usage=True):
        prediction = dspy.Predict("question -> answer")(question=FRANCE)
    usage = prediction.get_lm_usage()[ALIAS]
    last = lm.history[-1]["response"]
    assert usage["prompt_tokens"] == last.usage.input_tokens > 100
    assert usage["completion_tokens"] == last.usage.output_tokens > 0


@on_servers(endpoints=True, xfail={"llama-cpp-python": LCP_NO_STREAM_USAGE})
def test_stream_usage_is_the_servers_token_count(real_lm, server, chat):
    lm = real_lm(use_chat_api=chat, cache=False, max_tokens=8)
    assert "".join(lm.stream(prompt_for(chat)))
    record = lm.usage[-1]
    assert record.stream and record.prompt_tokens and record.completion_tokens


@on_servers(needs_core={"llama-cpp-python": "response_format_style='auto' falls back to the Anyscale form"})
def test_json_adapter_chain_of_thought_parses_thanks_to_schema_constrained_decoding(real_lm, server):
    lm = real_lm(use_chat_api=True, max_tokens=200)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = dspy.ChainOfThought("question -> answer")(question=FRANCE)
    assert isinstance(prediction.reasoning, str) and isinstance(prediction.answer, str) and prediction.answer


@on_servers(xfail={"llama-server": LLAMA_SERVER_NO_TOOLS})
def test_a_forced_tool_choice_comes_back_as_a_tool_call(real_lm, server):
    lm = real_lm(use_chat_api=True, cache=False, max_tokens=40)
    request = lm15.Request(
        model=lm.model,
        messages=(lm15.Message.user("What is the weather in Paris?"),),
        tools=(WEATHER_TOOL,),
        config=lm15.Config(tool_choice=lm15.ToolChoice(mode="required", allowed=("get_weather",))),
    )
    (call,) = lm(request).tool_calls
    assert call.name == "get_weather" and "city" in call.input


@on_servers()
def test_models_lists_the_served_model(server):
    assert ALIAS in [m["id"] for m in Anyscale.models(server.base_url, SECRET)]
