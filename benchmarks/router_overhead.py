"""What a Router costs: a call through a Router whose first member is healthy against a direct call to that
member, and a call whose primary refuses the connection against a direct call to the backup (the fallback
must add no wait beyond the failed attempt itself).

Every client calls a local stub (dspy_anyscale.testing.StubServer on 127.0.0.1, zero latency) with the same
one-line prompt, one call at a time (DSPy cache off); the clients take turns call by call, in a seeded random
order, so that machine noise hits them alike. Each round prints its medians; the summary gives the range of
the per-round ratios. Nothing here asserts an absolute time.

    python benchmarks/router_overhead.py [--calls 300] [--rounds 5]

Targets: a routed call <= 1.05x a direct call (sync and async); a fallback call costs the backup's call plus
the refused attempt, nothing more: (fallback - direct backup) / refused attempt about 1.0 (a Router that let
DSPy retry the primary would wait 1 + 2 + 4 s of backoff first).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import time
from collections.abc import Awaitable, Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from dspy.utils.exceptions import LMTransportError

from dspy_anyscale import Anyscale, Router
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
MODEL = "stub-model"
PROMPT = "Say hello."
DIRECT = "Anyscale lm(prompt)"
ROUTED = "Router lm(prompt), healthy first member"
DIRECT_ASYNC = "Anyscale await lm.acall(prompt)"
ROUTED_ASYNC = "Router await lm.acall(prompt)"
BACKUP = "backup Anyscale lm(prompt)"
FALLBACK = "Router, primary refuses the connection"
REFUSED = "the refused attempt alone"


def member(base_url: str, **options: object) -> Anyscale:
    return Anyscale(
        MODEL,
        api_base=base_url,
        api_key=KEY,
        use_chat_api=True,
        cache=False,
        temperature=None,
        max_tokens=None,
        **options,  # type: ignore[arg-type]
    )


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def refused_attempt(lm: Anyscale) -> Callable[[], object]:
    def call() -> object:
        try:
            return lm(PROMPT)
        except LMTransportError as exc:
            return exc

    return call


def turns(names: list[str], calls: int) -> list[list[str]]:
    shuffler = random.Random(0)
    orders = []
    for _ in range(calls):
        order = list(names)
        shuffler.shuffle(order)
        orders.append(order)
    return orders


def interleaved_us(fns: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for order in turns(list(fns), calls):
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


async def ainterleaved_us(fns: dict[str, Callable[[], Awaitable[object]]], calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up on this loop: its connection pool
        for _ in range(20):
            await fn()
    for order in turns(list(fns), calls):
        for name in order:
            start = time.perf_counter()
            await fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def outside(call: Callable[[], object], lms: list[Anyscale], noted: list[float]) -> Callable[[], object]:
    """``call``, also noting its time outside the tries' own: the call's time less the latency_ms of the
    newest usage record of each LM in ``lms`` (the LMs the call tries)."""

    def timed() -> object:
        start = time.perf_counter()
        result = call()
        elapsed_us = (time.perf_counter() - start) * 1e6
        noted.append(elapsed_us - sum(lm.usage[-1].latency_ms for lm in lms) * 1000)
        return result

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per client per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)

    with StubServer(api_key=KEY, model=MODEL) as primary, StubServer(api_key=KEY, model=MODEL) as backup:
        routed = Router({"primary": member(primary.base_url), "backup": member(backup.base_url)})
        # The direct call is to the Router's first member itself: the same LM, connection pool and server
        # (two Anyscale instances differ by a few percent from each other in this harness, whatever routes them).
        direct = routed.members["primary"]
        gone = closed_port()
        # cooldown_s=0: every call tries the refusing primary again (its trial), so every call pays the fallback.
        falling_back = Router({"primary": member(gone), "backup": member(backup.base_url)}, cooldown_s=0)
        direct_backup = member(backup.base_url)
        refused = member(gone, num_retries=0)
        around: dict[str, list[float]] = {FALLBACK: [], BACKUP: [], REFUSED: []}  # µs outside the tries' records
        sync_fns: dict[str, Callable[[], object]] = {
            DIRECT: lambda: direct(PROMPT),
            ROUTED: lambda: routed(PROMPT),
            BACKUP: outside(lambda: direct_backup(PROMPT), [direct_backup], around[BACKUP]),
            FALLBACK: outside(lambda: falling_back(PROMPT), list(falling_back.members.values()), around[FALLBACK]),
            REFUSED: outside(refused_attempt(refused), [refused], around[REFUSED]),
        }
        async_fns: dict[str, Callable[[], Awaitable[object]]] = {
            DIRECT_ASYNC: lambda: direct.acall(PROMPT),
            ROUTED_ASYNC: lambda: routed.acall(PROMPT),
        }
        for fn in sync_fns.values():  # warm up: connections, imports, lazy setup
            for _ in range(20):
                fn()
        rounds: list[dict[str, float]] = []
        for number in range(args.rounds):
            medians = interleaved_us(sync_fns, args.calls)
            medians.update(asyncio.run(ainterleaved_us(async_fns, args.calls)))
            rounds.append(medians)
            print(f"round {number + 1}: " + ", ".join(f"{name} {value:.0f} µs" for name, value in medians.items()))

    routed_sync = [r[ROUTED] / r[DIRECT] for r in rounds]
    routed_async = [r[ROUTED_ASYNC] / r[DIRECT_ASYNC] for r in rounds]
    fallback_extra = [(r[FALLBACK] - r[BACKUP]) / r[REFUSED] for r in rounds]
    beyond_us = [r[FALLBACK] - r[BACKUP] - r[REFUSED] for r in rounds]
    outside_us = {name: statistics.median(values) for name, values in around.items()}
    router_us = outside_us[FALLBACK] - outside_us[BACKUP] - outside_us[REFUSED]
    print(f"\n{args.rounds} rounds x {args.calls} calls per client, stub on 127.0.0.1 (cache off)\n")
    print(f"{'client':44} {'median µs/call':>15}")
    for name in rounds[0]:
        print(f"{name:44} {statistics.median(r[name] for r in rounds):15.0f}")
    print(f"\nrouted / direct, sync:   {spread(routed_sync, 'x')} (target <= 1.05)")
    print(f"routed / direct, async:  {spread(routed_async, 'x')} (target <= 1.05)")
    print(f"fallback: (routed - direct backup) / refused attempt: {spread(fallback_extra, '')} (about 1: no wait")
    print(f"          beyond the failed attempt); fallback - backup - refused attempt: {spread(beyond_us, ' µs', 0)}")
    print(
        "time outside the tries' usage-record latencies, median: "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in outside_us.items())
    )
    print(f"the Router's own time in a fallback call (that of the fallback less the other two): {router_us:.0f} µs")


def spread(values: list[float], unit: str, digits: int = 3) -> str:
    """The median of the rounds' values and their range: one noisy round moves the range, not the median."""
    return (
        f"median {statistics.median(values):.{digits}f}{unit} "
        f"(rounds {min(values):.{digits}f}{unit} to {max(values):.{digits}f}{unit})"
    )


if __name__ == "__main__":
    main()
