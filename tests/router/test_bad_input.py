"""Every Router option refuses a wrong value before anything is built or sent, with a ConfigurationError
that names the option and says what it takes."""

from __future__ import annotations

import pytest

from dspy_anyscale import ConfigurationError, Router
from dspy_anyscale.errors import BudgetExceededError
from dspy_anyscale.limits import Limits


@pytest.fixture
def two(make_lm):
    """Two members on the session's stub, with an unpriced model (what a budget needs is then missing)."""
    return {"a": make_lm(model="my-model", use_chat_api=True), "b": make_lm(model="my-model", temperature=0.5)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "round_robin"}, "strategy must be one of 'fallback', 'weighted', 'least_busy', 'latency'"),
        ({"strategy": None}, "strategy must be one of"),
        ({"weights": {"a": 1, "b": 1}}, "weights= applies to strategy='weighted'"),
        ({"strategy": "weighted", "weights": [0.5, 0.5]}, "weights must be a dict of member name -> weight"),
        ({"strategy": "weighted", "weights": {"a": 1}}, "missing 'b'"),
        ({"strategy": "weighted", "weights": {"a": 1, "b": 1, "c": 1}}, "unknown 'c'"),
        ({"strategy": "weighted", "weights": {"a": -1, "b": 1}}, r"weights\['a'\] must be a number >= 0"),
        ({"strategy": "weighted", "weights": {"a": "1", "b": 1}}, r"weights\['a'\] must be a number >= 0"),
        ({"strategy": "weighted", "weights": {"a": float("nan"), "b": 1}}, r"weights\['a'\]"),
        ({"strategy": "weighted", "weights": {"a": 0, "b": 0}}, "weights are all 0"),
        ({"fallback_on": 503}, "fallback_on must be None or a list"),
        ({"fallback_on": "503"}, "fallback_on must be None or a list"),
        ({"fallback_on": [99]}, r"fallback_on\[0\] must be an HTTP status from 100 to 599"),
        ({"fallback_on": [True]}, r"fallback_on\[0\] must be an error class"),
        ({"fallback_on": ["LMServerError"]}, r"fallback_on\[0\] must be an error class"),
        ({"fallback_on": [BudgetExceededError]}, "BudgetExceededError is never a reason"),
        ({"allowed_fails": 0}, "allowed_fails must be an integer >= 1"),
        ({"allowed_fails": 2.5}, "allowed_fails must be an integer >= 1"),
        ({"cooldown_s": -1}, "cooldown_s must be a number of seconds >= 0"),
        ({"cooldown_s": float("inf")}, "cooldown_s must be a number of seconds >= 0"),
        ({"health_check_interval_s": 0}, "health_check_interval_s must be None"),
        ({"health_check_interval_s": "10"}, "health_check_interval_s must be None"),
        ({"routing_key": 17}, "routing_key must be None, 'prompt'"),
        ({"routing_key": "prompt"}, "routing_key= chooses the member drawn by weight"),
        ({"max_requests": 0}, "max_requests"),
        ({"max_concurrency": -2}, "max_concurrency"),
        ({"budget_usd": -1.0}, "budget_usd"),
        ({"limits": {"max_requests": 3}}, "limits must be None or a dspy_anyscale.limits.Limits"),
        ({"limits": Limits(max_requests=3), "max_requests": 4}, "both set limits"),
        ({"budget_usd": 1.0}, "the Router's budget_usd, member 'a': budget_usd needs prices"),
    ],
)
def test_a_wrong_option_is_refused_naming_it(two, options, message):
    with pytest.raises(ConfigurationError, match=message):
        Router(two, **options)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({}, "a Router needs at least one member"),
        ([], "a Router needs at least one member"),
        ("http://host/v1", "members must be a dict of name -> Anyscale"),
        ({"": None}, "must be a non-empty name"),
        ({"a": "not an lm"}, r"members\['a'\] must be a dspy_anyscale.Anyscale or Router"),
    ],
)
def test_wrong_members_are_refused(members, message):
    with pytest.raises(ConfigurationError, match=message):
        Router(members)


def test_the_same_lm_twice_is_refused(two):
    with pytest.raises(ConfigurationError, match="the same LM object"):
        Router({"a": two["a"], "again": two["a"]})


def test_a_calls_routing_key_must_be_text(two):
    lm = Router(two, strategy="weighted")
    with pytest.raises(ConfigurationError, match="routing_key must be a string"):
        lm("q", routing_key=17)


def test_a_call_option_the_members_refuse_is_refused_and_not_moved_on(two):
    lm = Router(two)
    with pytest.raises(ConfigurationError, match="temperature"):
        lm("q", temperature="hot")


def test_the_limits_need_what_each_member_can_give(make_lm):
    priced = make_lm(model="my-model", prices={"input": 1.0, "output": 1.0})
    unpriced = make_lm(model="my-model")
    assert Router({"p": priced, "q": priced.copy(temperature=0.3)}, budget_usd=1.0).limiter.enabled
    with pytest.raises(ConfigurationError, match="member 'u': budget_usd needs prices"):
        Router({"p": priced, "u": unpriced}, budget_usd=1.0)
