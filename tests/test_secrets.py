"""The API key appears in no repr, history, saved state, pickle, cache file, log record or error."""

from __future__ import annotations

import copy
import logging
import pickle

import dspy
import pytest
from dspy.utils.exceptions import LMError

from dspy_anyscale import Anyscale
from dspy_anyscale.testing import Fault

from .conftest import MODEL, SECRET


def test_repr_and_str(make_lm):
    lm = make_lm()
    for text in (repr(lm), str(lm), repr(lm.engine), repr(lm.engine.transport), repr(vars(lm).get("_settings"))):
        assert SECRET not in text


def test_history_and_dump_state(make_lm):
    lm = make_lm(use_chat_api=True, headers={"X-Api-Key": "gateway-secret", "X-Team": "a"})
    dspy.configure(lm=lm)
    dspy.ChainOfThought("q -> a")(q="x")
    lm._generate("y")
    assert SECRET not in repr(lm.history) and SECRET not in repr(dspy.clients.base_lm.GLOBAL_HISTORY)
    state = lm.dump_state()
    assert SECRET not in repr(state)
    assert "gateway-secret" not in repr(state) and state["headers"] == {"X-Team": "a"}
    assert "api_key" not in state


def test_saved_program_file(make_lm, tmp_path):
    program = dspy.Predict("q -> a")
    program.lm = make_lm()
    program.save(tmp_path / "p.json")
    assert SECRET not in (tmp_path / "p.json").read_text()
    program.save(tmp_path / "whole", save_program=True)  # cloudpickle of the whole program
    files = [p for p in (tmp_path / "whole").rglob("*") if p.is_file()]
    assert files and all(SECRET.encode() not in p.read_bytes() for p in files)


def test_pickle_drops_the_key_and_rereads_it_from_the_environment(make_lm, stub, monkeypatch):
    lm = make_lm(use_chat_api=True)
    data = pickle.dumps(lm)
    assert SECRET.encode() not in data
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    restored = pickle.loads(data)
    assert restored.api_base == lm.api_base
    assert restored("after unpickling") == ["echo: after unpickling"]
    assert stub.posts()[-1].headers["Authorization"] == f"Bearer {SECRET}"


def test_unpickling_without_a_key_in_the_environment_says_what_to_set(make_lm):
    from dspy_anyscale import MissingConfigurationError

    data = pickle.dumps(make_lm())
    with pytest.raises(MissingConfigurationError, match="ANYSCALE_API_KEY"):
        pickle.loads(data)


def test_deepcopy_keeps_the_connection_without_rereading_the_environment(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    clone = copy.deepcopy(lm)
    assert clone.engine is lm.engine
    assert clone("deep") == ["echo: deep"]
    program = dspy.Predict("q -> a")
    program.lm = lm
    assert program.deepcopy().lm.engine is lm.engine


def test_disk_cache_files(make_lm, tmp_path):
    cache_dir = tmp_path / "dspy-cache"
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=False, disk_cache_dir=str(cache_dir))
    try:
        lm = make_lm(use_chat_api=True)
        dspy.configure(lm=lm)
        dspy.Predict("q -> a")(q="cache me")
        lm._generate("and me")
        files = [p for p in cache_dir.rglob("*") if p.is_file()]
        assert files, "the disk cache wrote nothing"
        assert all(SECRET.encode() not in p.read_bytes() for p in files)
    finally:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)


def test_log_records_at_every_level(make_lm, stub, caplog):
    caplog.set_level(logging.DEBUG)
    lm = make_lm(use_chat_api=True)
    lm._generate("logged")
    stub.script(Fault(status=500, body={"error": {"message": f"echo {SECRET}"}}))
    with pytest.raises(LMError):
        lm.copy(num_retries=0)._generate("fails")
    assert caplog.records, "expected debug records from the transport"
    assert all(SECRET not in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=401, body={"error": {"message": f"Invalid API key {SECRET}"}}),
        Fault(status=500, body={"error": {"message": f"upstream said Bearer {SECRET}"}}),
        Fault(status=200, body=f"<html>{SECRET}</html>".encode(), headers={"Content-Type": "text/html"}),
        Fault(reset=True),
    ],
)
def test_exception_messages(make_lm, stub, fault):
    stub.script(fault, fault)
    lm = make_lm(use_chat_api=True, num_retries=0)
    with pytest.raises(LMError) as caught:
        lm._generate("x")
    chain = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert all(SECRET not in str(e) and SECRET not in repr(e.args) for e in chain)


def test_wrong_key_error_points_at_the_variable(make_lm):
    from dspy.utils.exceptions import LMAuthError

    with pytest.raises(LMAuthError, match="ANYSCALE_API_KEY"):
        make_lm(api_key="not-the-key")._generate("x")


