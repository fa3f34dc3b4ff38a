"""The Router's pure parts, by table: the circuit breaker (with a fake clock), the strategies, the policy."""

from __future__ import annotations

import doctest
import errno
import importlib
import random

import pytest
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMInvalidRequestError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)

from dspy_anyscale import MemberHealth
from dspy_anyscale._routing import strategies
from dspy_anyscale._routing.health import Breaker, Outcome
from dspy_anyscale._routing.policy import DEFAULT_POLICY, Policy, context_window_in, not_connected, outcome_of
from dspy_anyscale.errors import BudgetExceededError, ConfigurationError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**kwargs) -> tuple[Breaker, FakeClock]:
    clock = FakeClock()
    return Breaker(clock=clock, wall=lambda: clock.now + 1e9, **kwargs), clock


# --- the breaker ---------------------------------------------------------------------------------------


def test_allowed_fails_consecutive_failures_open_it_for_the_cool_down_then_one_trial_closes_it():
    b, clock = breaker(allowed_fails=3, cooldown_s=5.0)
    for _ in range(2):
        assert b.start() is False
        b.end(Outcome.FAILED, trial=False)
    assert b.snapshot().state == "healthy" and b.snapshot().failures == 2
    b.start()
    b.end(Outcome.FAILED, trial=False)
    health = b.snapshot()
    assert (health.state, health.failures, health.until) == ("cooling", 3, clock.now + 5.0 + 1e9)
    assert not b.available() and b.start() is None, "skipped while it cools"
    clock.now += 5.0
    assert b.available()
    assert b.start() is True, "the first call after the cool-down is its trial"
    assert not b.available() and b.start() is None, "others keep skipping it while the trial runs"
    b.end(Outcome.ANSWERED, trial=True, latency_s=0.2)
    assert b.snapshot() == MemberHealth(state="healthy", in_flight=0, failures=0, p50_ms=200.0, until=None)


def test_a_failed_trial_opens_it_again_for_the_cool_down():
    b, clock = breaker(allowed_fails=1, cooldown_s=2.0)
    b.start()
    b.end(Outcome.FAILED, trial=False)
    clock.now += 2.0
    assert b.start() is True
    b.end(Outcome.FAILED, trial=True)
    assert b.snapshot().state == "cooling" and not b.available()
    clock.now += 2.0
    assert b.available()


def test_a_429_cools_it_for_its_retry_after_and_a_refusal_marks_it_down():
    b, clock = breaker(cooldown_s=5.0)
    b.start()
    b.end(Outcome.RATE_LIMITED, trial=False, retry_after=2.0)
    assert b.snapshot().state == "cooling" and b.until == clock.now + 2.0
    b.start(force=True)
    b.end(Outcome.RATE_LIMITED, trial=False, retry_after=None)
    assert b.until == clock.now + 5.0, "no Retry-After: the cool-down"
    b.start(force=True)
    b.end(Outcome.RATE_LIMITED, trial=False, retry_after=1e9)
    assert b.until == clock.now + 600.0, "capped as the limiter caps a cool-down"
    fresh, clock = breaker(cooldown_s=5.0)
    fresh.start()
    fresh.end(Outcome.REFUSED, trial=False)
    assert fresh.snapshot().state == "down" and fresh.until == clock.now + 5.0


def test_a_reply_closes_an_open_breaker_and_a_cancelled_try_says_nothing():
    b, clock = breaker(allowed_fails=1, cooldown_s=1.0)
    b.start()
    b.end(Outcome.REFUSED, trial=False)
    clock.now += 1.0
    b.start()
    b.end(Outcome.CANCELLED, trial=True)
    assert b.snapshot().state == "down" and b.available(), "the trial is free again"
    b.start()
    b.end(Outcome.REPLIED, trial=True)
    assert b.snapshot().state == "healthy"


def test_probes_close_it_and_in_flight_counts_tries():
    b, _ = breaker(allowed_fails=1)
    b.start()
    b.end(Outcome.FAILED, trial=False)
    b.probe_answered()
    assert b.snapshot().state == "healthy"
    b.start()
    b.start()
    assert b.in_flight == 2


def test_p50_is_the_median_of_the_latest_answers():
    b, _ = breaker(window=3)
    for latency in (0.9, 0.1, 0.2, 0.3):
        b.start()
        b.end(Outcome.ANSWERED, trial=False, latency_s=latency)
    assert b.p50_s() == 0.2


# --- strategies ------------------------------------------------------------------------------------------


