"""The limiter: FIFO concurrency across threads and tasks, rate buckets, the shared cool-down,
budget and request caps, permits, sharing and pickling, and the Ray ledger (marked ``ray``).

Timing is checked on a fake clock where the limiter sleeps; the few real-time checks assert
lower bounds the limiter guarantees and generous upper bounds (the machine is shared).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import inspect
import itertools
import os
import pickle
import random
import threading
import time
from collections.abc import Callable, Iterator

import dspy
import pytest
from dspy import lm15
from dspy.utils.exceptions import LMError, LMRateLimitError, is_retryable_lm_error

from dspy_anyscale.catalog import Prices
from dspy_anyscale.errors import ConfigurationError, LimiterDeadlockError
from dspy_anyscale.limits import (
    NO_PERMIT,
    UNLIMITED,
    AnyLimiter,
    AnyPermit,
    BudgetExceededError,
    DetachedLedger,
    Estimate,
    Limiter,
    LimiterTimeoutError,
    Limits,
    LocalLedger,
    SpendReport,
    estimate_prompt_tokens,
    estimate_text_tokens,
    may_have_been_billed,
)

PRICES = Prices(input=1.0, output=1.0)  # USD per million tokens: 1 token = $0.000001
WORST = Estimate(prompt_tokens=100, max_tokens=100, prices=PRICES)  # worst case $0.0002


class FakeClock:
    """Time moves only when the limiter sleeps. Only the head of the queue sleeps, so a sleep is an
    advance of the clock, recorded."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.t += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


