"""Transport failures seen through a whole DSPy call, sync and async: one request per attempt once an
answer has begun, a silent resend only for a stale kept-alive connection, no key in any frame of
an error, pool sizes that mean what they say, and no memory kept by ended event loops."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dspy.utils.exceptions import LMError, LMProviderError, LMTransportError

import dspy_anyscale
from dspy_anyscale.testing import Fault

from ..conftest import MODEL, SECRET

ENDPOINTS = [pytest.param(False, id="completions"), pytest.param(True, id="chat")]
MODES = [pytest.param("sync", id="sync"), pytest.param("async", id="async")]
PACKAGE_ROOT = str(Path(dspy_anyscale.__file__).resolve().parents[1])
BOUNDED = (5, 30)  # no test here waits out the default 600 s read timeout if something goes wrong


def call(lm, mode: str, prompt: str = "hello there") -> str:
    if mode == "sync":
        return lm._generate(prompt)["choices"][0]["text"]
    return asyncio.run(lm._agenerate(prompt))["choices"][0]["text"]


def calls_on_one_connection(lm, mode: str, prompts: list[str], before_last=None) -> list[str]:
    """Several calls in a row on one pool (one thread / one event loop); ``before_last`` runs before the last."""
    if mode == "sync":
        answers = []
        for index, prompt in enumerate(prompts):
            if index == len(prompts) - 1 and before_last:
                before_last()
            answers.append(lm._generate(prompt)["choices"][0]["text"])
        return answers

    async def run() -> list[str]:
        answers = []
        for index, prompt in enumerate(prompts):
            if index == len(prompts) - 1 and before_last:
                before_last()
            answers.append((await lm._agenerate(prompt))["choices"][0]["text"])
        return answers

    return asyncio.run(run())


# --- one request per attempt -----------------------------------------------------------------


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_half_a_body_then_a_close_is_one_post_and_a_transport_error(make_lm, stub, chat, mode):
    stub.script(Fault(body_cut_after=40))
    with pytest.raises(LMTransportError):
        call(make_lm(use_chat_api=chat, num_retries=0, timeout=BOUNDED), mode)
    assert len(stub.posts()) == 1, "a paid generation is never requested twice for one attempt"


@pytest.mark.parametrize("mode", MODES)
def test_half_a_body_on_a_reused_connection_is_not_resent_either(make_lm, stub, mode):
    lm = make_lm(use_chat_api=True, num_retries=0, cache=False, timeout=BOUNDED)
    with pytest.raises(LMTransportError):
        calls_on_one_connection(lm, mode, ["first", "second"], lambda: stub.script(Fault(body_cut_after=40)))
    assert len(stub.posts()) == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_stale_kept_alive_connection_is_resent_at_once_and_not_counted_as_a_retry(make_lm, stub, mode):
    lm = make_lm(use_chat_api=True, num_retries=0, cache=False, timeout=BOUNDED)
    answers = calls_on_one_connection(lm, mode, ["first", "second"], lambda: stub.script(Fault(close=True)))
    assert answers == ["echo: first", "echo: second"]
    assert len(stub.posts()) == 3, "the warm-up, the request the server dropped unanswered, its resend"


@pytest.mark.parametrize("mode", MODES)
def test_a_new_connection_closed_unanswered_is_not_resent(make_lm, stub, mode):
    stub.script(Fault(close=True))
    with pytest.raises(LMTransportError):
        call(make_lm(use_chat_api=True, num_retries=0, timeout=BOUNDED), mode)
    assert len(stub.posts()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_plain_json_answer_to_a_stream_is_an_error_that_quotes_it_and_is_not_retried(make_lm, stub, mode):
    stub.script(Fault(ignore_stream=True))
    lm = make_lm(use_chat_api=True, timeout=BOUNDED)
    with pytest.raises(LMProviderError, match="Expected an event stream") as caught:
        if mode == "sync":
            list(lm.stream("one two three"))
        else:

            async def collect():
                return [chunk async for chunk in lm.astream("one two three")]

            asyncio.run(collect())
    assert "echo: one two three" in str(caught.value) and len(stub.posts()) == 1


@pytest.mark.parametrize("chat", ENDPOINTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_gzip_answer_is_read(make_lm, stub, chat, mode):
    stub.script(Fault(gzip=True))
    assert call(make_lm(use_chat_api=chat, timeout=BOUNDED), mode) == "echo: hello there"


# --- the key in captured frame locals ----------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def failure_of(lm, mode: str) -> BaseException:
    """The exception of one call; this frame holds no key (it is part of the traceback)."""
    try:
        lm("hi") if mode == "sync" else asyncio.run(lm.acall("hi"))
    except LMError as exc:
        return exc
    raise AssertionError("the call succeeded")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["401", "500", "read-timeout", "connection-refused"])
def test_no_frame_of_a_failed_call_holds_the_key(make_lm, stub, mode, case):
    """What Sentry records: every frame's locals, along the whole exception chain."""
    faults = {
        "401": Fault(status=401, body={"error": {"message": "Invalid API key"}}),
        "500": Fault(status=500),
        "read-timeout": Fault(delay=0.6),
    }
    if case in faults:
        stub.script(faults[case])
    base = f"http://127.0.0.1:{closed_port()}/v1" if case == "connection-refused" else stub.base_url
    lm = make_lm(api_base=base, use_chat_api=True, num_retries=0, cache=False, timeout=(5, 0.2))
    exc = failure_of(lm, mode)
    text = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
    assert "Traceback" in text and SECRET not in text


