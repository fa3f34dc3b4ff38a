"""The API key appears in no repr, history, saved state, pickle, cache file, log record or error."""

from __future__ import annotations

import copy
import json
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


# --- every secret value the LM sends is redacted wherever the key is ------------------------------

# Secret header values of every kind: by name (Portkey's key, a virtual key, X-Auth-Token, a short
# custom key) and inside a JSON header (a Portkey config's target credential and virtual key).
HEADER_SECRETS = {
    "x-portkey-api-key": "pk-portkey-secret-0001",
    "x-portkey-virtual-key": "vk-portkey-secret-0002",
    "X-Auth-Token": "auth-token-secret-0003",
    "X-Api-Key": "k9",
}
CONFIG_SECRETS = ("sk-target-secret-0004", "vk-target-secret-0005")
CONFIG = json.dumps(
    {
        "strategy": {"mode": "fallback"},
        "targets": [{"provider": "openai", "api_key": CONFIG_SECRETS[0]}, {"virtual_key": CONFIG_SECRETS[1]}],
    }
)
SENT_SECRETS = (SECRET, *HEADER_SECRETS.values(), *CONFIG_SECRETS)
# What a gateway or proxy that quotes the request's headers back says.
ECHO = "; ".join(
    [
        f"Authorization: Bearer {SECRET}",
        *(f"{name}: {value}" for name, value in HEADER_SECRETS.items()),
        f"x-portkey-config: {CONFIG}",
    ]
)


@pytest.fixture
def secret_lm(make_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPY_ANYSCALE_IDENTITY_KEY_FILE", str(tmp_path / "identity.key"))
    return make_lm(use_chat_api=True, num_retries=0, headers={**HEADER_SECRETS, "x-portkey-config": CONFIG})


def _leaks(text: str) -> list[str]:
    return [value for value in SENT_SECRETS if value in text.replace("HTTP 4", "").replace("HTTP 5", "")]


def _error_text(exc: BaseException) -> str:
    chain = []
    error: BaseException | None = exc
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return "\n".join(f"{error}\n{error.args!r}\n{getattr(error, 'message', '')}" for error in chain)


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


ECHOING_FAULTS = {
    "400 error": Fault(status=400, body={"error": {"message": f"bad request headers: {ECHO}"}}),
    "401 error": Fault(status=401, body={"detail": f"denied: {ECHO}"}),
    "500 text": Fault(
        status=500, body=f"proxy failure, request was: {ECHO}".encode(), headers={"Content-Type": "text/plain"}
    ),
    "redirect": Fault(status=307, body=b"", headers={"Location": f"https://login.example/?token={SECRET}"}),
    "200 echo of the request": Fault(status=200, body={"headers": ECHO, "json": {"model": MODEL}}),
    "200 html": Fault(status=200, body=f"<html>{ECHO}</html>".encode(), headers={"Content-Type": "text/html"}),
}
STREAMED_FAULTS = {
    "stream error event": Fault(
        status=200,
        body=_sse(json.dumps({"error": {"message": f"upstream: {ECHO}"}})),
        headers={"Content-Type": "text/event-stream"},
    ),
    "stream event not JSON": Fault(
        status=200, body=_sse(f"oops {ECHO}"), headers={"Content-Type": "text/event-stream"}
    ),
}


@pytest.mark.parametrize("fault", list(ECHOING_FAULTS.values()), ids=list(ECHOING_FAULTS))
def test_no_secret_value_sent_appears_in_an_error(secret_lm, stub, fault):
    stub.script(fault, fault)
    for call in (
        lambda: secret_lm._generate("x"),
        lambda: secret_lm(dspy.lm15.Request(model=MODEL, messages=(dspy.lm15.Message.user("y"),))),
    ):
        with pytest.raises(LMError) as caught:
            call()
        assert _leaks(_error_text(caught.value)) == []
        assert _leaks(_with_locals(caught.value)) == []
    assert all(post.headers.get("X-Auth-Token") == HEADER_SECRETS["X-Auth-Token"] for post in stub.posts())


@pytest.mark.parametrize("fault", list(STREAMED_FAULTS.values()), ids=list(STREAMED_FAULTS))
def test_no_secret_value_sent_appears_in_a_stream_error(secret_lm, stub, fault):
    stub.script(fault)
    with pytest.raises(LMError) as caught:
        "".join(secret_lm.stream("x"))
    assert "***" in str(caught.value) and _leaks(_error_text(caught.value)) == []


def test_evaluate_and_parallel_error_logs_carry_only_redacted_text(secret_lm, stub, caplog):
    stub.script(*[ECHOING_FAULTS["400 error"]] * 4)
    program = dspy.Predict("question -> answer")
    devset = [dspy.Example(question="q1").with_inputs("question")]
    caplog.set_level(logging.DEBUG)
    with dspy.context(lm=secret_lm):
        dspy.Evaluate(devset=devset, metric=lambda *args: 1.0, num_threads=1, provide_traceback=True)(program)
        results = dspy.Parallel(num_threads=1, max_errors=5, provide_traceback=True)([(program, devset[0].inputs())])
    assert results == [None]
    logged = [record.getMessage() for record in caplog.records if "Error for" in record.getMessage()]
    assert len(logged) == 2 and all("***" in text for text in logged), "both error logs quote the error"
    assert _leaks(caplog.text) == []


def test_a_span_status_carries_only_redacted_text(secret_lm, stub):
    pytest.importorskip("opentelemetry.sdk", reason="needs the otel extra")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from dspy_anyscale import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider, record_content=True)
    try:
        stub.script(ECHOING_FAULTS["400 error"], ECHOING_FAULTS["500 text"])
        for _ in range(2):
            with pytest.raises(LMError):
                secret_lm("traced")
    finally:
        tracing.uninstrument()
    spans = exporter.get_finished_spans()
    descriptions = [span.status.description or "" for span in spans]
    assert sum("***" in text for text in descriptions) >= 2, "the error text was recorded (record_content=True)"
    assert _leaks("\n".join(span.to_json() for span in spans)) == []


def test_secrets_never_show_themselves():
    from dspy_anyscale._secrets import Secrets

    secrets = Secrets.sent_with(SECRET, {**HEADER_SECRETS, "x-portkey-config": CONFIG})
    assert _leaks(repr(secrets) + str(secrets)) == []
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(secrets)


@pytest.mark.parametrize(
    ("headers", "text", "expected"),
    [
        ({"X-Auth-Token": "tok-123456789"}, "token tok-123456789 refused", "token *** refused"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "got dXNlcjpwYXNz", "got ***"),
        ({"X-Key": "ab"}, "HTTP 400: key ab is bad; abc stays", "HTTP 400: key *** is bad; abc stays"),
        ({"x-portkey-config": '{"targets": [{"api_key": "sk-in-config-1"}]}'}, "sk-in-config-1", "***"),
        ({"x-portkey-config": '{"retry": {"attempts": 3}}'}, "attempts 3", "attempts 3"),
        ({"X-Team": "search-team-01"}, "team search-team-01", "team search-team-01"),
        ({"X-Auth-Token": 'a"quoted\\token'}, '{"h": "a\\"quoted\\\\token"}', '{"h": "***"}'),
    ],
    ids=[
        "by name",
        "after the scheme",
        "short, whole token only",
        "JSON field",
        "JSON without secrets",
        "not secret",
        "as JSON spells it",
    ],
)
def test_which_header_values_are_redacted(headers, text, expected):
    from dspy_anyscale._secrets import Secrets, redact

    assert redact(text, Secrets.sent_with(None, headers)) == expected
