"""What writing a long run's output costs: ``dspy_anyscale.run_program`` with and without ``output=``.

The same run (a ``dspy.Predict`` over N rows on ``--threads`` threads, DSPy's cache off) against the
local stub server (dspy_anyscale.testing.StubServer) answering each request after ``--latency``
seconds (1 ms by default), three ways: no output, a JSONL output (each row flushed as it finishes,
fsync once a second) and a Parquet directory (a part per 1000 rows or 10 s). Rounds are interleaved,
the order turning each round, so machine noise hits every variant alike; each output starts empty.
Progress is off in every variant: this measures the output alone. Printed: each variant's median
seconds, and per round its time over the no-output run's, as a range (the target: JSONL <= 1.03);
the same for the process's CPU time (all its threads, the stub server's too). On two cores, 16
threads and a 1 ms server make a run CPU-bound (by the GIL) and its time swing by +-20 % round to
round, more than the output costs; so the writers are also measured inside each run: the CPU time
of the loop's thread in every call it makes to them (encoding, writing, flushing, fsync, the last
part), as a share of that run's wall time. In a run bound by the GIL, that CPU time is what the
rows lose. (Wall time inside those calls would count the wait for the GIL after each system
call, milliseconds while the other threads run rows: not a cost of writing.)

Nothing here asserts a time.

    python benchmarks/output_overhead.py [--rows 2000] [--threads 16] [--latency 0.001] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

import dspy_anyscale
from dspy_anyscale import Anyscale
from dspy_anyscale.runs.output import JsonlWriter
from dspy_anyscale.runs.parquet import ParquetPartWriter
from dspy_anyscale.testing import StubServer

KEY = "sk-bench"
MODEL = "meta-llama/Llama-2-70b-chat-hf"  # priced: every row carries a cost, as in real runs


class WriterClock:
    """The CPU time a run's loop spends in its writer's methods (the loop calls them on its one thread)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for writer in (JsonlWriter, ParquetPartWriter):
            for name in ("write", "tick", "close"):
                setattr(writer, name, self._timed(getattr(writer, name)))

    def _timed(self, method: Callable[..., object]) -> Callable[..., object]:
        def timed(*args: object) -> object:
            started = time.thread_time()
            try:
                return method(*args)
            finally:
                self.seconds += time.thread_time() - started

        return timed


def variants(lm: Anyscale, rows: list[dspy.Example], threads: int, scratch: Path) -> dict[str, Callable[[], object]]:
    program = dspy.Predict("question -> answer")

    def run(output: Path | None) -> object:
        if output is not None:  # every round starts a new output
            shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
        return dspy_anyscale.run_program(
            program, rows, lm=lm, num_threads=threads, progress=False, output=None if output is None else str(output)
        )

    return {
        "no output": lambda: run(None),
        "JSONL (flush per row)": lambda: run(scratch / "results.jsonl"),
        "Parquet directory": lambda: run(scratch / "results"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.001, help="the stub's seconds per answer")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = [dspy.Example(question=f"question {i}").with_inputs("question") for i in range(args.rows)]
    with StubServer(api_key=KEY, model=MODEL) as stub, tempfile.TemporaryDirectory() as scratch:
        stub.latency = args.latency
        lm = Anyscale(MODEL, api_base=stub.base_url, api_key=KEY, use_chat_api=True, cache=False)
        runs = variants(lm, rows, args.threads, Path(scratch))
        for warm_up in runs.values():  # connections, DSPy's adapters, the first imports (pyarrow's)
            warm_up()
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        writing: dict[str, list[float]] = {name: [] for name in runs}
        clock = WriterClock()
        names = list(runs)
        for round_number in range(args.rounds):
            turn = round_number % len(names)
            for name in names[turn:] + names[:turn]:
                clock.seconds = 0.0
                started, used = time.perf_counter(), time.process_time()
                runs[name]()
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - used)
                writing[name].append(clock.seconds / wall[name][-1])
        lm.close()
    print(
        f"{args.rows} rows, {args.threads} threads, stub latency {args.latency * 1000:g} ms, {args.rounds} rounds "
        "(interleaved)"
    )
    report("wall clock", wall, args.rows)
    report("CPU time of the process", cpu, args.rows)
    print("\nthe writer's CPU time, share of the run's time, per round")
    for name, shares in list(writing.items())[1:]:
        low, high, middle = (100 * value for value in (min(shares), max(shares), statistics.median(shares)))
        print(f"{name:<24} {low:.2f}-{high:.2f} % (median {middle:.2f} %)")


def report(what: str, times: dict[str, list[float]], rows: int) -> None:
    base = times["no output"]
    print(f"\n{what:<24} {'median s':>9} {'rows/s':>8}   x no output, per round")
    for name, seconds in times.items():
        ratios = [run / plain for run, plain in zip(seconds, base, strict=True)]
        median = statistics.median(seconds)
        spread = f"{min(ratios):.3f}-{max(ratios):.3f} (median {statistics.median(ratios):.3f})"
        print(f"{name:<24} {median:>9.3f} {rows / median:>8.0f}   {spread}")


if __name__ == "__main__":
    main()
