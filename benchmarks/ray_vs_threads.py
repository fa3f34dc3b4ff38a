"""Ray (cold and warm) vs a thread pool: the same DSPy program over the same examples, equal concurrency.

    pip install -e '.[ray]' && python benchmarks/ray_vs_threads.py [--latency 0.2] [--sizes 500 2000]

All three run ``dspy.ChainOfThought("question -> answer")`` against the stub server with a fixed
latency and 32 requests in flight:

- thread pool: a ``ThreadPoolExecutor(32)`` in one process (the baseline);
- Ray cold: ``run_program(..., concurrency=4, threads_per_actor=8)``, a new Ray Data actor pool
  per run (each actor imports DSPy and builds its LM);
- Ray warm: the second run of the same examples on a ``ProgramPool(concurrency=4,
  threads_per_actor=8)`` started once beforehand, as an optimizer's later evaluations run.

Times are printed with their ratio to the thread pool's time measured in the same run (the
machine may be shared: compare ratios, not seconds). With two sizes, the difference between them
gives the steady-state time per example; the rest is fixed start-up. ``ray.init`` and the pool's
start are timed apart: they happen once per driver and once per pool.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import dspy
import ray

from dspy_anyscale import Anyscale
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
IN_FLIGHT = 32
LABELS = {
    "threads": "thread pool (32 threads)",
    "cold": "Ray cold (new actor pool per run)",
    "warm": "Ray warm (ProgramPool, 2nd run)",
}


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(lm: Anyscale, sizes: list[int]) -> tuple[dict[str, list[float]], float]:
    """Seconds per size for each way to run, and the pool's start-up."""
    from dspy_anyscale.ray import ProgramPool, run_program

    program = dspy.ChainOfThought("question -> answer")
    data = {
        size: [dspy.Example(question=f"question {i}").with_inputs("question") for i in range(size)] for size in sizes
    }

    def one(example: dspy.Example) -> dspy.Prediction:
        with dspy.context(lm=lm):
            return program(**example.inputs())

    def threads(examples: list[dspy.Example]) -> None:
        with ThreadPoolExecutor(max_workers=IN_FLIGHT) as pool:
            list(pool.map(one, examples))

    times: dict[str, list[float]] = {"threads": [], "cold": [], "warm": []}
    # One way at a time, so the warm pool's actors never share the CPUs with a cold run's.
    for size in sizes:
        times["threads"].append(timed(lambda size=size: threads(data[size])))
    for size in sizes:
        times["cold"].append(timed(lambda size=size: run_program(program, data[size], lm=lm, concurrency=4)))
    started = time.perf_counter()
    with ProgramPool(lm=lm, concurrency=4, threads_per_actor=8) as warm:
        pool_start = time.perf_counter() - started
        for size in sizes:
            run_program(program, data[size], pool=warm)  # the first run on the pool
            times["warm"].append(timed(lambda size=size: run_program(program, data[size], pool=warm)))
    return times, pool_start


def report(times: dict[str, list[float]], sizes: list[int], latency: float) -> None:
    ideal_ms = latency / IN_FLIGHT * 1000
    print(f"ChainOfThought, {latency} s latency, {IN_FLIGHT} requests in flight (ideal {ideal_ms:.1f} ms/example)")
    steady = len(sizes) >= 2
    header = "".join(f"{size:>10} ex  vs threads" for size in sizes)
    print(f"{'':36}{header}" + ("   steady ms/example   fixed start-up" if steady else ""))
    for name, seconds in times.items():
        cells = "".join(f"{s:11.2f} s {s / base:9.2f}x" for s, base in zip(seconds, times["threads"], strict=True))
        line = f"{LABELS[name]:36}{cells}"
        if steady:
            per_example = (seconds[-1] - seconds[0]) / (sizes[-1] - sizes[0])
            fixed = seconds[0] - per_example * sizes[0]
            line += f"   {per_example * 1000:17.2f}   {fixed:12.2f} s"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="the stub server's seconds per request")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="examples per run")
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)

    with StubServer(api_key=KEY, latency=args.latency) as server:
        lm = Anyscale("m", api_base=server.base_url, api_key=KEY, use_chat_api=True, cache=False)
        os.environ["ANYSCALE_API_KEY"] = KEY  # Ray workers inherit it; the LM state carries no key
        ray_init = timed(
            lambda: ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        )
        times, pool_start = measure(lm, args.sizes)
        ray.shutdown()

    report(times, args.sizes, args.latency)
    print(f"ray.init (once per driver): {ray_init:.2f} s; ProgramPool start (once per pool): {pool_start:.2f} s")


if __name__ == "__main__":
    main()
