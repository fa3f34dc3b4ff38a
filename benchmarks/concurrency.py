"""Concurrency: async fan-out and threads against a stub with fixed latency, beside baselines.

    python benchmarks/concurrency.py [--repeats 3] [--pool-size N]

1. 64 and 256 concurrent ``await lm.acall(...)`` with 0.3 s server latency, for Anyscale, DSPy's
   native lm15 route (``dspy.lm15.register_provider`` pointing at the same stub) and raw
   ``aiohttp`` posts with the same connection limit as Anyscale's pool.
2. 16 threads x 5 sync calls with 0.2 s latency, for Anyscale, the native route and raw
   ``requests.Session`` posts (a pool of 16).
3. 64 concurrent ``ChainOfThought.acall`` (a whole DSPy program) on Anyscale.

Each client runs inside one event loop: a warm-up fan-out opens its connections, then the timed
one. The ideal is one latency per wave (0.3 s; 5 x 0.2 s = 1.0 s). Absolute times move with the
machine's load; the ratios to the baselines measured in this same run are what to compare.
Targets: Anyscale <= 1.0x native at 64 and at 256; 64 in flight within 1.25x of one latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import aiohttp
import dspy
import requests
from dspy.lm15 import AccessPolicy, OpenAIChatCompat, ProviderDefinition, register_provider

from dspy_anyscale import Anyscale
from dspy_anyscale import _constants as C
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
MODEL = "stub-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
ASYNC_LATENCY = 0.3
THREAD_LATENCY = 0.2


def native_lm(base_url: str) -> dspy.LM:
    register_provider(
        ProviderDefinition.chat(
            AccessPolicy(provider="benchstub", env_keys=("BENCHSTUB_API_KEY",), base_url=base_url),
            compat=OpenAIChatCompat(),
        ),
        replace=True,
    )
    return dspy.LM(f"benchstub/{MODEL}", api_key=KEY, cache=False)


def fanout(make_call: Callable[[int], Awaitable[object]], width: int) -> float:
    """Seconds for ``width`` concurrent calls, after a warm-up fan-out on the same event loop."""

    async def run() -> float:
        await asyncio.gather(*(make_call(-1 - i) for i in range(width)))
        start = time.perf_counter()
        await asyncio.gather(*(make_call(i) for i in range(width)))
        return time.perf_counter() - start

    return asyncio.run(run())


def raw_aiohttp(base_url: str, limit: int) -> Callable[[int], Awaitable[float]]:
    """A fan-out through one ``aiohttp.ClientSession`` per loop (what an application would write)."""

    def run(width: int) -> float:
        async def go() -> float:
            connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
            async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {KEY}"}) as http:

                async def post(_: int) -> None:
                    async with http.post(f"{base_url}/chat/completions", json=BODY) as response:
                        await response.read()

                await asyncio.gather(*(post(i) for i in range(width)))
                start = time.perf_counter()
                await asyncio.gather(*(post(i) for i in range(width)))
                return time.perf_counter() - start

        return asyncio.run(go())

    return run  # type: ignore[return-value]


def threads(worker: Callable[[int], None], workers: int = 16) -> float:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(worker, range(workers)))  # warm-up: threads and connections
        start = time.perf_counter()
        list(pool.map(worker, range(workers)))
        return time.perf_counter() - start


def report(title: str, times: dict[str, list[float]], ideal: float, native: str, raw: str) -> None:
    print(title)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(
            f"  {name:36} {value:6.2f} s   {value / medians[native]:4.2f}x native   "
            f"{value / medians[raw]:4.2f}x raw   {value / ideal:4.2f}x ideal"
        )
    ours = times["Anyscale"]
    ratios = [o / n for o, n in zip(ours, times[native], strict=True)]
    print(f"  Anyscale / native per repeat: {' '.join(f'{r:.2f}' for r in ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per client (medians are printed)")
    parser.add_argument("--pool-size", type=int, default=C.DEFAULT_POOL_SIZE, help="Anyscale's pool_size")
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    with StubServer(api_key=KEY, latency=ASYNC_LATENCY, model=MODEL) as server:
        lm = Anyscale(
            MODEL, api_base=server.base_url, api_key=KEY, use_chat_api=True, cache=False, pool_size=args.pool_size
        )
        native = native_lm(server.base_url)
        raw = raw_aiohttp(server.base_url, args.pool_size)
        print(f"Anyscale pool_size={args.pool_size}; raw aiohttp with the same connection limit\n")

        for width in (64, 256):
            times: dict[str, list[float]] = {"Anyscale": [], "DSPy native lm15": [], "raw aiohttp": []}
            for _ in range(args.repeats):
                times["Anyscale"].append(fanout(lambda i: lm.acall(f"question {i}"), width))
                times["DSPy native lm15"].append(fanout(lambda i: native.acall(f"question {i}"), width))
                times["raw aiohttp"].append(raw(width))  # type: ignore[arg-type]
            server.max_in_flight = 0
            report(
                f"{width} concurrent acall, {ASYNC_LATENCY} s latency (ideal {ASYNC_LATENCY:.2f} s)",
                times,
                ASYNC_LATENCY,
                "DSPy native lm15",
                "raw aiohttp",
            )
            if width == 64:
                ours = statistics.median(times["Anyscale"])
                print(f"  64 in flight: {ours / ASYNC_LATENCY:.2f}x one latency (target <= 1.25)")
            print()

        cot = dspy.ChainOfThought("question -> answer")

        async def program(i: int) -> object:
            with dspy.context(lm=lm):
                return await cot.acall(question=f"program {i}")

        print(f"64 concurrent ChainOfThought.acall on Anyscale: {fanout(program, 64):.2f} s\n")

        server.latency = THREAD_LATENCY
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))

        def raw_worker(i: int) -> None:
            for _ in range(5):
                session.post(
                    f"{server.base_url}/chat/completions", json=BODY, headers={"Authorization": f"Bearer {KEY}"}
                )

        workers = {
            "Anyscale": lambda i: [lm(f"thread {i} call {j}") for j in range(5)],
            "DSPy native lm15": lambda i: [native(f"thread {i} call {j}") for j in range(5)],
            "raw requests.Session": raw_worker,
        }
        thread_times: dict[str, list[float]] = {name: [] for name in workers}
        for _ in range(args.repeats):
            for name, worker in workers.items():
                thread_times[name].append(threads(worker))
        report(
            f"16 threads x 5 sync calls, {THREAD_LATENCY} s latency (ideal {5 * THREAD_LATENCY:.2f} s)",
            thread_times,
            5 * THREAD_LATENCY,
            "DSPy native lm15",
            "raw requests.Session",
        )


if __name__ == "__main__":
    main()