# --- what pool_size means ------------------------------------------------------------------------


def test_sync_pool_size_keeps_connections_without_capping_threads(make_lm, stub):
    stub.latency = 0.2
    lm = make_lm(use_chat_api=True, cache=False, pool_size=4, timeout=BOUNDED)
    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(lambda i: lm(f"t{i}"), range(12)))
    # Each thread beyond the pool opened a connection of its own rather than waiting for one.
    assert len({request.peer for request in stub.posts()}) == 12


def test_async_pool_size_is_the_most_connections_at_once(make_lm, stub):
    stub.latency = 0.2
    lm = make_lm(use_chat_api=True, cache=False, pool_size=4, timeout=BOUNDED)

    async def many():
        return await asyncio.gather(*(lm.acall(f"q{i}") for i in range(12)))

    assert [answer[0] for answer in asyncio.run(many())] == [f"echo: q{i}" for i in range(12)]
    assert len({request.peer for request in stub.posts()}) == 4, "calls beyond the limit waited for a connection"


# --- ended event loops keep nothing ----------------------------------------------------------------


def test_hundreds_of_asyncio_runs_release_their_sessions(stub):
    """The leak this guards against kept each ended loop's client: ~0.8 MB per asyncio.run."""
    script = textwrap.dedent(
        f"""
        import asyncio, gc, json, os
        from dspy_anyscale import Anyscale

        def rss_mb():
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

        lm = Anyscale({MODEL!r}, api_base={stub.base_url!r}, api_key={SECRET!r}, use_chat_api=True, cache=False)
        sessions = lm._async_engine_spec.transport._sessions
        left = []
        for i in range(330):
            if i == 30:  # warmed up: imports, caches, allocator arenas
                gc.collect()
                baseline = rss_mb()
            assert asyncio.run(lm.acall(f"run {{i}}")) == [f"echo: run {{i}}"]
            left.append(len(sessions))
        gc.collect()
        print(json.dumps({{"growth_mb": rss_mb() - baseline, "max_left": max(left)}}))
        """
    )
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc to read the resident set size")
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": PACKAGE_ROOT}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env={**_environ(), **env}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_left"] == 0, "an ended loop's session stayed in the table"
    # 300 runs: the leak grew ~240 MB; a generous bound far above noise and far below that.
    assert result["growth_mb"] < 30, result


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
