"""GEPA and MIPROv2 end cleanly when an Anyscale LM's budget_usd is spent: GEPA returns its best program
so far, MIPROv2 raises one BudgetExceededError that says so, never a traceback from deep inside."""

from __future__ import annotations

import threading
import traceback
from typing import Any

import dspy
import pytest

from dspy_anyscale.errors import BudgetExceededError
from dspy_anyscale.optimizers import BudgetStop, compile_within_budget

from .test_attribution import TwoStep

PRICES = {"input": 1.0, "output": 2.0}
RUN_S = 120  # an optimizer that does not stop fails the test instead of hanging the suite


def bounded(function: Any) -> Any:
    """``function()`` in a thread, failing the test if it has not returned within RUN_S."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(RUN_S)
    assert not thread.is_alive(), "the optimizer did not stop"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def examples(n: int) -> list[dspy.Example]:
    return [dspy.Example(question=f"question {i}", answer="a").with_inputs("question") for i in range(n)]


def feedback_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return dspy.Prediction(score=0.5, feedback="shorter, please")


def test_gepa_returns_its_best_program_when_the_reflection_budget_is_spent(make_lm, stub):
    task = make_lm(use_chat_api=True, prices=PRICES, cache=False)
    reflection = make_lm(use_chat_api=True, prices=PRICES, budget_usd=0.02, max_tokens=2000, cache=False)
    dspy.configure(lm=task)
    gepa = dspy.GEPA(
        metric=feedback_metric,
        reflection_lm=reflection,
        max_metric_calls=100_000,  # far more than the budget allows: the budget must end the run
        num_threads=2,
        reflection_minibatch_size=2,
    )
    train = examples(6)
    best = bounded(lambda: compile_within_budget(gepa, TwoStep(), trainset=train, valset=train[:3]))
    assert isinstance(best, TwoStep)
    spent = reflection.spending()
    assert spent.refused >= 1 and spent.spent_usd <= 0.02
    assert len(task.usage) < 1000  # stopped within an iteration or two of the refusal, not at 100,000 calls
    # The task LM's calls name GEPA's student modules; the stopper was taken off again.
    assert {"generate_query.predict", "answer"} <= {r.module for r in task.usage}
    assert "stop_callbacks" not in gepa.gepa_kwargs


def test_a_budget_stop_is_gepas_own_stopper():
    class Ledger:
        def __init__(self) -> None:
            self.refused, self.remaining_usd = 0, 1.0

        def spending(self) -> Any:
            return self

    lm = Ledger()
    stop = BudgetStop(lm, min_remaining_usd=0.1)
    assert stop("state") is False and stop.state == "state"
    lm.refused = 1
    assert stop("state") is True
    lm.refused, lm.remaining_usd = 0, 0.05
    assert stop("state") is True


def test_mipro_ends_with_one_error_that_names_the_budget(make_lm, stub):
    lm = make_lm(use_chat_api=True, prices=PRICES, budget_usd=0.002, max_tokens=500, cache=False)
    dspy.configure(lm=lm)
    optimizer = dspy.MIPROv2(metric=lambda gold, pred, trace=None: 1.0, auto=None, num_candidates=3, num_threads=2)
    train = examples(8)

    def compile_it() -> Any:
        return compile_within_budget(
            optimizer,
            dspy.Predict("question -> answer"),
            trainset=train,
            valset=train[:4],
            num_trials=3,
            minibatch=False,
        )

    with pytest.raises(BudgetExceededError, match="MIPROv2 was ended by budget_usd") as caught:
        bounded(compile_it)
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "compile" not in frames  # nothing of MIPROv2's internals
    assert caught.value.__suppress_context__ and lm.spending().refused >= 1


def test_an_error_that_is_not_the_budget_goes_through(make_lm, stub):
    lm = make_lm(use_chat_api=True, prices=PRICES, budget_usd=1.0, cache=False)
    dspy.configure(lm=lm)
    optimizer = dspy.MIPROv2(metric=lambda gold, pred, trace=None: 1.0, auto=None, num_candidates=3)
    with pytest.raises(ValueError, match="Minibatch size"):
        compile_within_budget(optimizer, dspy.Predict("question -> answer"), trainset=examples(4), num_trials=1)
