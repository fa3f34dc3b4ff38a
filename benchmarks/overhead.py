"""Per-call overhead of a direct call (DSPy cache off) against a local stub server, as ratios.

Every client calls the same stub (dspy_anyscale.testing.StubServer on 127.0.0.1, zero latency)
with the same one-line prompt, one call at a time; the clients take turns call by call (in a
seeded random order) so that machine noise hits them alike. The medians are printed beside each
other and as ratios to DSPy's native lm15 route (sync calls against its sync route, async calls
against its async route) and to its LiteLLM route, measured in this same run. Nothing here asserts an absolute time.

    python benchmarks/overhead.py [--calls 300] [--rounds 5]

Targets: the Anyscale sync direct call at most 1.00x DSPy's native lm15 route, one async call
(sequential) at most 1.00x the native async route, and at most 0.7x the LiteLLM route. (The sync
target was 0.90x while the sync transport ran on connection classes that copied private
``http.client`` code; on public requests/urllib3 API only it is 1.00x: the last 10-15 % were not
worth a private API.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp
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
NATIVE = "dspy.LM native lm15 (register_provider)"
NATIVE_ASYNC = "dspy.LM native lm15 acall"
LITELLM = "dspy.LM LiteLLM route (engine='litellm')"
OURS = "Anyscale direct call lm(prompt)"
OURS_ASYNC = "Anyscale await lm.acall(prompt)"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}


def build_lms(base_url: str) -> tuple[dspy.LM, dspy.LM, Anyscale]:
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
    return native, litellm, anyscale


def sync_clients(
    base_url: str, native: dspy.LM, litellm: dspy.LM, anyscale: Anyscale
) -> dict[str, Callable[[], object]]:
    session = requests.Session()
    headers = {"Authorization": f"Bearer {KEY}"}
    request = Request(model=MODEL, messages=(Message.user(PROMPT),))
    return {
        "raw requests.Session.post": lambda: session.post(
            f"{base_url}/chat/completions", json=BODY, headers=headers, timeout=30
        ).json(),
        NATIVE: lambda: native(PROMPT),
        LITELLM: lambda: litellm(PROMPT),
        OURS: lambda: anyscale(PROMPT),
        "Anyscale lm(dspy.lm15.Request)": lambda: anyscale(request),
    }


def async_clients(
    base_url: str, native: dspy.LM, anyscale: Anyscale, session: aiohttp.ClientSession
) -> dict[str, Callable[[], Awaitable[object]]]:
    async def raw() -> object:
        async with session.post(f"{base_url}/chat/completions", json=BODY) as response:
            return await response.json()

    return {
        "raw aiohttp.ClientSession.post": raw,
        NATIVE_ASYNC: lambda: native.acall(PROMPT),
        OURS_ASYNC: lambda: anyscale.acall(PROMPT),
    }


def turns(names: list[str], calls: int) -> list[list[str]]:
    """Each client once per turn, in a new random order each time (seeded, the same every run).

    A fixed cyclic order would always put the same client right after LiteLLM, whose logging
    thread keeps running after each of its calls and slows whatever comes next.
    """
    shuffler = random.Random(0)
    orders = []
    for _ in range(calls):
        order = list(names)
        shuffler.shuffle(order)
        orders.append(order)
    return orders


def interleaved_us(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median µs per call of each client, taking turns call by call so that a burst of load on the
    machine hits every client alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for order in turns(list(fns), calls):
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


async def ainterleaved_us(fns: dict[str, Callable[[], Awaitable[object]]], calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for order in turns(list(fns), calls):
        for name in order:
            start = time.perf_counter()
            await fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


async def async_round(base_url: str, native: dspy.LM, anyscale: Anyscale, calls: int, warm_up: int) -> dict[str, float]:
    """One round of the async clients on one event loop (as an application would run them)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        fns = async_clients(base_url, native, anyscale, session)
        for fn in fns.values():
            for _ in range(warm_up):
                await fn()
        return await ainterleaved_us(fns, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per client per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)

    with StubServer(api_key=KEY, model=MODEL) as server:
        native, litellm, anyscale = build_lms(server.base_url)
        fns = sync_clients(server.base_url, native, litellm, anyscale)
        for fn in fns.values():  # warm up: connections, imports, lazy setup
            for _ in range(20):
                fn()
        results: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, value in interleaved_us(fns, args.calls).items():
                results[name].append(value)
            for name, value in asyncio.run(async_round(server.base_url, native, anyscale, args.calls, 20)).items():
                results.setdefault(name, []).append(value)

    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"median per call, {args.rounds} rounds x {args.calls} calls, stub on 127.0.0.1 (cache off)\n")
    print(f"{'client':44} {'µs/call':>9} {'× native':>9} {'× LiteLLM':>10}")
    for name, value in medians.items():
        native_value = (
            medians[NATIVE_ASYNC] if name in (NATIVE_ASYNC, OURS_ASYNC) or "aiohttp" in name else medians[NATIVE]
        )
        print(f"{name:44} {value:9.0f} {value / native_value:9.2f} {value / medians[LITELLM]:10.2f}")
    print(f"\nAnyscale sync vs native route:  {medians[OURS] / medians[NATIVE]:.2f}x (target <= 1.00)")
    print(f"Anyscale async vs native route: {medians[OURS_ASYNC] / medians[NATIVE_ASYNC]:.2f}x (target <= 1.00)")
    print(f"Anyscale vs LiteLLM route:      {medians[OURS] / medians[LITELLM]:.2f}x (target <= 0.70)")
    print(
        "(per-round ratios, sync:",
        " ".join(f"{o / n:.2f}" for o, n in zip(results[OURS], results[NATIVE], strict=True)) + ")",
    )


if __name__ == "__main__":
    main()
