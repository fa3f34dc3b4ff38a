"""Request ↔ wire JSON for both endpoints: every field written or refused, responses read back."""

from __future__ import annotations

import pytest
from dspy import lm15
from dspy.lm15 import Config, FunctionTool, ImagePart, Message, Request, TextPart, ToolCallPart, ToolChoice

from dspy_anyscale._wire import WireOptions, build_call, completions_prompt, parse_response
from dspy_anyscale.errors import UnexpectedResponseError

MODEL = "meta-llama/Llama-2-70b-chat-hf"
CHAT = WireOptions(endpoint="chat")
COMPLETIONS = WireOptions(endpoint="completions")
URL = "http://127.0.0.1:9/v1/chat/completions"


def request(text="Hi", **config) -> Request:
    return Request(model=MODEL, messages=(Message.user(text),), config=Config(**config))


def test_chat_body_minimal():
    call = build_call(request(), CHAT)
    assert call.path == "/chat/completions"
    assert call.payload == {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


def test_completions_body_sends_the_prompt_as_given():
    call = build_call(request("The capital of France is"), COMPLETIONS)
    assert call.path == "/completions"
    assert call.payload == {"model": MODEL, "prompt": "The capital of France is"}


@pytest.mark.parametrize("options", [CHAT, COMPLETIONS])
def test_every_sampling_field_reaches_the_wire(options):
    config = dict(
        max_tokens=64,
        temperature=0.3,
        top_p=0.9,
        top_k=40,
        seed=7,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        stop=("\n\n", "END"),
        user_id="u-1",
    )
    payload = build_call(request(**config), options).payload
    expected = {k: v for k, v in config.items() if k not in ("stop", "user_id")}
    assert {k: payload[k] for k in expected} == expected
    assert payload["stop"] == ["\n\n", "END"]
    assert payload["user"] == "u-1"


def test_extensions_reach_the_wire_verbatim():
    ext = {"logit_bias": {"50256": -100}, "repetition_penalty": 1.1, "min_p": 0.05}
    assert build_call(request(extensions=ext), COMPLETIONS).payload.items() >= ext.items()


def test_constructor_extras_are_sent_and_a_request_extension_overrides_them():
    options = WireOptions(endpoint="chat", extra_body={"repetition_penalty": 1.1, "min_p": 0.1})
    payload = build_call(request(extensions={"min_p": 0.2}), options).payload
    assert payload["repetition_penalty"] == 1.1
    assert payload["min_p"] == 0.2


def test_an_extension_may_not_overwrite_structure_or_a_typed_field():
    with pytest.raises(lm15.UnsupportedFeatureError, match="prompt"):
        build_call(request(extensions={"prompt": "x"}), COMPLETIONS)
    with pytest.raises(lm15.UnsupportedFeatureError, match="duplicates"):
        build_call(request(temperature=0.1, extensions={"temperature": 0.9}), CHAT)


def test_endpoint_directive_picks_the_endpoint_and_is_not_sent():
    directive = {"dspy_anyscale": {"endpoint": "chat"}}
    call = build_call(request(extensions=directive), COMPLETIONS)
    assert call.endpoint == "chat" and call.path == "/chat/completions"
    assert "dspy_anyscale" not in call.payload
    with pytest.raises(lm15.UnsupportedFeatureError, match="endpoint"):
        build_call(request(extensions={"dspy_anyscale": {"endpoint": "embeddings"}}), CHAT)


def test_logprobs_spelling_per_endpoint():
    chat = build_call(request(logprobs=3), CHAT).payload
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 3)
    assert "top_logprobs" not in build_call(request(logprobs=0), CHAT).payload
    assert build_call(request(logprobs=2), COMPLETIONS).payload["logprobs"] == 2


SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def test_response_format_openai_style_by_default():
    fmt = {"type": "json_schema", "schema": SCHEMA, "name": "qa", "strict": True}
    assert build_call(request(response_format=fmt), CHAT).payload["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "qa", "schema": SCHEMA, "strict": True},
    }


def test_response_format_anyscale_style():
    fmt = {"type": "json_schema", "schema": SCHEMA}
    assert build_call(request(response_format=fmt), CHAT, style="anyscale").payload["response_format"] == {
        "type": "json_object",
        "schema": SCHEMA,
    }


