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
    """USD per million tokens. ``cached_input``: the price of prompt tokens the server answered from
    its prompt cache (vLLM's ``prompt_tokens_details.cached_tokens``); None: priced as ``input``."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(
        self, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = None
    ) -> float | None:
        """USD for these counts; ``None`` when a count the price needs is unknown."""
        if prompt_tokens is None or completion_tokens is None:
            return None
        cached = min(cached_tokens or 0, prompt_tokens) if self.cached_input is not None else 0
        prompt_usd = (prompt_tokens - cached) * self.input + cached * (self.cached_input or 0.0)
        return (prompt_usd + completion_tokens * self.output) / 1_000_000

    def as_dict(self) -> dict[str, float]:
        """As ``prices=`` takes them."""
        values = {"input": self.input, "output": self.output}
        if self.cached_input is not None:
            values["cached_input"] = self.cached_input
        return values

    @classmethod
    def parse(cls, value: Prices | Mapping[str, float]) -> Prices:
        if isinstance(value, Prices):
            return value
        if not isinstance(value, Mapping) or not {"input", "output"} <= set(value) <= _PRICE_KEYS:
            raise ConfigurationError(
                "prices must be {'input': <USD per million tokens>, 'output': <USD per million tokens>} "
                f"(and optionally 'cached_input': the price of cached prompt tokens), got {value!r}"
            )
        for key, number in value.items():
            if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
                raise ConfigurationError(f"prices[{key!r}] must be a number of USD per million tokens")
            if number < 0:
                raise ConfigurationError(f"prices[{key!r}] must be a non-negative number of USD per million tokens")
        cached = value.get("cached_input")
        if cached is not None and cached > value["input"]:
            # Budgets price every prompt token at "input", a bound that must hold for cached ones too.
            raise ConfigurationError(
                f"prices['cached_input'] ({cached}) must not exceed prices['input'] ({value['input']}): "
                "cached prompt tokens cost at most what other prompt tokens cost"
            )
        return cls(float(value["input"]), float(value["output"]), None if cached is None else float(cached))


_PRICE_KEYS = frozenset({"input", "output", "cached_input"})


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
