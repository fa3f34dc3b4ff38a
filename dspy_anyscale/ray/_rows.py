"""Inside a worker: running one row of a program with the worker's LM, and shaping the results."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
from ray.data.block import BlockAccessor

from ..anyscale import Anyscale
from ..limits import Limiter
from ..router import Router, is_router_state, sized_state
from ..runs.parquet import mixed_columns  # pyarrow: installed with Ray Data
from ..runs.rows import RowRunner, RunSpec, columns_of, output_columns, tally_of
from ._job_limits import flush
from ._ray import ray

# The row shape is the local runner's (dspy_anyscale.runs.rows); these names stay importable from here.
__all__ = [
    "PoolWorker",
    "ProgramActor",
    "RowRunner",
    "RunSpec",
    "as_rows",
    "mixed_columns",
    "output_columns",
    "to_block",
    "worker_lm",
]


def worker_lm(lm_state: Mapping[str, Any], threads: int) -> Anyscale | Router:
    # The state has no key: load_state finds it in this worker's environment.
    if is_router_state(lm_state):  # each member's connection pool sized for the worker's threads
        return Router.load_state(sized_state(lm_state, max(threads, 1)), allow_custom_lm_class=True)
    return Anyscale.load_state({**lm_state, "pool_size": max(threads, 1)})


class ProgramActor:
    """One per slot of a Ray Data actor pool (a run without ``pool=``): builds the LM once, runs rows on threads."""

    def __init__(self, spec: RunSpec, lm_state: dict[str, Any], adapter: dspy.Adapter | None, threads: int) -> None:
        lm = worker_lm(lm_state, threads)
        if spec.limiter is not None:
            lm._share_limiter(spec.limiter)  # the job's one ledger, never a fresh one per worker
        self.runner = RowRunner(spec, lm, adapter)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dspy-anyscale-row")

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch.to_pylist()  # a pyarrow Table: nulls stay None (numpy would make them NaN)
        results = list(self.pool.map(self.runner, rows))
        flush(self.runner.limiter)
        return columns_of(results, self.runner.spec.output_columns)


class PoolWorker:
    """One actor of a :class:`ProgramPool`: the LM and threads live as long as the pool; programs come per run."""

    def __init__(
        self, lm_state: dict[str, Any], adapter: dspy.Adapter | None, threads: int, limiter: Limiter | None = None
    ) -> None:
        self.lm = worker_lm(lm_state, threads)
        if limiter is not None:
            self.lm._share_limiter(limiter)  # the pool's ledger (or the LM's own), shared by every worker
        self.limiter = self.lm.limiter  # what a run without limits of its own counts against
        self.adapter = adapter
        self.rows = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dspy-anyscale-row")
        self._runners: dict[str, RowRunner] = {}
        self._lock = threading.Lock()

    def ready(self) -> int:
        return os.getpid()

    def run_batch(self, run_id: str, spec_ref: list[Any], rows: Any) -> tuple[Any, dict[str, Any]]:
        """The batch's output block and its tally. ``spec_ref`` is ``[ObjectRef]``: nested, so Ray
        does not fetch and unpickle the program again for every batch of the run."""
        runner = self._runner(run_id, spec_ref[0])
        results = list(self.rows.map(runner, as_rows(rows)))
        flush(runner.limiter)
        return to_block(results, runner.spec.output_columns), tally_of(results)

    def _runner(self, run_id: str, spec_ref: Any) -> RowRunner:
        with self._lock:
            if run_id not in self._runners:
                spec = ray.get(spec_ref)
                # Each run installs its ledger: its own limits, else the pool's. A run's limits end
                # with it, even a run cancelled half-way (a request in flight settles where it began).
                self.lm._share_limiter(spec.limiter if spec.limiter is not None else self.limiter)
                # Only the current run's program is kept: an optimizer's old candidates are dropped.
                self._runners = {run_id: RowRunner(spec, self.lm, self.adapter)}
            return self._runners[run_id]


def to_block(rows: list[dict[str, Any]], always: Sequence[str]) -> Any:
    """An Arrow block, converted as Ray Data converts a ``map_batches`` output."""
    return BlockAccessor.batch_to_block(columns_of(rows, always))


def as_rows(rows: Any) -> list[dict[str, Any]]:
    # A pyarrow Table: nulls stay None (numpy would make them NaN).
    return rows.to_pylist() if hasattr(rows, "to_pylist") else list(rows)
