"""A small dspy.Evaluate under a budget on a real server: spend never exceeds it, refusals are never sent."""

from __future__ import annotations

import dspy
import pytest

from dspy_anyscale import Anyscale

from ..conftest import SECRET
from ._servers import ALIAS

pytestmark = pytest.mark.integration

CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi"}


def test_an_evaluate_under_a_budget_stays_within_it(llama_server):
    lm = Anyscale(
        ALIAS,
        api_base=llama_server.base_url,
        api_key=SECRET,
        use_chat_api=True,
        cache=False,
        max_tokens=96,
        prices={"input": 1.0, "output": 1.0},
        budget_usd=0.0012,
        max_concurrency=2,
    )
    devset = [
        dspy.Example(question=f"What is the capital of {country}?", answer=city).with_inputs("question")
        for country, city in CAPITALS.items()
    ]
    evaluate = dspy.Evaluate(
        devset=devset,
        metric=lambda example, prediction, trace=None: example.answer.lower() in str(prediction.answer).lower(),
        num_threads=2,
        max_errors=len(devset),
        provide_traceback=False,
        display_progress=False,
    )
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        evaluate(dspy.ChainOfThought("question -> answer"))
    spending = lm.spending()
    answered = [record for record in lm.usage if record.status == "ok"]
    refused = [record for record in lm.usage if record.status == "budget"]
    assert answered and refused, "some questions were answered, the rest refused by the budget"
    assert spending.spent_usd <= 0.0012
    assert sum(record.cost_usd for record in answered) == pytest.approx(spending.spent_usd)
    assert all(record.attempts == 0 for record in refused), "a refused call sent nothing"
    assert spending.refused == len(refused)
