"""Forked children (multiprocessing's fork start method, pre-fork servers) never share their parent's
pooled connections: every answer matches its question, and the parent keeps working."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import queue

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
