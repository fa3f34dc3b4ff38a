"""The old HFModel surface on Anyscale: _generate for both endpoints, kwargs on the wire, copies."""

from __future__ import annotations

import pytest
from dspy.lm15 import Config, Message, Request, Response

from dspy_anyscale import ConfigurationError, InvalidParameterError, UnsupportedParameterError
from dspy_anyscale.testing import Fault

from .conftest import MODEL, SECRET


@pytest.mark.parametrize(("chat", "path"), [(False, "/v1/completions"), (True, "/v1/chat/completions")])
def test_generate_normalises_both_endpoints(make_lm, stub, chat, path):
    lm = make_lm(use_chat_api=chat)
    result = lm._generate("Say hi")
    assert result == {"prompt": "Say hi", "choices": [{"text": "echo: Say hi", "finish_reason": "stop"}]}
    (sent,) = stub.posts()
    assert sent.path == path
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"


def test_completions_sends_the_prompt_as_given_and_chat_as_one_user_message(make_lm, stub):
    make_lm(use_chat_api=False)._generate("The capital of France is")
    make_lm(use_chat_api=True)._generate("The capital of France is")
    completions, chat = stub.posts()
    assert completions.body["prompt"] == "The capital of France is"
    assert chat.body["messages"] == [{"role": "user", "content": "The capital of France is"}]


