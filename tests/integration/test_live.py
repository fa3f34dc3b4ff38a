"""Against a real Anyscale endpoint. Skipped unless ANYSCALE_API_BASE and ANYSCALE_API_KEY are set
in the environment that runs pytest (ANYSCALE_MODEL picks the model; else the first listed)."""

from __future__ import annotations

import dspy
import pytest

from dspy_anyscale import Anyscale

from ..conftest import LIVE_ENDPOINT

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (LIVE_ENDPOINT["ANYSCALE_API_BASE"] and LIVE_ENDPOINT["ANYSCALE_API_KEY"]),
        reason="set ANYSCALE_API_BASE and ANYSCALE_API_KEY to run against a real Anyscale endpoint",
    ),
]


@pytest.fixture
def live_lm():
    base, key = LIVE_ENDPOINT["ANYSCALE_API_BASE"], LIVE_ENDPOINT["ANYSCALE_API_KEY"]
    model = LIVE_ENDPOINT["ANYSCALE_MODEL"] or Anyscale.models(base, key)[0]["id"]
    lm = Anyscale(model, api_base=base, api_key=key, use_chat_api=True, max_tokens=64)
    yield lm
    lm.close()


def test_live_direct_call(live_lm):
    assert "Paris" in live_lm("What is the capital of France? Answer in one word.")[0]


def test_live_chain_of_thought(live_lm):
    with dspy.context(lm=live_lm.copy(max_tokens=400)):
        prediction = dspy.ChainOfThought("question -> answer")(question="What is 17 + 25?")
    assert "42" in prediction.answer


def test_live_stream(live_lm):
    assert "".join(live_lm.stream("Say hello.")).strip()