def test_weighted_draws_split_by_weight():
    draws = random.Random(0)
    firsts = [strategies.weighted(["a", "b"], {"a": 0.8, "b": 0.2}, draws.random())[0] for _ in range(1000)]
    assert abs(firsts.count("a") / 1000 - 0.8) <= 0.05


@pytest.mark.parametrize(
    ("u", "expected"),
    [(0.0, ["a", "b", "c"]), (0.49, ["a", "b", "c"]), (0.5, ["b", "a", "c"]), (0.75, ["c", "a", "b"])],
)
def test_weighted_order_is_the_draw_then_the_rest_heaviest_first(u, expected):
    assert strategies.weighted(["a", "b", "c"], {"a": 2, "b": 1, "c": 1}, u) == expected


def test_a_routing_key_is_a_stable_point():
    points = [strategies.key_point(f"example-{i}") for i in range(200)]
    assert points == [strategies.key_point(f"example-{i}") for i in range(200)]
    assert all(0 <= p < 1 for p in points) and 0.35 < sum(points) / len(points) < 0.65


def test_least_busy_and_latency_orders():
    assert strategies.least_busy(["a", "b", "c"], {"a": 1, "b": 1, "c": 0}) == ["c", "a", "b"]
    assert strategies.fastest(["a", "b", "c"], {"a": 0.2, "b": 0.1, "c": None}) == ["c", "b", "a"]
    assert strategies.order("fallback", ["b", "a"], weights={}, in_flight={}, p50={}, u=0.5) == ["b", "a"]


@pytest.mark.parametrize("module", ["strategies", "health", "policy", "config", "options"])
def test_the_examples_in_the_docstrings_hold(module):
    found = importlib.import_module(f"dspy_anyscale._routing.{module}")
    assert doctest.testmod(found).failed == 0


def test_endpoint_names_doctest():
    from dspy_anyscale import _config

    assert doctest.run_docstring_examples is not None
    finder = doctest.DocTestFinder()
    (test,) = [t for t in finder.find(_config) if t.name.endswith("endpoint_name")]
    assert doctest.DocTestRunner().run(test).failed == 0


# --- the policy ------------------------------------------------------------------------------------------


def _refused() -> LMTransportError:
    error = LMTransportError("could not connect to 127.0.0.1:9: connection refused")
    error.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    return error


@pytest.mark.parametrize(
    ("error", "moves_on", "outcome"),
    [
        (LMRateLimitError("429", status=429, retry_after=2.0), True, Outcome.RATE_LIMITED),
        (LMServerError("503", status=503), True, Outcome.FAILED),
        (LMTimeoutError("read timeout"), True, Outcome.FAILED),
        (LMTransportError("reset by peer"), True, Outcome.FAILED),
        (_refused(), True, Outcome.REFUSED),
        (ContextWindowExceededError(message="too long", status=400), True, Outcome.REPLIED),
        (LMAuthError("401", status=401), False, Outcome.REPLIED),
        (LMInvalidRequestError("400", status=400), False, Outcome.REPLIED),
        (BudgetExceededError("over"), False, Outcome.CANCELLED),
        (ConfigurationError("bad temperature"), False, Outcome.CANCELLED),
        (ValueError("a program's own bug"), False, Outcome.CANCELLED),
        (KeyboardInterrupt(), False, Outcome.CANCELLED),
    ],
)
def test_the_default_policy(error, moves_on, outcome):
    assert DEFAULT_POLICY.moves_on(error) is moves_on
    assert outcome_of(error) is outcome
    assert DEFAULT_POLICY.moves_on(error, outcome) is moves_on, "given the outcome, the same answer"


def test_fallback_on_statuses_replace_the_set_but_a_refused_connection_always_moves_on():
    policy = Policy((), frozenset({503}))
    assert policy.moves_on(LMServerError("503", status=503))
    assert not policy.moves_on(LMServerError("500", status=500))
    assert not policy.moves_on(LMTimeoutError("timeout"))
    assert policy.moves_on(_refused()) and not_connected(_refused())
    assert policy.moves_on(_refused(), outcome_of(_refused())) and outcome_of(_refused()) is Outcome.REFUSED
    assert not policy.moves_on(BudgetExceededError("never"))


@pytest.mark.parametrize(
    ("message", "window"),
    [
        ("This model's maximum context length is 4096 tokens. However, you requested 5000", 4096),
        ("the request exceeds the available context size (n_ctx: 2048)", 2048),
        ("prompt is too long", None),
    ],
)
def test_the_context_window_an_error_states(message, window):
    assert context_window_in(ContextWindowExceededError(message=message)) == window