@contextlib.contextmanager
def background_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in its own thread, for mixing tasks with threads."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class InFlight:
    """Counts requests in flight and remembers the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def exit(self) -> None:
        with self._lock:
            self.now -= 1


# --- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_concurrency", 0),
        ("max_concurrency", 2.5),
        ("max_concurrency", True),
        ("max_concurrency", "4"),
        ("requests_per_minute", 0),
        ("requests_per_minute", -60),
        ("requests_per_minute", float("inf")),
        ("tokens_per_minute", float("nan")),
        ("tokens_per_minute", "1000"),
        ("budget_usd", 0),
        ("budget_usd", -1.0),
        ("budget_usd", False),
        ("max_requests", 0),
        ("max_requests", 1.0),
    ],
)
def test_each_option_is_validated_and_the_error_names_it(option, value):
    with pytest.raises(ConfigurationError, match=option):
        Limits(**{option: value})


def test_limits_are_off_by_default_and_report_what_is_set():
    assert not Limits().enabled
    limits = Limits(max_concurrency=4, requests_per_minute=30, tokens_per_minute=6000, budget_usd=2, max_requests=10)
    assert limits.enabled
    assert limits.as_kwargs() == {
        "max_concurrency": 4,
        "requests_per_minute": 30,
        "tokens_per_minute": 6000,
        "budget_usd": 2,
        "max_requests": 10,
    }
    assert limits.request_bucket == (1.0, 0.5)  # 30/min: one second's worth is half a request, so 1
    assert limits.token_bucket == (100.0, 100.0)


def _conforms(implementation: object, protocol: type) -> None:
    """``implementation`` has every member of ``protocol``, its methods with the same parameters."""
    for name, expected in vars(protocol).items():
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        assert hasattr(implementation, name), f"{type(implementation).__name__} has no {name}"
        actual = getattr(type(implementation), name, None)  # a method, or a property (None: an instance attribute)
        if inspect.isfunction(expected) and inspect.isfunction(actual):
            assert list(inspect.signature(actual).parameters) == list(inspect.signature(expected).parameters), name


def test_a_limiter_and_a_permit_are_one_type_each_whatever_the_limits():
    """Limiter and the no-op UNLIMITED are both an AnyLimiter (what the engine, the LM and Ray take);
    a Permit and NO_PERMIT are both an AnyPermit: the same members, the same parameters."""
    limiter = Limiter(Limits(max_concurrency=1))
    for implementation in (limiter, UNLIMITED):
        _conforms(implementation, AnyLimiter)
    with limiter.acquire() as permit:
        for implementation in (permit, NO_PERMIT):
            _conforms(implementation, AnyPermit)


def test_permit_and_limiter_do_not_import_each_other():
    """The Permit reports to a PermitOwner protocol defined beside it; it never imports the limiter."""
    import ast

    import dspy_anyscale.limits._permit as permit_module

    source = ast.parse(inspect.getsource(permit_module))
    imported = {node.module for node in ast.walk(source) if isinstance(node, ast.ImportFrom)}
    assert not {"_limiter", "_unlimited", "_protocol"} & imported, imported


def test_wrong_arguments_to_the_limiter_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="Limiter needs a Limits"):
        Limiter({"budget_usd": 1.0})
    with pytest.raises(ConfigurationError, match="timeout must be a non-negative number"):
        Limiter(Limits(max_concurrency=1)).acquire(timeout=-1)
    with pytest.raises(ConfigurationError, match=r"Estimate\.prompt_tokens must be a non-negative integer") as caught:
        Estimate(prompt_tokens=-1)
    assert isinstance(caught.value, ValueError)


def test_limits_describe_themselves_for_messages():
    assert Limits(budget_usd=5.0, max_requests=10).describe() == "budget_usd=5.0, max_requests=10"
    assert Limits().describe() == ""


def test_nothing_configured_gives_the_no_op_limiter():
    assert Limiter.for_limits(None) is UNLIMITED
    assert Limiter.for_limits(Limits()) is UNLIMITED
    assert Limiter.disabled() is UNLIMITED
    assert not UNLIMITED.enabled and not UNLIMITED.needs_estimate
    with UNLIMITED.acquire(WORST) as permit:
        assert permit is NO_PERMIT
        permit.answer_started()
        permit.settle(1, 1)
    assert asyncio.run(UNLIMITED.aacquire()) is NO_PERMIT
    UNLIMITED.note_rate_limited(30)  # no ledger: nothing to pause
    assert UNLIMITED.report().requests == 0
    assert copy.deepcopy(UNLIMITED) is UNLIMITED
    assert pickle.loads(pickle.dumps(UNLIMITED)) is UNLIMITED


# --- concurrency and the queue ----------------------------------------------------------------------


def test_32_threads_never_exceed_max_concurrency_4():
    limiter = Limiter(Limits(max_concurrency=4))
    flight = InFlight()

    def request() -> None:
        with limiter.acquire() as permit:
            flight.enter()
            time.sleep(0.005)
            flight.exit()
            permit.settle(10, 5)

    threads = [threading.Thread(target=request) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert flight.peak == 4
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    report = limiter.report()
    assert (report.requests, report.in_flight, report.prompt_tokens, report.completion_tokens) == (32, 0, 320, 160)


def test_64_asyncio_tasks_never_exceed_max_concurrency_4():
    limiter = Limiter(Limits(max_concurrency=4))
    flight = InFlight()

    async def request() -> None:
        permit = await limiter.aacquire()
        with permit:
            flight.enter()
            await asyncio.sleep(0.002)
            flight.exit()
            permit.settle(1, 1)

    async def main() -> None:
        await asyncio.gather(*(request() for _ in range(64)))

    asyncio.run(main())
    assert flight.peak == 4
    assert (limiter.in_flight, limiter.waiting, limiter.report().requests) == (0, 0, 64)


def test_threads_and_tasks_are_served_in_arrival_order():
    limiter = Limiter(Limits(max_concurrency=1))
    order: list[str] = []
    blocker = limiter.acquire()  # everyone below queues behind this one
    with background_loop() as loop:
        futures, threads = [], []
        for index in range(12):
            name = f"{'task' if index % 2 else 'thread'}-{index}"
            if index % 2:

                async def task(name: str = name) -> None:
                    with await limiter.aacquire():
                        order.append(name)

                futures.append(asyncio.run_coroutine_threadsafe(task(), loop))
            else:

                def thread(name: str = name) -> None:
                    with limiter.acquire():
                        order.append(name)

                threads.append(threading.Thread(target=thread))
                threads[-1].start()
            wait_until(lambda index=index: limiter.waiting == index + 1)  # in the queue before the next arrives
        blocker.settle(1, 1)
        for future in futures:
            future.result(10)
        for thread in threads:
            thread.join(10)
    assert order == [f"{'task' if i % 2 else 'thread'}-{i}" for i in range(12)]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def test_a_cancelled_task_leaves_the_queue_and_leaks_no_slot():
    limiter = Limiter(Limits(max_concurrency=1))
    blocker = limiter.acquire()
    admitted: list[str] = []

    def thread() -> None:
        with limiter.acquire():
            admitted.append("thread")

    with background_loop() as loop:

        async def waiter() -> None:
            await limiter.aacquire()
            admitted.append("task")  # never reached

        future = asyncio.run_coroutine_threadsafe(waiter(), loop)
        wait_until(lambda: limiter.waiting == 1)
        worker = threading.Thread(target=thread)
        worker.start()
        wait_until(lambda: limiter.waiting == 2)
        future.cancel()  # the head of the queue gives up
        wait_until(lambda: limiter.waiting == 1)
        assert limiter.in_flight == 1  # still only the blocker
        blocker.settle(1, 1)
        worker.join(10)
    assert admitted == ["thread"]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    assert limiter.report().in_flight == 0


def test_a_task_cancelled_while_the_head_waits_out_a_cool_down_frees_its_slot():
    limiter = Limiter(Limits(max_concurrency=2))
    limiter.note_rate_limited(30)

    async def main() -> None:
        task = asyncio.create_task(limiter.aacquire())
        await asyncio.sleep(0.05)
        assert (limiter.in_flight, limiter.waiting) == (1, 1)  # the head holds its slot while it waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert (limiter.in_flight, limiter.waiting, limiter.report().in_flight) == (0, 0, 0)


def test_a_sync_timeout_leaves_the_queue_and_nothing_is_held():
    limiter = Limiter(Limits(max_concurrency=1))
    blocker = limiter.acquire()
    with pytest.raises(LimiterTimeoutError, match="nothing was sent"):
        limiter.acquire(timeout=0.05)
    assert (limiter.in_flight, limiter.waiting) == (1, 0)
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(asyncio.wait_for(limiter.aacquire(), 0.05))  # the async timeout is a cancellation
    assert (limiter.in_flight, limiter.waiting) == (1, 0)
    blocker.settle(1, 1)
    with limiter.acquire(timeout=1) as permit:
        permit.settle(1, 1)
    assert (limiter.in_flight, limiter.report().requests) == (0, 2)


def test_a_sync_timeout_also_bounds_a_wait_for_the_rate_bucket():
    clock = FakeClock()
    limiter = Limiter(Limits(requests_per_minute=60), clock=clock)  # one request a second
    limiter.acquire().settle(1, 1)
    with pytest.raises(LimiterTimeoutError):
        limiter.acquire(timeout=0.25)
    assert clock.t == pytest.approx(0.25)  # it slept only as long as it was allowed to
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def test_a_waiter_whose_event_loop_closed_does_not_block_the_queue():
    limiter = Limiter(Limits(max_concurrency=1))
    blocker = limiter.acquire()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    asyncio.run_coroutine_threadsafe(limiter.aacquire(), loop)
    wait_until(lambda: limiter.waiting == 1)
    loop.call_soon_threadsafe(loop.stop)
    runner.join(10)
    loop.close()  # abandoned with its task still queued
    admitted = threading.Event()

    def thread() -> None:
        with limiter.acquire():
            admitted.set()

    worker = threading.Thread(target=thread)
    worker.start()
    wait_until(lambda: limiter.waiting == 1 and worker.is_alive())  # the thread queued, the dead task gone
    blocker.settle(1, 1)
    assert admitted.wait(10)
    worker.join(10)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def test_waiting_tasks_do_not_block_the_event_loop():
    limiter = Limiter(Limits(max_concurrency=1))
    limiter.note_rate_limited(0.3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> None:
        beat = asyncio.create_task(ticker())
        (await limiter.aacquire()).settle(1, 1)
        beat.cancel()

    asyncio.run(main())
    assert ticks >= 5  # the loop kept running while the task waited out the cool-down


# --- never a hang: sync calls on a loop thread, tasks left on a stopped loop ---------------------------


def run_bounded(target: Callable[[], object], timeout: float = 20.0) -> object:
    """``target()`` in a daemon thread: its result, or its exception; a hang fails the test instead."""
    outcome: dict[str, object] = {}

    def runner() -> None:
        try:
            outcome["value"] = target()
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout:g}s: a hang"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


def test_a_sync_call_on_a_loop_thread_behind_a_task_of_that_loop_fails_at_once():
    limiter = Limiter(Limits(max_concurrency=1))

    async def handler() -> None:
        held = await limiter.aacquire()  # an acall of this loop holds the only slot
        with pytest.raises(LimiterDeadlockError, match=r"await lm\.acall") as refused:
            limiter.acquire()  # a plain call inside async code would block the loop that must free it
        assert "max_concurrency=1" in str(refused.value) and "nothing was sent" in str(refused.value)
        assert isinstance(refused.value, LimiterTimeoutError)  # caught where a limiter timeout is
        held.settle(1, 1)
        with limiter.acquire() as permit:  # nothing of this loop ahead now: it goes at once
            permit.settle(1, 1)

    run_bounded(lambda: asyncio.run(handler()))
    assert (limiter.in_flight, limiter.waiting, limiter.report().requests) == (0, 0, 2)


def test_a_sync_call_on_a_loop_thread_behind_a_queued_task_of_that_loop_fails_at_once():
    limiter = Limiter(Limits(max_concurrency=1))
    blocker = limiter.acquire()  # held by another thread

    async def handler() -> None:
        queued = asyncio.create_task(limiter.aacquire())
        while limiter.waiting < 1:
            await asyncio.sleep(0.001)
        with pytest.raises(LimiterDeadlockError):
            limiter.acquire()  # the task ahead of it can never run while this call blocks its loop
        assert limiter.waiting == 1  # the refused call left the queue
        threading.Timer(0.05, blocker.settle, args=(1, 1)).start()
        (await queued).settle(1, 1)

    run_bounded(lambda: asyncio.run(handler()))
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def test_a_sync_call_on_a_loop_thread_waits_when_only_other_threads_are_ahead():
    limiter = Limiter(Limits(max_concurrency=2))
    blocker = limiter.acquire()  # another thread's request

    async def handler() -> None:
        held = await limiter.aacquire()  # this loop holds one of two slots: the other thread's frees the second
        threading.Timer(0.1, blocker.settle, args=(1, 1)).start()
        with limiter.acquire() as permit:  # waits for the other thread, which does let go
            permit.settle(1, 1)
        held.settle(1, 1)

    run_bounded(lambda: asyncio.run(handler()))
    assert (limiter.in_flight, limiter.waiting, limiter.report().requests) == (0, 0, 3)


async def _request(limiter: Limiter, seconds: float) -> str:
    permit = await limiter.aacquire()
    with permit:
        await asyncio.sleep(seconds)  # the request on the wire
        permit.settle(1, 1)
    return "answered"


@pytest.mark.parametrize("left", ["queued", "holding"])
def test_tasks_left_on_a_stopped_loop_never_block_callers_elsewhere(left):
    limiter = Limiter(Limits(max_concurrency=1))
    loop = asyncio.new_event_loop()
    try:
        if left == "queued":  # "first answer wins": the losers stay queued, the next one woken but never run
            tasks = [loop.create_task(_request(limiter, seconds)) for seconds in (0.01, 0.5, 0.5)]
        else:  # the loser holds the slot, its request in the middle of the wire

            async def winner() -> str:
                await asyncio.sleep(0.05)
                return "first"

            tasks = [loop.create_task(_request(limiter, 0.5)), loop.create_task(winner())]
        done, pending = loop.run_until_complete(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED))
        assert len(done) == 1 and pending  # the loop stopped with tasks of it in the gate

        def sync_caller() -> None:
            with limiter.acquire() as permit:
                permit.settle(1, 1)

        async def async_caller() -> None:
            (await limiter.aacquire()).settle(1, 1)

        run_bounded(sync_caller)  # another thread
        run_bounded(lambda: asyncio.run(async_caller()))  # another event loop
        # The loop runs again: its tasks take their turn and give everything back.
        assert loop.run_until_complete(asyncio.gather(*pending)) == ["answered"] * len(pending)
    finally:
        loop.close()
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    assert limiter.report().in_flight == 0


def test_a_holder_on_a_stopped_loop_counts_again_when_its_loop_resumes():
    limiter = Limiter(Limits(max_concurrency=1))
    loop = asyncio.new_event_loop()
    try:
        holder = loop.create_task(_request(limiter, 60.0))  # cancelled below, once it has proved its point
        loop.run_until_complete(asyncio.sleep(0.05))  # it holds the slot; then its loop stops
        assert limiter.in_flight == 1
        held = run_bounded(limiter.acquire)  # a stalled slot does not count: admitted
        assert limiter.in_flight == 2  # both on the wire: the bound gives way rather than hang
        resumed = threading.Thread(target=loop.run_until_complete, args=(asyncio.wait([holder]),))
        resumed.start()  # the loop runs again, and its slot counts again
        wait_until(loop.is_running)
        held.settle(1, 1)  # type: ignore[union-attr]
        with pytest.raises(LimiterTimeoutError):
            limiter.acquire(timeout=0.05)  # the resumed holder has the one slot
        loop.call_soon_threadsafe(holder.cancel)
        resumed.join(10)
    finally:
        loop.close()
    assert (limiter.in_flight, limiter.waiting, limiter.report().requests) == (0, 0, 2)


# --- request and token rates ------------------------------------------------------------------------


def test_600_requests_per_minute_spaces_30_acquisitions_over_2_seconds():
    clock = FakeClock()
    limiter = Limiter(Limits(requests_per_minute=600), clock=clock)
    times = []
    for _ in range(30):
        limiter.acquire().settle(1, 1)
        times.append(clock.now())
    # The bucket holds one second's worth (10): a burst of 10, then one every 0.1 s.
    assert times[:10] == [0.0] * 10
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[9:])]
    assert gaps == pytest.approx([0.1] * 20)
    assert times[-1] == pytest.approx(2.0)


def test_600_requests_per_minute_in_real_time_from_3_threads():
    limiter = Limiter(Limits(requests_per_minute=600))
    started = time.monotonic()

    def requests() -> None:
        for _ in range(10):
            limiter.acquire().settle(1, 1)

    threads = [threading.Thread(target=requests) for _ in range(3)]  # 30 requests: 10 at once, 20 at 10/s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    assert 1.95 <= elapsed < 10.0


def test_a_rate_below_one_request_a_second_still_sends_one_at_a_time():
    clock = FakeClock()
    limiter = Limiter(Limits(requests_per_minute=30), clock=clock)
    limiter.acquire().settle(1, 1)
    limiter.acquire().settle(1, 1)
    assert clock.t == pytest.approx(2.0)


def test_tokens_are_reserved_up_front_and_corrected_by_the_answer():
    clock = FakeClock()
    limiter = Limiter(Limits(tokens_per_minute=6000), clock=clock)  # 100 tokens/s, bucket of 100
    permit = limiter.acquire(Estimate(prompt_tokens=10, max_tokens=50))  # reserves 60: 40 left
    permit.settle(10, 10)  # used 20: 40 refunded, 80 left
    limiter.acquire(Estimate(prompt_tokens=30, max_tokens=50)).settle(30, 50)  # 80 fits: no wait
    assert clock.t == 0.0
    limiter.acquire(Estimate(prompt_tokens=0, max_tokens=50)).settle(0, 50)  # 0 left: waits 0.5 s
    assert clock.t == pytest.approx(0.5)


def test_an_answer_over_its_reservation_is_debited_extra():
    clock = FakeClock()
    limiter = Limiter(Limits(tokens_per_minute=6000), clock=clock)
    limiter.acquire(Estimate(prompt_tokens=10, max_tokens=10)).settle(60, 20)  # 20 reserved, 80 used
    limiter.acquire(Estimate(prompt_tokens=20, max_tokens=20)).settle(20, 20)  # 20 left: 40 needs 0.2 s
    assert clock.t == pytest.approx(0.2)


def test_unknown_usage_keeps_the_reservation_and_an_unbilled_failure_refunds_it():
    clock = FakeClock()
    limiter = Limiter(Limits(tokens_per_minute=6000), clock=clock)
    limiter.acquire(Estimate(prompt_tokens=20, max_tokens=30)).settle(None, None)  # 50 kept
    limiter.acquire(Estimate(prompt_tokens=20, max_tokens=30)).release_failed(ValueError("400"))  # refunded
    limiter.acquire(Estimate(prompt_tokens=20, max_tokens=30)).settle(None, 3)  # counts incomplete: kept
    assert clock.t == 0.0
    limiter.acquire(Estimate(prompt_tokens=0, max_tokens=10)).settle(0, 10)  # 0 left: waits 0.1 s
    assert clock.t == pytest.approx(0.1)


def test_a_request_bigger_than_the_token_bucket_goes_when_it_is_full_and_never_deadlocks():
    clock = FakeClock()
    limiter = Limiter(Limits(tokens_per_minute=600), clock=clock)  # 10 tokens/s, bucket of 10
    limiter.acquire(Estimate(prompt_tokens=5, max_tokens=0)).settle(5, 0)  # 5 left
    limiter.acquire(Estimate(prompt_tokens=90, max_tokens=10)).settle(90, 10)  # waits for a full bucket
    assert clock.t == pytest.approx(0.5)
    limiter.acquire(Estimate(prompt_tokens=1, max_tokens=0)).settle(1, 0)  # pays the debt of 90 first
    assert clock.t == pytest.approx(0.5 + 9.1)


def test_a_big_token_request_at_the_head_is_not_overtaken_by_small_ones():
    limiter = Limiter(Limits(tokens_per_minute=24_000))  # 400 tokens/s, bucket of 400
    limiter.acquire(Estimate(prompt_tokens=400, max_tokens=0)).settle(400, 0)  # empty now
    order: list[str] = []

    def request(name: str, tokens: int) -> None:
        with limiter.acquire(Estimate(prompt_tokens=tokens, max_tokens=0)) as permit:
            order.append(name)
            permit.settle(tokens, 0)

    big = threading.Thread(target=request, args=("big", 200))  # ready after 0.5 s
    big.start()
    wait_until(lambda: limiter.waiting == 1)
    small = threading.Thread(target=request, args=("small", 1))  # would be ready after 2.5 ms
    small.start()
    big.join(10)
    small.join(10)
    assert order == ["big", "small"]


def test_a_token_rate_needs_max_tokens_and_an_estimate():
    limiter = Limiter(Limits(tokens_per_minute=6000))
    assert limiter.needs_estimate
    with pytest.raises(ConfigurationError, match="tokens_per_minute"):
        limiter.acquire()
    with pytest.raises(ConfigurationError, match="max_tokens"):
        limiter.acquire(Estimate(prompt_tokens=10, max_tokens=None))
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


# --- the shared cool-down ---------------------------------------------------------------------------


def test_a_cool_down_holds_every_caller_on_a_fake_clock():
    clock = FakeClock()
    limiter = Limiter(Limits(max_concurrency=8), clock=clock)
    limiter.note_rate_limited(5)
    admitted_at: list[float] = []

    def request() -> None:
        with limiter.acquire() as permit:
            admitted_at.append(clock.now())
            permit.settle(1, 1)

    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert admitted_at == [5.0] * 6  # one head slept it out; nobody went early, nobody slept twice
    assert clock.sleeps == [5.0]
    assert limiter.report().rate_limited == 1


@pytest.mark.parametrize(
    "error",
    [lm15.RateLimitError("slow down", retry_after=3.0, status=429), LMRateLimitError("slow down", retry_after=3.0)],
)
def test_a_429_given_to_its_permit_starts_the_shared_cool_down(error):
    clock = FakeClock()
    limiter = Limiter(Limits(max_concurrency=4, budget_usd=1.0), clock=clock)
    with pytest.raises(type(error)), limiter.acquire(WORST):
        raise error  # the engine's request got a 429
    report = limiter.report()
    assert (report.cooldown_s, report.rate_limited, report.spent_usd, report.failed) == (3.0, 1, 0.0, 1)
    limiter.acquire(WORST).settle(1, 1)  # the next caller waits it out
    assert clock.t == 3.0


def test_a_later_shorter_cool_down_does_not_shorten_it_and_none_means_one_second():
    clock = FakeClock()
    limiter = Limiter(Limits(max_concurrency=1), clock=clock)
    limiter.note_rate_limited(5)
    limiter.note_rate_limited(1)
    assert limiter.report().cooldown_s == 5.0
    limiter.acquire().settle(1, 1)
    assert clock.t == 5.0
    limiter.note_rate_limited(None)
    limiter.acquire().settle(1, 1)
    assert clock.t == 6.0
    limiter.note_rate_limited(10**9)  # a broken Retry-After is capped
    assert limiter.report().cooldown_s == 600.0


def test_a_cool_down_holds_threads_and_tasks_in_real_time():
    limiter = Limiter(Limits(max_concurrency=16))
    noted = time.monotonic()
    limiter.note_rate_limited(0.3)
    admitted_at: list[float] = []

    def thread() -> None:
        with limiter.acquire() as permit:
            admitted_at.append(time.monotonic())
            permit.settle(1, 1)

    async def task() -> None:
        with await limiter.aacquire() as permit:
            admitted_at.append(time.monotonic())
            permit.settle(1, 1)

    threads = [threading.Thread(target=thread) for _ in range(4)]
    for worker in threads:
        worker.start()

    async def tasks() -> None:
        await asyncio.gather(*(task() for _ in range(4)))

    asyncio.run(tasks())
    for worker in threads:
        worker.join(10)
    assert len(admitted_at) == 8
    assert all(0.3 <= at - noted < 5.0 for at in admitted_at)


# --- budget and request caps ------------------------------------------------------------------------


def test_the_budget_is_never_exceeded_by_16_threads_with_random_costs():
    budget = 0.01
    limiter = Limiter(Limits(budget_usd=budget, max_concurrency=8))
    lock = threading.Lock()
    settled: list[float] = []
    refusals: list[BudgetExceededError] = []
    snapshots: list[SpendReport] = []
    done = threading.Event()

    def spender(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            try:
                permit = limiter.acquire(WORST)
            except BudgetExceededError as exc:
                with lock:
                    refusals.append(exc)
                return
            prompt, completion = rng.randint(0, 100), rng.randint(0, 100)  # never above the worst case
            time.sleep(rng.random() / 1000)
            permit.settle(prompt, completion)
            with lock:
                settled.append(PRICES.cost(prompt, completion))

    def monitor() -> None:
        while not done.is_set():
            snapshots.append(limiter.report())
            time.sleep(0.0005)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=spender, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    watcher.join(10)

    report = limiter.report()
    assert report.spent_usd <= budget
    assert report.spent_usd == pytest.approx(sum(settled), rel=1e-12)
    assert report.requests == len(settled) > 50  # more than the 50 that worst cases alone would allow
    assert report.refused == len(refusals) == 16
    assert (report.reserved_usd, report.in_flight) == (0.0, 0)
    assert snapshots and all(s.spent_usd <= budget for s in snapshots)
    assert all(s.spent_usd + s.reserved_usd <= budget + 1e-15 for s in snapshots)  # two floats added: rounding
    assert all(s.remaining_usd >= 0 for s in snapshots)


def test_a_refusal_says_spent_reserved_and_budget_in_usd_and_is_counted():
    limiter = Limiter(Limits(budget_usd=0.0005))
    first = limiter.acquire(WORST)  # $0.0002 reserved
    limiter.acquire(WORST).settle(100, 100)  # $0.0002 spent
    with pytest.raises(BudgetExceededError) as refused:
        limiter.acquire(WORST)  # 0.0002 + 0.0002 + 0.0002 > 0.0005
    error = refused.value
    assert "budget_usd" in str(error)
    assert "$0.000200 is spent" in str(error) and "$0.000200 reserved" in str(error) and "$0.0005 budget" in str(error)
    assert (error.limit, error.spent_usd, error.reserved_usd, error.request_usd, error.budget_usd) == (
        "budget_usd",
        0.0002,
        0.0002,
        0.0002,
        0.0005,
    )
    first.settle(10, 10)  # $0.00002: room again
    limiter.acquire(WORST).settle(0, 0)
    report = limiter.report()
    assert (report.refused, report.requests) == (1, 3)
    assert report.spent_usd == pytest.approx(0.00022)
    assert report.remaining_usd == pytest.approx(0.00028)
    assert "1 refused" in str(report)


def test_max_requests_caps_requests_sent_whatever_their_answer():
    limiter = Limiter(Limits(max_requests=4))
    limiter.acquire().settle(1, 1)
    limiter.acquire().release_failed(ValueError("400 bad request"))  # sent and refused: it counts
    limiter.acquire().release_failed(TimeoutError("read timeout"))  # sent, maybe billed: it counts
    held = limiter.acquire()  # the fourth
    with pytest.raises(BudgetExceededError, match="max_requests") as refused:
        limiter.acquire()
    assert (refused.value.limit, refused.value.requests, refused.value.reserved_requests) == ("max_requests", 3, 1)
    assert "2 of them failed" in str(refused.value)
    held.settle(1, 1)
    report = limiter.report()
    assert (report.requests, report.remaining_requests, report.failed, report.refused) == (4, 0, 2, 1)
    assert "4 requests of 4, 0 left" in str(report)


def test_a_request_answered_500_counts_but_costs_nothing_and_one_never_sent_gives_all_back():
    limiter = Limiter(Limits(max_requests=2, budget_usd=1.0, requests_per_minute=60), clock=FakeClock())
    limiter.acquire(WORST).release_failed(lm15.ServerError("500", status=500))  # the server said no
    with pytest.raises(BudgetExceededError, match="max_requests"):
        for _ in range(3):  # what DSPy's retries would do
            limiter.acquire(WORST).release_failed(lm15.ServerError("500", status=500))
    report = limiter.report()
    assert (report.requests, report.failed, report.spent_usd, report.remaining_requests) == (2, 2, 0.0, 0)

    unsent = Limiter(Limits(max_requests=1), clock=FakeClock())
    unsent.acquire().release_failed(ConnectionRefusedError("no listener"), sent=False)  # nothing left the client
    unsent.acquire().settle(1, 1)
    assert (unsent.report().requests, unsent.report().failed) == (1, 0)


def test_the_budget_is_exact_in_integer_money():
    limiter = Limiter(Limits(budget_usd=0.3))
    prices = Prices(0.1, 0.1)  # in floats 0.1 + 0.1 + 0.1 > 0.3: a float ledger would refuse the third
    one_million = Estimate(prompt_tokens=1_000_000, max_tokens=0, prices=prices)
    limiter.acquire(one_million).settle(1_000_000, 0)  # $0.1
    limiter.acquire(one_million).settle(1_000_000, 0)  # $0.2
    limiter.acquire(one_million).settle(1_000_000, 0)  # $0.3: exactly the budget, allowed
    assert 0.1 + 0.1 + 0.1 > 0.3
    with pytest.raises(BudgetExceededError):
        limiter.acquire(Estimate(prompt_tokens=1, max_tokens=0, prices=prices))
    assert limiter.report().spent_usd == 0.3


def test_unknown_usage_keeps_the_worst_case_as_spent():
    limiter = Limiter(Limits(budget_usd=1.0))
    limiter.acquire(WORST).settle(None, None)
    with limiter.acquire(WORST):
        pass  # left without settling: no counts either
    report = limiter.report()
    assert (report.spent_usd, report.unknown_usage, report.prompt_tokens) == (pytest.approx(0.0004), 2, 0)


def test_failed_requests_release_unless_the_server_may_have_billed_them():
    limiter = Limiter(Limits(budget_usd=1.0))
    limiter.acquire(WORST).release_failed(ValueError("429"))  # refused by the server: nothing billed
    assert limiter.report().spent_usd == 0.0
    limiter.acquire(WORST).release_failed(TimeoutError("read timeout"))  # may have been generated
    assert limiter.report().spent_usd == pytest.approx(0.0002)
    stream = limiter.acquire(WORST)
    stream.answer_started()  # a stream that had begun answering
    stream.release_failed(ConnectionResetError("cut"))
    assert limiter.report().spent_usd == pytest.approx(0.0004)
    limiter.acquire(WORST).release_failed(TimeoutError("connect"), billed=False)  # the engine knows better
    report = limiter.report()
    assert (report.spent_usd, report.failed, report.unknown_usage) == (pytest.approx(0.0004), 4, 2)


@pytest.mark.parametrize(
    ("error", "billed"),
    [
        (TimeoutError(), True),
        (asyncio.CancelledError(), True),
        (GeneratorExit(), True),
        (KeyboardInterrupt(), True),
        (ValueError(), False),
        (ConnectionRefusedError(), False),
        (None, False),
    ],
)
def test_which_failures_may_have_been_billed(error, billed):
    assert may_have_been_billed(error) is billed


def test_a_budget_needs_prices_and_max_tokens():
    limiter = Limiter(Limits(budget_usd=1.0))
    with pytest.raises(ConfigurationError, match="prices"):
        limiter.acquire(Estimate(prompt_tokens=10, max_tokens=10))
    with pytest.raises(ConfigurationError, match="max_tokens"):
        limiter.acquire(Estimate(prompt_tokens=10, max_tokens=None, prices=PRICES))
    with pytest.raises(ConfigurationError, match="budget_usd"):
        limiter.acquire()


def test_budget_errors_are_dspy_lm_errors_that_dspy_never_retries():
    error = BudgetExceededError("no", spent_usd=1.0, budget_usd=1.0)
    assert isinstance(error, LMError)
    assert not is_retryable_lm_error(error)
    assert not is_retryable_lm_error(LimiterTimeoutError("late"))
    copied = pickle.loads(pickle.dumps(error))  # exceptions cross process boundaries (Ray)
    assert (type(copied), str(copied), copied.spent_usd, copied.budget_usd) == (BudgetExceededError, "no", 1.0, 1.0)


@pytest.mark.parametrize("error", [BudgetExceededError("over budget"), LimiterTimeoutError("late")])
def test_dspy_raises_a_refusal_from_an_engine_once_without_retrying(error):
    class RefusingEngine:
        calls = 0

        def complete(self, request):
            RefusingEngine.calls += 1
            raise error

        def stream(self, request):
            raise error

        def close(self):
            pass

    lm = dspy.LM("openai/refusing", engine=RefusingEngine(), num_retries=3, cache=False)
    with pytest.raises(type(error)) as raised:
        lm("hello")
    assert raised.value is error
    assert RefusingEngine.calls == 1


class LimitedEngine:
    """A DSPy engine wired to a limiter the way ``AnyscaleEngine`` is to be: acquire before sending,
    settle from the response's usage; the ``with`` releases a failure (and notes a 429)."""

    def __init__(self, limiter: Limiter, script: list) -> None:
        self.limiter = limiter
        self.script = list(script)  # per request: an exception to raise, or (prompt, completion) tokens
        self.sent = 0

    def complete(self, request: lm15.Request) -> lm15.Response:
        payload = {"messages": [{"role": "user", "content": "question"}], "max_tokens": request.config.max_tokens}
        with self.limiter.acquire(Estimate.for_payload(payload, PRICES)) as permit:
            self.sent += 1
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            usage = lm15.Usage(input_tokens=step[0], output_tokens=step[1])
            response = lm15.Response(
                id=None, model=request.model, message=lm15.Message.assistant("ok"), finish_reason="stop", usage=usage
            )
            permit.settle(usage.input_tokens, usage.output_tokens)
            return response

    def stream(self, request: lm15.Request):
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_through_dspy_a_429_pauses_its_retry_n_counts_each_candidate_and_a_refusal_is_final():
    clock = FakeClock()
    limiter = Limiter(Limits(max_concurrency=2, budget_usd=0.001), clock=clock)
    script = [lm15.RateLimitError("slow down", retry_after=0.01, status=429), (10, 5), (10, 5), (10, 5), (10, 5)]
    engine = LimitedEngine(limiter, script)
    lm = dspy.LM("openai/limited", engine=engine, max_tokens=100, num_retries=2, cache=False)

    assert lm("hello") == ["ok"]  # DSPy retried the 429; the retry waited out the shared cool-down
    assert clock.sleeps == [pytest.approx(0.01)]
    assert lm("hello", n=3) == ["ok"] * 3  # DSPy's n fan-out: one request, and one permit, per candidate
    report = limiter.report()
    assert (report.requests, report.failed, report.rate_limited, report.prompt_tokens) == (5, 1, 1, 40)
    assert report.spent_usd == pytest.approx(4 * 15 / 1e6)

    with pytest.raises(BudgetExceededError):
        lm("hello", max_tokens=10**6)  # a worst case of $1 cannot fit: refused once, never sent or retried
    assert engine.sent == 5 and limiter.report().refused == 1


