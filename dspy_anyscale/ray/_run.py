"""One run: check the arguments, then map the program over the rows, on a warm pool or a Ray Data actor pool."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import dspy

from .. import _constants as C
from ..anyscale import Anyscale
from ..errors import ConfigurationError
from ._checks import (
    check_adapter,
    check_lm,
    check_optional,
    check_positive_ints,
    check_program,
    fail,
    is_number,
)
from ._pool import DEFAULT_CONCURRENCY, DEFAULT_NUM_CPUS, DEFAULT_THREADS_PER_ACTOR, ProgramPool
from ._ray import ray
from ._rows import Metric, ProgramActor, RunSpec, RunSummary, Tally, output_columns, tally_of, to_block

if TYPE_CHECKING:
    from ray.data import Dataset

logger = logging.getLogger(C.LOGGER_NAME)


def run_program(
    program: dspy.Module,
    dataset: Dataset | Iterable[Mapping[str, Any] | dspy.Example],
    *,
    lm: Anyscale | None = None,
    adapter: dspy.Adapter | None = None,
    input_keys: Sequence[str] | None = None,
    concurrency: int | None = None,
    threads_per_actor: int | None = None,
    batch_size: int = 32,
    num_cpus: float | None = None,
    materialize: bool = True,
    metric: Metric | None = None,
    failure_score: float = 0.0,
    pool: ProgramPool | None = None,
) -> Dataset:
    """Map ``program`` over ``dataset`` on Ray actors; one output row per input row.

    ::

        results = run_program(qa, devset, lm=lm, concurrency=4)   # a new actor pool for this run
        with ProgramPool(lm=lm) as pool:
            results = run_program(qa, devset, pool=pool)         # the pool's warm actors

    ``lm`` and ``adapter`` are what ``dspy.configure`` would set in one process (the driver's
    settings do not reach the workers). ``dataset`` is a Ray Dataset or an iterable of dicts or
    ``dspy.Example`` s. ``input_keys`` are the program's inputs (default: the examples'
    ``with_inputs`` keys; required otherwise), a list of column names. ``batch_size`` rows go to
    an actor at a time.

    Without ``pool=``: a new pool of ``concurrency`` (default 4) Ray Data actors is built for this
    run, each reserving ``num_cpus`` (default 0.25: they wait on the network) and running rows on
    ``threads_per_actor`` (default 8) threads. With ``materialize=True`` (the default) the run
    executes now, with Ray's progress bar on the driver, and its summary is logged;
    ``materialize=False`` returns the lazy dataset, to stream into ``write_parquet`` and the like.

    With ``pool=`` (a :class:`ProgramPool`): the run uses the pool's actors, LM and adapter, so
    omit ``lm``, ``adapter``, ``concurrency``, ``threads_per_actor`` and ``num_cpus`` (the same
    values are accepted, different ones refused). The pool's actors are already running, so the
    run always executes before this returns and its summary is logged; the Dataset returned holds
    the result blocks in Ray's object store (spilled to disk when large). ``materialize=False``
    is accepted, and the dataset is then the same: it still chains into ``write_parquet``.
    """
    results, _ = _run(
        program,
        dataset,
        lm=lm,
        adapter=adapter,
        input_keys=input_keys,
        concurrency=concurrency,
        threads_per_actor=threads_per_actor,
        batch_size=batch_size,
        num_cpus=num_cpus,
        materialize=materialize,
        metric=metric,
        failure_score=failure_score,
        pool=pool,
    )
    return results


def evaluate(
    program: dspy.Module,
    dataset: Dataset | Iterable[Mapping[str, Any] | dspy.Example],
    metric: Metric,
    *,
    lm: Anyscale | None = None,
    input_keys: Sequence[str] | None = None,
    failure_score: float = 0.0,
    pool: ProgramPool | None = None,
    **run_options: Any,
) -> tuple[float, Dataset]:
    """``dspy.Evaluate`` over a Ray Dataset: (score in percent, the per-row results with ``score``).

    ::

        score, scored = evaluate(qa, devset, metric, lm=lm, concurrency=4)
        with ProgramPool(lm=lm) as pool:
            scores = [evaluate(candidate, devset, metric, pool=pool)[0] for candidate in candidates]

    The score is computed as ``dspy.Evaluate`` computes it: ``round(100 * sum(scores) / rows, 2)``,
    with ``failure_score`` for a row whose program raised. ``run_options`` are
    :func:`run_program`'s (``adapter``, ``concurrency``, ``batch_size``, ...).
    """
    if not callable(metric):
        fail("metric", "a callable metric(example, prediction, trace=None)", metric)
    unknown = sorted(set(run_options) - _RUN_OPTIONS)
    if unknown:
        raise TypeError(
            f"evaluate() got unexpected keyword arguments {unknown}; run_program's are {sorted(_RUN_OPTIONS)}"
        )
    options = {"lm": lm, "input_keys": input_keys, "failure_score": failure_score, "pool": pool, **run_options}
    results, tally = _run(program, dataset, metric=metric, **options)
    if tally is not None:  # a pool run counted as it went: no second pass over the results
        return (round(100 * tally.score / tally.rows, 2) if tally.rows else 0.0), results
    rows = results.count()
    return (round(100 * results.sum("score") / rows, 2) if rows else 0.0), results


def summarize_run(results: Dataset, *, seconds: float | None = None) -> RunSummary:
    """Rows, errors, tokens, cost (None if a row's cost is unknown) and, for :func:`evaluate`, the score.

    ::

        print(summarize_run(run_program(qa, devset, lm=lm)))
        # 500 rows, 0 errors, 150000 prompt + 11500 completion tokens, $0.161500

    One pass over the few columns it needs, batch by batch: fine for a dataset of any size.
    """
    if not isinstance(results, ray.data.Dataset):
        fail("results", "the ray.data.Dataset that run_program or evaluate returned", results)
    if seconds is not None and (not is_number(seconds) or seconds < 0):
        fail("seconds", "None or a number of seconds >= 0", seconds)
    columns = ["error", "prompt_tokens", "completion_tokens", "cost_usd"]
    known = results.columns(fetch_if_missing=False)  # a lazy dataset's columns are checked as it runs
    missing = [name for name in columns if known is not None and name not in known]
    if missing:
        raise ConfigurationError(
            f"results must come from run_program or evaluate: it has no {', '.join(missing)} column(s)"
        )
    scored = "score" in (results.columns() or ())
    tally = Tally()
    for batch in results.select_columns([*columns, "score"] if scored else columns).iter_batches(
        batch_format="pyarrow"
    ):
        tally.add(tally_of(batch.to_pylist()))
    return tally.summary(seconds=seconds, scored=scored)


# --- one run, with or without a pool --------------------------------------------------------------


def _run(
    program: Any,
    dataset: Any,
    *,
    lm: Any,
    adapter: Any = None,
    input_keys: Any = None,
    concurrency: Any = None,
    threads_per_actor: Any = None,
    batch_size: Any = 32,
    num_cpus: Any = None,
    materialize: Any = True,
    metric: Any = None,
    failure_score: Any = 0.0,
    pool: Any = None,
) -> tuple[Dataset, Tally | None]:
    """Check every argument (no Ray work before that), then run; a pool run also returns its tally."""
    sizes = {"concurrency": concurrency, "threads_per_actor": threads_per_actor, "num_cpus": num_cpus}
    _check_run_arguments(program, lm, adapter, pool, sizes, batch_size, materialize, metric, failure_score)
    inputs = _inputs(dataset, input_keys)
    spec = RunSpec(program, tuple(inputs.keys), tuple(output_columns(program, metric)), metric, float(failure_score))
    if pool is not None:
        return _run_on_pool(pool, inputs, spec, batch_size)
    return _run_on_ray_data(inputs, spec, lm, adapter, batch_size, materialize, **sizes), None


_RUN_OPTIONS = frozenset({"adapter", "concurrency", "threads_per_actor", "batch_size", "num_cpus", "materialize"})


def _check_run_arguments(
    program: Any,
    lm: Any,
    adapter: Any,
    pool: Any,
    sizes: Mapping[str, Any],
    batch_size: Any,
    materialize: Any,
    metric: Any,
    failure_score: Any,
) -> None:
    """``sizes``: concurrency, threads_per_actor and num_cpus, each None (the default, or the pool's) or a value."""
    check_program(program)
    check_adapter(adapter)
    check_positive_ints(batch_size=batch_size)
    check_optional(**sizes)
    if not isinstance(materialize, bool):
        fail("materialize", "True or False", materialize)
    if metric is not None and not callable(metric):
        fail("metric", "None or a callable metric(example, prediction, trace=None)", metric)
    if not is_number(failure_score):
        fail("failure_score", "a number (the score of a row whose program raised)", failure_score)
    if pool is not None:
        if not isinstance(pool, ProgramPool):
            fail("pool", "a ProgramPool (or None)", pool)
        pool._check_run_settings(lm, adapter, **sizes)
    else:
        check_lm(lm)


def _run_on_pool(pool: ProgramPool, inputs: _Inputs, spec: RunSpec, batch_size: int) -> tuple[Dataset, Tally]:
    started = time.perf_counter()
    blocks, tally = pool._run(spec, inputs.batches(batch_size))
    # from_arrow_refs keeps the blocks where the workers stored them: nothing comes through the driver.
    results = ray.data.from_arrow_refs(blocks) if blocks else ray.data.from_arrow(to_block([], spec.output_columns))
    summary = tally.summary(seconds=time.perf_counter() - started, scored=spec.metric is not None)
    logger.info("dspy_anyscale.ray: %s", summary)
    return results, tally


def _run_on_ray_data(
    inputs: _Inputs,
    spec: RunSpec,
    lm: Anyscale,
    adapter: dspy.Adapter | None,
    batch_size: int,
    materialize: bool,
    *,
    concurrency: int | None,
    threads_per_actor: int | None,
    num_cpus: float | None,
) -> Dataset:
    """Today's path: a Ray Data actor pool built for this run (each actor imports DSPy: seconds)."""
    threads = threads_per_actor or DEFAULT_THREADS_PER_ACTOR
    started = time.perf_counter()
    results = inputs.dataset().map_batches(
        ProgramActor,
        fn_constructor_kwargs={"spec": spec, "lm_state": lm.dump_state(), "adapter": adapter, "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=concurrency or DEFAULT_CONCURRENCY),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=DEFAULT_NUM_CPUS if num_cpus is None else num_cpus,
    )
    if not materialize:
        return results
    results = results.materialize()
    logger.info("dspy_anyscale.ray: %s", summarize_run(results, seconds=time.perf_counter() - started))
    return results


@dataclass(frozen=True)
class _Inputs:
    """The rows to run (an in-memory list, or a Ray Dataset) and which of their columns the program reads."""

    keys: list[str]
    rows: list[dict[str, Any]] | None = None
    data: Dataset | None = None

    def dataset(self) -> Dataset:
        return self.data if self.data is not None else ray.data.from_items(self.rows or [])

    def batches(self, size: int) -> Iterator[Any]:
        """A pool's batches: a Ray Dataset streams through the driver as workers ask for more."""
        if self.data is not None:
            return iter(self.data.iter_batches(batch_size=size, batch_format="pyarrow"))
        rows = self.rows or []
        return (rows[start : start + size] for start in range(0, len(rows), size))


def _inputs(dataset: Any, input_keys: Any) -> _Inputs:
    if isinstance(dataset, ray.data.Dataset):
        if input_keys is None:
            _require_input_keys()
        # Only a schema Ray already knows: fetching one would run the dataset's first blocks.
        return _Inputs(_check_input_keys(input_keys, dataset.columns(fetch_if_missing=False)), data=dataset)
    items = _items(dataset)
    rows = [dict(item.toDict() if isinstance(item, dspy.Example) else item) for item in items]
    if input_keys is None:
        declared = [set(i.inputs().keys()) for i in items if isinstance(i, dspy.Example) and i._input_keys]
        if not declared:
            _require_input_keys()
        input_keys = sorted(set.union(*declared))
    columns = set().union(*(row.keys() for row in rows)) if rows else None
    return _Inputs(_check_input_keys(input_keys, columns), rows=rows)


def _items(dataset: Any) -> list[Any]:
    expected = "a ray.data.Dataset or an iterable (list, generator) of dicts or dspy.Example"
    if hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # a DataFrame iterates over its column names
        fail("dataset", f"{expected} (for a pandas DataFrame: ray.data.from_pandas(df))", dataset)
    if isinstance(dataset, str | bytes | Mapping | dspy.Example) or not isinstance(dataset, Iterable):
        fail("dataset", expected, dataset)
    items = list(dataset)
    for index, item in enumerate(items):
        if not isinstance(item, Mapping | dspy.Example):
            fail(f"dataset[{index}]", "a dict or a dspy.Example", item)
    return items


def _require_input_keys() -> NoReturn:
    raise ConfigurationError(
        "pass input_keys=[...]: which columns are the program's inputs (the rest, such as gold labels "
        "for a metric, are carried through)"
    )


def _check_input_keys(keys: Any, columns: Iterable[str] | None) -> list[str]:
    if (
        isinstance(keys, str | bytes)
        or not isinstance(keys, Sequence)
        or not keys
        or not all(isinstance(key, str) and key for key in keys)
    ):
        fail("input_keys", "a non-empty list of column names, such as ['question']", keys, show=True)
    if columns is not None:
        known = set(columns)
        missing = [key for key in keys if key not in known]
        if missing:
            raise ConfigurationError(
                f"input_keys names {', '.join(map(repr, missing))}, not a column of the dataset "
                f"(its columns: {', '.join(map(repr, sorted(known)))})"
            )
    return list(keys)
