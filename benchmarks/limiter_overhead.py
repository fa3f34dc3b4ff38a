"""What the limiter costs per request: nothing configured, and configured but never binding.

Two measurements, rounds interleaved so machine noise hits every variant alike, medians printed:

1. The limiter alone, per call (µs): no limiter; ``Limiter.disabled()`` behind an ``enabled``
   check (what the engine does); the no-op permit used unconditionally; a configured limiter
   whose limits never bind (every option set, far above the load), with and without the cost of
   estimating the prompt tokens of a typical DSPy chat request.
2. A real request: ``engine.complete`` of an ``Anyscale`` LM against the local stub server
   (dspy_anyscale.testing.StubServer, zero latency) bare, and wrapped the way the engine will
   wrap it; printed as µs per call and as a ratio to the bare call.

Nothing here asserts a time; the unlimited ratio must be 1.00 within the noise printed beside it.

    python benchmarks/limiter_overhead.py [--calls 20000] [--requests 300] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from dspy.lm15 import Config, Message, Request

from dspy_anyscale import Anyscale
from dspy_anyscale.catalog import Prices
from dspy_anyscale.limits import Estimate, Limiter, Limits
from dspy_anyscale.limits._cooling import CoolingLimiter
from dspy_anyscale.limits._outer import outer_limiters
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
MODEL = "stub-model"
PRICES = Prices(1.0, 1.0)
# Every option set, none of them binding at this load.
LOOSE = Limits(
    max_concurrency=1_000,
    requests_per_minute=1e12,
    tokens_per_minute=1e15,
    budget_usd=1e9,
    max_requests=10**15,
)
# A typical DSPy ChatAdapter request: a system message with the field instructions, one user turn.
PAYLOAD = {
    "model": MODEL,
    "messages": [
        {
            "role": "system",
            "content": "Your input fields are:\n1. `question` (str):\nYour output fields are:\n1. `reasoning` "
            "(str):\n2. `answer` (str):\nAll interactions will be structured in the following way, with the "
            "appropriate values filled in.\n\n[[ ## question ## ]]\n{question}\n\n[[ ## reasoning ## ]]\n"
            "{reasoning}\n\n[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]\nIn adhering to this "
            "structure, your objective is: \n        Given the fields `question`, produce the fields `answer`.",
        },
        {
            "role": "user",
            "content": "[[ ## question ## ]]\nWhat is the capital of France?\n\nRespond with the corresponding "
            "output fields, starting with the field `[[ ## reasoning ## ]]`, then `[[ ## answer ## ]]`, and "
            "then ending with the marker for `[[ ## completed ## ]]`.",
        },
    ],
    "max_tokens": 256,
}
ESTIMATE = Estimate.for_payload(PAYLOAD, PRICES)


def limiter_variants() -> dict[str, Callable[[], object]]:
    unlimited = Limiter.disabled()
    cooling = CoolingLimiter()
    loose = Limiter(LOOSE)

    def nothing() -> None:
        pass

    def guarded_unlimited() -> None:
        if unlimited.enabled:  # the engine's fast path: no estimate, no permit
            raise AssertionError
        nothing()

    def unlimited_permit() -> None:
        with unlimited.acquire(None) as permit:
            nothing()
            permit.settle(100, 20)

    def cooling_permit() -> None:
        # What the engine of an LM without limits does: no Router around it (one context-variable read),
        # then the cool-down-only limiter (one attribute read while no 429 has been seen).
        if outer_limiters():
            raise AssertionError
        with cooling.acquire(None) as permit:
            nothing()
            permit.settle(100, 20)

    def loose_limiter() -> None:
        with loose.acquire(ESTIMATE) as permit:
            nothing()
            permit.settle(100, 20)

    def loose_with_estimate() -> None:
        with loose.acquire(Estimate.for_payload(PAYLOAD, PRICES)) as permit:
            nothing()
            permit.settle(100, 20)

    return {
        "no limiter": nothing,
        "Limiter.disabled(), `if limiter.enabled` check": guarded_unlimited,
        "Limiter.disabled(), no-op permit always": unlimited_permit,
        "no limits: shared 429 cool-down + Router check": cooling_permit,
        "configured, not binding": loose_limiter,
        "configured, not binding, + prompt estimate": loose_with_estimate,
    }


def request_variants(base_url: str) -> dict[str, Callable[[], object]]:
    lm = Anyscale(MODEL, api_base=base_url, api_key=KEY, use_chat_api=True, cache=False)
    engine = lm.engine
    request = Request(
        model=MODEL,
        messages=(Message.user("What is the capital of France?"),),
        config=Config(max_tokens=256),
    )
    unlimited, loose = Limiter.disabled(), Limiter(LOOSE)

    def bare() -> object:
        return engine.complete(request)

    def with_unlimited() -> object:
        if not unlimited.enabled:
            return engine.complete(request)
        raise AssertionError

    def with_loose() -> object:
        with loose.acquire(Estimate.for_payload(PAYLOAD, PRICES)) as permit:
            response = engine.complete(request)
            permit.settle(response.usage.input_tokens, response.usage.output_tokens)
            return response

    return {
        "engine.complete, no limiter": bare,
        "engine.complete, Limiter.disabled()": with_unlimited,
        "engine.complete, configured, not binding": with_loose,
    }


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(variants: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, list[float]]:
    for fn in variants.values():  # warm up: connections, caches, lazy imports
        per_call_us(fn, max(10, calls // 20))
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            results[name].append(per_call_us(fn, calls))
    return results


def spread(values: list[float]) -> float:
    """Half the interquartile range: the noise between rounds of one variant."""
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / 2


def report(title: str, results: dict[str, list[float]]) -> None:
    baseline_name = next(iter(results))
    baseline = statistics.median(results[baseline_name])
    print(f"\n{title}")
    print(f"{'variant':48} {'µs/call':>9} {'± noise':>8} {'overhead µs':>12} {'ratio':>7}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:48} {median:9.3f} {spread(values):8.3f} {median - baseline:12.3f} {median / baseline:7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="limiter-only calls per variant per round")
    parser.add_argument("--requests", type=int, default=300, help="HTTP requests per variant per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    args = parser.parse_args()

    print(f"prompt estimate of the benchmark request: {ESTIMATE.prompt_tokens} tokens (+{ESTIMATE.max_tokens} max)")
    report(
        f"1. the limiter alone: median of {args.rounds} rounds x {args.calls} calls",
        measure(limiter_variants(), args.calls, args.rounds),
    )
    with StubServer(api_key=KEY, model=MODEL) as server:
        results = measure(request_variants(server.base_url), args.requests, args.rounds)
    report(
        f"2. a real request to the stub on 127.0.0.1: median of {args.rounds} rounds x {args.requests} requests",
        results,
    )


if __name__ == "__main__":
    main()
