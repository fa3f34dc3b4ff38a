"""Router behaviour against several stub servers on 127.0.0.1: fallback, cool-downs, strategies, streams,
limits over all members, and what the final error says. No absolute timings are asserted: waits are on
what the Router reports (``health()``), and every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMError,
    LMServerError,
    LMTransportError,
)

from dspy_anyscale.errors import BudgetExceededError
from dspy_anyscale.testing import Fault, StubServer

from ..conftest import SECRET
from ..limits.test_limits import run_bounded

ALWAYS_500 = [Fault(status=500, headers={"Retry-After": "0"})]
CONTEXT_400 = Fault(
    status=400,
    body={"error": {"message": "This model's maximum context length is 4096 tokens", "type": "invalid_request_error"}},
)


def _wait_for(condition, timeout: float = 10.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout:g}s"
        time.sleep(step)


def test_a_failing_primary_never_fails_a_call_and_gets_almost_no_requests_while_cooling(stubs, member, routers):
    primary, backup = stubs(), stubs()
    primary.chaos(1.0, ALWAYS_500)
    lm = routers({"primary": member(primary), "backup": member(backup)}, allowed_fails=3, cooldown_s=60)
    answers = [lm(f"question {i}") for i in range(30)]
    assert all(answer == [f"echo: question {i}"] for i, answer in enumerate(answers))
    # Each failure moved on at once (no retries on a member that is not the last try), and after
    # allowed_fails the primary was skipped: 3 requests in all, not 30 (nor 30 x 4 with retries).
    assert len(primary.posts()) == 3
    assert len(backup.posts()) == 30
    health = lm.health()["primary"]
    assert (health.state, health.failures) == ("cooling", 3) and health.until is not None


def test_a_429_with_retry_after_keeps_the_member_silent_for_that_long_and_it_is_used_again_after(
    stubs, member, routers
):
    primary, backup = stubs(), stubs()
    primary.script(Fault(status=429, headers={"Retry-After": "2"}))
    lm = routers({"primary": member(primary), "backup": member(backup)})
    assert lm("first") == ["echo: first"]
    health = lm.health()["primary"]
    assert health.state == "cooling" and health.until is not None
    assert 1.0 < health.until - time.time() <= 2.0, "cooled for the Retry-After"
    during = 0
    while time.time() < health.until - 0.3:  # calls while it cools never reach it
        assert lm(f"during {during}") == [f"echo: during {during}"]
        during += 1
        time.sleep(0.05)
    assert during >= 5 and len(primary.posts()) == 1
    time.sleep(max(0.0, health.until - time.time()) + 0.05)
    assert lm("after") == ["echo: after"]
    assert len(primary.posts()) == 2, "used again once its Retry-After has passed"
    assert lm.health()["primary"].state == "healthy"


def test_the_weighted_split_is_the_weights_within_five_points_over_a_thousand_calls(stubs, member, routers):
    a, b = stubs(), stubs()
    lm = routers({"a": member(a), "b": member(b)}, strategy="weighted", weights={"a": 0.8, "b": 0.2})
    for i in range(1000):
        lm._generate(f"q{i}", max_tokens=4)
    share = len(a.posts()) / 1000
    assert len(a.posts()) + len(b.posts()) == 1000
    assert abs(share - 0.8) <= 0.05, share


def test_a_routing_key_keeps_one_example_on_one_member(stubs, member, routers):
    a, b = stubs(), stubs()
    lm = routers({"a": member(a), "b": member(b)}, strategy="weighted", weights={"a": 1, "b": 1})
    for _ in range(10):
        lm("same question", routing_key="example-17")
    assert sorted((len(a.posts()), len(b.posts()))) == [0, 10], "one key, one member"
    a.reset()
    b.reset()
    for i in range(40):
        lm("another", routing_key=f"example-{i}")
    assert len(a.posts()) >= 5 and len(b.posts()) >= 5, "different keys spread by weight"


def test_routing_key_prompt_sends_the_same_prompt_to_the_same_member(stubs, member, routers):
    a, b = stubs(), stubs()
    lm = routers({"a": member(a), "b": member(b)}, strategy="weighted", routing_key="prompt")
    for _ in range(2):
        for i in range(8):
            lm(f"example {i}")
    firsts = {}
    for server, name in ((a, "a"), (b, "b")):
        for request in server.posts():
            firsts.setdefault(request.body["messages"][-1]["content"], set()).add(name)
    assert all(len(names) == 1 for names in firsts.values()) and len(firsts) == 8


def test_least_busy_prefers_an_idle_member(stubs, member, routers):
    a, b = stubs(), stubs()
    a.script(Fault(delay=1.0))
    lm = routers({"a": member(a), "b": member(b)}, strategy="least_busy")
    slow = threading.Thread(target=lm, args=("slow",), daemon=True)
    slow.start()
    _wait_for(lambda: lm.health()["a"].in_flight == 1)
    assert lm("quick") == ["echo: quick"]
    assert len(b.posts()) == 1, "the idle member took the call while the other was busy"
    slow.join(10)
    assert not slow.is_alive() and len(a.posts()) == 1


def test_latency_measures_each_member_then_prefers_the_fastest(stubs, member, routers):
    slow, fast = stubs(latency=0.3), stubs()  # a wide gap: a busy machine's hiccup must not reorder them
    lm = routers({"slow": member(slow), "fast": member(fast)}, strategy="latency")
    for i in range(8):
        lm(f"q{i}")
    assert len(slow.posts()) == 1, "measured once, then the faster member is preferred"
    assert len(fast.posts()) == 7
    assert lm.health()["slow"].p50_ms > lm.health()["fast"].p50_ms


def test_a_closed_port_never_fails_a_call(stubs, member, routers, closed_port):
    live = stubs()
    lm = routers({"gone": member(closed_port), "live": member(live)})
    assert [lm(f"q{i}") for i in range(10)] == [[f"echo: q{i}"] for i in range(10)]
    assert lm.health()["gone"].state == "down"
    assert len(live.posts()) == 10


def test_64_acall_with_the_primary_down_are_all_answered(stubs, member, routers, closed_port):
    live = stubs()
    lm = routers({"gone": member(closed_port), "live": member(live)})

    async def many():
        return await asyncio.gather(*(lm.acall(f"q{i}") for i in range(64)))

    answers = run_bounded(lambda: asyncio.run(many()), timeout=60)
    assert answers == [[f"echo: q{i}"] for i in range(64)]
    assert len(live.posts()) == 64 and lm.health()["gone"].state == "down"


def test_context_length_moves_on_to_a_member_whose_window_is_larger(stubs, member, routers):
    small, same, large = stubs(), stubs(), stubs()
    small.script(CONTEXT_400)
    lm = routers(
        {
            "llama-2-7b": member(small, model="meta-llama/Llama-2-7b-chat-hf"),  # 4096 tokens
            "llama-2-13b": member(same, model="meta-llama/Llama-2-13b-chat-hf"),  # 4096: skipped
            "mixtral": member(large, model="mistralai/Mixtral-8x7B-Instruct-v0.1"),  # 32768
        }
    )
    assert lm("a long prompt") == ["echo: a long prompt"]
    assert (len(small.posts()), len(same.posts()), len(large.posts())) == (1, 0, 1)
    assert lm.health()["llama-2-7b"].state == "healthy", "a prompt too long says nothing bad of the member"


def test_context_length_is_raised_when_no_member_can_take_more(stubs, member, routers):
    small, same = stubs(), stubs()
    small.script(CONTEXT_400)
    lm = routers(
        {
            "a": member(small, model="meta-llama/Llama-2-7b-chat-hf"),
            "b": member(same, model="meta-llama/Llama-2-13b-chat-hf"),
        }
    )
    with pytest.raises(ContextWindowExceededError):
        lm("too long")
    assert len(same.posts()) == 0


def test_401_is_raised_at_once_and_no_backup_is_asked(stubs, member, routers):
    primary, backup = stubs(), stubs()
    lm = routers({"primary": member(primary, api_key="esecret_WRONG_KEY_123456"), "backup": member(backup)})
    with pytest.raises(LMAuthError) as caught:
        lm("q")
    assert len(backup.posts()) == 0, "a bad key must not hide behind a backup"
    assert "esecret_WRONG_KEY_123456" not in str(caught.value)
    assert lm.health()["primary"].state == "healthy"


def test_an_invalid_request_is_raised_at_once_and_no_backup_is_asked(stubs, member, routers):
    primary, backup = stubs(), stubs()
    primary.script(
        Fault(status=400, body={"error": {"message": "unknown field 'foo'", "type": "invalid_request_error"}})
    )
    lm = routers({"primary": member(primary), "backup": member(backup)})
    with pytest.raises(LMError) as caught:
        lm("q")
    assert not isinstance(caught.value, ContextWindowExceededError)
    assert len(primary.posts()) == 1 and len(backup.posts()) == 0, "an invalid request is the caller's to fix"
    assert lm.health()["primary"].state == "healthy"


def test_a_stream_falls_back_before_its_first_chunk(stubs, member, routers, closed_port):
    primary, backup = stubs(), stubs()
    primary.script(Fault(status=503, headers={"Retry-After": "0"}))
    lm = routers({"primary": member(primary), "backup": member(backup)})
    assert "".join(run_bounded(lambda: list(lm.stream("one two three")))) == "echo: one two three"
    assert len(primary.posts()) == 1 and len(backup.posts()) == 1
    gone = routers({"gone": member(closed_port), "backup": member(backup)})
    assert "".join(run_bounded(lambda: list(gone.stream("four five")))) == "echo: four five"


def test_after_its_first_chunk_a_stream_failure_is_the_callers_and_no_text_comes_twice(stubs, member, routers):
    primary, backup = stubs(), stubs()
    primary.script(Fault(stream_cut_after=3))
    lm = routers({"primary": member(primary), "backup": member(backup)})
    received: list[str] = []

    def read() -> None:
        for chunk in lm.stream("alpha beta gamma delta epsilon"):
            received.append(chunk)

    with pytest.raises(LMTransportError):
        run_bounded(read)
    assert received and "".join(received) != "echo: alpha beta gamma delta epsilon"
    assert len(backup.posts()) == 0, "nothing was asked of the backup once text had been given"


def test_an_async_stream_falls_back_before_its_first_chunk(stubs, member, routers, closed_port):
    backup = stubs()
    lm = routers({"gone": member(closed_port), "backup": member(backup)})

    async def read() -> str:
        return "".join([chunk async for chunk in lm.astream("six seven")])

    assert run_bounded(lambda: asyncio.run(read())) == "echo: six seven"


def test_when_every_member_fails_the_last_error_is_raised_with_a_note_naming_each(stubs, member, routers, closed_port):
    broken = stubs()
    broken.chaos(1.0, ALWAYS_500)
    lm = routers({"gone": member(closed_port), "broken": member(broken, num_retries=0)})
    with pytest.raises(LMServerError) as caught:
        lm("q")
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "gone: LMTransportError" in notes and "broken: LMServerError" in notes
    assert SECRET not in notes


def test_when_every_member_cools_the_one_that_may_be_tried_soonest_is_tried(stubs, member, routers):
    a, b = stubs(), stubs()
    a.chaos(1.0, ALWAYS_500)
    b.chaos(1.0, ALWAYS_500)
    lm = routers({"a": member(a, num_retries=0), "b": member(b, num_retries=0)}, allowed_fails=1, cooldown_s=60)
    with pytest.raises(LMServerError):
        lm("q")
    assert {h.state for h in lm.health().values()} == {"cooling"}
    a.chaos(0.0)
    b.chaos(0.0)
    assert lm("again") == ["echo: again"], "a call is never failed without trying anyone"
    assert len(a.posts()) + len(b.posts()) == 3
    assert "healthy" in {h.state for h in lm.health().values()}


def test_after_its_cool_down_one_trial_call_closes_the_breaker(stubs, member, routers):
    primary, backup = stubs(), stubs()
    primary.script(Fault(status=500, headers={"Retry-After": "0"}))
    lm = routers({"primary": member(primary), "backup": member(backup)}, allowed_fails=1, cooldown_s=0.5)
    lm("fails over")
    until = lm.health()["primary"].until
    assert until is not None
    lm("while cooling")
    assert len(primary.posts()) == 1
    time.sleep(max(0.0, until - time.time()) + 0.05)
    lm("trial")
    assert len(primary.posts()) == 2 and lm.health()["primary"].state == "healthy"


def test_fallback_on_replaces_the_set_but_a_refused_connection_always_moves_on(stubs, member, routers, closed_port):
    primary, backup = stubs(), stubs()
    lm = routers({"primary": member(primary), "backup": member(backup)}, fallback_on=[503])
    primary.script(Fault(status=503, headers={"Retry-After": "0"}))
    assert lm("a") == ["echo: a"]
    primary.script(*[Fault(status=500, headers={"Retry-After": "0"})] * 4)
    with pytest.raises(LMServerError):
        lm("b")  # 500 is not in fallback_on: raised (the primary was the last try: its own retries ran)
    gone = routers({"gone": member(closed_port), "backup": member(backup)}, fallback_on=[503])
    assert gone("c") == ["echo: c"]


def test_a_call_of_n_goes_to_one_member(stubs, member, routers):
    a, b = stubs(), stubs()
    lm = routers({"a": member(a), "b": member(b)}, strategy="weighted")
    for _ in range(6):
        result = lm._generate("q", n=3)
        assert len(result["choices"]) == 3
    assert len(a.posts()) % 3 == 0 and len(b.posts()) % 3 == 0


def test_the_routers_max_requests_holds_over_all_members_and_a_refusal_is_not_moved_on(stubs, member, routers):
    a, b = stubs(), stubs()
    lm = routers({"a": member(a), "b": member(b)}, strategy="weighted", max_requests=3)
    for i in range(3):
        lm(f"q{i}")
    with pytest.raises(BudgetExceededError):
        lm("one too many")
    assert len(a.posts()) + len(b.posts()) == 3
    assert lm.spending().requests == 3
    assert all(h.state == "healthy" for h in lm.health().values()), "a refusal says nothing of the members"


def test_the_routers_budget_holds_over_all_members_with_each_members_prices(stubs, member, routers):
    a, b = stubs(), stubs()
    priced = {"prices": {"input": 100.0, "output": 100.0}, "max_tokens": 16}  # USD per million tokens
    lm = routers({"a": member(a, **priced), "b": member(b, **priced)}, strategy="weighted", budget_usd=0.02)
    answered = 0
    with pytest.raises(BudgetExceededError):
        for i in range(100):
            lm(f"question {i}", routing_key=f"example-{i}")  # a stable split: both members are used
            answered += 1
    assert 0 < answered < 100 and len(a.posts()) + len(b.posts()) == answered
    assert a.posts() and b.posts(), "one budget, spent on both members"
    spent = lm.spending()
    assert spent.requests == answered and 0 < spent.spent_usd <= 0.02
    assert all(h.state == "healthy" for h in lm.health().values()), "a refusal says nothing of the members"


def test_the_routers_max_concurrency_holds_over_all_members(stubs, member, routers):
    a, b = stubs(latency=0.1), stubs(latency=0.1)
    lm = routers({"a": member(a), "b": member(b)}, strategy="least_busy", max_concurrency=2)

    async def many():
        await asyncio.gather(*(lm.acall(f"q{i}") for i in range(12)))

    run_bounded(lambda: asyncio.run(many()), timeout=60)
    assert a.max_in_flight + b.max_in_flight <= 3  # the two maxima need not coincide
    assert max(a.max_in_flight, b.max_in_flight) <= 2 and len(a.posts()) + len(b.posts()) == 12


def test_each_members_own_limits_still_hold(stubs, member, routers):
    a, b = stubs(), stubs()
    lm = routers({"a": member(a, max_requests=2), "b": member(b)})
    with pytest.raises(BudgetExceededError):
        for i in range(3):
            lm(f"q{i}")
    assert len(a.posts()) == 2 and len(b.posts()) == 0, "a member's own refusal is not a reason to move on"


def test_a_nested_router_is_a_member(stubs, member, routers, closed_port):
    a, b, c = stubs(), stubs(), stubs()
    inner = routers({"b": member(b), "c": member(c)}, strategy="weighted", weights={"b": 1, "c": 0})
    lm = routers({"gone": member(closed_port), "pool": inner})
    assert lm("q") == ["echo: q"]
    assert len(b.posts()) == 1
    assert [entry["endpoint"] for entry in lm.history] == ["b"]
    assert [entry["endpoint"] for entry in inner.history] == ["b"]
    del a


def test_a_restarted_member_gets_traffic_again_after_its_cool_down(stubs, member, routers):
    primary, backup = stubs(), stubs()
    port = primary.port
    lm = routers({"primary": member(primary), "backup": member(backup)}, cooldown_s=0.5)
    primary.stop()
    assert lm("while down") == ["echo: while down"]
    assert lm.health()["primary"].state == "down"
    restarted = StubServer(api_key=SECRET, port=port).start()
    try:
        until = lm.health()["primary"].until
        time.sleep(max(0.0, until - time.time()) + 0.05)
        assert lm("back") == ["echo: back"]
        assert len(restarted.posts()) == 1 and lm.health()["primary"].state == "healthy"
    finally:
        restarted.stop()


def test_probes_close_the_breaker_of_a_member_that_answers_again(stubs, member, routers, caplog):
    primary, backup = stubs(), stubs()
    primary.script(Fault(status=500, headers={"Retry-After": "0"}))
    lm = routers(
        {"primary": member(primary), "backup": member(backup)},
        allowed_fails=1,
        cooldown_s=600,
        health_check_interval_s=0.05,
    )
    caplog.set_level("DEBUG", logger="dspy_anyscale")
    lm("fails over")
    assert lm.health()["primary"].state == "cooling"
    _wait_for(lambda: lm.health()["primary"].state == "healthy")
    assert any(r.method == "GET" and r.path.endswith("/models") for r in primary.requests)
    assert lm("back") == ["echo: back"] and len(primary.posts()) == 2
    lm.close()
    assert not lm._probes.running
    assert SECRET not in caplog.text


def test_a_member_stopped_after_it_answered_is_down_and_its_backup_answers(stubs, member, routers):
    """A stopped service closes the connections the member keeps open too (as a killed process would): the
    next call finds nothing there, moves on, and marks the member down."""
    primary, backup = stubs(), stubs()
    lm = routers({"primary": member(primary), "backup": member(backup)}, cooldown_s=60)
    assert lm("before") == ["echo: before"] and len(primary.posts()) == 1
    run_bounded(primary.stop, timeout=10)
    assert run_bounded(lambda: [lm(f"after {i}") for i in range(3)], timeout=30) == [
        [f"echo: after {i}"] for i in range(3)
    ]
    assert len(primary.posts()) == 1 and len(backup.posts()) == 3
    assert lm.health()["primary"].state == "down"
