"""Per-call overhead of a direct call (DSPy cache off) against a local stub server, as ratios.

Every client calls the same stub (dspy_anyscale.testing.StubServer on 127.0.0.1, zero latency)
with the same one-line prompt; rounds interleave the clients so machine noise hits them alike.
The medians are printed beside each other and as ratios to DSPy's native lm15 route and to its
LiteLLM route, measured in this same run. Nothing here asserts an absolute time.

    python benchmarks/overhead.py [--calls 300] [--rounds 5]

Targets (issue #2): Anyscale direct call no slower than DSPy's native lm15 route, and at most
0.7x the LiteLLM route.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
import requests
from dspy.lm15 import (
    AccessPolicy,
    Message,
    OpenAIChatCompat,
    ProviderDefinition,
    Request,
    register_provider,
)

from dspy_anyscale import Anyscale
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
MODEL = "stub-model"
PROMPT = "Say hello."


def clients(base_url: str) -> dict[str, Callable[[], object]]:
    session = requests.Session()
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    headers = {"Authorization": f"Bearer {KEY}"}

    register_provider(
        ProviderDefinition.chat(
            AccessPolicy(provider="benchstub", env_keys=("BENCHSTUB_API_KEY",), base_url=base_url),
            compat=OpenAIChatCompat(),
        ),
        replace=True,
    )
    native = dspy.LM(f"benchstub/{MODEL}", api_key=KEY, cache=False)
    litellm = dspy.LM(f"openai/{MODEL}", api_base=base_url, api_key=KEY, cache=False, engine="litellm")
    anyscale = Anyscale(
        MODEL, api_base=base_url, api_key=KEY, use_chat_api=True, cache=False, temperature=None, max_tokens=None
    )
    request = Request(model=MODEL, messages=(Message.user(PROMPT),))
    return {
        "raw requests.Session.post": lambda: session.post(
            f"{base_url}/chat/completions", json=body, headers=headers, timeout=30
        ).json(),
        "dspy.LM native lm15 (register_provider)": lambda: native(PROMPT),
        "dspy.LM LiteLLM route (engine='litellm')": lambda: litellm(PROMPT),
        "Anyscale direct call lm(prompt)": lambda: anyscale(PROMPT),
        "Anyscale lm(dspy.lm15.Request)": lambda: anyscale(request),
    }


def median_us(fn: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per client per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)

    with StubServer(api_key=KEY, model=MODEL) as server:
        fns = clients(server.base_url)
        for fn in fns.values():  # warm up: connections, imports, lazy setup
            for _ in range(20):
                fn()
        results: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                results[name].append(median_us(fn, args.calls))

    medians = {name: statistics.median(values) for name, values in results.items()}
    native = medians["dspy.LM native lm15 (register_provider)"]
    litellm = medians["dspy.LM LiteLLM route (engine='litellm')"]
    print(f"median per call, {args.rounds} rounds x {args.calls} calls, stub on 127.0.0.1 (cache off)\n")
    print(f"{'client':44} {'µs/call':>9} {'× native':>9} {'× LiteLLM':>10}")
    for name, value in medians.items():
        print(f"{name:44} {value:9.0f} {value / native:9.2f} {value / litellm:10.2f}")
    ours = medians["Anyscale direct call lm(prompt)"]
    print(f"\nAnyscale vs native route: {ours / native:.2f}x (target <= 1.00)")
    print(f"Anyscale vs LiteLLM route: {ours / litellm:.2f}x (target <= 0.70)")


if __name__ == "__main__":
    main()
