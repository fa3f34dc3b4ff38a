"""The driver's side of a long run on Ray: rows written to ``output`` as batches come back, a
resumed run skipping the rows already done, the progress on the driver, Ctrl-C, and Ray Data kept
quiet (its bars and its per-run INFO lines) while ours show.

The driver writes: a worker only runs rows. A batch is written once, when its result reaches the
driver; a batch whose worker died is run again (the pool retries it) and written when that run
comes back, so no row is lost or written twice. A driver killed mid-run leaves every batch it had
received in ``output``; the next run with ``resume=True`` runs the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import _constants as C
from .._validate import check_id_column, check_no_row_id_column, check_output, check_run_flags
from ..errors import ConfigurationError
from ..runs.ids import id_text, row_ids, with_row_ids
from ..runs.interrupt import StopSignal
from ..runs.manifest import manifest_of
from ..runs.result import resume_call
from ..runs.rows import ROW_ID, Metric, Tally, tally_of
from ..runs.session import Session
from ._ray import ray
from ._rows import to_block

logger = logging.getLogger(C.LOGGER_NAME)
T = TypeVar("T")


@dataclass(frozen=True)
class LongRunOptions:
    """``run_program`` / ``evaluate`` 's options for a long run, checked with the other arguments."""

    output: Any = None
    resume: Any = False
    retry_errors: Any = False
    progress: Any = True
    id_column: Any = None
    filesystem: Any = None
    function: str = "dspy_anyscale.ray.run_program"

    def check(self, *, executes_now: bool) -> str | None:
        """The output's kind (``_validate.check_output``), or None without one."""
        check_run_flags(output=self.output, resume=self.resume, retry_errors=self.retry_errors, progress=self.progress)
        kind = None if self.output is None else check_output(self.output, self.filesystem)
        if kind is not None and not executes_now:
            raise ConfigurationError(
                "output= writes each batch's rows as the run executes, and materialize=False returns a run that "
                "has not executed: pass one or the other"
            )
        return kind

    def check_ids(self, rows: list[dict[str, Any]] | None, columns: Sequence[str] | None) -> None:
        """The id column, against the data's columns (a Ray Dataset's when Ray knows them already)."""
        if rows is not None:
            columns = sorted(set().union(*(row.keys() for row in rows))) if rows else None
        id_column = check_id_column(self.id_column, columns)
        if self.output is None:
            return
        if rows is None and id_column is None:
            raise ConfigurationError(
                "output= with a Ray Dataset needs id_column=...: the name of a column whose values tell the rows "
                "apart, for a resumed run to know which are done (a Ray Dataset is read in parallel, so its rows have "
                "no stable position to go by; ds.add_column(...) can make one)"
            )
        if columns is not None:
            check_no_row_id_column(columns, id_column, ROW_ID)

    def open(
        self, program: Any, input_keys: Sequence[str], metric: Metric | None, kind: str | None, *, executes_now: bool
    ) -> LongRun | None:
        """The run's driver side, when it writes output or shows our progress (reads the output)."""
        if not executes_now or (self.output is None and self.progress is not True):
            return None
        shown = {name: getattr(self, name) for name in ("output", "id_column", "retry_errors") if getattr(self, name)}
        return LongRun.open(
            program,
            input_keys,
            metric,
            output=self.output,
            kind=kind,
            filesystem=self.filesystem,
            resume=self.resume,
            retry_errors=self.retry_errors,
            progress=self.progress,
            id_column=self.id_column,
            function=self.function,
            shown=shown,
        )