def test_constructor_key_never_lands_in_kwargs(stub):
    lm = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET)
    assert "api_key" not in lm.kwargs and SECRET not in repr(lm.kwargs)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("GET http://127.0.0.1:8000/v1 failed", "1", "GET http://127.0.0.1:8000/v1 failed"),
        ("the file does not exist", "x", "the file does not exist"),
        ("Bearer x was refused", "x", "Bearer *** was refused"),
        ('{"key": "x"}', "x", '{"key": "***"}'),
        ("key=abc123&x=1", "abc123", "key=***&x=1"),
        (f"token {SECRET}, again {SECRET}suffix", SECRET, "token ***, again ***suffix"),
    ],
)
def test_redaction_removes_a_short_key_only_as_a_whole_token(text, key, expected):
    from dspy_anyscale._secrets import Secret, redact

    assert redact(text, key) == expected
    assert redact(text, Secret(key)) == expected


def test_a_secret_never_shows_itself():
    from dspy_anyscale._secrets import Secret

    secret = Secret(SECRET)
    assert SECRET not in repr(secret) and SECRET not in str(secret) and SECRET not in f"{secret}"
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(secret)


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("x-portkey-config", '{"targets": [{"provider": "openai", "api_key": "k"}]}', True),
        ("x-portkey-config", '{"strategy": {"mode": "fallback"}}', False),
        ("x-portkey-config", "pc-saved-config-id", False),
        ("X-ApiKey", "v", True),
        ("xAccessToken", "v", True),
    ],
)
def test_a_header_is_secret_by_its_name_or_by_secret_fields_in_its_json(name, value, secret):
    from dspy_anyscale._secrets import is_secret_header

    assert is_secret_header(name, value) is secret


def test_a_portkey_config_with_target_keys_is_not_saved_with_the_program(make_lm):
    from dspy_anyscale import portkey_headers

    headers = portkey_headers(config={"targets": [{"provider": "openai", "api_key": "target-key-123456"}]}, api_key="")
    lm = make_lm(headers=headers)
    assert "target-key-123456" not in repr(lm.dump_state())
    assert b"target-key-123456" not in pickle.dumps(lm)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("Authorization", True),
        ("x-portkey-api-key", True),
        ("X-Api-Key", True),
        ("x_access_token", True),
        ("Cookie", True),
        ("x-portkey-provider", False),
        ("x-portkey-trace-id", False),
        ("X-Team", False),
        ("x-portkey-custom-host", False),
        ("x-portkey-virtual-key", True),
    ],
)
def test_which_header_values_are_secret(name, secret):
    from dspy_anyscale._secrets import is_secret_header

    assert is_secret_header(name) is secret


def _with_locals(exc: BaseException) -> str:
    """What Sentry-style reporters capture: the traceback with every frame's locals, for the frames of
    the library (this test's own frame holds the key it passed)."""
    import traceback

    report = traceback.TracebackException.from_exception(exc, capture_locals=True)
    text = []
    for current in _chain(report):
        frames = [frame for frame in current.stack if "/tests/" not in frame.filename]
        text.append(
            "".join(traceback.StackSummary.from_list(frames).format()) + "".join(current.format_exception_only())
        )
    return "".join(text)


def _chain(report):
    seen = []
    while report is not None and report not in seen:
        seen.append(report)
        report = report.__cause__ or report.__context__
    return seen


@pytest.mark.parametrize(
    "bad",
    [{"prompt_template": "no placeholder"}, {"timeout": None}, {"api_key": SECRET + "\n"}, {"headers": "x"}],
    ids=["prompt_template", "timeout", "key with a newline", "headers"],
)
def test_a_constructor_error_captured_with_locals_never_shows_the_key(stub, bad):
    with pytest.raises(Exception) as caught:
        Anyscale(MODEL, api_base=stub.base_url, **{"api_key": SECRET, **bad})
    assert SECRET not in _with_locals(caught.value)


@pytest.mark.parametrize(
    "fault", [Fault(status=401), Fault(status=500), Fault(reset=True)], ids=["401", "500", "reset"]
)
def test_a_call_error_captured_with_locals_never_shows_the_key(make_lm, stub, fault):
    stub.script(*[fault] * 4)
    with pytest.raises(LMError) as caught:
        make_lm(num_retries=0)("q")
    assert SECRET not in _with_locals(caught.value)


def test_a_models_error_captured_with_locals_never_shows_the_key(stub):
    stub.script(Fault(status=401))
    stub.api_key = "another-key"
    try:
        with pytest.raises(LMError) as caught:
            Anyscale.models(api_base=stub.base_url, api_key=SECRET)
    finally:
        stub.api_key = SECRET
    assert SECRET not in _with_locals(caught.value)
