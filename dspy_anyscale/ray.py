"""Run a DSPy program over a Ray Dataset: ``pip install 'dspy-anyscale[ray]'``.

    import ray
    from dspy_anyscale.ray import run_program, summarize_run

    ray.init()                                   # a laptop; ray.init(address="auto") on a cluster
    results = run_program(program, dataset, lm=lm, input_keys=["question"], concurrency=4)
    print(summarize_run(results))

Each actor of the pool builds its own ``Anyscale`` LM once, from ``lm.dump_state()`` (never the
key: every worker reads ``ANYSCALE_API_KEY`` from its own environment, or from a Ray runtime
env you give it), keeps its connection pool, and runs its batch's rows on ``threads_per_actor``
threads. At most ``concurrency * threads_per_actor`` requests are in flight, whatever the size of
the dataset; 429s are retried by DSPy as everywhere else. A row that fails gets an ``error``
string, never stops the job, and is counted.

Output rows: the input row's columns, the prediction's fields as ``pred_<field>``, ``error``
(None or ``"<ErrorClass>: message"``), ``prompt_tokens``, ``completion_tokens``, ``cost_usd`` and
``latency_ms`` (and ``score`` from :func:`evaluate`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dspy

from . import _constants as C
from .anyscale import Anyscale

try:
    import ray
    import ray.data
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("dspy_anyscale.ray needs Ray Data: pip install 'dspy-anyscale[ray]'") from exc

if TYPE_CHECKING:
    from ray.data import Dataset

logger = logging.getLogger(C.LOGGER_NAME)

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

    @property
    def rows_per_second(self) -> float | None:
        return self.rows / self.seconds if self.seconds else None

    def __str__(self) -> str:
        cost = f"${self.cost_usd:.6f}" if self.cost_usd is not None else "cost unknown"
        speed = f", {self.rows_per_second:.1f} rows/s" if self.rows_per_second else ""
        score = f", score {self.score}" if self.score is not None else ""
        return (
            f"{self.rows} rows, {self.errors} errors, {self.prompt_tokens} prompt + {self.completion_tokens} "
            f"completion tokens, {cost}{speed}{score}"
        )


class _ProgramActor:
    """One per pool slot: builds the LM once, keeps its pool, runs rows on a few threads."""

    def __init__(
        self,
        program: dspy.Module,
        lm_state: dict[str, Any],
        adapter: dspy.Adapter | None,
        input_keys: Sequence[str],
        output_columns: Sequence[str],
        threads: int,
        metric: Metric | None,
        failure_score: float,
    ) -> None:
        self.lm = Anyscale.load_state({**lm_state, "pool_size": max(threads, 1)})  # the key: this worker's env
        self.program = program
        self.adapter = adapter
        self.input_keys = list(input_keys)
        self.output_columns = list(output_columns)
        self.metric = metric
        self.failure_score = failure_score
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dspy-anyscale-row")

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch.to_pylist()  # a pyarrow Table: nulls stay None (numpy would make them NaN)
        results = list(self.pool.map(self._row, rows))
        return _columns(results, self.output_columns)

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        out: dict[str, Any] = dict(row)
        try:
            with dspy.context(lm=self.lm, adapter=self.adapter, track_usage=True):
                prediction = self.program(**{key: row[key] for key in self.input_keys})
            out.update({PREDICTION_PREFIX + key: _plain(value) for key, value in prediction.items()})
            out.update(self._usage(prediction.get_lm_usage() or {}))
            out["error"] = None
            if self.metric is not None:
                out["score"] = float(self.metric(_example(row, self.input_keys), prediction))
        except Exception as exc:  # one bad row never stops the job: it is reported in its own row
            out.update(
                {"error": f"{type(exc).__name__}: {exc}", "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
            )
            if self.metric is not None:
                out["score"] = self.failure_score
        out["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return out

    def _usage(self, usage: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        prompt = sum(u.get("prompt_tokens") or 0 for u in usage.values())
        completion = sum(u.get("completion_tokens") or 0 for u in usage.values())
        cost = self.lm.engine.recorder.cost(self.lm.model, prompt, completion) if usage else 0.0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost}


def run_program(
    program: dspy.Module,
    dataset: Dataset | Iterable[Mapping[str, Any] | dspy.Example],
    *,
    lm: Anyscale,
    adapter: dspy.Adapter | None = None,
    input_keys: Sequence[str] | None = None,
    concurrency: int = 4,
    threads_per_actor: int = 8,
    batch_size: int = 32,
    num_cpus: float = 0.25,
    materialize: bool = True,
    metric: Metric | None = None,
    failure_score: float = 0.0,
) -> Dataset:
    """Map ``program`` over ``dataset`` on a pool of ``concurrency`` Ray actors.

    ``lm`` and ``adapter`` are what ``dspy.configure`` would set in one process (the driver's
    settings do not reach the workers). ``dataset`` is a Ray Dataset or an iterable of dicts or
    ``dspy.Example`` s. ``input_keys`` are
    the program's inputs (default: the examples' ``with_inputs`` keys; required otherwise). The
    actors wait on the network, so each reserves only ``num_cpus`` of a CPU. With
    ``materialize=True`` (the default) the run executes now, with Ray's progress bar on the driver,
    and its summary is logged; ``materialize=False`` returns the lazy dataset, to stream into
    ``write_parquet`` and the like.
    """
    _check_positive(concurrency=concurrency, threads_per_actor=threads_per_actor, batch_size=batch_size)
    data, keys = _dataset(dataset, input_keys)
    started = time.perf_counter()
    results = data.map_batches(
        _ProgramActor,
        fn_constructor_kwargs={
            "program": program,
            "lm_state": lm.dump_state(),
            "adapter": adapter,
            "input_keys": keys,
            "output_columns": _output_columns(program, metric),
            "threads": threads_per_actor,
            "metric": metric,
            "failure_score": failure_score,
        },
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )
    if not materialize:
        return results
    results = results.materialize()
    logger.info("dspy_anyscale.ray: %s", summarize_run(results, seconds=time.perf_counter() - started))
    return results


def evaluate(
    program: dspy.Module,
    dataset: Dataset | Iterable[Mapping[str, Any] | dspy.Example],
    metric: Metric,
    *,
    lm: Anyscale,
    input_keys: Sequence[str] | None = None,
    failure_score: float = 0.0,
    **run_options: Any,
) -> tuple[float, Dataset]:
    """``dspy.Evaluate`` over a Ray Dataset: (score in percent, the per-row results with ``score``).

    The score is computed as ``dspy.Evaluate`` computes it: ``round(100 * sum(scores) / rows, 2)``,
    with ``failure_score`` for a row whose program raised.
    """
    results = run_program(
        program, dataset, lm=lm, input_keys=input_keys, metric=metric, failure_score=failure_score, **run_options
    )
    rows = results.count()
    return (round(100 * results.sum("score") / rows, 2) if rows else 0.0), results


def summarize_run(results: Dataset, *, seconds: float | None = None) -> RunSummary:
    """Rows, errors, tokens, cost (None if a row's cost is unknown) and, for :func:`evaluate`, the score.

    One pass over the few columns it needs, batch by batch: fine for a dataset of any size.
    """
    columns = ["error", "prompt_tokens", "completion_tokens", "cost_usd"]
    scored = "score" in (results.columns() or ())
    totals = {"rows": 0, "errors": 0, "prompt": 0, "completion": 0, "cost": 0.0, "unknown": 0, "score": 0.0}
    selected = results.select_columns([*columns, "score"] if scored else columns)
    for batch in selected.iter_batches(batch_format="pyarrow"):
        rows = batch.to_pylist()
        totals["rows"] += len(rows)
        totals["errors"] += sum(row["error"] is not None for row in rows)
        totals["prompt"] += sum(row["prompt_tokens"] or 0 for row in rows)
        totals["completion"] += sum(row["completion_tokens"] or 0 for row in rows)
        totals["unknown"] += sum(row["cost_usd"] is None for row in rows)
        totals["cost"] += sum(row["cost_usd"] or 0.0 for row in rows)
        totals["score"] += sum(row.get("score") or 0.0 for row in rows)
    rows = int(totals["rows"])
    return RunSummary(
        rows=rows,
        errors=int(totals["errors"]),
        prompt_tokens=int(totals["prompt"]),
        completion_tokens=int(totals["completion"]),
        cost_usd=None if totals["unknown"] else float(totals["cost"]),
        seconds=seconds,
        score=round(100 * totals["score"] / rows, 2) if scored and rows else None,
    )


# --- helpers --------------------------------------------------------------------------------------


def _dataset(
    dataset: Dataset | Iterable[Mapping[str, Any] | dspy.Example], input_keys: Sequence[str] | None
) -> tuple[Dataset, list[str]]:
    if isinstance(dataset, ray.data.Dataset):
        data, items = dataset, []
    else:
        items = list(dataset)
        data = ray.data.from_items([dict(i.toDict() if isinstance(i, dspy.Example) else i) for i in items])
    if input_keys is None:
        declared = [set(i.inputs().keys()) for i in items if isinstance(i, dspy.Example) and i._input_keys]
        if not declared:
            raise ValueError(
                "pass input_keys=[...]: which columns are the program's inputs (the rest, such as gold labels "
                "for a metric, are carried through)"
            )
        input_keys = sorted(set.union(*declared))
    return data, list(input_keys)


def _output_columns(program: dspy.Module, metric: Metric | None) -> list[str]:
    """Columns every output batch has, even one whose rows all failed: the last predictor's outputs."""
    predictors = program.predictors()
    fields = list(predictors[-1].signature.output_fields) if predictors else []
    return [PREDICTION_PREFIX + name for name in fields] + list(USAGE_COLUMNS) + (["score"] if metric else [])


def _columns(rows: list[dict[str, Any]], always: Sequence[str]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys([*(key for row in rows for key in row), *always]))  # failed rows lack pred_ fields
    return {key: [row.get(key) for row in rows] for key in keys}


def _example(row: Mapping[str, Any], input_keys: Sequence[str]) -> dspy.Example:
    return dspy.Example(**row).with_inputs(*input_keys)


def _plain(value: Any) -> Any:
    """A value Arrow can store: primitives as they are, anything else as JSON text."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    try:
        return json.dumps(value.model_dump() if hasattr(value, "model_dump") else value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["RunSummary", "evaluate", "run_program", "summarize_run"]
