"""What tracing costs per call: not wired at all, wired but off, and on, as ratios measured in one run.

Direct calls ``lm(prompt)`` (DSPy cache off) against the stub server on 127.0.0.1 at zero
latency, so the client's own work is all there is to measure. Four instances:

* not wired: an ``Anyscale`` without the tracing observer (the package before tracing);
* off (tracing=None): the observer present, ``instrument()`` not called (every user's default);
* off (tracing=False): the observer present and told no;
* on (tracing=True): spans through the OpenTelemetry SDK's SimpleSpanProcessor (exported as each
  ends: the costliest processor) to an in-memory exporter, metrics to an in-memory reader, both
  set as the global providers. After call_started this is exactly the instrument() path.

The instances take turns call by call (A B C D A B C D ...), so load from other processes hits
them alike; each round prints its medians and ratios to "not wired", and the end prints the
median and range of the ratios over rounds. On a shared machine the end-to-end ratios of the
"off" rows scatter around 1.0 by more than tracing could cost, so the hooks an "off" call runs
are also timed directly, in a tight loop, as a fraction of a call. Nothing asserts an absolute time.

    python benchmarks/tracing_overhead.py [--calls 300] [--rounds 7]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dspy_anyscale import Anyscale, tracing
from dspy_anyscale._observe import Attempt, AttemptStart, Call
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
MODEL = "stub-model"
PROMPT = "Say hello."
NOT_WIRED, OFF, OFF_FALSE, ON = "not wired", "off (tracing=None)", "off (tracing=False)", "on (tracing=True)"


def make_lm(base_url: str, mode: bool | None, wired: bool = True) -> Anyscale:
    """An instance with the tracing observer next to its usage recorder, as the constructor adds it."""
    common = {"api_base": base_url, "api_key": KEY, "use_chat_api": True, "cache": False}
    if wired and "tracing" in inspect.signature(Anyscale.__init__).parameters:
        return Anyscale(MODEL, tracing=mode, **common)
    lm = Anyscale(MODEL, **common)
    for engine in (lm._engine_spec, lm._async_engine_spec):
        kept = tuple(o for o in engine.observers if not isinstance(o, tracing.TracingObserver))
        extra = (tracing.tracing_observer(mode, base_url=base_url, endpoint="chat"),) if wired else ()
        engine.observers = (*kept, *extra)
    return lm


def one_round(lms: dict[str, Anyscale], calls: int) -> dict[str, float]:
    """Median µs per call of each instance, the instances taking turns call by call.

    The order rotates every turn: whoever goes first after the previous turn's work must not be
    always the same instance.
    """
    times: dict[str, list[float]] = {name: [] for name in lms}
    order = list(lms.items())
    for turn in range(calls):
        shift = turn % len(order)
        for name, lm in order[shift:] + order[:shift]:
            start = time.perf_counter()
            lm(PROMPT)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def off_hooks_us(repeat: int = 200_000) -> float:
    """µs that the four hooks of one untraced call cost (a tracing=None observer, nothing instrumented)."""
    observer = tracing.tracing_observer(None, endpoint="chat")
    call = Call(MODEL, (observer,))
    start = AttemptStart("chat", MODEL, "http://127.0.0.1/v1/chat/completions", False, 0.0, 0, None)
    attempt = Attempt(start, ok=True, latency_s=0.001)
    began = time.perf_counter()
    for _ in range(repeat):
        observer.call_started(call)
        observer.attempt_started(call, start)
        observer.attempt_finished(call, attempt)
        observer.call_finished(call, None)
    return (time.perf_counter() - began) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per instance per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds")
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))

    with StubServer(api_key=KEY, model=MODEL) as server:
        lms = {
            NOT_WIRED: make_lm(server.base_url, None, wired=False),
            OFF: make_lm(server.base_url, None),
            OFF_FALSE: make_lm(server.base_url, False),
            ON: make_lm(server.base_url, True),
        }
        one_round(lms, 30)  # warm up: connections, imports, lazy setup
        print(f"median µs per call, {args.rounds} rounds x {args.calls} calls each, stub on 127.0.0.1, cache off\n")
        print(f"{'round':>5}  " + "".join(f"{name:>21}" for name in lms) + "   ratios to 'not wired'")
        rounds = []
        for number in range(1, args.rounds + 1):
            result = one_round(lms, args.calls)
            exporter.clear()
            rounds.append(result)
            ratios = "  ".join(f"{result[name] / result[NOT_WIRED]:.3f}" for name in lms if name != NOT_WIRED)
            print(f"{number:5d}  " + "".join(f"{result[name]:21.0f}" for name in lms) + f"   {ratios}")
        for lm in lms.values():
            lm.close()

    print(f"\n{'instance':22} {'median µs':>10}   × not wired: median (range over rounds)")
    for name in lms:
        per_round = [r[name] / r[NOT_WIRED] for r in rounds]
        median_us = statistics.median(r[name] for r in rounds)
        spread = f"{statistics.median(per_round):.3f} ({min(per_round):.3f}-{max(per_round):.3f})"
        print(f"{name:22} {median_us:10.0f}   {spread}")
    hooks = off_hooks_us()
    call_us = statistics.median(r[NOT_WIRED] for r in rounds)
    print(
        f"\nthe four hooks of an untraced call, timed alone: {hooks:.2f} µs = {hooks / call_us:.4f}x of a call "
        f"({call_us:.0f} µs)"
    )


if __name__ == "__main__":
    main()