@dataclass
class LongRun:
    """One Ray run's output, progress and stop signal, from ``open`` (before any Ray work) to ``close``."""

    session: Session
    id_column: str | None
    progress: bool | str
    call: str  # the call that resumes this run, for the words at the end
    writes: bool  # rows go to an output (else: progress only)
    resumed: bool  # the call has resume=True already
    kept: list[dict[str, Any]] = field(default_factory=list)  # rows an earlier run finished, not run again
    stop: StopSignal = field(default_factory=StopSignal)
    total: int | None = None
    ran: Tally = field(default_factory=Tally)  # the rows this run got back
    said: bool = False  # the stopping words, once

    @classmethod
    def open(
        cls,
        program: Any,
        input_keys: Sequence[str],
        metric: Metric | None,
        *,
        output: Any,
        kind: str | None,
        filesystem: Any,
        resume: bool,
        retry_errors: bool,
        progress: bool | str,
        id_column: str | None,
        function: str,
        shown: Mapping[str, Any],
    ) -> LongRun:
        """Read the output (refusing one of another run) before any Ray work."""
        manifest = manifest_of(program, input_keys, id_column, metric)
        session = Session.open(output, kind, manifest, filesystem=filesystem, resume=resume, retry_errors=retry_errors)
        positional = "program, dataset, metric" if metric is not None else "program, dataset"
        call = resume_call(function, positional, shown)
        return cls(session, id_column, progress, call, writes=output is not None, resumed=resume)

    # --- which rows run ----------------------------------------------------------------------------

    def rows_to_run(self, rows: list[dict[str, Any]], input_keys: Sequence[str]) -> list[dict[str, Any]]:
        """In-memory rows, each with its ``row_id``, less those an earlier run finished (kept)."""
        self.total = len(rows)
        if not self.writes:
            return rows
        todo = []
        for row in with_row_ids(rows, row_ids(rows, input_keys, self.id_column)):
            done = self.session.done(row[ROW_ID])
            if done is None:
                todo.append(row)
            else:
                self.kept.append(done)
        return todo

    def dataset_to_run(self, dataset: Any) -> Any:
        """A Ray Dataset with a ``row_id`` column from ``id_column``, less the rows an earlier run
        finished. Its size is not known ahead, so every finished row of the output is kept."""
        if not self.writes or self.id_column is None:
            return dataset
        self.kept = [row for row in self.session.earlier.rows.values() if self.session.done(row[ROW_ID]) is not None]
        done = frozenset(str(row[ROW_ID]) for row in self.kept)
        return dataset.map_batches(_WithIds(self.id_column, done), batch_format="pyarrow", zero_copy_batch=True)

    # --- while it runs -----------------------------------------------------------------------------

    def start(self) -> None:
        self.session.start(self.total, self.kept, progress=self.progress is True)

    def execute(self, run: Callable[[], T]) -> T:
        """``run()`` with the progress shown and Ctrl-C caught; a failure leaves the output as written."""
        try:
            with self.stop:
                self.start()
                return run()
        except BaseException:
            self.abandon()
            raise

    def should_stop(self) -> bool:
        """A Ctrl-C asked the run to stop: send no more batches (and write those in flight)."""
        if self.stop.requested and not self.said:
            self.said = True
            self.session.note(
                "stopping: interrupted by Ctrl-C. No new batches are sent; waiting up to "
                f"{C.RUNS_INTERRUPT_WAIT_S:g} s for those in flight, to write them; press Ctrl-C again to stop at once"
            )
        return self.stop.requested

    def on_block(self, block_ref: Any, counts: Mapping[str, Any] | None = None) -> None:
        """A batch's result reached the driver: written (fetched from the object store for that), counted."""
        if self.writes:
            rows = ray.get(block_ref).to_pylist()
            self.session.record(rows)
            counts = tally_of(rows)
        else:
            if counts is None:  # Ray Data's block, without a tally: read it for the figures
                counts = tally_of(ray.get(block_ref).to_pylist())
            self.session.advance(counts)
        self.ran.add(counts)
        self.session.tick()

    # --- the end -------------------------------------------------------------------------------------

    def finish(self) -> None:
        """End the output (each row once, if the run completed) and the progress; say what was left. A
        run stopped by Ctrl-C then raises ``KeyboardInterrupt``."""
        interrupted = self.stop.requested
        never = None if self.total is None else self.total - len(self.kept) - self.ran.rows
        not_run = self.ran.refused + (never or 0)  # rows a budget refused were not run
        complete = not interrupted and not_run == 0
        self.session.close(complete=complete)
        if complete:
            return
        budget = "run with a bigger budget (limits=Limits(budget_usd=...), or on the lm)" if self.ran.refused else None
        reason = "interrupted by Ctrl-C" if interrupted else "rows were refused by the budget"
        self.session.say_stopped(
            self.call, not_run=not_run, total=self.total, reason=reason, budget=budget, resumed=self.resumed
        )
        if interrupted:
            raise KeyboardInterrupt(f"the run was stopped: {not_run} rows were not run; resume with resume=True")

    def with_kept(self, blocks: list[Any], tally: Tally | None, columns: Sequence[str]) -> list[Any]:
        """The run's blocks with the kept rows' block in front; ``tally`` (if any) counts them too."""
        if not self.kept:
            return blocks
        if tally is not None:
            tally.add(tally_of(self.kept))
        return [ray.put(to_block(self.kept, columns)), *blocks]

    def abandon(self) -> None:
        """The run failed (or a second Ctrl-C): what was written stays, for a resumed run."""
        self.session.close(complete=False)


class _WithIds:
    """A Ray Data map stage: the ``row_id`` column (the id column's values as text), done rows dropped."""

    def __init__(self, id_column: str, done: frozenset[str]) -> None:
        self.id_column, self.done = id_column, done

    def __call__(self, table: Any) -> Any:
        import pyarrow  # type: ignore[import-untyped]  # installed with Ray Data, no stubs

        ids = [id_text(value) for value in table.column(self.id_column).to_pylist()]
        table = table.append_column(ROW_ID, pyarrow.array(ids, type=pyarrow.string()))
        return table.filter(pyarrow.array([row_id not in self.done for row_id in ids]))


@contextlib.contextmanager
def quiet_ray_data(dataset: Any, progress: bool | str) -> Iterator[None]:
    """Ray Data's own progress bars and per-run INFO lines off while the run shows its own figures
    (``progress=True``) or none (``progress=False``); ``progress="ray"`` leaves them as they are."""
    if progress == "ray":
        yield
        return
    context = dataset.context  # shared with the datasets it came from: put back as it was after
    bars = context.enable_progress_bars
    ray_data = logging.getLogger("ray.data")
    level = ray_data.level
    context.enable_progress_bars = False
    ray_data.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        ray_data.setLevel(level)


def stream_blocks(dataset: Any, run: LongRun) -> list[Any]:
    """Execute a Ray Data run block by block, each block written and counted as it comes to the
    driver; a Ctrl-C stops at the next block (those in flight run again when the run is resumed)."""
    refs = []
    for bundle in dataset.iter_internal_ref_bundles():
        for ref in bundle.block_refs:
            refs.append(ref)
            run.on_block(ref)
        if run.should_stop():
            break
    return refs
