"""Structured outputs, tools, logprobs and the capabilities DSPy's adapters read from the LM."""

from __future__ import annotations

import json
import logging

import dspy
import pydantic
import pytest
from dspy.lm15 import Config, FunctionTool, Message, Request, ToolChoice

from dspy_anyscale.testing import tool_call_message

from .conftest import MODEL

ENDPOINTS = [pytest.param(False, id="completions"), pytest.param(True, id="chat")]


# --- declared capabilities ---------------------------------------------------------------------


def test_chat_declares_json_schema_and_tools(make_lm):
    lm = make_lm(use_chat_api=True)
    assert lm.supports_response_schema and lm.supports_function_calling and not lm.supports_reasoning
    assert {
        "response_format",
        "tools",
        "tool_choice",
        "logprobs",
        "top_logprobs",
        "stop",
        "seed",
    } <= lm.supported_params


def test_completions_declares_neither(make_lm):
    lm = make_lm(use_chat_api=False)
    assert not lm.supports_response_schema and not lm.supports_function_calling
    assert "response_format" not in lm.supported_params and "tools" not in lm.supported_params
    assert {"temperature", "max_tokens", "logprobs", "stop"} <= lm.supported_params


def test_constructor_overrides_for_servers_without_them(make_lm):
    lm = make_lm(use_chat_api=True, supports_tools=False, supports_response_schema=False)
    assert not lm.supports_function_calling and not lm.supports_response_schema
    assert "tools" not in lm.supported_params
    assert "response_format" in lm.supported_params, "json_object mode still works"


# --- JSON mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["openai", "anyscale"])
def test_json_adapter_chain_of_thought_sends_a_schema_and_parses(make_lm, stub, style):
    dspy.configure(lm=make_lm(use_chat_api=True, response_format_style=style), adapter=dspy.JSONAdapter())
    prediction = dspy.ChainOfThought("question -> answer")(question="Schema?")
    assert (prediction.reasoning, prediction.answer) == ("reasoning for Schema?", "answer for Schema?")
    fmt = stub.posts()[0].body["response_format"]
    schema = fmt["json_schema"]["schema"] if style == "openai" else fmt["schema"]
    assert fmt["type"] == ("json_schema" if style == "openai" else "json_object")
    assert set(schema["properties"]) == {"reasoning", "answer"} and set(schema["required"]) == {"reasoning", "answer"}


def test_json_adapter_on_completions_asks_in_the_prompt_only(make_lm, stub):
    dspy.configure(lm=make_lm(use_chat_api=False), adapter=dspy.JSONAdapter())
    prediction = dspy.ChainOfThought("question -> answer")(question="No schema?")
    assert prediction.answer == "answer for No schema?"
    body = stub.posts()[0].body
    assert "response_format" not in body and "JSON" in body["prompt"]


def test_json_adapter_without_schema_support_uses_json_object_mode(make_lm, stub):
    dspy.configure(lm=make_lm(use_chat_api=True, supports_response_schema=False), adapter=dspy.JSONAdapter())
    assert dspy.Predict("question -> answer")(question="json object?").answer == "answer for json object?"
    assert stub.posts()[0].body["response_format"] == {"type": "json_object"}


class Answer(pydantic.BaseModel):
    city: str
    population: int


def test_pydantic_response_format_on_a_direct_call(make_lm, stub):
    stub.responder = lambda endpoint, body: json.dumps({"city": "Paris", "population": 2100000})
    text = make_lm(use_chat_api=True)("Biggest city?", response_format=Answer)[0]
    assert Answer.model_validate_json(text).city == "Paris"
    fmt = stub.posts()[0].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Answer"
    assert fmt["json_schema"]["schema"]["properties"]["population"]["type"] == "integer"


def test_response_format_refused_on_completions_direct_call(make_lm, stub):
    from dspy.utils.exceptions import LMUnsupportedFeatureError

    with pytest.raises(LMUnsupportedFeatureError, match="use_chat_api=True"):
        make_lm(use_chat_api=False)("x", response_format={"type": "json_object"})
    assert stub.posts() == []


# --- tools ----------------------------------------------------------------------------------------


def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"sunny in {city}"


class Assist(dspy.Signature):
    """Answer using the tools."""

    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    answer: str = dspy.OutputField()
    tool_calls: dspy.ToolCalls = dspy.OutputField()