def test_json_object_mode():
    payload = build_call(request(response_format={"type": "json_object"}), CHAT).payload
    assert payload["response_format"] == {"type": "json_object"}


def test_schema_refused_when_declared_unsupported():
    options = WireOptions(endpoint="chat", supports_response_schema=False)
    with pytest.raises(lm15.UnsupportedFeatureError, match="supports_response_schema"):
        build_call(request(response_format={"type": "json_schema", "schema": SCHEMA}), options)


@pytest.mark.parametrize(
    ("config", "feature"),
    [
        ({"response_format": {"type": "json_object"}}, "config.response_format"),
        ({"tool_choice": ToolChoice("auto")}, "config.tool_choice"),
        ({"reasoning": lm15.Reasoning("low")}, "config.reasoning"),
    ],
)
def test_completions_refuses_what_it_cannot_carry(config, feature):
    with pytest.raises(lm15.UnsupportedFeatureError) as caught:
        build_call(request(**config), COMPLETIONS)
    assert caught.value.feature == feature
    assert "use_chat_api=True" in str(caught.value)


@pytest.mark.parametrize(
    "config",
    [{"service_tier": "flex"}, {"store": True}, {"cache": lm15.CacheConfig()}, {"probabilities": "required"}],
)
def test_fields_no_anyscale_style_server_has_are_refused(config):
    with pytest.raises(lm15.UnsupportedFeatureError) as caught:
        build_call(request(**config), CHAT)
    assert caught.value.feature == f"config.{next(iter(config))}"


def test_tools_and_tool_choice():
    tool = FunctionTool(name="search", description="Search the web", parameters={"type": "object", "properties": {}})
    req = Request(
        model=MODEL,
        messages=(Message.user("x"),),
        tools=(tool,),
        config=Config(tool_choice=ToolChoice("required", allowed=("search",), parallel=False)),
    )
    payload = build_call(req, CHAT).payload
    assert payload["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "search",
                "parameters": {"type": "object", "properties": {}},
                "description": "Search the web",
            },
        }
    ]
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "search"}}
    assert payload["parallel_tool_calls"] is False
    with pytest.raises(lm15.UnsupportedFeatureError, match="supports_tools"):
        build_call(req, WireOptions(endpoint="chat", supports_tools=False))
    with pytest.raises(lm15.UnsupportedFeatureError):
        build_call(req, COMPLETIONS)


def test_builtin_tools_are_refused():
    req = Request(model=MODEL, messages=(Message.user("x"),), tools=(lm15.BuiltinTool("web_search"),))
    with pytest.raises(lm15.UnsupportedFeatureError, match="built-in"):
        build_call(req, CHAT)


def test_one_system_message_joining_system_prompt_and_request_system():
    options = WireOptions(endpoint="chat", system_prompt="Be terse.")
    req = Request(model=MODEL, system="Answer in French.", messages=(Message.user("Hi"),))
    messages = build_call(req, options).payload["messages"]
    assert messages == [
        {"role": "system", "content": "Be terse.\n\nAnswer in French."},
        {"role": "user", "content": "Hi"},
    ]


def test_a_second_system_message_is_refused_not_sent():
    req = Request(model=MODEL, system="One.", messages=(Message.user("Hi"), Message.developer("Two.")))
    with pytest.raises(lm15.UnsupportedFeatureError, match="Only one system message"):
        build_call(req, CHAT)


def test_conversation_with_tool_calls_and_results():
    messages = (
        Message.user("weather?"),
        Message.assistant([ToolCallPart(id="c1", name="weather", input={"city": "Paris"})]),
        Message(role="tool", parts=(lm15.ToolResultPart(id="c1", content=(TextPart("sunny"),), name="weather"),)),
    )
    req = Request(model=MODEL, messages=messages)
    rows = build_call(req, CHAT).payload["messages"]
    assert rows[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    assert rows[2]["role"] == "tool" and rows[2]["tool_call_id"] == "c1" and "sunny" in rows[2]["content"]


def test_images_become_image_url_blocks():
    req = Request(
        model=MODEL,
        messages=(Message.user([TextPart("What is this?"), ImagePart(url="https://x/cat.png", detail="low")]),),
    )
    content = build_call(req, CHAT).payload["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "low"}},
    ]


def test_completions_rendering_of_a_conversation_and_template():
    options = WireOptions(endpoint="completions", system_prompt="Sys.", prompt_template="[INST]{prompt}[/INST]")
    req = Request(
        model=MODEL,
        system="Adapter system.",
        messages=(Message.user("Q1"), Message.assistant("A1"), Message.user("Q2")),
    )
    assert completions_prompt(req, options) == "[INST]Sys.\n\nAdapter system.\n\nQ1\n\nA1\n\nQ2[/INST]"


def test_completions_template_applies_to_a_plain_prompt():
    options = WireOptions(endpoint="completions", prompt_template="<s>[INST] {prompt} [/INST]")
    assert build_call(request("Hello"), options).payload["prompt"] == "<s>[INST] Hello [/INST]"


def test_stream_flags():
    payload = build_call(request(), CHAT, stream=True).payload
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}


