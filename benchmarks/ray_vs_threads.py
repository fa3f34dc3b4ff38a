"""Ray Data vs a thread pool: the same DSPy program over the same examples, equal concurrency.

    pip install -e '.[ray]' && python benchmarks/ray_vs_threads.py [--latency 0.2]

Both run ``dspy.ChainOfThought("question -> answer")`` against the stub server with a fixed
latency and 32 requests in flight: a ``ThreadPoolExecutor(32)`` in one process, and
``run_program(..., concurrency=4, threads_per_actor=8)`` on a local Ray (2 CPUs). Each runs 500
and then 2000 examples; the difference between the two runs gives the steady-state time per
example, the rest is the fixed start-up (a new actor pool per run: each actor imports DSPy and
builds its LM once). ``ray.init`` is timed apart: it happens once per driver.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import dspy
import ray

from dspy_anyscale import Anyscale
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
SIZES = (500, 2000)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    program = dspy.ChainOfThought("question -> answer")

    with StubServer(api_key=KEY, latency=args.latency) as server:
        lm = Anyscale("m", api_base=server.base_url, api_key=KEY, use_chat_api=True, cache=False)
        os.environ["ANYSCALE_API_KEY"] = KEY  # Ray workers inherit it; the LM state carries no key
        ray_init = timed(
            lambda: ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        )
        from dspy_anyscale.ray import run_program

        def one(example):
            with dspy.context(lm=lm):
                return program(**example.inputs())

        def threads(examples):
            with ThreadPoolExecutor(max_workers=32) as pool:
                list(pool.map(one, examples))

        def on_ray(examples):
            run_program(program, examples, lm=lm, concurrency=4, threads_per_actor=8)

        times: dict[str, list[float]] = {"threads": [], "ray": []}
        for size in SIZES:
            examples = [dspy.Example(question=f"question {i}").with_inputs("question") for i in range(size)]
            times["threads"].append(timed(lambda examples=examples: threads(examples)))
            times["ray"].append(timed(lambda examples=examples: on_ray(examples)))
        ray.shutdown()

    ideal_ms = args.latency / 32 * 1000
    print(f"ChainOfThought, {args.latency} s latency, 32 requests in flight (ideal {ideal_ms:.1f} ms/example)")
    print(f"{'':30} {SIZES[0]:>6} ex {SIZES[1]:>6} ex   steady ms/example   fixed start-up")
    steady = {}
    for name, (small, large) in times.items():
        steady[name] = (large - small) / (SIZES[1] - SIZES[0])
        fixed = small - steady[name] * SIZES[0]
        label = "thread pool (32 threads)" if name == "threads" else "Ray Data (4 actors x 8 thr.)"
        print(f"{label:30} {small:7.2f} s {large:7.2f} s   {steady[name] * 1000:17.2f}   {fixed:12.2f} s")
    print(f"steady state: Ray at {steady['ray'] / steady['threads']:.2f}x the thread pool's time per example")
    print(f"ray.init (once per driver): {ray_init:.2f} s")


if __name__ == "__main__":
    main()
