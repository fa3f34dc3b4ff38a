"""The engine's own policies: bounded Retry-After waits, and no key in what a stream's errors say."""

from __future__ import annotations

import asyncio
import math
import time
import types

import pytest
from dspy.utils.exceptions import LMRateLimitError, LMServerError

from dspy_anyscale import Anyscale
from dspy_anyscale.testing import Fault

from .conftest import MODEL, SECRET
from .raw_server import RawServer, Reply, chat_chunk

MODES = ["sync", "async", "stream", "astream"]


def _call(lm, mode):
    if mode == "sync":
        return lm("q")
    if mode == "async":
        return asyncio.run(lm.acall("q"))
    if mode == "stream":
        return "".join(lm.stream("q"))

    async def collect():
        return "".join([chunk async for chunk in lm.astream("q")])

    return asyncio.run(collect())


@pytest.fixture
def waits(monkeypatch):
    """DSPy's backoff sleeps, recorded instead of slept (a sleep of hours would hang the test)."""
    import dspy.clients.execution as execution

    recorded: list[float] = []

    def fake_sleep(seconds):
        recorded.append(seconds)

    async def fake_async_sleep(seconds):
        recorded.append(seconds)

    monkeypatch.setattr(execution, "time", types.SimpleNamespace(sleep=fake_sleep))
    monkeypatch.setattr(execution, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": fake_async_sleep}))
    return recorded


TOO_LONG = {
    "27.7 hours": "99999",
    "an HTTP date in 2099": "Thu, 01 Jan 2099 00:00:00 GMT",
    "1e308 seconds": "1e308",
    "infinity": "inf",
    "an overflowing number": "1e400",
}


@pytest.mark.parametrize("value", list(TOO_LONG.values()), ids=list(TOO_LONG))
@pytest.mark.parametrize("mode", MODES)
def test_a_429_asking_for_too_long_a_wait_fails_at_once(make_lm, stub, waits, value, mode):
    stub.script(Fault(status=429, headers={"Retry-After": value}))
    lm = make_lm(use_chat_api=True, num_retries=3)
    started = time.perf_counter()
    with pytest.raises(LMRateLimitError, match=r"asked to wait .* more than max_retry_wait=60 s") as caught:
        _call(lm, mode)
    assert time.perf_counter() - started < 30, "failed at once"
    assert waits == [] and len(stub.posts()) == 1
    assert type(caught.value) is LMRateLimitError and caught.value.status == 429
    assert caught.value.retry_after is None or caught.value.retry_after > 60
    assert lm.usage[-1].status == "LMRateLimitError"


def test_a_503_asking_for_too_long_a_wait_fails_at_once_as_a_server_error(make_lm, stub, waits):
    stub.script(Fault(status=503, headers={"Retry-After": "3600"}))
    with pytest.raises(LMServerError, match="3600 s"):
        make_lm(num_retries=3)("q")
    assert waits == [] and len(stub.posts()) == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_max_retry_wait_is_settable_and_shorter_waits_are_honoured(make_lm, stub, waits, mode):
    stub.script(Fault(status=429, headers={"Retry-After": "5"}))
    assert _call(make_lm(max_retry_wait=10), mode) == ["echo: q"]
    assert waits == [5.0]
    stub.script(Fault(status=429, headers={"Retry-After": "5"}))
    with pytest.raises(LMRateLimitError, match="max_retry_wait=2 s"):
        _call(make_lm(max_retry_wait=2, cache=False), mode)


def test_max_retry_wait_survives_copies_and_saving(make_lm):
    lm = make_lm(max_retry_wait=5)
    assert lm.copy(temperature=0.5).engine.max_retry_wait == 5
    assert lm.copy(system_prompt="x").engine.max_retry_wait == 5
    assert Anyscale.load_state({**lm.dump_state(), "api_key": SECRET}).engine.max_retry_wait == 5


@pytest.mark.parametrize("bad", [-1, "60", math.inf, None])
def test_max_retry_wait_must_be_a_number_of_seconds(make_lm, bad):
    from dspy_anyscale import ConfigurationError

    with pytest.raises(ConfigurationError, match="max_retry_wait"):
        make_lm(max_retry_wait=bad)


# --- what stream errors quote ------------------------------------------------------------------


def _echoing_key(seen):
    """A server that quotes the request's Authorization in an in-stream error event."""
    quoted = seen.headers.get("Authorization", "")
    return Reply.sse(chat_chunk("partial "), {"error": {"message": f"upstream refused header {quoted}", "code": 400}})


def _non_json_event(seen):
    return Reply.sse(f"oops {seen.headers.get('Authorization', '')}")


@pytest.mark.parametrize("server", [_echoing_key, _non_json_event], ids=["error event", "non-JSON event"])
@pytest.mark.parametrize("mode", ["stream", "astream"])
def test_a_stream_error_never_quotes_the_key(server, mode):
    with RawServer(server) as raw:
        lm = Anyscale(MODEL, api_base=raw.base_url, api_key=SECRET, use_chat_api=True, num_retries=0)
        with pytest.raises(Exception) as caught:
            _call(lm, mode)
    text = "".join(str(e) for e in (caught.value, caught.value.__cause__, caught.value.__context__) if e)
    assert SECRET not in text and "***" in text
