"""``dspy_anyscale.run_program`` / ``evaluate``: a long run on one machine, on threads (no Ray).

Every argument is checked, and the output read (and refused if it belongs to another run), before
the first request. Then rows run on ``num_threads`` threads; each finished row is written to
``output`` at once; a Ctrl-C or a budget used up stops the run after the rows in flight, and says
how to resume it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from .. import _constants as C
from .._validate import (
    check_adapter,
    check_id_column,
    check_local_limits,
    check_local_lm,
    check_metric,
    check_no_row_id_column,
    check_num_threads,
    check_output,
    check_program,
    check_run_flags,
    check_run_options,
    fail,
    is_number,
)
from ..limits import Limits
from ..limits._config import limits_from
from .data import read_rows
from .ids import row_ids, with_row_ids
from .interrupt import StopSignal
from .loop import Outcome, drive
from .manifest import manifest_of
from .result import RunResult, resume_call
from .rows import ROW_ID, Metric, RowRunner, RunSpec, output_columns
from .session import Session, refused, summary_of

logger = logging.getLogger(C.LOGGER_NAME)

Data = Iterable[Mapping[str, Any] | dspy.Example]


def run_program(
    program: dspy.Module,
    data: Data,
    *,
    lm: Any = None,
    adapter: dspy.Adapter | None = None,
    input_keys: Sequence[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    resume: bool = False,
    retry_errors: bool = False,
    progress: bool = True,
    num_threads: int = C.RUNS_DEFAULT_NUM_THREADS,
    id_column: str | None = None,
    filesystem: Any = None,
    metric: Metric | None = None,
    failure_score: float = C.RAY_DEFAULT_FAILURE_SCORE,
    limits: Limits | None = None,
) -> RunResult:
    """Run ``program`` over every row of ``data`` on ``num_threads`` threads, writing each row to
    ``output`` as it finishes; a run that is killed or stopped goes on with ``resume=True``.

    ::

        result = dspy_anyscale.run_program(qa, devset, lm=lm, output="results.jsonl")
        result = dspy_anyscale.run_program(qa, devset, lm=lm, output="results.jsonl", resume=True)

    ``data``: dicts or ``dspy.Example`` s; ``input_keys`` the columns the program reads (default:
    the examples' ``with_inputs`` keys). ``lm`` / ``adapter``: what the rows run with (default:
    DSPy's settings, ``dspy.configure(lm=...)``). ``output``: ``.jsonl`` (a local file, one row per
    line), ``.parquet`` (one file) or a path without a suffix (a directory of Parquet parts), on the
    local disk, a URI (``s3://...``) or ``filesystem=`` (pyarrow's or fsspec's). Rows look like
    ``dspy_anyscale.ray.run_program`` 's, with a ``row_id``: the ``id_column`` the data has, or a
    digest of the input fields. ``resume=True`` keeps the finished rows of ``output`` and runs the
    others; ``retry_errors=True`` runs its error rows again too; an output written by a program of
    another signature, other input columns or another metric is refused. ``progress``: a bar on a
    terminal, log lines elsewhere, nothing with False. ``limits=Limits(...)``: limits for this run
    (a copy of ``lm`` with a ledger of its own). ``metric``: a ``score`` column (see :func:`evaluate`).

    The first Ctrl-C stops sending rows, waits up to a minute for those in flight, writes them,
    says how to resume and raises ``KeyboardInterrupt``; a second one stops at once. A budget used
    up stops the run the same way and returns: ``result.complete`` is False, ``result.not_run``
    counts the rows left (rows a budget refused included: a resumed run runs them).
    """
    options = _Options(
        lm=lm,
        adapter=adapter,
        input_keys=input_keys,
        output=output,
        resume=resume,
        retry_errors=retry_errors,
        progress=progress,
        num_threads=num_threads,
        id_column=id_column,
        filesystem=filesystem,
        metric=metric,
        failure_score=failure_score,
        limits=limits,
    )
    return _run(program, data, options, function="dspy_anyscale.run_program", positional="program, data")


def evaluate(program: dspy.Module, data: Data, metric: Metric, **options: Any) -> tuple[float, RunResult]:
    """``dspy.Evaluate`` as a long run: (score in percent, the :class:`RunResult` with a ``score`` per row).

    ::

        score, result = dspy_anyscale.evaluate(qa, devset, metric, lm=lm, output="scored.jsonl")

    The score is ``dspy.Evaluate`` 's, ``round(100 * sum(scores) / rows, 2)`` over every row of
    ``data``: rows a resumed run found done in ``output`` and rows it ran, together; a row whose
    program raised, or that was not run, counts as ``failure_score`` (default 0). ``options`` are
    :func:`run_program` 's (``lm``, ``output``, ``resume``, ``num_threads``, ...).
    """
    check_metric(metric, optional=False)
    check_run_options(options, _OPTION_NAMES - {"metric"}, where="evaluate")
    given = _Options(**{**options, "metric": metric})
    result = _run(program, data, given, function="dspy_anyscale.evaluate", positional="program, data, metric")
    return (result.summary.score or 0.0), result


@dataclass(frozen=True)
class _Options:
    lm: Any = None
    adapter: Any = None
    input_keys: Any = None
    output: Any = None
    resume: Any = False
    retry_errors: Any = False
    progress: Any = True
    num_threads: Any = C.RUNS_DEFAULT_NUM_THREADS
    id_column: Any = None
    filesystem: Any = None
    metric: Any = None
    failure_score: Any = C.RAY_DEFAULT_FAILURE_SCORE
    limits: Any = None

    def shown(self) -> dict[str, Any]:
        """The options a resumed call repeats, as the user gave them (the defaults left out)."""
        names = ("input_keys", "output", "id_column", "num_threads", "retry_errors")
        defaults = _Options()
        return {name: getattr(self, name) for name in names if getattr(self, name) != getattr(defaults, name)}


_OPTION_NAMES = frozenset(_Options.__dataclass_fields__)


@dataclass(frozen=True)
class _Plan:
    """A run whose arguments were all checked: nothing has been sent or written yet."""

    rows: list[dict[str, Any]]  # every row of the data, with its row_id
    input_keys: list[str]
    lm: Any
    adapter: dspy.Adapter | None
    kind: str | None  # the output's kind (_validate.check_output), None without one
    limits: Limits | None


def _check(program: Any, data: Any, options: _Options) -> _Plan:
    """Every argument, before anything runs (a wrong one is a ConfigurationError naming it)."""
    check_program(program)
    lm = options.lm if options.lm is not None else dspy.settings.lm
    check_local_lm(lm)
    adapter = options.adapter if options.adapter is not None else dspy.settings.adapter
    check_adapter(adapter)
    check_num_threads(options.num_threads)
    check_metric(options.metric, optional=True)
    if not is_number(options.failure_score):
        fail("failure_score", "a number (the score of a row whose program raised)", options.failure_score)
    check_run_flags(
        output=options.output, resume=options.resume, retry_errors=options.retry_errors, progress=options.progress
    )
    if options.progress == "ray":
        fail("progress", "True or False", options.progress)
    kind = None if options.output is None else check_output(options.output, options.filesystem)
    limits = check_local_limits(limits_from(options.limits, {}), lm)
    rows, keys = read_rows(data, options.input_keys)
    columns = set().union(*(row.keys() for row in rows)) if rows else set()
    id_column = check_id_column(options.id_column, columns if rows else None)
    check_no_row_id_column(columns, id_column, ROW_ID)
    rows = with_row_ids(rows, row_ids(rows, keys, id_column))
    return _Plan(rows, keys, lm, adapter, kind, limits)


def _run(program: Any, data: Any, options: _Options, *, function: str, positional: str) -> RunResult:
    started = time.perf_counter()
    plan = _check(program, data, options)
    manifest = manifest_of(program, plan.input_keys, options.id_column, options.metric)
    session = Session.open(
        options.output,
        plan.kind,
        manifest,
        filesystem=options.filesystem,
        resume=options.resume,
        retry_errors=options.retry_errors,
    )
    # --- the run starts here: the output is open.
    earlier = [session.done(row[ROW_ID]) for row in plan.rows]
    kept = {index: row for index, row in enumerate(earlier) if row is not None}
    todo = [(index, row) for index, row in enumerate(plan.rows) if index not in kept]
    lm = plan.lm.copy(limits=plan.limits) if plan.limits is not None else plan.lm  # a ledger for this run
    columns = tuple(output_columns(program, options.metric))
    spec = RunSpec(program, tuple(plan.input_keys), columns, options.metric, float(options.failure_score))
    runner = RowRunner(spec, lm, plan.adapter)
    session.start(len(plan.rows), kept.values(), progress=bool(options.progress))
    words = _Words(session, options, function, positional, len(plan.rows))
    try:
        with StopSignal() as stop:
            outcome = drive(todo, runner, session, options.num_threads, stop)
    except BaseException as exc:  # a second Ctrl-C, or a bug: what was written stays, and can be resumed
        session.close(complete=False)
        words.stopped(len(plan.rows) - len(kept) - len(session.new), _reason(exc), budget=False)
        raise
    finally:
        if lm is not plan.lm:
            logger.info("dspy_anyscale: this run's limits: %s", lm.spending())
            lm.close()
    return _finish(plan, kept, todo, outcome, session, options, words, started)


def _finish(
    plan: _Plan,
    kept: Mapping[int, dict[str, Any]],
    todo: Sequence[tuple[int, dict[str, Any]]],
    outcome: Outcome,
    session: Session,
    options: _Options,
    words: _Words,
    started: float,
) -> RunResult:
    not_run = len(todo) - len(outcome.results) + refused(outcome.results.values())
    session.close(complete=not_run == 0)
    ordered = {**kept, **outcome.results}
    rows = [ordered[index] for index in sorted(ordered)]
    summary = summary_of(
        rows,
        seconds=time.perf_counter() - started,
        resumed=len(kept),
        scored=options.metric is not None,
        total=len(plan.rows),
        failure_score=float(options.failure_score),
    )
    logger.info("dspy_anyscale: %s", summary)
    hint, reason = None, None
    if not_run:
        # A budget refuses rows while others are in flight (their worst case held) without being used up:
        # the run went on, and those rows, refused unsent, are the ones a resumed run runs.
        reason = outcome.stopped or "rows were refused by the budget"
        hint = words.stopped(not_run, reason, budget=not outcome.interrupted)
    result = RunResult(rows, summary, not_run, reason, session.shown, len(kept), hint)
    if outcome.interrupted:
        raise KeyboardInterrupt(f"the run was stopped: {not_run} rows were not run; resume with resume=True")
    return result


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "stopped at once (a second Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Words:
    """What the run says when it stops early: what was left, and the call that goes on from it."""

    session: Session
    options: _Options
    function: str
    positional: str
    total: int

    def stopped(self, not_run: int, reason: str, *, budget: bool) -> str:
        """Say it; the call that resumes."""
        own = budget and self.options.limits is None  # the lm's own limits: a copy with a bigger budget resumes
        more = "limits=Limits(budget_usd=...)" if budget and not own else ""
        call = resume_call(self.function, self.positional, self.options.shown(), more=more)
        how = None
        if budget:
            how = "run with a bigger budget" if not own else "give the lm a bigger budget (lm=lm.copy(budget_usd=...))"
        resumed = bool(self.options.resume)
        self.session.say_stopped(call, not_run=not_run, total=self.total, reason=reason, budget=how, resumed=resumed)
        return call