# --- a call of n candidates: all reserved at once, or none --------------------------------------


def test_a_call_of_n_candidates_reserves_all_of_them_at_its_first_request_or_none():
    limiter = Limiter(Limits(max_requests=5))
    limiter.acquire().settle(1, 1)
    limiter.acquire().settle(1, 1)  # 3 left
    with limiter.candidates(4), pytest.raises(BudgetExceededError, match="4 requests") as refused:
        limiter.acquire()  # the call needs 4: refused before any of them is sent
    assert refused.value.limit == "max_requests"
    report = limiter.report()
    assert (report.requests, report.remaining_requests, report.in_flight, report.refused) == (2, 3, 0, 1)

    with limiter.candidates(3):
        first = limiter.acquire()  # reserves all three
        assert limiter.report().remaining_requests == 0
        with pytest.raises(BudgetExceededError):
            run_bounded(limiter.acquire)  # another caller cannot take what the call reserved
        first.settle(1, 1)
        limiter.acquire().settle(1, 1)
        limiter.acquire().settle(1, 1)
    report = limiter.report()
    assert (report.requests, report.remaining_requests, report.in_flight) == (5, 0, 0)


def test_candidates_never_sent_are_given_back_when_the_call_ends():
    limiter = Limiter(Limits(max_requests=3, budget_usd=0.0006))  # three worst cases of $0.0002
    with limiter.candidates(3):
        limiter.acquire(WORST).settle(10, 10)  # the other two came from the cache
        assert limiter.report().remaining_requests == 0
    report = limiter.report()
    assert (report.requests, report.remaining_requests, report.reserved_usd) == (1, 2, 0.0)
    with limiter.candidates(3), pytest.raises(BudgetExceededError, match="budget_usd") as refused:
        limiter.acquire(WORST)  # 3 x $0.0002 no longer fits
    assert refused.value.request_usd == pytest.approx(0.0006)
    with limiter.candidates(2):
        limiter.acquire(WORST).settle(10, 10)
        limiter.acquire(WORST).settle(10, 10)
    assert limiter.report().requests == 3


