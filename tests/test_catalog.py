"""The legacy Anyscale catalogue: context windows and prices."""

from __future__ import annotations

from dspy_anyscale import Prices, model_info


def test_model_info():
    info = model_info("meta-llama/Llama-2-70b-chat-hf")
    assert (info.context_window, info.prices) == (4096, Prices(1.0, 1.0))
    assert model_info("ANYSCALE/mistralai/Mixtral-8x7B-Instruct-v0.1").context_window == 32768
    assert model_info("my-org/unknown") is None
