"""The local run's loop: rows on threads, at most ``num_threads`` in flight, each result written by
the loop (one thread writes, so rows never interleave) as soon as it comes back.

A row is handed to a thread only when another has come back: the rows sent and not yet written are
never more than ``num_threads``, and that is all a killed process loses. The threads are daemon
threads, so a second Ctrl-C (or the end of the interpreter) never waits for a slow request; each
runs in a copy of the caller's context, so ``dspy.context(...)`` around the call reaches the rows.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _constants as C
from .interrupt import StopSignal
from .rows import RowRunner
from .session import Session

Task = tuple[int, dict[str, Any]]


class Threads:
    """``size`` daemon threads running ``work`` on the rows given to ``submit``; results on ``results``."""

    def __init__(self, work: Callable[[dict[str, Any]], dict[str, Any]], size: int) -> None:
        self.work = work
        self.size = size
        self.tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[int, dict[str, Any] | BaseException]] = queue.SimpleQueue()
        self.context = contextvars.copy_context()
        self.threads: list[threading.Thread] = []

    def submit(self, task: Task) -> None:
        if len(self.threads) < self.size:  # started as needed: a run of 3 rows starts 3
            thread = threading.Thread(
                target=self.context.copy().run,
                args=(self._work,),
                name=f"dspy-anyscale-run-{len(self.threads)}",
                daemon=True,
            )
            thread.start()
            self.threads.append(thread)
        self.tasks.put(task)

    def stop(self) -> None:
        """Each thread ends after its current row (if any); nothing waits for it."""
        for _ in self.threads:
            self.tasks.put(None)

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            index, row = task
            try:
                result: dict[str, Any] | BaseException = self.work(row)
            except BaseException as exc:  # the runner catches a row's failures: this is a bug, for the loop to raise
                result = exc
            self.results.put((index, result))


@dataclass
class Outcome:
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # data index -> the row this run made
    stopped: str | None = None  # why rows were left unrun, if they were
    interrupted: bool = False  # by Ctrl-C
    left_running: int = 0  # rows still in flight when the wait for them ran out


def drive(todo: Sequence[Task], runner: RowRunner, session: Session, threads: int, stop: StopSignal) -> Outcome:
    """Run ``todo`` (data index, row) until done, stopped by Ctrl-C, or stopped by a budget used up."""
    outcome = Outcome()
    pool = Threads(runner, threads)
    pending: Iterator[Task] = iter(todo)
    in_flight, stopping_since = 0, None
    try:
        while True:
            if stopping_since is None and (reason := _stop_reason(stop, runner)) is not None:
                stopping_since = time.monotonic()
                outcome.stopped, outcome.interrupted = reason, stop.requested
                session.note(_stopping_words(reason, in_flight, stop.requested))
            while stopping_since is None and in_flight < threads and (task := next(pending, None)) is not None:
                pool.submit(task)
                in_flight += 1
            if in_flight == 0:
                break
            if stopping_since is not None and time.monotonic() - stopping_since > C.RUNS_INTERRUPT_WAIT_S:
                outcome.left_running = in_flight
                break
            in_flight -= _collect(pool, session, outcome)
    finally:
        pool.stop()
    return outcome


def _collect(pool: Threads, session: Session, outcome: Outcome) -> int:
    """Write the rows that came back (waiting up to ``RUNS_POLL_S`` for one); how many they were."""
    try:
        first = pool.results.get(timeout=C.RUNS_POLL_S)
    except queue.Empty:
        session.tick()
        return 0
    batch = [first]
    while True:  # every row already back: one write for all of them
        try:
            batch.append(pool.results.get_nowait())
        except queue.Empty:
            break
    rows = []
    for index, result in batch:
        if isinstance(result, BaseException):
            raise result
        outcome.results[index] = result
        rows.append(result)
    session.record(rows)
    return len(batch)


def _stop_reason(stop: StopSignal, runner: RowRunner) -> str | None:
    if stop.requested:
        return "interrupted by Ctrl-C"
    return runner.stopped  # a budget used up (set by the row that was refused)


def _stopping_words(reason: str, in_flight: int, interrupted: bool) -> str:
    again = "; press Ctrl-C again to stop at once" if interrupted else ""
    return (
        f"stopping: {reason}. No new rows are sent; waiting up to {C.RUNS_INTERRUPT_WAIT_S:g} s for the "
        f"{in_flight} in flight, to write them{again}"
    )