def test_candidates_requested_concurrently_share_the_reservation():
    limiter = Limiter(Limits(max_requests=4, max_concurrency=2))

    async def candidate() -> None:
        permit = await limiter.aacquire()
        with permit:
            await asyncio.sleep(0.01)
            permit.settle(1, 1)

    async def call(n: int) -> None:
        with limiter.candidates(n):
            await asyncio.gather(*(candidate() for _ in range(n)))

    asyncio.run(call(3))
    with pytest.raises(BudgetExceededError, match="3 requests"):
        asyncio.run(call(3))  # 1 left: none of the three is sent
    assert (limiter.report().requests, limiter.in_flight, limiter.waiting) == (3, 0, 0)


# --- permits ---------------------------------------------------------------------------------------


def test_a_permit_takes_effect_once_and_a_with_block_always_frees_it():
    limiter = Limiter(Limits(max_concurrency=1, budget_usd=1.0))
    permit = limiter.acquire(WORST)
    permit.settle(10, 10)
    permit.settle(100, 100)  # ignored
    permit.release_failed(TimeoutError())  # ignored
    with pytest.raises(RuntimeError), limiter.acquire(WORST):
        raise RuntimeError("the engine failed")  # not billed: its money goes back; a request all the same
    report = limiter.report()
    assert (report.requests, report.failed, report.spent_usd) == (2, 1, pytest.approx(0.00002))
    assert limiter.in_flight == 0


