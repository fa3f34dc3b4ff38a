"""Concurrency: async fan-out and threads against a stub with fixed latency, beside baselines.

    python benchmarks/concurrency.py

1. 64 concurrent ``await lm.acall(...)`` with 0.3 s server latency (target: under 1.2 s),
   beside 64 concurrent raw ``httpx.AsyncClient`` posts to the same stub.
2. 16 threads x 5 sync calls with 0.2 s latency (target: under 1.6 s), beside 16 threads x 5
   raw ``requests.Session`` posts.
3. 64 concurrent ``ChainOfThought.acall`` (a whole DSPy program) with 0.3 s latency.

The ideal is one latency per wave (0.3 s; 5 x 0.2 s = 1.0 s). Times vary with the machine; the
ratios to the baselines measured in this same run are what to compare.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
import httpx
import requests

from dspy_anyscale import Anyscale
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def async_fanout(server: StubServer, lm: Anyscale) -> tuple[float, float, float]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def raw() -> None:
        async with httpx.AsyncClient(
            headers={"Authorization": f"Bearer {KEY}"}, limits=httpx.Limits(max_connections=64)
        ) as client:
            await asyncio.gather(*(client.post(f"{server.base_url}/chat/completions", json=body) for _ in range(64)))

    async def ours() -> None:
        await asyncio.gather(*(lm.acall(f"question {i}") for i in range(64)))

    async def program() -> None:
        cot = dspy.ChainOfThought("question -> answer")
        with dspy.context(lm=lm):
            await asyncio.gather(*(cot.acall(question=f"program {i}") for i in range(64)))

    asyncio.run(ours())  # warm up: imports, the loop's client
    return timed(lambda: asyncio.run(raw())), timed(lambda: asyncio.run(ours())), timed(lambda: asyncio.run(program()))


def thread_fanout(server: StubServer, lm: Anyscale) -> tuple[float, float]:
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def raw_worker(i: int) -> None:
        for _ in range(5):
            session.post(f"{server.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})

    def our_worker(i: int) -> None:
        for j in range(5):
            lm(f"thread {i} call {j}")

    def run(worker) -> float:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return timed(lambda: list(pool.map(worker, range(16))))

    return run(raw_worker), run(our_worker)


def main() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    with StubServer(api_key=KEY, latency=0.3) as server:
        lm = Anyscale("m", api_base=server.base_url, api_key=KEY, use_chat_api=True, cache=False)
        raw, ours, program = async_fanout(server, lm)
        print("64 concurrent calls, 0.3 s latency (ideal 0.30 s, target < 1.2 s)")
        print(f"  raw httpx.AsyncClient gather     {raw:6.2f} s")
        print(f"  Anyscale acall gather            {ours:6.2f} s   {ours / raw:4.2f}x raw")
        print(f"  ChainOfThought.acall gather      {program:6.2f} s   {program / raw:4.2f}x raw")
        print(f"  max requests in flight at once: {server.max_in_flight}")
        server.latency = 0.2
        raw_t, ours_t = thread_fanout(server, lm)
        print("16 threads x 5 sync calls, 0.2 s latency (ideal 1.00 s, target < 1.6 s)")
        print(f"  raw requests.Session             {raw_t:6.2f} s")
        print(f"  Anyscale lm(prompt)              {ours_t:6.2f} s   {ours_t / raw_t:4.2f}x raw")


if __name__ == "__main__":
    main()
