"""Bad input gets a clear error naming what was wrong, before any request; keys never leak into it."""

from __future__ import annotations

import asyncio
import re
import warnings

import dspy
import pytest

from dspy_anyscale import (
    Anyscale,
    AnyscaleError,
    ConfigurationError,
    InvalidParameterError,
    UnsupportedParameterError,
    portkey_headers,
)
from dspy_anyscale._params import PARAMETERS

from .conftest import MODEL, SECRET

# --- the API key ---------------------------------------------------------------------------------

BAD_KEYS = {
    "trailing newline": SECRET + "\n",
    "leading space": " " + SECRET,
    "inner space": SECRET[:6] + " " + SECRET[6:],
    "tab": SECRET + "\t",
    "carriage return": SECRET + "\r\nX-Injected: 1",
    "NUL": SECRET + "\0",
    "escape": SECRET + "\x1b",
    "latin-1": SECRET + "é",
    "snowman": SECRET + "☃",
}


@pytest.mark.parametrize("key", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
@pytest.mark.parametrize("source", ["argument", "environment", ".env"])
def test_a_key_with_whitespace_or_control_characters_is_refused_without_showing_it(
    stub, monkeypatch, tmp_path, key, source
):
    kwargs = {"api_base": stub.base_url}
    if source == "environment" and "\0" in key:
        pytest.skip("an environment variable cannot hold NUL")
    if source == "argument":
        kwargs["api_key"] = key
    elif source == "environment":
        monkeypatch.setenv("ANYSCALE_API_KEY", key)
    else:
        # python-dotenv strips an unquoted value: quote it so the bad character survives, as in real files.
        escaped = key.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        (tmp_path / ".env").write_text(f'ANYSCALE_API_KEY="{escaped}"\n', encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        Anyscale(MODEL, **kwargs)
    message = str(caught.value)
    assert SECRET not in message and SECRET[4:12] not in message
    assert "position" in message and ("api_key" in message or "ANYSCALE_API_KEY" in message)
    assert stub.requests == []


# --- every generation parameter, at every entry point --------------------------------------------

BAD_VALUES = {
    "temperature": "hot",
    "max_tokens": 0,
    "top_p": 2,
    "top_k": 1.5,
    "seed": "1",
    "frequency_penalty": 3,
    "presence_penalty": "x",
    "max_completion_tokens": -1,
    "stop": 5,
    "logit_bias": "x",
    "logprobs": "yes",
    "top_logprobs": 50,
    "user": 5,
    "metadata": "x",
    "n": 0,
    "response_format": "json",
    "tools": "x",
    "tool_choice": 5,
    "parallel_tool_calls": "yes",
    "cache": "no",
    "rollout_id": {"a"},
}


def test_every_parameter_of_the_table_has_a_bad_value_here():
    assert set(BAD_VALUES) == set(PARAMETERS)


def _entry_points(lm):
    def program(**kwargs):
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="q", config=kwargs)

    return {
        "direct": lambda **kw: lm("q", **kw),
        "generate": lambda **kw: lm._generate("q", **kw),
        "acall": lambda **kw: asyncio.run(lm.acall("q", **kw)),
        "stream": lambda **kw: lm.stream("q", **kw),
        "astream": lambda **kw: lm.astream("q", **kw),
        "program": program,
    }


def _names_the_parameter(caught, name):
    assert caught.value.parameter == name
    assert re.search(rf"\b{name}\b", str(caught.value))


@pytest.mark.parametrize("name", sorted(set(BAD_VALUES) - {"tools", "tool_choice", "parallel_tool_calls"}))
@pytest.mark.parametrize("entry", ["direct", "generate", "acall", "stream", "astream", "program"])
def test_a_parameter_of_the_wrong_type_is_refused_naming_it(make_lm, stub, name, entry):
    if (entry, name) == ("program", "temperature"):
        pytest.skip("dspy.Predict compares temperature itself (a TypeError from DSPy) before calling the LM")
    call = _entry_points(make_lm(use_chat_api=True))[entry]
    with pytest.raises(InvalidParameterError) as caught:
        call(**{name: BAD_VALUES[name]})
    _names_the_parameter(caught, name)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
    assert isinstance(caught.value, ConfigurationError), "one family for everything passed wrong"
    assert stub.posts() == []


@pytest.mark.parametrize("name", ["tools", "tool_choice", "parallel_tool_calls"])
def test_tool_parameters_of_the_wrong_type_are_refused_on_messages_calls(make_lm, stub, name):
    lm = make_lm(use_chat_api=True)
    with warnings.catch_warnings(), pytest.raises(InvalidParameterError) as caught:
        warnings.simplefilter("ignore", DeprecationWarning)  # messages= dicts, as adapters send them
        lm(messages=[{"role": "user", "content": "q"}], **{name: BAD_VALUES[name]})
    _names_the_parameter(caught, name)
    assert stub.posts() == []


@pytest.mark.parametrize("name", sorted(set(BAD_VALUES) - {"tools", "tool_choice", "parallel_tool_calls"}))
def test_a_constructor_default_of_the_wrong_type_is_refused_at_construction(make_lm, name):
    with pytest.raises(InvalidParameterError) as caught:
        make_lm(**{name: BAD_VALUES[name]})
    _names_the_parameter(caught, name)


def test_stop_5_names_the_parameter(make_lm):
    with pytest.raises(InvalidParameterError, match=r"stop must be a non-empty string or a list of them, got int 5"):
        make_lm()("hi", stop=5)


@pytest.mark.parametrize("value", [{1, 2}, object(), b"bytes", float("nan")])
def test_a_provider_parameter_that_is_not_json_is_refused(make_lm, value):
    if isinstance(value, float):
        pytest.skip("orjson sends NaN as null; servers refuse it with a 400")
    with pytest.raises(InvalidParameterError, match="min_p"):
        make_lm(min_p=value)
    with pytest.raises(InvalidParameterError, match="min_p"):
        make_lm()._generate("q", min_p=value)


@pytest.mark.parametrize(("flag", "value"), [("only_completed", "yes"), ("return_sorted", 1), ("only_completed", None)])
def test_old_surface_flags_must_be_bools(make_lm, stub, flag, value):
    with pytest.raises(InvalidParameterError, match=flag):
        make_lm()("q", **{flag: value})
    assert stub.posts() == []


@pytest.mark.parametrize("prompt", [5, None, ["a"], b"x"])
@pytest.mark.parametrize("entry", ["direct", "generate", "stream"])
def test_a_prompt_that_is_not_text_is_refused(make_lm, prompt, entry):
    lm = make_lm()
    call = {"direct": lm, "generate": lm._generate, "stream": lm.stream}[entry]
    with pytest.raises(InvalidParameterError, match="prompt must be a string"):
        call(prompt)


# --- the constructor ---------------------------------------------------------------------------------

CONSTRUCTOR = [
    ({"model": 5}, "model"),
    ({"model": ""}, "model"),
    ({"model": " padded "}, "model"),
    ({"model": "meta-llama/"}, "model"),
    ({"api_base": 5}, "api_base"),
    ({"api_base": "ftp://host/v1"}, "api_base"),
    ({"api_base": "http://127.0.0.1:70000/v1"}, "port"),
    ({"api_base": "http://127.0.0.1:0/v1"}, "port"),
    ({"api_base": "http://my host/v1"}, "api_base"),
    ({"api_base": "http://127.0.0.1:8000/v1/my path"}, "api_base"),
    ({"api_base": "http://127.0.0.1:8000/v1\0"}, "api_base"),
    ({"api_base": "http://127.0.0.1:8000/v1/chat/completions"}, "base URL"),
    ({"api_key": 5}, "api_key"),
    ({"use_chat_api": "yes"}, "use_chat_api"),
    ({"timeout": None}, "timeout"),
    ({"timeout": "60"}, "timeout"),
    ({"timeout": 1e30}, "timeout"),
    ({"timeout": float("inf")}, "timeout"),
    ({"timeout": (5, 600, 1)}, "timeout"),
    ({"timeout": -1}, "timeout"),
    ({"num_retries": -1}, "num_retries"),
    ({"num_retries": "3"}, "num_retries"),
    ({"system_prompt": 123}, "system_prompt"),
    ({"prompt_template": 7}, "prompt_template"),
    ({"response_format_style": "xml"}, "response_format_style"),
    ({"supports_tools": "no"}, "supports_tools"),
    ({"supports_response_schema": 0}, "supports_response_schema"),
    ({"headers": "str"}, "headers"),
    ({"headers": {"X-Team": 1}}, "headers"),
    ({"headers": {"bad name": "v"}}, "header name"),
    ({"headers": {"X-Team": "a\r\nX-Injected: 1"}}, "line break"),
    ({"headers": {"X-Team": "café"}}, "non-ASCII"),
    ({"headers": {"Content-Length": "5"}}, "Content-Length"),
    ({"pool_size": 0}, "pool_size"),
    ({"pool_size": 2.5}, "pool_size"),
    ({"prices": "cheap"}, "prices"),
    ({"prices": {"input": -1, "output": 1}}, "prices"),
    ({"usage_log": 123}, "usage_log"),
]


@pytest.mark.parametrize(("kwargs", "match"), CONSTRUCTOR, ids=[repr(k) for k, _ in CONSTRUCTOR])
def test_wrong_constructor_arguments_are_refused_naming_them(stub, kwargs, match):
    args = {"model": MODEL, "api_base": stub.base_url, "api_key": SECRET, **kwargs}
    with pytest.raises(ConfigurationError, match=match) as caught:
        Anyscale(**args)
    assert SECRET not in str(caught.value)
    assert stub.requests == []


FAMILY = [
    ({"extra_headers": {"X-Team": "a"}}, UnsupportedParameterError),  # a setting given as a generation parameter
    ({"tools": [{"type": "function"}]}, UnsupportedParameterError),
    ({"temperature": "hot"}, InvalidParameterError),
    ({"min_p": {1, 2}}, InvalidParameterError),
    ({"timeout": None}, ConfigurationError),
    ({"budget_usd": -1}, ConfigurationError),
    ({"limits": "cheap"}, ConfigurationError),
]


@pytest.mark.parametrize(("kwargs", "kind"), FAMILY, ids=[next(iter(k)) for k, _ in FAMILY])
def test_everything_passed_wrong_is_one_family(stub, kwargs, kind):
    """A setting, a limit or a generation parameter: ``except ConfigurationError`` (a ValueError, an
    AnyscaleError) catches every wrong argument, and the subclass still says which kind."""
    with pytest.raises(ConfigurationError) as caught:
        Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, **kwargs)
    assert isinstance(caught.value, kind)
    assert isinstance(caught.value, AnyscaleError) and isinstance(caught.value, ValueError)
    assert stub.requests == []