def test_counts_that_are_not_counts_are_treated_as_unknown():
    limiter = Limiter(Limits(budget_usd=1.0))
    limiter.acquire(WORST).settle(-1, 5)
    limiter.acquire(WORST).settle("12", 5)  # type: ignore[arg-type]
    assert limiter.report().unknown_usage == 2


# --- sharing and pickling --------------------------------------------------------------------------


def test_copies_share_one_limiter():
    limiter = Limiter(Limits(budget_usd=1.0))
    assert copy.copy(limiter) is limiter
    assert copy.deepcopy(limiter) is limiter
    assert copy.deepcopy({"lm": {"limiter": limiter}})["lm"]["limiter"] is limiter
    lm = dspy.LM("openai/shared", cache=False)
    lm.limiter = limiter  # what Anyscale will hold: DSPy's lm.copy() deep-copies the LM
    assert lm.copy(temperature=0.5).limiter is limiter


def test_a_pickled_local_limiter_arrives_detached_and_never_with_a_fresh_budget():
    limiter = Limiter(Limits(budget_usd=1.0, max_concurrency=2))
    limiter.acquire(WORST).settle(100, 100)
    copied = pickle.loads(pickle.dumps(limiter))
    assert copied is not limiter and copied.limits == limiter.limits
    assert isinstance(copied.backend, DetachedLedger)
    with pytest.raises(ConfigurationError, match="pickled copy does not get a fresh budget"):
        copied.acquire(WORST)
    with pytest.raises(ConfigurationError, match="share_on_ray"):
        asyncio.run(copied.aacquire(WORST))
    with pytest.raises(ConfigurationError):
        copied.report()
    assert (copied.in_flight, copied.waiting) == (0, 0)  # a refused caller holds nothing
    assert pickle.loads(pickle.dumps(copied)).backend.origin_pid == os.getpid()  # stays detached
    limiter.acquire(WORST).settle(100, 100)  # the original is untouched
    assert limiter.report().requests == 2


