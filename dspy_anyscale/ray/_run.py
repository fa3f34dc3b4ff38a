"""One run: check the arguments, then map the program over the rows, on a warm pool or a Ray Data actor pool."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import dspy

from .. import _constants as C
from .._validate import (
    check_dataset_items,
    check_input_keys,
    check_job_limits,
    check_metric,
    check_run_arguments,
    check_run_options,
    check_run_results,
    require_input_keys,
)
from ..anyscale import Anyscale
from ..limits import Limiter, Limits, SpendReport
from ..limits._config import LIMIT_NAMES, job_limits
from ..router import Router
from ..runs.rows import (
    USAGE_BY_MODULE,
    Metric,
    ModuleTally,
    RunSpec,
    RunSummary,
    Tally,
    as_text,
    check_summary_by,
    output_columns,
    tally_of,
)
from ._job_limits import (
    on_the_lm_or_here,
    return_lm_ledger,
    share_lm_ledger,
    start_ledger,
    stop_ledger,
    without_limits,
)
from ._long import LongRun, LongRunOptions, quiet_ray_data, stream_blocks
from ._pool import ProgramPool
from ._ray import ray
from ._rows import ProgramActor, mixed_columns, to_block

if TYPE_CHECKING:
    from ray.data import Dataset

logger = logging.getLogger(C.LOGGER_NAME)


def run_program(
    program: dspy.Module,
    dataset: Dataset | Iterable[Mapping[str, Any] | dspy.Example],
    *,
    lm: Anyscale | Router | None = None,
    adapter: dspy.Adapter | None = None,
    input_keys: Sequence[str] | None = None,
    concurrency: int | None = None,
    threads_per_actor: int | None = None,
    batch_size: int = C.RAY_DEFAULT_BATCH_SIZE,
    num_cpus: float | None = None,
    materialize: bool = True,
    metric: Metric | None = None,
    failure_score: float = C.RAY_DEFAULT_FAILURE_SCORE,
    pool: ProgramPool | None = None,
    limits: Limits | None = None,
    output: str | os.PathLike[str] | None = None,
    resume: bool = False,
    retry_errors: bool = False,
    progress: bool | str = True,
    id_column: str | None = None,
    filesystem: Any = None,
    **legacy_limits: Any,
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
    executes now, with its progress on the driver, and its summary is logged;
    ``materialize=False`` returns the lazy dataset, to stream into ``write_parquet`` and the like.

    With ``pool=`` (a :class:`ProgramPool`): the run uses the pool's actors, LM and adapter, so
    omit ``lm``, ``adapter``, ``concurrency``, ``threads_per_actor`` and ``num_cpus`` (the same
    values are accepted, different ones refused). The pool's actors are already running, so the
    run always executes before this returns and its summary is logged; the Dataset returned holds
    the result blocks in Ray's object store (spilled to disk when large). ``materialize=False``
    is accepted, and the dataset is then the same: it still chains into ``write_parquet``.

    Limits for the whole run: ``limits=Limits(budget_usd=..., max_requests=...,
    requests_per_minute=..., tokens_per_minute=...)`` (``Anyscale``'s limits, ``from
    dspy_anyscale.limits import Limits``), held by one ledger (a Ray actor) that every worker's LM
    reserves from, for this run only. A row whose request does not fit gets
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
    ``ray.shutdown()``; after, the ``lm`` refuses to send and says so). The five limits as
    keywords (``run_program(..., budget_usd=...)``) are deprecated, accepted for one release.

    Long runs, as ``dspy_anyscale.run_program``: ``output=`` (``.jsonl``, ``.parquet``, or a
    directory of Parquet parts; local, a URI or ``filesystem=``) gets each batch's rows, written by
    the driver as the batch comes back, each with a ``row_id``; a killed driver's next run with
    ``resume=True`` runs only the rows not in it (``retry_errors=True``: its error rows too). With
    a Ray Dataset, name its unique id column (``id_column=``); in-memory rows may use a digest of
    their inputs. ``progress``: the figures on the driver (a bar on a terminal, log lines
    elsewhere), with Ray Data's own bars and INFO lines quiet; False for none, ``"ray"`` for Ray
    Data's. The first Ctrl-C stops sending batches (with a pool: waits for those in flight and
    writes them), says how to resume and raises ``KeyboardInterrupt``. A worker lost mid-run
    loses no row: the pool runs its batches again. A run that writes its output executes now
    (``materialize=False`` is refused with ``output=``), and the Dataset returned holds the rows
    the output had too.
    """
    given = job_limits(limits, legacy_limits, where="run_program")
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
        limits=given,
        long_run=LongRunOptions(output, resume, retry_errors, progress, id_column, filesystem),
    )
    return results