def test_native_tool_calling_end_to_end(make_lm, stub):
    stub.responder = lambda endpoint, body: tool_call_message("get_weather", {"city": "Paris"})
    dspy.configure(lm=make_lm(use_chat_api=True), adapter=dspy.ChatAdapter(use_native_function_calling=True))
    prediction = dspy.Predict(Assist)(question="Weather in Paris?", tools=[dspy.Tool(get_weather)])
    (call,) = prediction.tool_calls.tool_calls
    assert (call.name, call.args) == ("get_weather", {"city": "Paris"})
    assert call.execute() == "sunny in Paris"
    (sent,) = stub.posts()
    assert sent.body["tools"][0]["function"]["name"] == "get_weather"
    assert sent.body["tools"][0]["function"]["parameters"]["properties"]["city"]["type"] == "string"


def test_tools_are_not_sent_when_declared_unsupported(make_lm, stub):
    from dspy.utils.exceptions import AdapterParseError

    dspy.configure(
        lm=make_lm(use_chat_api=True, supports_tools=False), adapter=dspy.ChatAdapter(use_native_function_calling=True)
    )
    # DSPy then asks for the tool calls as text; the stub's text is no ToolCalls, so parsing fails.
    with pytest.raises(AdapterParseError, match="tool_calls"):
        dspy.Predict(Assist)(question="Weather?", tools=[dspy.Tool(get_weather)])
    assert stub.posts() and all("tools" not in r.body for r in stub.posts())


def test_explicit_request_with_tools_and_forced_choice(make_lm, stub):
    stub.responder = lambda endpoint, body: tool_call_message("get_weather", '{"city": "Oslo"}', call_id="c9")
    tool = FunctionTool(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}})
    request = Request(
        model=MODEL,
        messages=(Message.user("Weather in Oslo?"),),
        tools=(tool,),
        config=Config(tool_choice=ToolChoice("required", allowed=("get_weather",))),
    )
    response = make_lm(use_chat_api=True)(request)
    assert response.finish_reason == "tool_call"
    assert (response.tool_calls[0].id, response.tool_calls[0].input) == ("c9", {"city": "Oslo"})
    assert stub.posts()[0].body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_tool_arguments_that_are_not_json_are_kept_not_lost(make_lm, stub):
    stub.responder = lambda endpoint, body: tool_call_message("get_weather", "{city: Paris")
    request = Request(model=MODEL, messages=(Message.user("x"),), tools=(FunctionTool(name="get_weather"),))
    assert make_lm(use_chat_api=True)(request).tool_calls[0].input == {"partial_json": "{city: Paris"}


def test_streamed_tool_calls_assemble(make_lm, stub):
    import asyncio

    stub.responder = lambda endpoint, body: tool_call_message("get_weather", {"city": "Rome"})
    dspy.configure(lm=make_lm(use_chat_api=True), adapter=dspy.ChatAdapter(use_native_function_calling=True))
    program = dspy.streamify(dspy.Predict(Assist))

    async def run():
        return [item async for item in program(question="Weather in Rome?", tools=[dspy.Tool(get_weather)])]

    final = asyncio.run(run())[-1]
    assert final.tool_calls.tool_calls[0].args == {"city": "Rome"}
    assert stub.posts()[0].body["stream"] is True


# --- logprobs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_logprobs_reach_dspy_outputs(make_lm, stub, chat):
    dspy.configure(lm=make_lm(use_chat_api=chat))
    prediction = dspy.Predict("question -> answer", logprobs=True, top_logprobs=1)(question="probs?")
    tokens = prediction.logprobs["content"]
    assert tokens and all({"token", "logprob", "top_logprobs"} <= set(t) for t in tokens)
    body = stub.posts()[0].body
    assert body["logprobs"] is True if chat else body["logprobs"] == 1


# --- truncation ----------------------------------------------------------------------------------


def test_truncation_is_reported_so_dspy_warns(make_lm, caplog):
    caplog.set_level(logging.WARNING)
    response = make_lm(use_chat_api=True)(
        Request(model=MODEL, messages=(Message.user("a b c d e f g h"),), config=Config(max_tokens=2))
    )
    assert response.finish_reason == "length"
    assert any("truncated" in record.getMessage() for record in caplog.records)