def test_a_detached_copy_can_be_attached_to_a_ledger():
    copied = pickle.loads(pickle.dumps(Limiter(Limits(max_requests=1))))
    copied.attach(LocalLedger(copied.limits, FakeClock()))
    copied.acquire().settle(1, 1)
    with pytest.raises(BudgetExceededError):
        copied.acquire()


def test_the_ledger_cannot_change_under_requests_in_flight():
    limiter = Limiter(Limits(max_requests=5))
    held = limiter.acquire()
    with pytest.raises(ConfigurationError, match="in flight"):
        limiter.attach(LocalLedger(limiter.limits, FakeClock()))
    with pytest.raises(ConfigurationError, match="in flight"):
        limiter.backend.export()
    held.settle(1, 1)


# --- the prompt estimate ---------------------------------------------------------------------------

# Token counts from llama.cpp's tokenizer tests (models/ggml-vocab-*.gguf.out): Llama 2 (SentencePiece,
# with its leading space token), Llama 3 (BPE) and GPT-2 (byte-level BPE).
TOKENIZED = [
    ("Hello, world!", (4, 4, 4)),
    ("w048 7tuijk dsdfhu", (11, 10, 9)),
    ("333333333", (10, 3, 3)),
    ("    Hello\n    Hello", (5, 5, 9)),
    ("нещо на Български", (6, 8, 20)),
    ("Cửa Việt", (8, 3, 10)),
    ("កាន់តែពិសេសអាចខលចេញ", (46, 34, 57)),
    ("🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)", (40, 29, 34)),
    ("Hello, y'all! How are you 😁 ?我想在apple工作1314151天～", (30, 21, 29)),
]


