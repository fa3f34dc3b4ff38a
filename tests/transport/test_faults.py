"""Scripted faults against the stub server, for both endpoints, sync and async: what is retried,
what is not, what the error says; a soak test with random transient faults; real concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMError,
    LMInvalidRequestError,
    LMProviderError,
    LMTimeoutError,
    LMTransportError,
)

from dspy_anyscale.testing import Fault

from ..conftest import SECRET
from ..leaks import no_leaked_sockets

ENDPOINTS = [pytest.param(False, id="completions"), pytest.param(True, id="chat")]
MODES = [pytest.param("sync", id="sync"), pytest.param("async", id="async")]


@pytest.fixture
def waits(monkeypatch):
    """The backoff delays DSPy's retry loop asks for, recorded instead of slept (capped at 10 ms).

    Only DSPy's execution module sees the fake: the stub server's own sleeps stay real.
    """
    import dspy.clients.execution as execution

    recorded: list[float] = []

    def fake_sleep(seconds):
        recorded.append(seconds)
        time.sleep(min(seconds, 0.01))

    async def fake_async_sleep(seconds):
        recorded.append(seconds)
        await asyncio.sleep(min(seconds, 0.01))

    monkeypatch.setattr(execution, "time", types.SimpleNamespace(sleep=fake_sleep))
    monkeypatch.setattr(execution, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": fake_async_sleep}))
    return recorded


def call(lm, mode: str, prompt: str = "hello there"):
    if mode == "sync":
        return lm._generate(prompt)["choices"][0]["text"]
    return asyncio.run(lm._agenerate(prompt))["choices"][0]["text"]


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_429_retry_after_is_honoured(make_lm, stub, waits, chat, mode):
    stub.script(Fault(status=429, headers={"Retry-After": "1.5"}))
    assert call(make_lm(use_chat_api=chat), mode) == "echo: hello there"
    assert len(stub.posts()) == 2
    assert 1.5 in waits, "DSPy waits what the server asked for"


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "fault",
    [Fault(status=500), Fault(status=502), Fault(status=503), Fault(reset=True)],
    ids=["500", "502", "503", "connection-reset"],
)
def test_transient_failures_twice_then_success(make_lm, stub, waits, chat, mode, fault):
    stub.script(fault, fault)
    assert call(make_lm(use_chat_api=chat), mode) == "echo: hello there"
    assert len(stub.posts()) == 3


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_read_timeout_then_success(make_lm, stub, waits, chat, mode):
    stub.script(Fault(delay=1.0))
    lm = make_lm(use_chat_api=chat, timeout=(5, 0.25))
    assert call(lm, mode) == "echo: hello there"
    assert len(stub.posts()) == 2


@pytest.mark.parametrize("mode", MODES)
def test_timeouts_exhausted_is_dspys_timeout_error(make_lm, stub, waits, mode):
    stub.script(*[Fault(delay=0.6)] * 3)
    lm = make_lm(use_chat_api=True, timeout=(5, 0.2), num_retries=2)
    with pytest.raises(LMTimeoutError, match=r"read timeout 0\.2s"):
        call(lm, mode)
    assert len(stub.posts()) == 3


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault(status=401, body={"error": {"message": "Invalid API key"}}), LMAuthError),
        (
            Fault(
                status=400,
                body={
                    "error": {
                        "message": "the request exceeds the available context size",
                        "type": "exceed_context_size_error",
                    }
                },
            ),
            ContextWindowExceededError,
        ),
        (Fault(status=400, body={"error": {"message": "temperature must be <= 2"}}), LMInvalidRequestError),
    ],
)
def test_client_errors_are_not_retried(make_lm, stub, waits, chat, mode, fault, error):
    stub.script(fault)
    with pytest.raises(error):
        call(make_lm(use_chat_api=chat), mode)
    assert len(stub.posts()) == 1 and waits == []


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fault", "says"),
    [
        (Fault(status=200, body=b'{"choices": [', headers={"Content-Type": "application/json"}), '{"choices": ['),
        (
            Fault(
                status=200,
                body=b"<html><title>Endpoints have shut down</title></html>",
                headers={"Content-Type": "text/html"},
            ),
            "Endpoints have shut down",
        ),
        (Fault(status=200, body={"id": "x", "choices": []}), "non-empty 'choices'"),
    ],
)
def test_bad_answers_say_what_came_back(make_lm, stub, waits, chat, mode, fault, says):
    stub.script(fault)
    with pytest.raises(LMProviderError) as caught:
        call(make_lm(use_chat_api=chat), mode)
    message = str(caught.value)
    assert says in message and stub.base_url in message and "HTTP 200" in message
    assert len(stub.posts()) == 1


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_truncated_stream_is_an_error_not_a_short_answer(make_lm, stub, waits, chat, mode):
    stub.script(Fault(stream_cut_after=3))
    lm = make_lm(use_chat_api=chat)
    with pytest.raises(LMTransportError, match="the answer is incomplete"):
        if mode == "sync":
            list(lm.stream("one two three four five six"))
        else:
            asyncio.run(_collect(lm.astream("one two three four five six")))
    assert len(stub.posts()) == 1, "chunks were already delivered: no retry"


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_a_stream_failing_before_its_first_chunk_is_retried(make_lm, stub, waits, chat):
    stub.script(Fault(status=503), Fault(stream_cut_after=0))
    assert "".join(make_lm(use_chat_api=chat).stream("a b c")) == "echo: a b c"
    assert len(stub.posts()) == 3


async def _collect(iterator):
    return [item async for item in iterator]


def test_no_error_text_contains_the_key(make_lm, stub, waits):
    cases = [
        [Fault(status=401, body={"error": {"message": f"bad {SECRET}"}})],
        [Fault(status=500, body={"error": {"message": f"upstream {SECRET}"}})],
        [Fault(status=200, body=f"<p>{SECRET}</p>".encode(), headers={"Content-Type": "text/html"})],
        [Fault(reset=True), Fault(reset=True)],  # the transport retries one reset by itself
        [Fault(delay=0.6)],
    ]
    lm = make_lm(use_chat_api=True, num_retries=0, timeout=(5, 0.2))
    for faults in cases:
        stub.script(*faults)
        with pytest.raises(LMError) as caught:
            lm._generate("x")
        for error in (caught.value, caught.value.__cause__):
            assert SECRET not in str(error)


@pytest.mark.parametrize("chat", ENDPOINTS)
def test_soak_200_calls_8_threads_15_percent_faults(make_lm, stub, waits, chat):
    stub.chaos(0.15, seed=1 if chat else 2)
    lm = make_lm(use_chat_api=chat, num_retries=8, cache=False)
    prompts = [f"request number {i}" for i in range(200)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda p: lm._generate(p)["choices"][0]["text"], prompts))
    assert answers == [f"echo: {p}" for p in prompts], "none lost, none mixed up"
    assert len(stub.posts()) > 200, "faults were injected and retried"


def test_async_calls_run_concurrently_on_one_loop(make_lm, stub):
    stub.latency = 0.3
    lm = make_lm(use_chat_api=True, cache=False)

    async def many():
        return await asyncio.gather(*(lm.acall(f"q{i}") for i in range(64)))

    results = asyncio.run(many())
    assert [r[0] for r in results] == [f"echo: q{i}" for i in range(64)]
    assert stub.max_in_flight >= 32, f"only {stub.max_in_flight} requests were in flight at once"


def test_threads_share_a_pool_sized_for_them(make_lm, stub):
    stub.latency = 0.2
    lm = make_lm(use_chat_api=True, cache=False)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: lm(f"t{i}"), range(16)))
    assert stub.max_in_flight == 16


def test_asyncio_run_many_times_leaves_no_open_sockets(make_lm, stub):
    lm = make_lm(use_chat_api=True, cache=False)
    with no_leaked_sockets():
        for i in range(5):
            assert asyncio.run(lm.acall(f"loop {i}")) == [f"echo: loop {i}"]


def test_the_socket_check_catches_a_leak_planted_on_purpose(stub):
    import socket

    with pytest.raises(AssertionError, match=r"left open|ResourceWarning"), no_leaked_sockets():
        planted = socket.create_connection(("127.0.0.1", stub.port))
    planted.close()
    with pytest.raises(AssertionError, match="ResourceWarning"), no_leaked_sockets():
        socket.create_connection(("127.0.0.1", stub.port))  # dropped unclosed: only a finalizer notices


def test_dspy_program_async_with_faults(make_lm, stub, waits):
    stub.script(Fault(status=503), Fault(reset=True))
    dspy.configure(lm=make_lm(use_chat_api=True))
    prediction = asyncio.run(dspy.ChainOfThought("question -> answer").acall(question="async?"))
    assert prediction.answer == "answer for async?"


def test_requests_an_earlier_test_left_in_flight_do_not_count_after_a_reset(stub):
    # The stub is shared by the session: a request still being answered from before reset() (a slow one
    # a test gave up on) must not inflate the next test's in-flight counts, nor make them negative later.
    stub.latency = 0.5
    request = urllib.request.Request(
        f"{stub.base_url}/chat/completions",
        data=b'{"model": "m", "messages": [{"role": "user", "content": "left behind"}]}',
        headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"},
    )
    left = threading.Thread(target=lambda: urllib.request.urlopen(request, timeout=5).read())
    left.start()
    deadline = time.monotonic() + 5
    while stub.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stub.in_flight == 1
    stub.reset()
    assert (stub.in_flight, stub.max_in_flight) == (0, 0)
    left.join(5)
    assert (stub.in_flight, stub.max_in_flight) == (0, 0)
