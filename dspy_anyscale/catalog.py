"""The legacy Anyscale Endpoints catalogue: context windows and prices, and cost arithmetic.

Prices are USD per million tokens, as Anyscale Endpoints listed them (input = output). Your own
Anyscale Service or vLLM deployment has its own costs: pass ``prices=`` to ``Anyscale`` to use
them instead. A model that is in neither has no price, and its cost is ``None`` (unknown), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import ConfigurationError


@dataclass(frozen=True)
class Prices:
    """USD per million tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """USD for these counts; ``None`` when a count the price needs is unknown."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000

    @classmethod
    def parse(cls, value: Prices | Mapping[str, float]) -> Prices:
        if isinstance(value, Prices):
            return value
        if not isinstance(value, Mapping) or set(value) != {"input", "output"}:
            raise ConfigurationError(
                "prices must be {'input': <USD per million tokens>, 'output': <USD per million tokens>}, "
                f"got {value!r}"
            )
        for key, number in value.items():
            if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
                raise ConfigurationError(f"prices[{key!r}] must be a number of USD per million tokens")
            if number < 0:
                raise ConfigurationError(f"prices[{key!r}] must be a non-negative number of USD per million tokens")
        return cls(float(value["input"]), float(value["output"]))


@dataclass(frozen=True)
class ModelInfo:
    """A catalogue entry: the model id Anyscale Endpoints served, its context window and prices."""

    id: str
    context_window: int
    prices: Prices


def _entry(model_id: str, context_window: int, usd_per_million: float) -> tuple[str, ModelInfo]:
    return model_id, ModelInfo(model_id, context_window, Prices(usd_per_million, usd_per_million))


CATALOG: Mapping[str, ModelInfo] = MappingProxyType(
    dict(
        [
            _entry("meta-llama/Llama-2-7b-chat-hf", 4096, 0.15),
            _entry("meta-llama/Llama-2-13b-chat-hf", 4096, 0.25),
            _entry("meta-llama/Llama-2-70b-chat-hf", 4096, 1.00),
            # Some sources list 16384 tokens for CodeLlama-34b; Anyscale's model page said 4096.
            _entry("codellama/CodeLlama-34b-Instruct-hf", 4096, 1.00),
            _entry("mistralai/Mistral-7B-Instruct-v0.1", 16384, 0.15),
            _entry("mistralai/Mixtral-8x7B-Instruct-v0.1", 32768, 0.15),
            _entry("HuggingFaceH4/zephyr-7b-beta", 16384, 0.15),
            _entry("mistralai/Mixtral-8x22B-Instruct-v0.1", 65536, 0.90),
            _entry("meta-llama/Meta-Llama-3-8B-Instruct", 8192, 0.15),
            _entry("meta-llama/Meta-Llama-3-70B-Instruct", 8192, 1.00),
        ]
    )
)
_BY_LOWER = {key.lower(): info for key, info in CATALOG.items()}


def model_info(name: str) -> ModelInfo | None:
    """The catalogue entry for a model id (case-insensitive; an ``anyscale/`` prefix is allowed), or None."""
    key = name.strip().lower()
    key = key.removeprefix("anyscale/")
    return _BY_LOWER.get(key)