@pytest.mark.parametrize(("text", "counts"), TOKENIZED)
def test_the_estimate_of_a_message_is_at_least_what_real_tokenizers_count(text, counts):
    assert estimate_prompt_tokens(messages=[{"role": "user", "content": text}]) >= max(counts)
    if max(counts) >= 20:  # long enough that the per-message allowance is not what covers it
        assert estimate_text_tokens(text) >= max(counts)


def test_the_estimate_errs_high_against_chars_over_4_on_prose():
    prose = (
        "Answer the question using the context. Think step by step, then give the answer in one sentence.\n"
        "Context: The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions."
    ) * 20
    assert estimate_text_tokens(prose) >= len(prose) / 4


def test_prompt_estimates_cover_messages_prompts_parts_and_tools():
    text = "Name a primary color."
    one = estimate_text_tokens(text)
    assert estimate_prompt_tokens(prompt=text) == 8 + one
    assert estimate_prompt_tokens(prompt=[text, text]) == 8 + 2 * one
    chat = estimate_prompt_tokens(messages=[{"role": "system", "content": text}, {"role": "user", "content": text}])
    assert chat == 8 + 2 * (8 + one)
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    assert estimate_prompt_tokens(messages=[{"role": "user", "content": parts}]) > 8 + 8 + one
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    assert estimate_prompt_tokens(prompt=text, tools=tools) > 8 + one
    assert estimate_prompt_tokens() == 8
    assert estimate_text_tokens("") == 0


def test_an_estimate_from_a_request_body():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
    estimate = Estimate.for_payload(chat, PRICES)
    assert (estimate.max_tokens, estimate.prices) == (64, PRICES)
    assert estimate.prompt_tokens == estimate_prompt_tokens(messages=chat["messages"])
    assert estimate.worst_tokens == estimate.prompt_tokens + 64
    assert Estimate.for_payload({"prompt": "hi", "max_completion_tokens": 8}).max_tokens == 8
    assert Estimate.for_payload({"prompt": "hi"}).worst_tokens is None
    assert Estimate(prompt_tokens=1_000_000, max_tokens=1_000_000, prices=Prices(0.15, 0.15)).worst_cost_pico() == (
        300_000_000_000  # $0.30 exactly
    )


@pytest.mark.parametrize("bad", [{"prompt_tokens": -1}, {"prompt_tokens": 1.5}, {"prompt_tokens": 1, "max_tokens": -2}])
def test_an_estimate_is_validated(bad):
    with pytest.raises(ValueError, match="Estimate"):
        Estimate(**bad)


# Dense text, where the estimate runs below a byte-level BPE's count (0.52-0.67x measured on real
# tokenizers): random base64, random identifiers, symbol-heavy code.
_RNG = random.Random(7)
DENSE = {
    "base64": base64.b64encode(_RNG.randbytes(600)).decode(),
    "identifiers": " ".join(f"v{_RNG.getrandbits(48):x}_{_RNG.getrandbits(16)}" for _ in range(60)),
    "code": "for(i=0;i<n;i++){a[i]=b[i]^c[(i*7)%m];}\n" * 20,
    "non-ascii": "Cửa Việt 我想在apple工作 🚀😶‍🌫️ " * 10,
}