# --- responses ---------------------------------------------------------------------------------


def chat_body(content="Paris", finish="stop", **extra):
    return {
        "id": "chatcmpl-1",
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish, **extra}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }


def test_parse_chat_response():
    call = build_call(request(), CHAT)
    response = parse_response(chat_body(), call, request(), url=URL)
    assert response.text == "Paris"
    assert response.finish_reason == "stop"
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (12, 3, 15)
    assert response.id == "chatcmpl-1"


def test_parse_chat_length_and_tool_calls_and_logprobs():
    call = build_call(request(), CHAT)
    body = chat_body(
        finish="length",
        logprobs={
            "content": [
                {"token": "Par", "logprob": -0.5, "bytes": [80], "top_logprobs": [{"token": "Lon", "logprob": -2.0}]}
            ]
        },
    )
    response = parse_response(body, call, request(), url=URL)
    assert response.finish_reason == "length"
    assert response.logprobs[0].token == "Par" and response.logprobs[0].top[0].token == "Lon"
    tool_body = chat_body(content=None, finish="tool_calls")
    tool_body["choices"][0]["message"]["tool_calls"] = [
        {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}
    ]
    tools = parse_response(tool_body, call, request(), url=URL)
    assert tools.finish_reason == "tool_call"
    assert (tools.tool_calls[0].name, tools.tool_calls[0].input) == ("search", {"q": "x"})


def test_parse_completions_response_with_logprobs():
    call = build_call(request(), COMPLETIONS)
    body = {
        "id": "cmpl-1",
        "model": MODEL,
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        "choices": [
            {
                "index": 0,
                "text": " Paris.",
                "finish_reason": "stop",
                "logprobs": {
                    "tokens": [" Paris", "."],
                    "token_logprobs": [-0.1, -0.2],
                    "top_logprobs": [{" Paris": -0.1, " Lyon": -3.0}, {".": -0.2}],
                },
            }
        ],
    }
    response = parse_response(body, call, request(), url=URL)
    assert response.text == " Paris."
    assert [t.token for t in response.logprobs] == [" Paris", "."]
    assert {t.token for t in response.logprobs[0].top} == {" Paris", " Lyon"}
    assert response.usage.total_tokens == 7


def test_completions_logprobs_in_the_chat_shape_llama_cpp_sends():
    call = build_call(request(), COMPLETIONS)
    logprobs = {
        "content": [
            {
                "id": 7042,
                "token": " Paris",
                "bytes": [32, 80],
                "logprob": -0.26,
                "top_logprobs": [{"id": 260, "token": " the", "bytes": [32], "logprob": -2.76}],
            }
        ]
    }
    body = {"model": MODEL, "choices": [{"index": 0, "text": " Paris", "finish_reason": "stop", "logprobs": logprobs}]}
    response = parse_response(body, call, request(), url=URL)
    assert response.logprobs[0].token == " Paris" and response.logprobs[0].top[0].token == " the"


@pytest.mark.parametrize(
    "body",
    [{"choices": []}, {"object": "list"}, {"choices": [{"index": 0}]}, {"choices": "nope"}],
)
def test_bodies_without_choices_name_what_came_back(body):
    call = build_call(request(), CHAT)
    with pytest.raises(UnexpectedResponseError) as caught:
        parse_response(body, call, request(), url=URL)
    message = str(caught.value)
    assert URL in message and "HTTP 200" in message and "the server sent" in message


def test_missing_usage_is_unknown_not_zero():
    body = chat_body()
    del body["usage"]
    response = parse_response(body, build_call(request(), CHAT), request(), url=URL)
    assert response.usage.input_tokens is None