def test_use_chat_api_none_means_the_instance_default_and_can_be_overridden(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    lm._generate("a", use_chat_api=None)
    lm._generate("a", use_chat_api=False)
    assert [r.path for r in stub.posts()] == ["/v1/chat/completions", "/v1/completions"]


def test_the_two_endpoints_never_share_a_cache_entry(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    lm._generate("same prompt")
    lm._generate("same prompt", use_chat_api=False)
    lm._generate("same prompt")
    lm._generate("same prompt", use_chat_api=False)
    assert [r.path for r in stub.posts()] == ["/v1/chat/completions", "/v1/completions"]


def test_program_calls_in_the_two_modes_do_not_share_the_cache(make_lm, stub):
    import dspy

    for chat in (True, False, True, False):
        with dspy.context(lm=make_lm(use_chat_api=chat)):
            dspy.Predict("question -> answer")(question="same question")
    assert [r.path for r in stub.posts()] == ["/v1/chat/completions", "/v1/completions"]


def test_prompt_template_and_system_prompt(make_lm, stub):
    make_lm(use_chat_api=False, prompt_template="[INST]{prompt}[/INST]")._generate("Hi")
    make_lm(use_chat_api=True, system_prompt="You are terse.")._generate("Hi")
    completions, chat = stub.posts()
    assert completions.body["prompt"] == "[INST]Hi[/INST]"
    assert chat.body["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("bad", ["no placeholder", "{prompt}{prompt}", 7])
def test_bad_prompt_template_is_refused_at_construction(make_lm, bad):
    with pytest.raises(ConfigurationError, match="prompt_template"):
        make_lm(prompt_template=bad)


def test_direct_call_returns_a_list_of_strings(make_lm):
    lm = make_lm(use_chat_api=True)
    assert lm("Hello") == ["echo: Hello"]
    assert lm(prompt="Hello") == ["echo: Hello"]


def test_n_yields_n_choices_with_n_requests(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    assert len(lm._generate("Hello", n=3)["choices"]) == 3
    assert len(stub.posts()) == 3
    assert all("n" not in r.body for r in stub.posts())
    assert lm("Hello", n=3) == ["echo: Hello"] * 3
    assert len(stub.posts()) == 3, "the same three candidates come from DSPy's cache"


def test_constructor_defaults_and_per_call_kwargs_reach_the_wire(make_lm, stub):
    lm = make_lm(use_chat_api=True, temperature=0.2, top_p=0.9, stop=["\n\n"], seed=1, repetition_penalty=1.1)
    lm._generate(
        "x",
        top_k=40,
        max_tokens=16,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={"50256": -100},
        min_p=0.05,
        temperature=0.7,
    )
    body = stub.posts()[0].body
    expected = {
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 1,
        "repetition_penalty": 1.1,
        "top_k": 40,
        "max_tokens": 16,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"50256": -100},
        "min_p": 0.05,
    }
    assert {k: body[k] for k in expected} == expected


def test_default_max_tokens_leaves_room_for_chain_of_thought(make_lm, stub):
    lm = make_lm()
    lm._generate("x")
    assert stub.posts()[0].body["max_tokens"] >= 1000


def test_provider_extras_go_in_every_program_request(make_lm, stub):
    import dspy

    lm = make_lm(use_chat_api=True, repetition_penalty=1.2, min_p=0.1)
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="q")
    body = stub.posts()[0].body
    assert (body["repetition_penalty"], body["min_p"]) == (1.2, 0.1)


@pytest.mark.parametrize("typo", ["temprature", "max_token", "top_pp", "max_new_tokens"])
def test_misspelt_parameters_are_refused_with_a_suggestion(make_lm, typo):
    with pytest.raises(UnsupportedParameterError, match="did you mean"):
        make_lm(**{typo: 1})
    lm = make_lm()
    with pytest.raises(UnsupportedParameterError, match="did you mean"):
        lm._generate("x", **{typo: 1})


def test_provider_parameters_per_program_call_are_refused_with_the_fix(make_lm):
    lm = make_lm(use_chat_api=True)
    with pytest.raises(UnsupportedParameterError, match="constructor"):
        lm(messages=[{"role": "user", "content": "x"}], repetition_penalty=1.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n must"),
        ({"top_p": "high"}, "top_p"),
        ({"logprobs": -1}, "logprobs"),
    ],
)
def test_invalid_values_are_refused_before_any_request(make_lm, stub, kwargs, match):
    lm = make_lm()
    with pytest.raises(InvalidParameterError, match=match):
        lm._generate("x", **kwargs)
    assert stub.posts() == []


def test_invalid_constructor_defaults_are_refused_at_construction(make_lm):
    with pytest.raises(InvalidParameterError, match="temperature"):
        make_lm(temperature=9)


def test_connection_settings_are_not_generation_parameters(make_lm):
    with pytest.raises(UnsupportedParameterError, match="named argument"):
        make_lm(base_url="http://x/v1")


def test_tools_are_refused_on_a_direct_prompt(make_lm):
    with pytest.raises(UnsupportedParameterError, match="tools"):
        make_lm(use_chat_api=True)._generate("x", tools=[{"type": "function", "function": {"name": "f"}}])


def test_only_completed_drops_truncated_choices(make_lm, stub):
    from dspy_anyscale.hf_model import select_choices

    choices = [{"text": "cut", "finish_reason": "length"}, {"text": "done", "finish_reason": "stop"}]
    assert [c["text"] for c in select_choices(choices, True, False)] == ["done"]
    assert [c["text"] for c in select_choices(choices, False, False)] == ["cut", "done"]
    assert [c["text"] for c in select_choices(choices[:1], True, False)] == ["cut"], "all truncated: keep them"


def test_truncation_is_reported_as_finish_reason_length(make_lm):
    lm = make_lm(use_chat_api=True)
    choice = lm._generate("one two three four five six", max_tokens=2)["choices"][0]
    assert choice["finish_reason"] == "length"


def test_return_sorted_orders_by_mean_logprob(make_lm, stub):
    from dspy_anyscale.hf_model import select_choices

    choices = [
        {"text": "b", "logprobs": {"content": [{"logprob": -2.0}]}},
        {"text": "a", "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -0.1}]}},
    ]
    assert [c["text"] for c in select_choices(choices, True, True)] == ["a", "b"]
    lm = make_lm(use_chat_api=True)
    assert lm("Hi there", return_sorted=True) == ["echo: Hi there"]
    assert stub.posts()[0].body["logprobs"] is True


def test_logprobs_are_returned_in_choices(make_lm):
    lm = make_lm(use_chat_api=True)
    choice = lm._generate("hello world", logprobs=True, top_logprobs=2)["choices"][0]
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["echo:", "hello", "world"]


def test_an_explicit_request_returns_a_response(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    response = lm(Request(model=MODEL, messages=(Message.user("Hi"),), config=Config(max_tokens=5)))
    assert isinstance(response, Response) and response.text == "echo: Hi"
    assert stub.posts()[0].body["max_tokens"] == 5


def test_history_and_inspect_history(make_lm, capsys):
    lm = make_lm(use_chat_api=True)
    lm._generate("Remember me")
    assert len(lm.history) == 1
    lm.inspect_history(1)
    out = capsys.readouterr().out
    assert "Remember me" in out and "echo: Remember me" in out


def test_copy_shares_the_pool_for_dspy_settings_and_rebuilds_for_wire_settings(make_lm, stub):
    lm = make_lm(use_chat_api=False)
    hotter = lm.copy(temperature=0.9)
    assert hotter.engine is lm.engine and hotter.kwargs["temperature"] == 0.9 and lm.kwargs["temperature"] == 0.0
    chat = lm.copy(use_chat_api=True, repetition_penalty=1.3)
    assert chat.engine is not lm.engine and chat.use_chat_api and chat.extra_body == {"repetition_penalty": 1.3}
    chat._generate("x")
    assert stub.posts()[0].path.endswith("/chat/completions")
    assert stub.posts()[0].headers["Authorization"] == f"Bearer {SECRET}", "the key carries over"


def test_acall_direct_prompt(make_lm):
    import asyncio

    lm = make_lm(use_chat_api=True)
    assert asyncio.run(lm.acall("Hi")) == ["echo: Hi"]
    assert asyncio.run(lm._agenerate("Hi", n=2))["choices"][1]["text"] == "echo: Hi"


def test_server_errors_surface_as_dspy_errors_after_retries(make_lm, stub):
    from dspy.utils.exceptions import LMAuthError, LMInvalidRequestError

    lm = make_lm(use_chat_api=True, api_key="wrong-key")
    with pytest.raises(LMAuthError):
        lm._generate("x")
    assert len(stub.posts()) == 1, "auth errors are not retried"
    stub.reset()
    stub.script(Fault(status=400, body={"error": {"message": "bad"}}))
    with pytest.raises(LMInvalidRequestError):
        make_lm(use_chat_api=True)._generate("x")
    assert len(stub.posts()) == 1
