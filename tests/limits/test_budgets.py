"""Budgets, rate limits and concurrency caps on Anyscale, against the stub: they hold across threads,
asyncio tasks, streams and copies; a refusal is never sent nor retried; one 429 holds every caller."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import pickle
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.utils.exceptions import is_retryable_lm_error

from dspy_anyscale import ConfigurationError, testing
from dspy_anyscale.cli import main as cli
from dspy_anyscale.errors import BudgetExceededError, LimiterDeadlockError, LMError
from dspy_anyscale.limits import Limits
from dspy_anyscale.testing import Fault

from .test_limits import DENSE, run_bounded

PRICES = {"input": 100.0, "output": 100.0}  # USD per million tokens: a stub call costs ~ $0.001


def _slow(stub, seconds):
    stub.latency = seconds


def test_32_threads_never_exceed_max_concurrency_at_the_server(make_lm, stub):
    _slow(stub, 0.05)
    lm = make_lm(max_concurrency=4, cache=False)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: lm(f"q{i}")[0], range(64)))
    assert answers == [f"echo: q{i}" for i in range(64)]
    assert stub.max_in_flight == 4


def test_64_acalls_and_streams_share_the_cap(make_lm, stub):
    _slow(stub, 0.05)
    lm = make_lm(max_concurrency=4, cache=False, use_chat_api=True)

    async def stream(i):
        return "".join([chunk async for chunk in lm.astream(f"s{i}")])

    async def main():
        return await asyncio.gather(*(lm.acall(f"q{i}") for i in range(48)), *(stream(i) for i in range(16)))

    results = asyncio.run(main())
    assert len(results) == 64 and stub.max_in_flight == 4


def test_dspys_n_candidates_count_against_the_cap(make_lm, stub):
    _slow(stub, 0.05)
    lm = make_lm(max_concurrency=2, cache=False)

    async def main():
        return await asyncio.gather(*(lm._agenerate(f"q{i}", n=3) for i in range(4)))

    assert all(len(result["choices"]) == 3 for result in asyncio.run(main()))
    assert stub.max_in_flight == 2 and len(stub.posts()) == 12


def test_requests_per_minute_spaces_the_calls(make_lm, stub):
    lm = make_lm(requests_per_minute=600, cache=False)  # 10 a second, a bucket of 10
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: lm(f"q{i}"), range(30)))
    elapsed = time.perf_counter() - started
    assert elapsed >= 1.8, "30 calls at 10 a second after a burst of 10 take about 2 s"
    assert elapsed < 15, "and not much more (generous: the machine may be busy)"


def _total_cost(lm):
    return sum(record.cost_usd for record in lm.usage if record.status == "ok")


@pytest.mark.parametrize("mode", ["threads", "async", "copies"])
def test_the_budget_is_never_exceeded(make_lm, stub, mode):
    _slow(stub, 0.02)
    lm = make_lm(prices=PRICES, budget_usd=0.02, max_tokens=20, cache=False)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(target, i):
        try:
            target(f"question number {i}")
            result = "ok"
        except BudgetExceededError:
            result = "refused"
        with lock:
            outcomes.append(result)

    if mode == "async":

        async def aone(i):
            try:
                await lm.acall(f"question number {i}")
                outcomes.append("ok")
            except BudgetExceededError:
                outcomes.append("refused")

        async def main():
            await asyncio.gather(*(aone(i) for i in range(60)))

        asyncio.run(main())
    else:
        targets = [lm, lm.copy(temperature=0.5), copy.deepcopy(lm), lm.copy(system_prompt="Be brief.")]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: one(targets[i % 4] if mode == "copies" else lm, i), range(60)))
    spending = lm.spending()
    assert outcomes.count("ok") >= 1 and outcomes.count("refused") >= 1
    assert spending.spent_usd <= 0.02 and spending.refused == outcomes.count("refused")
    assert len(stub.posts()) == outcomes.count("ok"), "a refused request was never sent"
    if mode != "copies":
        assert _total_cost(lm) <= 0.02 + 1e-12, "what the server answered costs no more than the budget"


def test_a_refusal_is_not_retried_and_says_spent_reserved_and_budget(make_lm, stub):
    lm = make_lm(prices=PRICES, budget_usd=0.0001, max_tokens=20, num_retries=3)
    with pytest.raises(BudgetExceededError, match=r"budget_usd exceeded: .*spent .* reserved .*budget") as caught:
        lm("too expensive for this budget")
    assert not is_retryable_lm_error(caught.value) and stub.posts() == []
    assert lm.usage[-1].status == "budget" and lm.usage[-1].attempts == 0


def test_max_requests_caps_a_program_run(make_lm, stub):
    lm = make_lm(max_requests=3, cache=False)
    with dspy.context(lm=lm):
        predict = dspy.Predict("question -> answer")
        for i in range(3):
            predict(question=f"q{i}")
        with pytest.raises(BudgetExceededError, match="max_requests"):
            predict(question="one too many")
    assert len(stub.posts()) == 3 and lm.spending().remaining_requests == 0


def test_refused_calls_are_in_the_usage_log_and_summary(make_lm, tmp_path, capsys):
    log = tmp_path / "usage.jsonl"
    lm = make_lm(max_requests=1, usage_log=log, cache=False)
    lm("first")
    with pytest.raises(BudgetExceededError):
        lm("second")
    assert [record.status for record in lm.usage] == ["ok", "budget"]
    assert cli(["usage", str(log)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("meta-llama"))
    assert row.split()[1:5] == ["2", "0", "0", "1"], "calls, errors, cached, refused"


def test_one_429_holds_every_caller(make_lm, stub):
    # Answers take 0.1 s; the scripted 429 comes back at once (a responder is not asked for a fault),
    # so the cool-down starts while the rest of the first wave is in flight. Lower bounds only: the
    # limiter guarantees that nothing admitted after the 429 reaches the server before its Retry-After.
    received: list[float] = []
    plain = stub.responder

    def responder(endpoint, body):
        received.append(time.monotonic())
        time.sleep(0.1)
        return plain(endpoint, body)

    stub.responder = responder
    stub.script(Fault(status=429, headers={"Retry-After": "1"}))
    lm = make_lm(max_concurrency=4, cache=False)
    noted: list[tuple[float, int]] = []
    note = lm.limiter.note_rate_limited

    def noting(seconds=None):
        noted.append((time.monotonic(), lm.limiter.in_flight))
        note(seconds)

    lm.limiter.note_rate_limited = noting
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: lm(f"q{i}"), range(8)))
    assert answers == [[f"echo: q{i}"] for i in range(8)]
    [(at, in_flight)] = noted  # in_flight: the 429's own slot and the rest of the first wave admitted by then
    during = [t for t in received if t < at + 1.0]
    assert len(received) == 8, "every caller was answered, the refused one after its retry"
    assert len(during) <= in_flight - 1 <= 3, "only requests admitted before the 429 reached the server during it"
    assert lm.spending().rate_limited == 1


def test_limits_need_prices_and_max_tokens(make_lm):
    with pytest.raises(ConfigurationError, match="budget_usd needs prices"):
        make_lm(model="my-org/unpriced-model", budget_usd=1.0)
    with pytest.raises(ConfigurationError, match="max_tokens"):
        make_lm(prices=PRICES, budget_usd=1.0, max_tokens=None)
    for bad in ({"max_concurrency": 0}, {"requests_per_minute": -1}, {"budget_usd": "5"}, {"max_requests": 1.5}):
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            make_lm(**bad)


def test_limits_can_be_given_as_one_value(make_lm, stub):
    lm = make_lm(prices=PRICES, limits=Limits(max_requests=1, max_concurrency=3), cache=False)
    assert lm.limiter.limits == Limits(max_requests=1, max_concurrency=3)
    lm("first")
    with pytest.raises(BudgetExceededError, match="max_requests reached"):
        lm("second")
    assert len(stub.posts()) == 1
    state = lm.dump_state()  # saved as the keywords, which every version takes
    assert (state["max_requests"], state["max_concurrency"]) == (1, 3) and "limits" not in state
    assert lm.copy(temperature=0.5).limiter is lm.limiter, "a copy shares the ledger"
    renewed = lm.copy(limits=Limits(budget_usd=1.0))
    assert renewed.limiter is not lm.limiter and renewed.limiter.limits == Limits(budget_usd=1.0), "new limits replace"


def test_limits_and_the_limit_keywords_together_are_refused_saying_which_to_keep(make_lm):
    keep_one = r"limits=Limits\(max_requests=2\) and budget_usd=1.0 both set limits: keep one"
    with pytest.raises(ConfigurationError, match=keep_one):
        make_lm(prices=PRICES, limits=Limits(max_requests=2), budget_usd=1.0)
    with pytest.raises(
        ConfigurationError, match=r"limits must be None or a dspy_anyscale.limits.Limits\(\.\.\.\), got dict"
    ):
        make_lm(limits={"budget_usd": 1.0})
    lm = make_lm(prices=PRICES, budget_usd=1.0)
    with pytest.raises(ConfigurationError, match="keep one"):
        lm.copy(limits=Limits(max_requests=2), budget_usd=2.0)


def test_limits_given_as_one_value_are_checked_like_the_keywords(make_lm):
    with pytest.raises(ConfigurationError, match="budget_usd needs prices"):
        make_lm(model="my-org/unpriced-model", limits=Limits(budget_usd=1.0))
    with pytest.raises(ConfigurationError, match="max_tokens"):
        make_lm(prices=PRICES, limits=Limits(tokens_per_minute=1000), max_tokens=None)


def test_copies_share_the_ledger_and_saved_state_keeps_the_limits(make_lm):
    lm = make_lm(prices=PRICES, budget_usd=1.0, max_concurrency=3)
    for copied in (lm.copy(temperature=0.3), copy.deepcopy(lm), lm.copy(use_chat_api=True)):
        assert copied.limiter is lm.limiter
    assert lm.copy(budget_usd=2.0).limiter is not lm.limiter
    state = lm.dump_state()
    assert (state["budget_usd"], state["max_concurrency"]) == (1.0, 3)


def test_an_unpickled_lm_never_gets_a_fresh_budget(make_lm, monkeypatch):
    from ..conftest import SECRET

    lm = make_lm(prices=PRICES, budget_usd=1.0)
    lm("spend a little")
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    restored = pickle.loads(pickle.dumps(lm))
    with pytest.raises(ConfigurationError, match="ledger"):
        restored("would start a new budget")


def test_no_limits_means_no_limiter(make_lm):
    lm = make_lm()
    assert not lm.limiter.enabled and lm.spending().budget_usd is None


# --- never a hang ------------------------------------------------------------------------------------


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_a_plain_call_inside_async_code_fails_at_once_rather_than_hang_behind_its_own_loop(make_lm, stub):
    _slow(stub, 0.2)
    lm = make_lm(max_concurrency=1, cache=False)

    async def handler():  # a FastAPI handler, a notebook cell
        pending = asyncio.create_task(lm.acall("first"))
        await _until(lambda: lm.limiter.in_flight == 1)  # the acall holds the only slot
        with pytest.raises(LimiterDeadlockError, match=r"await lm\.acall"):
            lm("second")
        assert await pending == ["echo: first"]
        return lm("third")  # nothing of this loop ahead: it goes

    assert run_bounded(lambda: asyncio.run(handler()), 60) == ["echo: third"]
    assert len(stub.posts()) == 2  # the refused call sent nothing
    assert sorted(record.status == "ok" for record in lm.usage) == [False, True, True]


def test_a_sync_stream_read_inside_async_code_fails_at_once_rather_than_hang_behind_its_own_loop(make_lm, stub):
    _slow(stub, 0.2)
    lm = make_lm(max_concurrency=1, cache=False)

    async def handler():
        pending = asyncio.create_task(lm.acall("first"))
        await _until(lambda: lm.limiter.in_flight == 1)  # the acall holds the only slot
        with pytest.raises(LimiterDeadlockError, match=r"await lm\.acall"):
            "".join(lm.stream("second"))  # its request runs on another loop, on behalf of this blocked one
        assert await pending == ["echo: first"]
        return "".join(lm.stream("third"))

    assert run_bounded(lambda: asyncio.run(handler()), 60) == "echo: third"
    assert len(stub.posts()) == 2  # the refused stream sent nothing


def test_first_answer_wins_leaves_nothing_that_blocks_later_callers(make_lm, stub):
    _slow(stub, 0.2)
    lm = make_lm(max_concurrency=1, cache=False)
    loop = asyncio.new_event_loop()
    try:
        tasks = [loop.create_task(lm.acall(f"q{i}")) for i in range(3)]
        done, pending = loop.run_until_complete(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED))
        assert len(done) == 1 and len(pending) == 2  # the loop stopped with the losers in the gate
        assert run_bounded(lambda: lm("later"), 60) == ["echo: later"]
        assert run_bounded(lambda: asyncio.run(lm.acall("later, async")), 60) == ["echo: later, async"]
        results = [*loop.run_until_complete(asyncio.gather(*pending)), *(task.result() for task in done)]
        assert sorted(answer for [answer] in results) == [f"echo: q{i}" for i in range(3)]  # resumed, they finish
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert (lm.limiter.in_flight, lm.limiter.waiting) == (0, 0)
    assert len(stub.posts()) == 5


# --- never an overspend ----------------------------------------------------------------------------


def _usage_a_token_per_byte(body, text):
    """What a byte-level BPE counts at worst: a token per UTF-8 byte, plus a few for the chat template."""
    if "messages" in body:
        prompt = sum(len(str(message.get("content") or "").encode()) + 6 for message in body["messages"]) + 10
    else:
        prompt = len(str(body.get("prompt", "")).encode()) + 1
    completion = max(1, len(text.split()))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_the_budget_holds_against_a_server_that_counts_a_token_per_byte(make_lm, stub, monkeypatch, chat):
    monkeypatch.setattr(testing, "_usage", _usage_a_token_per_byte)
    _slow(stub, 0.02)
    budget = 0.10
    lm = make_lm(
        prices={"input": 10.0, "output": 10.0}, budget_usd=budget, max_tokens=20, cache=False, use_chat_api=chat
    )
    texts = list(DENSE.values())

    def one(i):
        with contextlib.suppress(BudgetExceededError):
            lm(texts[i % len(texts)][: 200 + 13 * i])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(64)))
    spending = lm.spending()
    assert spending.requests >= 2 and spending.refused >= 1
    assert spending.spent_usd <= budget and spending.overruns == 0
    assert _total_cost(lm) <= budget + 1e-12, "what the server counted costs no more than the budget"


def test_every_request_sent_counts_against_max_requests_whatever_its_answer(make_lm, stub):
    stub.chaos(1.0, [Fault(status=500, headers={"Retry-After": "0"})])
    lm = make_lm(max_requests=1, cache=False, num_retries=2)
    for i in range(5):
        with pytest.raises(LMError):
            lm(f"q{i}")
    assert len(stub.posts()) == 1, "one request allowed, one sent: DSPy's retries are requests too"
    spending = lm.spending()
    assert (spending.requests, spending.remaining_requests, spending.failed) == (1, 0, 1)
    assert "1 request of 1, 0 left" in str(spending)


def _n_call(lm, how: str, n: int) -> list:
    messages = [{"role": "user", "content": "name a colour"}]
    if how == "_generate":
        return lm._generate("name a colour", n=n)["choices"]
    if how == "_agenerate":
        return asyncio.run(lm._agenerate("name a colour", n=n))["choices"]
    if how == "dspy.Predict":
        with dspy.context(lm=lm):
            return dspy.Predict("question -> answer", n=n)(question="name a colour").completions.answer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # messages= dicts, as adapters send them
        if how == "messages":
            return lm(messages=messages, n=n)
        return asyncio.run(lm.acall(messages=messages, n=n))


@pytest.mark.parametrize("how", ["_generate", "_agenerate", "messages", "acall messages", "dspy.Predict"])
def test_a_call_of_n_completions_is_reserved_whole_or_refused_before_sending(make_lm, stub, how):
    lm = make_lm(max_requests=2, cache=False, use_chat_api=True)
    with pytest.raises(BudgetExceededError, match="3 requests"):
        _n_call(lm, how, 3)
    assert stub.posts() == [], "nothing paid for and thrown away"
    assert len(_n_call(lm, how, 2)) == 2 and len(stub.posts()) == 2
    assert lm.spending().remaining_requests == 0


def test_a_call_of_n_completions_that_does_not_fit_the_budget_sends_nothing(make_lm, stub):
    probe = make_lm(prices=PRICES, budget_usd=1e-9, max_tokens=20)
    with pytest.raises(BudgetExceededError) as refused:
        probe._generate("name a colour")
    worst = refused.value.request_usd  # one completion's worst case
    lm = make_lm(prices=PRICES, budget_usd=2.5 * worst, max_tokens=20, cache=False)
    with pytest.raises(BudgetExceededError, match="3 requests"):
        lm._generate("name a colour", n=3)
    assert stub.posts() == []
    assert len(lm._generate("name a colour", n=2)["choices"]) == 2


def test_spending_prices_the_answers_without_a_budget(make_lm, stub):
    lm = make_lm(prices=PRICES, max_concurrency=2, cache=False)
    lm("what does this cost?")
    asyncio.run(lm.acall("and this one?"))
    spending = lm.spending()
    assert spending.spent_usd is not None and spending.spent_usd > 0
    assert spending.spent_usd == pytest.approx(_total_cost(lm), rel=1e-9)
    assert "unknown" not in str(spending)
