"""DSPy programs end to end on Anyscale against the stub server, in both endpoint modes.

Every test here runs with warnings turned into errors: a DeprecationWarning from DSPy (the
forward()/aforward() plugin path, messages= from user code) would fail it.
"""

from __future__ import annotations

import asyncio
import warnings

import dspy
import pytest

from dspy_anyscale import Anyscale
from dspy_anyscale.testing import Fault

pytestmark = [
    pytest.mark.filterwarnings("error::DeprecationWarning"),
    pytest.mark.filterwarnings("error::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("error::FutureWarning"),
]

MODES = [pytest.param(False, id="completions"), pytest.param(True, id="chat")]


@pytest.fixture(autouse=True)
def _errors():
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("error", category)
        yield


@pytest.mark.parametrize("chat", MODES)
def test_chain_of_thought(make_lm, stub, chat):
    dspy.configure(lm=make_lm(use_chat_api=chat))
    prediction = dspy.ChainOfThought("question -> answer")(question="What is the capital of France?")
    assert prediction.answer == "answer for What is the capital of France?"
    assert prediction.reasoning == "reasoning for What is the capital of France?"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    assert [r.path for r in stub.posts()] == [path]


@pytest.mark.parametrize("chat", MODES)
def test_completions_mode_renders_system_and_user_into_one_prompt(make_lm, stub, chat):
    dspy.configure(lm=make_lm(use_chat_api=chat))
    dspy.Predict("question -> answer")(question="Why?")
    body = stub.posts()[0].body
    if chat:
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    else:
        assert "Your input fields are" in body["prompt"] and "[[ ## question ## ]]\nWhy?" in body["prompt"]
        assert "messages" not in body


@pytest.mark.parametrize("chat", MODES)
def test_predict_and_parallel(make_lm, stub, chat):
    dspy.configure(lm=make_lm(use_chat_api=chat))
    predict = dspy.Predict("question -> answer")
    questions = [f"question number {i}" for i in range(8)]
    pairs = [(predict, dspy.Example(question=q).with_inputs("question")) for q in questions]
    results = dspy.Parallel(num_threads=4)(pairs)
    assert [r.answer for r in results] == [f"answer for {q}" for q in questions]
    assert len(stub.posts()) == 8


def test_three_identical_cached_calls_make_one_request(make_lm, stub):
    dspy.configure(lm=make_lm(use_chat_api=True))
    cot = dspy.ChainOfThought("question -> answer")
    answers = {cot(question="Same?").answer for _ in range(3)}
    assert answers == {"answer for Same?"}
    assert len(stub.posts()) == 1


def test_cache_off_makes_every_request(make_lm, stub):
    dspy.configure(lm=make_lm(use_chat_api=True, cache=False))
    cot = dspy.ChainOfThought("question -> answer")
    for _ in range(3):
        cot(question="Same?")
    assert len(stub.posts()) == 3


def test_inspect_history(make_lm, capsys):
    lm = make_lm(use_chat_api=True)
    dspy.configure(lm=lm)
    dspy.ChainOfThought("question -> answer")(question="Where is Paris?")
    lm.inspect_history(n=1)
    out = capsys.readouterr().out
    assert "Where is Paris?" in out and "answer for Where is Paris?" in out
    dspy.inspect_history(n=1)
    assert "Where is Paris?" in capsys.readouterr().out


def test_track_usage_shows_the_servers_token_counts(make_lm, stub):
    dspy.configure(lm=make_lm(use_chat_api=True), track_usage=True)
    prediction = dspy.ChainOfThought("question -> answer")(question="Count my tokens")
    usage = prediction.get_lm_usage()
    from dspy_anyscale.testing import _usage

    sent = stub.posts()[0].body
    expected = _usage(
        sent,
        "\n\n".join(
            [
                "[[ ## reasoning ## ]]\nreasoning for Count my tokens",
                "[[ ## answer ## ]]\nanswer for Count my tokens",
                "[[ ## completed ## ]]",
            ]
        ),
    )
    model_usage = usage[next(iter(usage))]
    assert model_usage["prompt_tokens"] == expected["prompt_tokens"]
    assert model_usage["completion_tokens"] == expected["completion_tokens"]


def test_cache_hits_add_no_usage(make_lm):
    dspy.configure(lm=make_lm(use_chat_api=True), track_usage=True)
    cot = dspy.ChainOfThought("question -> answer")
    cot(question="once")
    assert cot(question="once").get_lm_usage() == {}


def test_async_program(make_lm, stub):
    dspy.configure(lm=make_lm(use_chat_api=True))
    cot = dspy.ChainOfThought("question -> answer")

    async def run():
        return await asyncio.gather(*(cot.acall(question=f"q{i}") for i in range(5)))

    results = asyncio.run(run())
    assert [r.answer for r in results] == [f"answer for q{i}" for i in range(5)]


def test_json_adapter_sends_a_schema_and_parses(make_lm, stub):
    dspy.configure(lm=make_lm(use_chat_api=True), adapter=dspy.JSONAdapter())
    prediction = dspy.ChainOfThought("question -> answer")(question="Structured?")
    assert prediction.answer == "answer for Structured?"
    fmt = stub.posts()[0].body["response_format"]
    assert fmt["type"] == "json_schema" and set(fmt["json_schema"]["schema"]["properties"]) == {"reasoning", "answer"}


def test_transient_failures_are_retried_by_dspy(make_lm, stub):
    stub.script(Fault(status=429, headers={"Retry-After": "0"}), Fault(status=503, headers={"Retry-After": "0"}))
    dspy.configure(lm=make_lm(use_chat_api=True))
    assert dspy.Predict("question -> answer")(question="retry me").answer == "answer for retry me"
    assert len(stub.posts()) == 3


def test_save_and_load_a_program_that_uses_anyscale(make_lm, stub, tmp_path, monkeypatch):
    lm = make_lm(use_chat_api=True, repetition_penalty=1.1, system_prompt="Be brief.")
    program = dspy.ChainOfThought("question -> answer")
    program.predict.lm = lm
    path = tmp_path / "program.json"
    program.save(path)
    monkeypatch.setenv("ANYSCALE_API_KEY", stub.api_key)
    loaded = dspy.ChainOfThought("question -> answer")
    loaded.load(path, allow_unsafe_lm_state=True)
    assert isinstance(loaded.predict.lm, Anyscale)
    assert loaded.predict.lm.api_base == lm.api_base and loaded.predict.lm.extra_body == {"repetition_penalty": 1.1}
    assert loaded(question="loaded?").answer == "answer for loaded?"
    assert stub.posts()[-1].body["repetition_penalty"] == 1.1
