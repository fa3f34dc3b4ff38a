"""One run: check the arguments, then map the program over the rows, on a warm pool or a Ray Data actor pool."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

import dspy

from .. import _constants as C
from ..anyscale import Anyscale
from ..errors import ConfigurationError
from ..limits import Limiter, Limits, SpendReport
from ._checks import (
    check_adapter,
    check_lm,
    check_optional,
    check_positive_ints,
    check_program,
    fail,
    is_number,
)
from ._job_limits import (
    check_limits,
    on_the_lm_or_here,
    return_lm_ledger,
    share_lm_ledger,
    start_ledger,
    stop_ledger,
    without_limits,
)
from ._pool import DEFAULT_CONCURRENCY, DEFAULT_NUM_CPUS, DEFAULT_THREADS_PER_ACTOR, ProgramPool
from ._ray import ray
from ._rows import (
    Metric,
    ProgramActor,
    RunSpec,
    RunSummary,
    Tally,
    as_text,
    mixed_columns,
    output_columns,
    tally_of,
    to_block,
)

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
    max_concurrency: int | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    budget_usd: float | None = None,
    max_requests: int | None = None,
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

    Limits for the whole run: ``budget_usd``, ``max_requests``, ``requests_per_minute`` and
    ``tokens_per_minute`` are ``Anyscale``'s, held by one ledger (a Ray actor) that every
    worker's LM reserves from, for this run only. A row whose request does not fit gets
    ``error="BudgetExceededError: ..."`` and nothing of it is sent; once the cap is used up (less
    left than a request's worst case, or every request made) the run stops sending: the rows
    left fail at once, unrun, and the run finishes. ``summarize_run`` counts them in ``errors``
    and ``refused``. Without these, an ``lm`` with limits of its own keeps them for the whole
    job: its ledger moves into a Ray actor that the workers and the driver's ``lm`` share, so
    ``lm.spending()`` covers the workers, and comes back into the driver once the run has
    executed (the ``lm`` goes on after ``ray.shutdown()``). Limits are set in one place: on the
    run, the pool or the LM. ``max_concurrency`` is refused: the job's requests in flight are at
    most ``concurrency x threads_per_actor``. With ``materialize=False`` the run's ledger lives as
    long as the lazy dataset, and every execution of it counts against that one ledger; an
    ``lm``'s own ledger stays in Ray until ``lm.limiter.bring_home()`` (call it before
    ``ray.shutdown()``; after, the ``lm`` refuses to send and says so).
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
        limits={
            "max_concurrency": max_concurrency,
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "budget_usd": budget_usd,
            "max_requests": max_requests,
        },
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
    max_concurrency: int | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    budget_usd: float | None = None,
    max_requests: int | None = None,
    **run_options: Any,
) -> tuple[float, Dataset]:
    """``dspy.Evaluate`` over a Ray Dataset: (score in percent, the per-row results with ``score``).

    ::

        score, scored = evaluate(qa, devset, metric, lm=lm, concurrency=4)
        with ProgramPool(lm=lm) as pool:
            scores = [evaluate(candidate, devset, metric, pool=pool)[0] for candidate in candidates]

    The score is computed as ``dspy.Evaluate`` computes it: ``round(100 * sum(scores) / rows, 2)``,
    with ``failure_score`` for a row whose program raised (a row refused by the run's limits
    too). ``run_options`` are :func:`run_program`'s (``adapter``, ``concurrency``, ``batch_size``,
    ...); the limits are its limits for the whole run.
    """
    if not callable(metric):
        fail("metric", "a callable metric(example, prediction, trace=None)", metric)
    unknown = sorted(set(run_options) - _RUN_OPTIONS)
    if unknown:
        raise TypeError(
            f"evaluate() got unexpected keyword arguments {unknown}; run_program's are {sorted(_RUN_OPTIONS)}"
        )
    limits = {
        "max_concurrency": max_concurrency,
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
        "budget_usd": budget_usd,
        "max_requests": max_requests,
    }
    options = {"lm": lm, "input_keys": input_keys, "failure_score": failure_score, "pool": pool, **run_options}
    results, tally = _run(program, dataset, metric=metric, limits=limits, **options)
    if tally is not None:  # a pool run counted as it went: no second pass over the results
        return (round(100 * tally.score / tally.rows, 2) if tally.rows else 0.0), results
    rows = results.count()
    return (round(100 * results.sum("score") / rows, 2) if rows else 0.0), results


def summarize_run(results: Dataset, *, seconds: float | None = None) -> RunSummary:
    """Rows, errors, tokens, cost (None if a row's cost is unknown) and, for :func:`evaluate`, the score.

    ::

        print(summarize_run(run_program(qa, devset, lm=lm)))
        # 500 rows, 0 errors, 150000 prompt + 11500 completion tokens, $0.161500

    ``refused`` counts the errors that were budget refusals (``BudgetExceededError``: rows of
    which nothing was sent, or whose later requests were not).

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
    limits: Mapping[str, Any] | None = None,
) -> tuple[Dataset, Tally | None]:
    """Check every argument (no Ray work before that), then run; a pool run also returns its tally."""
    sizes = {"concurrency": concurrency, "threads_per_actor": threads_per_actor, "num_cpus": num_cpus}
    _check_run_arguments(program, lm, adapter, pool, sizes, batch_size, materialize, metric, failure_score)
    run_limits = _check_run_limits(limits or {}, lm, pool, concurrency, threads_per_actor)
    inputs = _inputs(dataset, input_keys)
    spec = RunSpec(program, tuple(inputs.keys), tuple(output_columns(program, metric)), metric, float(failure_score))
    # --- Ray work from here on.
    if pool is not None:
        return _run_on_pool(pool, inputs, spec, batch_size, run_limits)
    # A run's own ledger, else the LM's, moved into a Ray actor: never a fresh one in each worker.
    owned = start_ledger(run_limits)
    spec = replace(spec, limiter=owned or share_lm_ledger(lm))
    return _run_on_ray_data(inputs, spec, lm, adapter, batch_size, materialize, owned=owned is not None, **sizes), None


