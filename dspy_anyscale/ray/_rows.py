"""Inside a worker: running one row of a program with the worker's LM, and shaping the results."""

from __future__ import annotations

import json
import os
import reprlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import UnionType
from typing import Any, Union, get_args, get_origin

import dspy
import pyarrow  # type: ignore[import-untyped]  # installed with Ray Data, no stubs
from dspy.utils.usage_tracker import UsageTracker
from ray.data.block import BlockAccessor

from ..anyscale import Anyscale
from ..limits import Limiter
from ..usage import usage_totals
from ._job_limits import BUDGET_ERROR, budget_refusal, flush, used_up
from ._ray import ray

PREDICTION_PREFIX = "pred_"
USAGE_COLUMNS = ("error", "prompt_tokens", "completion_tokens", "cost_usd", "latency_ms")
Metric = Callable[[dspy.Example, dspy.Prediction], float | bool]


@dataclass(frozen=True)
class RunSummary:
    rows: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    seconds: float | None = None
    score: float | None = None
    refused: int = 0  # of the errors: rows refused by budget_usd or max_requests (their refused requests unsent)

    @property
    def rows_per_second(self) -> float | None:
        return self.rows / self.seconds if self.seconds else None

    def __str__(self) -> str:
        cost = f"${self.cost_usd:.6f}" if self.cost_usd is not None else "cost unknown"
        speed = f", {self.rows_per_second:.1f} rows/s" if self.rows_per_second else ""
        score = f", score {self.score}" if self.score is not None else ""
        refused = f" ({self.refused} over budget)" if self.refused else ""
        return (
            f"{self.rows} rows, {self.errors} errors{refused}, {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion tokens, {cost}{speed}{score}"
        )


@dataclass(frozen=True)
class RunSpec:
    """What one run sends its workers once: the program as it is now, and how to read its rows."""

    program: dspy.Module
    input_keys: tuple[str, ...]
    output_columns: tuple[str, ...]
    metric: Metric | None = None
    failure_score: float = 0.0
    # The run's own limits (a ledger in a Ray actor; it pickles as the actor's handle), else None:
    # the workers' LMs then count against the pool's ledger, or the LM's own.
    limiter: Limiter | None = None


