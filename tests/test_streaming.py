"""OpenAI-style stream chunks (chat deltas, completions text) → dspy.lm15 stream events."""

from __future__ import annotations

import json

import pytest
from dspy import lm15
from dspy.lm15 import Message, Request

from dspy_anyscale._sse import ServerSentEvent
from dspy_anyscale._streaming import StreamTranslator
from dspy_anyscale._wire import WireOptions, build_call
from dspy_anyscale.errors import UnexpectedResponseError

# --- translation of OpenAI chunks ---------------------------------------------------------------

REQUEST = Request(model="m", messages=(Message.user("hi"),))


def translate(endpoint: str, *datas: str) -> list:
    call = build_call(REQUEST, WireOptions(endpoint=endpoint), stream=True)
    translator = StreamTranslator(call, REQUEST, url="http://x/v1/chat/completions")
    events = [event for data in datas for event in translator.feed(ServerSentEvent(data))]
    return events + translator.finish()


def chat_chunk(delta=None, finish=None, **extra):
    return json.dumps(
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}
    )


def test_chat_stream_events_and_usage():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = translate(
        "chat",
        chat_chunk({"role": "assistant"}),
        chat_chunk({"content": "Hel"}),
        chat_chunk({"content": "lo"}),
        chat_chunk(finish="stop"),
        json.dumps({"id": "c1", "choices": [], "usage": usage}),
        "[DONE]",
    )
    assert [e.type for e in events] == ["start", "delta", "delta", "end"]
    assert "".join(e.delta.text for e in events if e.type == "delta") == "Hello"
    assert events[-1].finish_reason == "stop" and events[-1].usage.total_tokens == 5


def test_completions_stream_events():
    def chunk(text, finish=None):
        return json.dumps(
            {
                "id": "x",
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "finish_reason": finish,
                    }
                ],
            }
        )

    events = translate("completions", chunk("Par"), chunk("is", "length"), "[DONE]")
    assert "".join(e.delta.text for e in events if e.type == "delta") == "Paris"
    assert events[-1].finish_reason == "length"


def test_tool_call_fragments_and_reasoning():
    call = {"index": 0, "id": "t1", "type": "function", "function": {"name": "search", "arguments": '{"q":'}}
    more = {"index": 0, "function": {"arguments": ' "x"}'}}
    events = translate(
        "chat",
        chat_chunk({"reasoning_content": "think"}),
        chat_chunk({"tool_calls": [call]}),
        chat_chunk({"tool_calls": [more]}),
        chat_chunk(finish="tool_calls"),
        "[DONE]",
    )
    kinds = [e.delta.type for e in events if e.type == "delta"]
    assert kinds == ["thinking", "tool_call", "tool_call"]
    assert events[-1].finish_reason == "tool_call"


def test_finish_reason_without_done_is_complete_but_neither_is_an_error():
    assert translate("chat", chat_chunk({"content": "a"}), chat_chunk(finish="stop"))[-1].type == "end"
    assert translate("chat", chat_chunk({"content": "a"}), "[DONE]")[-1].finish_reason == "stop"
    with pytest.raises(lm15.TransportError, match="after 1 characters without"):
        translate("chat", chat_chunk({"content": "a"}))
    with pytest.raises(lm15.TransportError, match="before any data"):
        translate("chat")


def test_an_error_payload_inside_the_stream_raises_the_mapped_error():
    with pytest.raises(lm15.RateLimitError):
        translate("chat", chat_chunk({"content": "a"}), json.dumps({"error": {"message": "slow", "code": 429}}))
    with pytest.raises(lm15.ContextLengthError):
        translate("chat", json.dumps({"error": {"message": "exceeds the available context size", "code": 400}}))
    with pytest.raises(lm15.ServerError):
        translate("chat", json.dumps({"error": {"message": "something broke"}}))


def test_non_json_event_names_what_came_back():
    with pytest.raises(UnexpectedResponseError, match="not JSON: <html>"):
        translate("chat", "<html>")