def _end_ledger(limiter: Limiter | None, *, owned: bool) -> SpendReport | None:
    """A Ray Data run has executed: its own ledger stops, the LM's comes home; the ledger's last report."""
    if limiter is None:
        return None
    if owned:
        return stop_ledger(limiter)
    return_lm_ledger(limiter)  # the driver's LM goes on with the counts, after ray.shutdown() too
    try:
        return limiter.report()
    except Exception:  # the ledger could not come home and its actor is gone: nothing to report
        logger.debug("dspy_anyscale.ray: could not read the lm's ledger", exc_info=True)
        return None


def _check_run_limits(
    limits: Mapping[str, Any], lm: Any, pool: ProgramPool | None, concurrency: Any, threads: Any
) -> Limits | None:
    if pool is None:
        return check_limits(
            limits,
            lm=lm,
            where="a Ray job",
            sizes=(concurrency or DEFAULT_CONCURRENCY, threads or DEFAULT_THREADS_PER_ACTOR),
            existing=lm.limiter,
            hint=on_the_lm_or_here(lm.limiter),
        )
    own = pool.limits is not None
    return check_limits(
        limits,
        lm=pool.lm,
        where="a run on this pool",
        sizes=(pool.concurrency, pool.threads_per_actor),
        existing=pool.limiter,
        owner="the pool" if own else "the pool's lm",
        hint=(
            "on the pool, for all its runs, or per run on a ProgramPool(...) without limits"
            if own
            else f"on the lm, for all the pool's runs, or per run on ProgramPool(lm={without_limits(pool.limiter)})"
        ),
    )


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


def _run_on_pool(
    pool: ProgramPool, inputs: _Inputs, spec: RunSpec, batch_size: int, limits: Limits | None
) -> tuple[Dataset, Tally]:
    started = time.perf_counter()
    pool._check_open()  # before starting a ledger for the run
    spec = replace(spec, limiter=start_ledger(limits))
    try:
        blocks, tally = pool._run(spec, inputs.batches(batch_size))
    finally:
        report = stop_ledger(spec.limiter)  # the run's own limits end with it
    # from_arrow_refs keeps the blocks where the workers stored them: nothing comes through the driver.
    results = ray.data.from_arrow_refs(blocks) if blocks else ray.data.from_arrow(to_block([], spec.output_columns))
    summary = tally.summary(seconds=time.perf_counter() - started, scored=spec.metric is not None)
    _log_summary(summary, report if report is not None else pool._report_if_limited())
    return results, tally


def _log_summary(summary: RunSummary, report: Any) -> None:
    if report is None:
        logger.info("dspy_anyscale.ray: %s", summary)
    else:
        logger.info("dspy_anyscale.ray: %s; limits: %s", summary, report)


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
    owned: bool = False,
) -> Dataset:
    """A Ray Data actor pool built for this run (each actor imports DSPy: seconds).

    ``owned``: ``spec.limiter`` is this run's own ledger, else the LM's (moved into Ray for the
    run). Once the run has executed, the run's own ledger is stopped and the LM's comes home. A
    lazy run may execute again: its ledger stays in Ray as long as its dataset (which holds the
    actor's handle), the LM's until ``lm.limiter.bring_home()``.
    """
    threads = threads_per_actor or DEFAULT_THREADS_PER_ACTOR
    started = time.perf_counter()
    try:
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
    except BaseException:
        _end_ledger(spec.limiter, owned=owned)
        raise
    report = _end_ledger(spec.limiter, owned=owned)
    _log_summary(summarize_run(results, seconds=time.perf_counter() - started), report)
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
    rows = _one_type_per_column([dict(item.toDict() if isinstance(item, dspy.Example) else item) for item in items])
    if input_keys is None:
        declared = [set(i.inputs().keys()) for i in items if isinstance(i, dspy.Example) and i._input_keys]
        if not declared:
            _require_input_keys()
        input_keys = sorted(set.union(*declared))
    columns = set().union(*(row.keys() for row in rows)) if rows else None
    return _Inputs(_check_input_keys(input_keys, columns), rows=rows)


def _one_type_per_column(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows Ray Data can store: a column mixing types (str and int, say) would fail the whole run
    when Arrow merges its blocks, so such a column becomes text, with a warning naming it."""
    mixed = mixed_columns(rows)
    if not mixed:
        return rows
    logger.warning(
        "dspy_anyscale.ray: %s mix types, and Ray Data holds one type per column (Arrow): their values "
        "were converted to text (None stays None)",
        "; ".join(f"column {name!r} ({' and '.join(types)})" for name, types in mixed.items()),
    )
    return as_text(rows, mixed)


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