def test_a_usage_log_that_is_a_directory_or_under_a_file_is_refused(stub, tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, match in ((tmp_path, "directory"), (tmp_path / "file" / "usage.jsonl", "is a file")):
        with pytest.raises(ConfigurationError, match=match):
            Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, usage_log=bad)


def test_usage_log_expands_the_home_directory(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    lm = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, usage_log="~/logs/usage.jsonl")
    lm("q")
    assert (tmp_path / "logs" / "usage.jsonl").is_file()


def test_a_half_built_instance_has_a_safe_repr():
    lm = Anyscale.__new__(Anyscale)
    assert "not fully constructed" in repr(lm)


# --- other public entry points -------------------------------------------------------------------

MODELS = [
    ({"api_base": 5}, "api_base"),
    ({"api_key": 5}, "api_key"),
    ({"timeout": None}, "timeout"),
    ({"headers": "x"}, "headers"),
]


@pytest.mark.parametrize(("kwargs", "match"), MODELS, ids=[repr(k) for k, _ in MODELS])
def test_models_refuses_wrong_arguments(stub, kwargs, match):
    args = {"api_base": stub.base_url, "api_key": SECRET, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        Anyscale.models(**args)
    assert stub.requests == []


PORTKEY = [
    ({"provider": 5}, "provider"),
    ({"config": 5}, "config"),
    ({"config": {"bad": {1, 2}}}, "JSON"),
    ({"metadata": "x"}, "metadata"),
    ({"metadata": {"k": object()}}, "JSON"),
    ({"retry_count": -1}, "retry_count"),
    ({"retry_count": True}, "retry_count"),
    ({"cache": "always"}, "cache"),
    ({"custom_host": "my-host"}, "custom_host"),
    ({"trace_id": "a\nb"}, "trace_id"),
    ({"virtual_key": ""}, "virtual_key"),
]


# ids without memory addresses: pytest-xdist's workers must collect the same names
@pytest.mark.parametrize(
    ("kwargs", "match"), PORTKEY, ids=[re.sub(r" at 0x[0-9a-f]+", "", repr(k)) for k, _ in PORTKEY]
)
def test_portkey_headers_refuses_wrong_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        portkey_headers(**kwargs)


def test_unsupported_and_invalid_stay_distinct(make_lm):
    with pytest.raises(UnsupportedParameterError):
        make_lm()._generate("q", tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(InvalidParameterError):
        make_lm()._generate("q", n="2")
