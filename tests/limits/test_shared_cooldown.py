"""An LM without limits still shares a 429's cool-down: one ``Retry-After`` holds every caller of that LM
(threads, tasks, copies), so a single rate limit does not become a thundering herd of retries.

Asserted as lower bounds only (a request held for the Retry-After arrives no earlier than it says), which
a slow machine cannot break."""

from __future__ import annotations

import asyncio
import copy
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from dspy_anyscale.limits import Limiter, Limits
from dspy_anyscale.limits._cooling import CoolingLimiter
from dspy_anyscale.testing import Fault, dspy_field_responder

from .test_limits import run_bounded

RETRY_AFTER = 2.0


def _arrivals(stub) -> list[float]:
    """Record when each answered request reaches the stub (the 429 is scripted, not answered)."""
    times: list[float] = []
    lock = threading.Lock()

    def responder(endpoint, body):
        with lock:
            times.append(time.monotonic())
        return dspy_field_responder(endpoint, body)

    stub.responder = responder
    return times


def _heard_429(lm) -> bool:
    """The LM has heard the 429 (its limiter cools): the stub having received the request is not enough,
    the answer must have come back, or a caller started meanwhile rightly goes out."""
    return lm.limiter._wait_s() > 0


def _wait_for_429(lm, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _heard_429(lm):
        assert time.monotonic() < deadline, "the 429 never came back"
        time.sleep(0.005)


def test_one_429_holds_every_thread_of_an_lm_without_limits(make_lm, stub):
    lm = make_lm(use_chat_api=True, cache=False)
    assert not lm.limiter.enabled, "no limits: nothing is counted"
    arrivals = _arrivals(stub)
    stub.script(Fault(status=429, headers={"Retry-After": f"{RETRY_AFTER:g}"}))
    started = time.monotonic()
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(lm, "first")
        _wait_for_429(lm)  # the 429 has come back: every caller is held from now on
        others = [pool.submit(lm, f"other {i}") for i in range(8)]
        answers = [f.result(timeout=30) for f in (first, *others)]
    assert answers[0] == ["echo: first"] and len(answers) == 9
    assert len(stub.posts()) == 10, "one 429 and nine answers: nobody got a 429 of their own"
    assert min(arrivals) - started >= RETRY_AFTER * 0.95, "no request went out during the Retry-After"


def test_one_429_holds_every_task_and_copy(make_lm, stub):
    lm = make_lm(use_chat_api=True, cache=False)
    clone = lm.copy(temperature=0.7)
    assert clone.limiter is lm.limiter and copy.deepcopy(lm).limiter is lm.limiter
    arrivals = _arrivals(stub)
    stub.script(Fault(status=429, headers={"Retry-After": f"{RETRY_AFTER:g}"}))

    async def run() -> list[object]:
        started = time.monotonic()
        first = asyncio.ensure_future(lm.acall("first"))
        deadline = time.monotonic() + 10
        while not _heard_429(lm):  # the 429 has come back: every caller is held from now on
            assert time.monotonic() < deadline, "the 429 never came back"
            await asyncio.sleep(0.005)
        results = await asyncio.gather(first, *(clone.acall(f"other {i}") for i in range(8)))
        return [started, *results]

    started, *answers = run_bounded(lambda: asyncio.run(run()), timeout=60)
    assert len(answers) == 9 and len(stub.posts()) == 10
    assert min(arrivals) - started >= RETRY_AFTER * 0.95


def test_the_cooling_limiter_counts_nothing_and_arrives_fresh_after_pickling():
    limiter = CoolingLimiter()
    assert (limiter.enabled, limiter.needs_estimate, limiter.in_flight) == (False, False, 0)
    limiter.note_rate_limited(30)
    assert limiter._wait_s() > 29
    assert copy.copy(limiter) is limiter
    restored = pickle.loads(pickle.dumps(limiter))
    assert isinstance(restored, CoolingLimiter) and restored._wait_s() == 0.0
    assert limiter.report().requests == 0
    limiter.note_rate_limited(1e9)
    assert limiter._wait_s() <= 600.0, "capped as the ledger caps a cool-down"


def test_an_lm_with_limits_keeps_its_ledgers_cool_down(make_lm):
    lm = make_lm(max_concurrency=4)
    assert isinstance(lm.limiter, Limiter) and lm.limiter.limits == Limits(max_concurrency=4)
    assert isinstance(make_lm().limiter, CoolingLimiter)
