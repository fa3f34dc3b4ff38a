"""What a request may cost before it is sent, without a tokenizer: a prompt-token *estimate*
(close, errs high on natural text: what rate buckets reserve), a true *upper bound* (what budgets
reserve), and the worst case in tokens and in (integer pico-) USD.

The bound holds whatever the server's tokenizer: a byte-level BPE spends at most one token per
UTF-8 byte (SentencePiece with byte fallback at most one more per text, for its leading space),
so a prompt has at most as many tokens as its text has bytes, plus what the chat template adds
(``BOUND_TOKENS_PER_MESSAGE`` / ``BOUND_TOKENS_PER_REQUEST``). Dense text (base64, random
identifiers, code) runs at 0.5-0.7 of the estimate's count on real tokenizers, never above the bound."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any

from .._constants import (
    BOUND_TOKENS_PER_MESSAGE,
    BOUND_TOKENS_PER_REQUEST,
    ESTIMATE_LETTERS_PER_TOKEN,
    ESTIMATE_TOKENS_PER_MESSAGE,
    ESTIMATE_TOKENS_PER_REQUEST,
    PICO_PER_USD,
    TOKENS_PER_PRICE_UNIT,
)
from ..catalog import Prices
from ..errors import ConfigurationError

# ASCII characters that are not letters or spaces: digits, punctuation, newlines, tabs. Llama 2
# spends a whole token on each digit and each newline; punctuation rarely merges much.
_SYMBOLS = bytes(code for code in range(128) if not chr(code).isalpha() and chr(code) != " ")


def estimate_text_tokens(text: str) -> int:
    """Tokens in ``text`` as an estimate that errs high, without a tokenizer.

    ASCII letters and spaces count 3 to a token, every other ASCII character one token, every
    byte of a non-ASCII character one token (see ``_defaults`` for the measurements). Linear
    C-speed passes only: a 10,000-character prompt takes microseconds.
    """
    ascii_bytes = text.encode("ascii", "ignore")
    non_ascii = 0 if len(ascii_bytes) == len(text) else len(text.encode("utf-8", "replace")) - len(ascii_bytes)
    symbols = len(ascii_bytes) - len(ascii_bytes.translate(None, _SYMBOLS))
    letters = len(ascii_bytes) - symbols
    return -(-letters // ESTIMATE_LETTERS_PER_TOKEN) + symbols + non_ascii


def estimate_prompt_tokens(
    *,
    messages: Iterable[Mapping[str, Any]] | None = None,
    prompt: str | Iterable[str] | None = None,
    tools: Any = None,
) -> int:
    """The prompt tokens of a chat (``messages``) or completions (``prompt``) request, erring high.

    An estimate, not a count: it is what the limiter reserves before sending; the server's usage
    corrects it when the answer comes. Message text is measured as text; anything else (tool
    calls, content parts other than text, ``tools`` schemas) by its JSON.
    """
    total = ESTIMATE_TOKENS_PER_REQUEST
    for message in messages or ():
        total += ESTIMATE_TOKENS_PER_MESSAGE + _message_tokens(message)
    if prompt is not None:
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        total += sum(estimate_text_tokens(text) for text in texts)
    if tools:
        total += estimate_text_tokens(_json(tools))
    return total


def _message_tokens(message: Mapping[str, Any]) -> int:
    tokens = 0
    for key, value in message.items():
        if key == "role":
            continue  # part of the per-message template overhead
        tokens += _content_tokens(value) if key == "content" else estimate_text_tokens(_json(value))
    return tokens


def _content_tokens(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if isinstance(content, list):
        return sum(_part_tokens(part) for part in content)
    return estimate_text_tokens(_json(content))


def _part_tokens(part: Any) -> int:
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return estimate_text_tokens(part["text"])
    return estimate_text_tokens(_json(part))


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


# --- a true upper bound -----------------------------------------------------------------------------


def prompt_token_bound(
    *,
    messages: Iterable[Mapping[str, Any]] | None = None,
    prompt: str | Iterable[str] | None = None,
    tools: Any = None,
) -> int:
    """The most prompt tokens a chat (``messages``) or completions (``prompt``) request can have.

    UTF-8 bytes of every text (a token is at least one byte), of the role names, and of the JSON
    of anything else (tool calls, non-text content parts; ``tools`` as JSON indented by 4, as chat
    templates print them), plus the template allowance per message and per request. What it does
    not bound: an image part (a vision model counts the image, not its URL) and a template that
    adds more than the allowance; an answer over its reservation is counted in ``overruns``.
    """
    total = BOUND_TOKENS_PER_REQUEST
    for message in messages or ():
        total += BOUND_TOKENS_PER_MESSAGE + sum(_utf8(_bound_text(key, value)) for key, value in message.items())
    if prompt is not None:
        total += sum(_utf8(text) for text in ([prompt] if isinstance(prompt, str) else prompt))
    if tools:
        total += _utf8(
            tools if isinstance(tools, str) else json.dumps(tools, default=str, ensure_ascii=False, indent=4)
        )
    return total


def _bound_text(key: str, value: Any) -> str:
    if key == "content" and isinstance(value, list):
        return "".join(_part_text(part) for part in value)
    if key == "content" and value is None:
        return ""
    return _json(value)


def _part_text(part: Any) -> str:
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    return _json(part)


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate still counts, as its 3 bytes


# --- the worst case of one request ---------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What the engine knows of a request before sending it.

    prompt_tokens: an estimate (``estimate_prompt_tokens``), what token buckets reserve; max_tokens:
    the completion cap the request carries (None: no cap, which a budget or a token rate cannot
    admit); prices: USD per million tokens (None: unknown, which a budget cannot admit);
    prompt_bound: the most prompt tokens the request can have (``prompt_token_bound``), what a
    budget reserves (None: ``prompt_tokens`` is taken as the bound); module: the DSPy module that
    makes the request, for ``report_by_module`` (None: a direct call).
    """

    prompt_tokens: int
    max_tokens: int | None = None
    prices: Prices | None = None
    prompt_bound: int | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "max_tokens", "prompt_bound"):
            value = getattr(self, name)
            if value is None and name != "prompt_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"Estimate.{name} must be a non-negative integer, got {value!r}")

    @classmethod
    def for_payload(
        cls, payload: Mapping[str, Any], prices: Prices | None = None, module: str | None = None
    ) -> Estimate:
        """From a chat or completions request body (``messages`` / ``prompt``, ``tools``, ``max_tokens``)."""
        parts = {"messages": payload.get("messages"), "prompt": payload.get("prompt"), "tools": payload.get("tools")}
        max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens"))
        return cls(estimate_prompt_tokens(**parts), max_tokens, prices, prompt_token_bound(**parts), module)

    @property
    def prompt_ceiling(self) -> int:
        """The prompt tokens a budget reserves: the bound, never below the estimate."""
        return self.prompt_tokens if self.prompt_bound is None else max(self.prompt_bound, self.prompt_tokens)

    @property
    def worst_tokens(self) -> int | None:
        """Prompt estimate + max_tokens: what a token bucket reserves. None without max_tokens."""
        return None if self.max_tokens is None else self.prompt_tokens + self.max_tokens

    def worst_cost_pico(self) -> int | None:
        """The worst-case cost in pico-USD (the prompt's bound, and max_tokens), or None when prices
        or max_tokens are unknown."""
        if self.prices is None or self.max_tokens is None:
            return None
        return cost_pico(self.prices, self.prompt_ceiling, self.max_tokens)


@dataclass(frozen=True)
class _PicoRates:
    """Prices as whole pico-USD per token, rounded up (a cap must never under-count)."""

    input: int
    output: int


@lru_cache(maxsize=256)
def _pico_rates(prices: Prices) -> _PicoRates:
    # Decimal(repr(x)) is the price as the user wrote it (0.15, not 0.1499999...).
    def per_token(usd_per_million: float) -> int:
        return math.ceil(Decimal(repr(usd_per_million)) * PICO_PER_USD / TOKENS_PER_PRICE_UNIT)

    return _PicoRates(per_token(prices.input), per_token(prices.output))


def cost_pico(prices: Prices, prompt_tokens: int, completion_tokens: int) -> int:
    rates = _pico_rates(prices)
    return prompt_tokens * rates.input + completion_tokens * rates.output


def usd_to_pico(usd: float) -> int:
    """A budget in pico-USD, rounded down (a cap must never be looser than written)."""
    return math.floor(Decimal(repr(usd)) * PICO_PER_USD)


def pico_to_usd(pico: int) -> float:
    return pico / PICO_PER_USD
