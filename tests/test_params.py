"""The parameter table is the one source of truth: every other set of names derives from it and agrees
with what DSPy and the wire mapping really do."""

from __future__ import annotations

import dataclasses

import pytest
from dspy.lm15 import Config, request_from_openai_chat

from dspy_anyscale._params import (
    DSPY_CALL_KEYS,
    DSPY_GENERATION_KEYS,
    PARAMETERS,
    SAMPLING_FIELDS,
    TOOL_KEYS,
    plan_direct_call,
    supported_params,
)
from dspy_anyscale._wire import WireOptions, build_call

# A value each parameter accepts, for the checks below (one row per parameter of the table).
GOOD_VALUES = {
    "temperature": 0.5,
    "max_tokens": 16,
    "top_p": 0.9,
    "top_k": 40,
    "seed": 7,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
    "max_completion_tokens": 16,
    "stop": ["\n"],
    "logit_bias": {"50256": -100},
    "logprobs": True,
    "top_logprobs": 2,
    "user": "u-1",
    "metadata": {"team": "a"},
    "n": 2,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "cache": False,
    "rollout_id": 3,
}


def test_every_parameter_has_a_value_here():
    assert set(GOOD_VALUES) == set(PARAMETERS)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_each_good_value_passes_its_own_check(name):
    assert PARAMETERS[name].check(GOOD_VALUES[name])


def test_the_derived_sets_partition_the_table():
    assert set(PARAMETERS) == DSPY_GENERATION_KEYS | DSPY_CALL_KEYS
    assert not DSPY_GENERATION_KEYS & DSPY_CALL_KEYS
    assert TOOL_KEYS <= DSPY_GENERATION_KEYS


def test_sampling_fields_are_typed_config_fields_sent_under_their_own_name():
    config_fields = {field.name for field in dataclasses.fields(Config)}
    assert set(SAMPLING_FIELDS) <= config_fields
    request = plan_direct_call({name: GOOD_VALUES[name] for name in SAMPLING_FIELDS}, {}).request("m", "hi")
    payload = build_call(request, WireOptions(endpoint="chat")).payload
    assert {name: payload[name] for name in SAMPLING_FIELDS} == {name: GOOD_VALUES[name] for name in SAMPLING_FIELDS}


@pytest.mark.parametrize("name", sorted(DSPY_GENERATION_KEYS - {"n"}))
def test_dspy_carries_every_generation_parameter(name):
    """DSPy's messages path (request_from_openai_chat) takes each name; n is DSPy's own fan-out."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], name: GOOD_VALUES[name]}
    if name == "tool_choice":
        body["tools"] = GOOD_VALUES["tools"]
    if name == "top_logprobs":
        body["logprobs"] = True
    request_from_openai_chat(body)


@pytest.mark.parametrize(
    ("chat", "tools"), [(True, True), (True, False), (False, True)], ids=["chat", "chat-no-tools", "completions"]
)
def test_supported_params_follow_the_table(chat, tools):
    names = supported_params(chat=chat, tools=tools)
    for name, param in PARAMETERS.items():
        expected = param.kind != "call" and (chat or not param.chat_only) and (tools or param.kind != "tools")
        assert (name in names) is expected, name
    assert "stream" in names


@pytest.mark.parametrize("name", sorted(set(PARAMETERS) - TOOL_KEYS))
def test_every_direct_parameter_reaches_the_wire_or_dspy(name):
    """Nothing is dropped: a direct call's parameter is in the body, the Config, or DSPy's call controls."""
    options = {name: GOOD_VALUES[name]}
    if name == "top_logprobs":
        options["logprobs"] = True
    plan = plan_direct_call(options, {})
    if name in DSPY_CALL_KEYS:
        assert plan.call_kwargs[name] == GOOD_VALUES[name]
        return
    if name == "n":
        assert plan.n == 2
        return
    payload = build_call(plan.request("m", "hi"), WireOptions(endpoint="chat")).payload
    wire_name = {"max_completion_tokens": "max_tokens", "top_logprobs": "top_logprobs"}.get(name, name)
    assert wire_name in payload, f"{name} did not reach the body: {sorted(payload)}"
