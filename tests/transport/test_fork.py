"""Forked children (multiprocessing's fork start method, pre-fork servers) never share their parent's
pooled connections: every answer matches its question, and the parent keeps working. Their limiter
starts with a free gate, and never with a copy of the parent's ledger (they refuse instead)."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import queue
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs the fork start method",
)

CHILDREN = 4
CALLS = 20


def ask(lm, mode: str, question: str) -> str:
    if mode == "sync":
        return lm(question)[0]
    if mode == "async":
        return asyncio.run(lm.acall(question))[0]
    return "".join(lm.stream(question))


def child(lm, index: int, mode: str, results) -> None:
    """In the child: many distinct questions on the inherited LM; report every mismatch or error."""
    wrong: list[tuple[str, str]] = []
    error = None
    try:
        for number in range(CALLS):
            question = f"child {index} question {number}"
            answer = ask(lm, mode, question)
            if answer != f"echo: {question}":
                wrong.append((question, answer))
        # Let go of everything inherited from the parent, as an exiting interpreter would.
        from dspy_anyscale._transport import loops as _transport_loops

        _transport_loops._inherited.clear()
        gc.collect()
    except Exception as exc:  # reported to the parent, which fails the test with it
        error = repr(exc)[:500]
    results.put((index, wrong, error))


def run_children(lm, mode: str) -> list[tuple[int, list, str | None]]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=child, args=(lm, index, mode, results)) for index in range(CHILDREN)]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=120) for _ in processes]
    except queue.Empty:
        outcomes = []
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()
    assert len(outcomes) == CHILDREN, f"exit codes: {[process.exitcode for process in processes]}"
    return sorted(outcomes)


def assert_parent_still_works(lm) -> None:
    assert lm("parent after") == ["echo: parent after"]
    assert asyncio.run(lm.acall("parent after, async")) == ["echo: parent after, async"]
    assert "".join(lm.stream("parent after stream")) == "echo: parent after stream"


@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_children_forked_after_a_warm_up_get_fresh_connections(make_lm, stub, mode):
    lm = make_lm(use_chat_api=True, cache=False, num_retries=0, timeout=(5, 5))
    # The parent's pools now hold kept-alive connections: the sync pool, and the background loop's
    # session that sync streams use.
    assert lm("warm-up") == ["echo: warm-up"]
    assert "".join(lm.stream("warm up")) == "echo: warm up"
    for index, wrong, error in run_children(lm, mode):
        assert error is None and wrong == [], f"child {index}: {error or wrong[:3]}"
    assert_parent_still_works(lm)


def test_children_forked_from_inside_a_running_loop_leave_the_parents_loop_alone(make_lm, stub):
    lm = make_lm(use_chat_api=True, cache=False, num_retries=0, timeout=(5, 5))

    async def parent() -> list[str]:
        await lm.acall("warm-up")  # a kept-alive connection in this loop's session
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(None, run_children, lm, "async")
        for index, wrong, error in outcomes:
            assert error is None and wrong == [], f"child {index}: {error or wrong[:3]}"
        # Same loop, same session, same connection: the children must not have touched them.
        return [(await lm.acall(f"parent {number}"))[0] for number in range(5)]

    assert asyncio.run(parent()) == [f"echo: parent {number}" for number in range(5)]
    assert_parent_still_works(lm)


# --- the limiter in a forked child ----------------------------------------------------------------

_INHERITED: dict[str, object] = {}  # what a forked child finds in memory, as a module global would be


def _ask_inherited(question: str) -> tuple[str, str]:
    """In a child: one call on the LM inherited from the parent; what came back, or the error."""
    try:
        return "ok", _INHERITED["lm"](question)[0]  # type: ignore[operator]
    except Exception as exc:  # reported to the parent
        return type(exc).__name__, str(exc)


def _in_a_forked_child(question: str, timeout: float = 30.0) -> tuple[str, str]:
    """``_ask_inherited(question)`` in one forked child; a child that hangs fails the test."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    process = context.Process(target=lambda: results.put(_ask_inherited(question)))
    process.start()
    try:
        return results.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"the forked child was still blocked after {timeout:g}s")
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def test_a_child_forked_while_a_request_is_in_flight_starts_with_a_free_gate(make_lm, stub):
    from dspy_anyscale.testing import Fault

    lm = make_lm(max_concurrency=1, cache=False, num_retries=0, timeout=(5, 10))
    stub.script(Fault(delay=2.0))  # the parent's request stays on the wire while the child is forked
    parent = threading.Thread(target=lm, args=("parent, in flight",))
    parent.start()
    try:
        deadline = time.monotonic() + 10
        while lm.limiter.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert lm.limiter.in_flight == 1
        _INHERITED["lm"] = lm
        assert _in_a_forked_child("child") == ("ok", "echo: child")  # the parent's slot stayed with the parent
    finally:
        _INHERITED.clear()
        parent.join(30)
    assert (lm.limiter.in_flight, lm.limiter.waiting) == (0, 0)


@pytest.mark.parametrize(
    "limits",
    [{"max_requests": 3}, {"budget_usd": 1.0, "prices": {"input": 1.0, "output": 1.0}}, {"requests_per_minute": 600}],
)
def test_forked_children_refuse_rather_than_copy_the_ledger(make_lm, stub, limits):
    lm = make_lm(cache=False, num_retries=0, **limits)
    lm("before the fork")
    _INHERITED["lm"] = lm
    try:
        with multiprocessing.get_context("fork").Pool(3) as pool:
            outcomes = pool.map(_ask_inherited, [f"child question {i}" for i in range(9)], chunksize=1)
    finally:
        _INHERITED.clear()
    assert len(stub.posts()) == 1, "no child sent anything on a copy of the parent's ledger"
    for kind, message in outcomes:
        assert kind == "ConfigurationError"
        assert "forked" in message and "initializer" in message and "post_fork" in message
    assert lm("after the fork") == ["echo: after the fork"]  # the parent's ledger is untouched
    assert lm.spending().requests == 2