@pytest.mark.parametrize("text", DENSE.values(), ids=DENSE.keys())
def test_a_budget_reserves_a_true_upper_bound_of_the_prompt_whatever_the_tokenizer(text):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": text}]
    estimate = Estimate.for_payload({"messages": messages, "max_tokens": 10}, PRICES)
    at_most = sum(len(message["content"].encode()) for message in messages)  # a byte-level BPE token >= 1 byte
    assert estimate.prompt_bound >= at_most + 2 * 16  # with each message's template allowance
    assert estimate.worst_cost_pico() >= (estimate.prompt_bound + 10) * 10**6  # $1 per million tokens
    assert estimate.prompt_tokens <= estimate.prompt_bound  # token buckets keep the closer estimate
    completions = Estimate.for_payload({"prompt": text, "max_tokens": 10}, PRICES)
    assert completions.prompt_bound >= len(text.encode())


def test_16_threads_never_overspend_against_a_server_that_counts_a_token_per_byte():
    budget = 0.01
    limiter = Limiter(Limits(budget_usd=budget, max_concurrency=16))
    texts = list(DENSE.values())

    def spender(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            text = rng.choice(texts)[: rng.randint(100, 600)]
            messages = [{"role": "user", "content": text}]
            try:
                permit = limiter.acquire(Estimate.for_payload({"messages": messages, "max_tokens": 20}, PRICES))
            except BudgetExceededError:
                return
            time.sleep(rng.random() / 1000)
            # The worst a byte-level BPE can do: a token per byte, plus the chat template's markers.
            permit.settle(len(text.encode()) + 10, rng.randint(0, 20))

    threads = [threading.Thread(target=spender, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    report = limiter.report()
    assert report.requests > 10
    assert report.spent_usd <= budget and report.overruns == 0


# --- the report -----------------------------------------------------------------------------------


def test_the_report_is_frozen_and_reads_well():
    limiter = Limiter(Limits(budget_usd=1.0, max_requests=10))
    limiter.acquire(WORST).settle(80, 20)
    held = limiter.acquire(WORST)
    report = limiter.report()
    with pytest.raises(AttributeError):
        report.spent_usd = 0.0  # type: ignore[misc]
    assert str(report) == (
        "spent $0.000100 of $1, $0.999700 left ($0.000200 reserved by 1 in flight); 1 request of 10, 8 left; "
        "80 prompt + 20 completion tokens"
    )
    held.settle(None, None)
    assert "without counts" in str(limiter.report())


def test_without_prices_spending_is_unknown_but_tokens_are_counted():
    limiter = Limiter(Limits(max_concurrency=2))
    limiter.acquire(Estimate(prompt_tokens=10, max_tokens=10)).settle(7, 3)
    report = limiter.report()
    assert (report.spent_usd, report.prompt_tokens, report.completion_tokens) == (None, 7, 3)
    assert str(report).startswith("spent unknown; 1 request;")


def test_with_prices_and_no_budget_the_answers_are_priced():
    limiter = Limiter(Limits(max_concurrency=2))
    limiter.acquire(Estimate(prompt_tokens=0, prices=PRICES)).settle(70, 30)
    limiter.acquire(Estimate(prompt_tokens=0, prices=PRICES)).settle(None, None)  # no counts, no worst case
    report = limiter.report()
    assert (report.spent_usd, report.prompt_tokens, report.unknown_usage) == (None, 70, 1)
    priced = Limiter(Limits(max_requests=10))
    priced.acquire(Estimate(prompt_tokens=0, prices=PRICES)).settle(70, 30)
    assert priced.report().spent_usd == pytest.approx(0.0001)
    assert str(priced.report()).startswith("spent $0.000100; 1 request of 10, 9 left")


# --- the Ray ledger --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def spender_actor(ray):
    """A Ray actor class defined here, so Ray ships it by value."""

    @ray.remote(num_cpus=0)
    class Spender:
        def ready(self) -> bool:
            return True

        def run(self, limiter: Limiter, seed: int) -> tuple[int, float]:
            rng = random.Random(seed)
            admitted, cost = 0, 0.0
            while True:
                try:
                    permit = limiter.acquire(WORST)
                except BudgetExceededError:
                    break
                prompt, completion = rng.randint(0, 100), rng.randint(0, 100)
                time.sleep(0.005)  # a request takes time: the actors overlap
                permit.settle(prompt, completion)
                admitted, cost = admitted + 1, cost + PRICES.cost(prompt, completion)
            limiter.report()  # waits until the ledger has every settlement of this process
            return admitted, cost

    return Spender


@pytest.mark.ray
def test_4_ray_actors_share_one_budget(local_ray):
    budget = 0.01
    limiter = Limiter(Limits(budget_usd=budget))
    limiter.acquire(WORST).settle(50, 50)  # $0.0001 spent before the job: it moves with the ledger
    ledger = limiter.share_on_ray()
    assert limiter.share_on_ray() is ledger  # idempotent
    assert limiter.report().spent_usd == pytest.approx(0.0001)

    actors = [spender_actor(local_ray).remote() for _ in range(4)]
    local_ray.get([actor.ready.remote() for actor in actors], timeout=300)  # all started before anyone spends
    results = local_ray.get([actor.run.remote(limiter, seed) for seed, actor in enumerate(actors)], timeout=300)

    report = limiter.report()
    assert report.spent_usd <= budget
    assert report.spent_usd == pytest.approx(0.0001 + sum(cost for _, cost in results), rel=1e-9)
    assert report.requests == 1 + sum(admitted for admitted, _ in results)
    assert all(admitted > 0 for admitted, _ in results)  # every actor spent from the one budget
    assert report.refused == 4 and report.in_flight == 0
    with pytest.raises(BudgetExceededError):
        limiter.acquire(Estimate(prompt_tokens=10_000, max_tokens=0, prices=PRICES))  # the driver is held too


@pytest.mark.ray
def test_a_pickled_ray_limiter_keeps_its_ledger_and_a_cool_down_is_shared(local_ray):
    limiter = Limiter(Limits(max_requests=100))
    limiter.share_on_ray()
    copied = pickle.loads(pickle.dumps(limiter))
    assert copied.backend.handle._actor_id == limiter.backend.handle._actor_id
    copied.acquire().settle(3, 4)
    noted = time.monotonic()
    copied.note_rate_limited(0.2)
    copied.report()  # the note has reached the ledger actor

    async def acquire_async() -> None:
        (await limiter.aacquire()).settle(1, 1)

    asyncio.run(acquire_async())
    assert time.monotonic() - noted >= 0.2  # the copy's 429 paused the original too
    report = limiter.report()
    assert (report.requests, report.prompt_tokens, report.rate_limited) == (2, 4, 1)