class RowRunner:
    """Runs one row of a run with a worker's LM: the prediction, its usage, its score or its error.

    Once a refusal shows that the run's cap is used up (``budget_usd`` or ``max_requests``), the
    run stops sending: every row after it fails at once with ``BudgetExceededError``, unrun.
    """

    def __init__(self, spec: RunSpec, lm: Anyscale, adapter: dspy.Adapter | None) -> None:
        self.spec = spec
        self.lm = lm
        self.adapter = adapter
        self.limiter = lm.limiter  # the ledger this run's rows count against, flushed after each batch
        self.stopped: str | None = None  # set once: why the rows left are not run
        self.kinds = output_kinds(spec.program)  # pred_ columns the signature declares bool, int or float

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        started = time.perf_counter()
        out: dict[str, Any] = dict(row)
        if self.stopped is not None:
            reason = f"{BUDGET_ERROR}: this row was not run: {self.stopped}; the run stopped sending"
            out.update(failed_row(reason, spec))
        else:
            self._run(row, out)
        out["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return out

    def _run(self, row: dict[str, Any], out: dict[str, Any]) -> None:
        spec = self.spec
        usage = UsageTracker()  # this row's calls, answered or not: a row that fails half-way was still billed
        try:
            with dspy.context(lm=self.lm, adapter=self.adapter, track_usage=True, usage_tracker=usage):
                prediction = spec.program(**{key: row[key] for key in spec.input_keys})
            out.update(self._cells(prediction))
            out["error"] = None
            if spec.metric is not None:
                out["score"] = float(spec.metric(example_of(row, spec.input_keys), prediction))
        except KeyboardInterrupt:
            raise  # someone stopping the worker: not this row's failure
        except BaseException as exc:  # SystemExit too: one bad row never stops the job, it is its own error
            out.update(failed_row(self._error(exc), spec))
        out.update(self._usage(usage.get_total_tokens()))

    def _cells(self, prediction: dspy.Prediction) -> dict[str, Any]:
        cells = {PREDICTION_PREFIX + key: value for key, value in prediction.items()}
        return {name: cell(name, value, self.kinds.get(name)) for name, value in cells.items()}

    def _error(self, exc: BaseException) -> str:
        refusal = budget_refusal(exc)
        if refusal is None:
            return f"{type(exc).__name__}: {exc}"
        reason = used_up(refusal)
        if reason is not None and self.stopped is None:
            self.stopped = reason
        return f"{BUDGET_ERROR}: {refusal}"

    def _usage(self, usage: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        if not usage:  # every LM call was answered from DSPy's cache
            return {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        prompt, completion = usage_totals(usage)  # None when the server did not send the counts
        cost = self.lm.cost_of(prompt, completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost}


def worker_lm(lm_state: Mapping[str, Any], threads: int) -> Anyscale:
    # The state has no key: load_state finds it in this worker's environment.
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


@dataclass
class Tally:
    """Running totals of a run's rows; workers send one per batch, so a summary needs no second pass."""

    rows: int = 0
    errors: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unknown_cost: int = 0
    score: float = 0.0

    def add(self, counts: Mapping[str, Any]) -> None:
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)

    def summary(self, *, seconds: float | None, scored: bool) -> RunSummary:
        return RunSummary(
            rows=self.rows,
            errors=self.errors,
            prompt_tokens=int(self.prompt_tokens),
            completion_tokens=int(self.completion_tokens),
            cost_usd=None if self.unknown_cost else float(self.cost_usd),
            seconds=seconds,
            score=round(100 * self.score / self.rows, 2) if scored and self.rows else None,
            refused=self.refused,
        )


def tally_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "rows": len(rows),
        "errors": sum(row["error"] is not None for row in rows),
        "refused": sum((row["error"] or "").startswith(f"{BUDGET_ERROR}:") for row in rows),
        "prompt_tokens": sum(row["prompt_tokens"] or 0 for row in rows),
        "completion_tokens": sum(row["completion_tokens"] or 0 for row in rows),
        "cost_usd": sum(row["cost_usd"] or 0.0 for row in rows),
        "unknown_cost": sum(row["cost_usd"] is None for row in rows),
        "score": sum(row.get("score") or 0.0 for row in rows),
    }


def failed_row(message: str, spec: RunSpec) -> dict[str, Any]:
    failed: dict[str, Any] = {"error": message, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    if spec.metric is not None:
        failed["score"] = spec.failure_score
    return failed


def to_block(rows: list[dict[str, Any]], always: Sequence[str]) -> Any:
    """An Arrow block, converted as Ray Data converts a ``map_batches`` output."""
    return BlockAccessor.batch_to_block(columns_of(rows, always))


def as_rows(rows: Any) -> list[dict[str, Any]]:
    # A pyarrow Table: nulls stay None (numpy would make them NaN).
    return rows.to_pylist() if hasattr(rows, "to_pylist") else list(rows)


def output_columns(program: dspy.Module, metric: Metric | None) -> list[str]:
    """Columns every output batch has, even one whose rows all failed: the last predictor's outputs."""
    predictors = program.predictors()
    fields = list(predictors[-1].signature.output_fields) if predictors else []
    return [PREDICTION_PREFIX + name for name in fields] + list(USAGE_COLUMNS) + (["score"] if metric else [])


def columns_of(rows: list[dict[str, Any]], always: Sequence[str]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys([*(key for row in rows for key in row), *always]))  # failed rows lack pred_ fields
    return {key: [row.get(key) for row in rows] for key in keys}


def example_of(row: Mapping[str, Any], input_keys: Sequence[str]) -> dspy.Example:
    return dspy.Example(**row).with_inputs(*input_keys)


# --- one type per column: Ray Data stores rows as Arrow, which cannot merge blocks whose column types
# differ (int64 in one, string in another), and would fail the whole run. ----------------------------

_DECLARED = {bool: "bool", int: "int", float: "float"}
# Values Arrow stores natively; a column of these that mixes types is turned into text.
PLAIN_DATA = (str, bytes, bool, int, float, list, tuple, dict)


def output_kinds(program: dspy.Module) -> dict[str, str]:
    """``pred_<field>`` -> "bool", "int" or "float", for the fields the last predictor's signature
    declares so (``Optional`` too); every other prediction field is stored as text."""
    predictors = program.predictors()
    if not predictors:
        return {}
    kinds = {}
    for name, field in predictors[-1].signature.output_fields.items():
        kind = _declared_kind(field.annotation)
        if kind is not None:
            kinds[PREDICTION_PREFIX + name] = kind
    return kinds


def _declared_kind(annotation: Any) -> str | None:
    if get_origin(annotation) in (Union, UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) != 1:
            return None  # int | str: text
        annotation = members[0]
    return _DECLARED.get(annotation)


def cell(name: str, value: Any, kind: str | None) -> Any:
    """The value of one prediction field as its column stores it, the same type in every row: text,
    or the bool / int / float its signature declares. A value that does not fit its declared type
    is that row's error (``TypeError``), never a column of two types."""
    if value is None:
        return None
    if kind is None:
        return text(value)
    if isinstance(value, bool):
        if kind == "bool":
            return value
    elif kind == "float" and isinstance(value, int | float):
        return float(value)
    elif kind == "int" and isinstance(value, int):
        return value
    raise TypeError(
        f"{name}: the signature declares {kind}, and the program returned {type(value).__name__} "
        f"{reprlib.repr(value)}; a column holds one type"
    )


def mixed_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Columns of plain data (str, numbers, lists, dicts) that Arrow cannot hold as one type, each
    with the type names it mixes. Columns of other Python objects are left to Ray (it pickles them)."""
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for name, value in row.items():
            if value is not None:
                columns.setdefault(name, []).append(value)
    mixed = {}
    for name, values in columns.items():
        if not all(isinstance(value, PLAIN_DATA) for value in values):
            continue
        try:
            pyarrow.array(values)
        except (pyarrow.ArrowException, ValueError, TypeError, OverflowError):
            mixed[name] = sorted({type(value).__name__ for value in values})
    return mixed


def as_text(rows: list[dict[str, Any]], columns: Iterable[str]) -> list[dict[str, Any]]:
    """The rows with these columns' values as text (None stays None)."""
    names = set(columns)
    return [{k: (v if k not in names or v is None else text(v)) for k, v in row.items()} for row in rows]


def text(value: Any) -> str:
    """A value as text: scalars as ``str`` gives them, containers and models as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    try:
        return json.dumps(value.model_dump() if hasattr(value, "model_dump") else value, default=str)
    except (TypeError, ValueError):
        return str(value)