def evaluate(
    program: dspy.Module,
    dataset: Dataset | Iterable[Mapping[str, Any] | dspy.Example],
    metric: Metric,
    *,
    lm: Anyscale | Router | None = None,
    input_keys: Sequence[str] | None = None,
    failure_score: float = C.RAY_DEFAULT_FAILURE_SCORE,
    pool: ProgramPool | None = None,
    limits: Limits | None = None,
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
    ``output``, ``resume``, ...); ``limits`` are its limits for the whole run (the five as keywords
    are deprecated). A resumed run's score is over the rows its output had and those it ran, together.
    """
    # Limits' fields among the run options: the deprecated spelling of limits=.
    legacy_limits = {name: run_options.pop(name) for name in list(run_options) if name in LIMIT_NAMES}
    given = job_limits(limits, legacy_limits, where="evaluate")
    check_metric(metric, optional=False)
    check_run_options(run_options, _RUN_OPTIONS | _LONG_RUN_OPTIONS, where="evaluate")
    long_options = {name: run_options.pop(name) for name in list(run_options) if name in _LONG_RUN_OPTIONS}
    long_run = LongRunOptions(**long_options, function="dspy_anyscale.ray.evaluate")
    options = {"lm": lm, "input_keys": input_keys, "failure_score": failure_score, "pool": pool, **run_options}
    results, tally = _run(program, dataset, metric=metric, limits=given, long_run=long_run, **options)
    if tally is not None:  # the driver counted the rows as they came: no second pass over the results
        return (round(100 * tally.score / tally.rows, 2) if tally.rows else 0.0), results
    with quiet_ray_data(results, progress=False):
        rows = results.count()
        return (round(100 * results.sum("score") / rows, 2) if rows else 0.0), results


def summarize_run(results: Dataset, *, seconds: float | None = None, by: Literal["module"] | None = None) -> RunSummary:
    """Rows, errors, tokens, cost (None if a row's cost is unknown) and, for :func:`evaluate`, the score.

    ::

        print(summarize_run(run_program(qa, devset, lm=lm)))
        # 500 rows, 0 errors, 150000 prompt + 11500 completion tokens, $0.161500

    ``refused`` counts the errors that were budget refusals (``BudgetExceededError``: rows of
    which nothing was sent, or whose later requests were not).

    ``by="module"``: ``modules`` also holds each DSPy module's share (a :class:`ModuleSummary` per
    module path, e.g. ``generate_query.predict``): its LM calls, tokens, cost and p50/p95 latency,
    from the rows' ``usage_by_module``; their costs add up to the run's. Rows of an output written
    before that column existed (a resumed run's) count under ``(not recorded)``.

    One pass over the few columns it needs, batch by batch: fine for a dataset of any size.
    """
    columns = ["error", "prompt_tokens", "completion_tokens", "cost_usd"]
    check_run_results(results, seconds, columns, dataset_type=ray.data.Dataset)
    check_summary_by(by)
    present = results.columns() or ()
    scored = "score" in present
    wanted = [*columns, *(["score"] if scored else [])]
    if by is not None and USAGE_BY_MODULE in present:  # a dataset from an older release has none
        wanted.append(USAGE_BY_MODULE)
    tally, modules = Tally(), ModuleTally()
    selected = results.select_columns(wanted)
    with quiet_ray_data(selected, progress=False):  # a pass over a few columns: no bars, no INFO lines
        for batch in selected.iter_batches(batch_format="pyarrow"):
            rows = batch.to_pylist()
            tally.add(tally_of(rows))
            if by is not None:
                modules.add(rows)
    summary = tally.summary(seconds=seconds, scored=scored)
    return replace(summary, modules=modules.summaries()) if by is not None else summary


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
    batch_size: Any = C.RAY_DEFAULT_BATCH_SIZE,
    num_cpus: Any = None,
    materialize: Any = True,
    metric: Any = None,
    failure_score: Any = C.RAY_DEFAULT_FAILURE_SCORE,
    pool: Any = None,
    limits: Limits,
    long_run: LongRunOptions | None = None,
) -> tuple[Dataset, Tally | None]:
    """Check every argument (no Ray work before that), then run; a pool run also returns its tally."""
    options = long_run if long_run is not None else LongRunOptions()
    sizes = {"concurrency": concurrency, "threads_per_actor": threads_per_actor, "num_cpus": num_cpus}
    check_run_arguments(
        program,
        lm=lm,
        adapter=adapter,
        pool=pool,
        sizes=sizes,
        batch_size=batch_size,
        materialize=materialize,
        metric=metric,
        failure_score=failure_score,
        anyscale=(Anyscale, Router),
        pool_type=ProgramPool,
    )
    run_limits = _check_run_limits(limits, lm, pool, concurrency, threads_per_actor)
    executes_now = bool(materialize) or pool is not None
    kind = options.check(executes_now=executes_now)
    inputs = _inputs(dataset, input_keys)
    known = None if inputs.data is None else inputs.data.columns(fetch_if_missing=False)
    options.check_ids(inputs.rows, known)
    spec = RunSpec(program, tuple(inputs.keys), tuple(output_columns(program, metric)), metric, float(failure_score))
    # Reads the output (refused if another run's) and the rows' ids (refused if two rows share one).
    long = options.open(program, inputs.keys, metric, kind, executes_now=executes_now)
    if long is not None and inputs.rows is not None:
        inputs = replace(inputs, rows=long.rows_to_run(inputs.rows, inputs.keys))
    # --- Ray work from here on.
    if long is not None and inputs.data is not None:
        inputs = replace(inputs, data=long.dataset_to_run(inputs.data))
    if pool is not None:
        return _run_on_pool(pool, inputs, spec, batch_size, run_limits, long)
    # A run's own ledger, else the LM's, moved into a Ray actor: never a fresh one in each worker.
    owned = start_ledger(run_limits)
    spec = replace(spec, limiter=owned or share_lm_ledger(lm))
    args = (inputs, spec, lm, adapter, batch_size, materialize)
    return _run_on_ray_data(*args, owned=owned is not None, long=long, progress=options.progress, **sizes)


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
    limits: Limits, lm: Any, pool: ProgramPool | None, concurrency: Any, threads: Any
) -> Limits | None:
    if pool is None:
        return check_job_limits(
            limits,
            lm=lm,
            where="a Ray job",
            sizes=(concurrency or C.RAY_DEFAULT_CONCURRENCY, threads or C.RAY_DEFAULT_THREADS_PER_ACTOR),
            existing=lm.limiter,
            hint=on_the_lm_or_here(lm.limiter),
        )
    own = pool.limits is not None
    return check_job_limits(
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
_LONG_RUN_OPTIONS = frozenset({"output", "resume", "retry_errors", "progress", "id_column", "filesystem"})


def _run_on_pool(
    pool: ProgramPool, inputs: _Inputs, spec: RunSpec, batch_size: int, limits: Limits | None, long: LongRun | None
) -> tuple[Dataset, Tally]:
    started = time.perf_counter()
    pool._check_open()  # before starting a ledger for the run
    spec = replace(spec, limiter=start_ledger(limits))
    try:
        if long is None:
            blocks, tally = pool._run(spec, inputs.batches(batch_size))
        else:  # each batch written and counted by the driver as it comes back
            batches = inputs.batches(batch_size)
            blocks, tally = long.execute(lambda: pool._run(spec, batches, long.on_block, long.should_stop))
    finally:
        report = stop_ledger(spec.limiter)  # the run's own limits end with it
    resumed = 0
    if long is not None:
        resumed, blocks = len(long.kept), long.with_kept(blocks, tally, spec.output_columns)
    # from_arrow_refs keeps the blocks where the workers stored them: nothing comes through the driver.
    results = ray.data.from_arrow_refs(blocks) if blocks else ray.data.from_arrow(to_block([], spec.output_columns))
    summary = tally.summary(seconds=time.perf_counter() - started, scored=spec.metric is not None)
    _log_summary(replace(summary, resumed=resumed), report if report is not None else pool._report_if_limited())
    if long is not None:
        long.finish()  # says what was left; after a Ctrl-C, raises KeyboardInterrupt
    return results, tally


def _log_summary(summary: RunSummary, report: Any) -> None:
    if report is None:
        logger.info("dspy_anyscale.ray: %s", summary)
    else:
        logger.info("dspy_anyscale.ray: %s; limits: %s", summary, report)


def _run_on_ray_data(
    inputs: _Inputs,
    spec: RunSpec,
    lm: Anyscale | Router,
    adapter: dspy.Adapter | None,
    batch_size: int,
    materialize: bool,
    *,
    concurrency: int | None,
    threads_per_actor: int | None,
    num_cpus: float | None,
    owned: bool = False,
    long: LongRun | None = None,
    progress: bool | str = True,
) -> tuple[Dataset, Tally | None]:
    """A Ray Data actor pool built for this run (each actor imports DSPy: seconds); the results, and
    their tally when the driver counted the rows as they came (a long run).

    ``owned``: ``spec.limiter`` is this run's own ledger, else the LM's (moved into Ray for the
    run). Once the run has executed, the run's own ledger is stopped and the LM's comes home. A
    lazy run may execute again: its ledger stays in Ray as long as its dataset (which holds the
    actor's handle), the LM's until ``lm.limiter.bring_home()``.
    """
    threads = threads_per_actor or C.RAY_DEFAULT_THREADS_PER_ACTOR
    started = time.perf_counter()
    try:
        results = inputs.dataset().map_batches(
            ProgramActor,
            fn_constructor_kwargs={"spec": spec, "lm_state": lm.dump_state(), "adapter": adapter, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=concurrency or C.RAY_DEFAULT_CONCURRENCY),
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=C.RAY_DEFAULT_NUM_CPUS if num_cpus is None else num_cpus,
        )
        if not materialize:
            return results, None
        with quiet_ray_data(results, progress):
            results = results.materialize() if long is None else _streamed(results, long, spec)
    except BaseException:
        _end_ledger(spec.limiter, owned=owned)
        raise
    report = _end_ledger(spec.limiter, owned=owned)
    seconds = time.perf_counter() - started
    if long is None:
        _log_summary(summarize_run(results, seconds=seconds), report)
        return results, None
    tally = replace(long.ran)  # counted as the blocks came back: no second pass over the results
    tally.add(tally_of(long.kept))
    summary = tally.summary(seconds=seconds, scored=spec.metric is not None)
    _log_summary(replace(summary, resumed=len(long.kept)), report)
    long.finish()  # says what was left; after a Ctrl-C, raises KeyboardInterrupt
    return results, tally


def _streamed(results: Dataset, long: LongRun, spec: RunSpec) -> Dataset:
    """Execute the run block by block, each written and counted on the driver as it comes back; the
    Dataset of its blocks (and of the rows the output had)."""
    blocks = long.with_kept(long.execute(lambda: stream_blocks(results, long)), None, spec.output_columns)
    return ray.data.from_arrow_refs(blocks) if blocks else ray.data.from_arrow(to_block([], spec.output_columns))


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
            require_input_keys()
        # Only a schema Ray already knows: fetching one would run the dataset's first blocks.
        return _Inputs(check_input_keys(input_keys, dataset.columns(fetch_if_missing=False)), data=dataset)
    items = check_dataset_items(dataset)
    rows = _one_type_per_column([dict(item.toDict() if isinstance(item, dspy.Example) else item) for item in items])
    if input_keys is None:
        declared = [set(i.inputs().keys()) for i in items if isinstance(i, dspy.Example) and i._input_keys]
        if not declared:
            require_input_keys()
        input_keys = sorted(set.union(*declared))
    columns = set().union(*(row.keys() for row in rows)) if rows else None
    return _Inputs(check_input_keys(input_keys, columns), rows=rows)


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
