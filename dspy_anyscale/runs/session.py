"""One run's bookkeeping, wherever its rows run (threads here, Ray actors there): the output it
writes to, the rows an earlier run left in it, the progress shown, and the words said at the end.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .. import _constants as C
from .budget import is_budget_error
from .manifest import Manifest
from .output import RowWriter, Store, open_store
from .progress import Progress
from .resume import Earlier, prepare
from .rows import ROW_ID, RunSummary, Tally, tally_of

logger = logging.getLogger(C.LOGGER_NAME)


class Session:
    """``Session.open(...)`` reads the output (refusing one that does not belong) before anything runs;
    then ``start`` (the progress), ``record`` per finished batch of rows, ``close``."""

    def __init__(self, store: Store | None, earlier: Earlier, writer: RowWriter | None, retry_errors: bool) -> None:
        self.store = store
        self.earlier = earlier
        self.writer = writer
        self.retry_errors = retry_errors
        self.new: dict[str, dict[str, Any]] = {}  # row_id -> the row this run wrote
        self.written = 0
        self.progress: Progress | None = None

    @classmethod
    def open(
        cls,
        output: str | os.PathLike[str] | None,
        kind: str | None,
        manifest: Manifest,
        *,
        filesystem: Any = None,
        resume: bool = False,
        retry_errors: bool = False,
    ) -> Session:
        if output is None or kind is None:
            return cls(None, Earlier(), None, retry_errors)
        store = open_store(output, kind, filesystem)
        earlier, writer = prepare(store, manifest, resume=resume)
        return cls(store, earlier, writer, retry_errors)

    @property
    def shown(self) -> str | None:
        return None if self.store is None else self.store.shown

    def done(self, row_id: str) -> dict[str, Any] | None:
        """The row's result from the earlier run, if it needs no new run."""
        return self.earlier.done(row_id, retry_errors=self.retry_errors)

    def start(self, total: int | None, kept: Iterable[Mapping[str, Any]], *, progress: bool) -> None:
        """Show progress over ``total`` rows, ``kept`` (earlier rows not run again) done already."""
        done = Tally()
        done.add(tally_of(list(kept)))
        self.progress = Progress(total, done=done, enabled=progress)

    def record(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rows that finished: written (durably against a killed process) before anything else."""
        if not rows:
            return
        if self.writer is not None:
            self.writer.write(rows)
            self.written += len(rows)
        for row in rows:
            row_id = row.get(ROW_ID)
            if row_id is not None:
                self.new[str(row_id)] = row
        if self.progress is not None:
            self.progress.update(tally_of(rows))

    def advance(self, counts: Mapping[str, Any]) -> None:
        """Rows that finished and are not written (no output): their tally, for the progress only."""
        if self.progress is not None:
            self.progress.update(counts)

    def tick(self) -> None:
        if self.writer is not None:
            self.writer.tick()
        if self.progress is not None:
            self.progress.refresh()

    def note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.note(message)
        else:
            logger.warning("%s", message)

    def close(self, *, complete: bool) -> None:
        """Flush the output and end the progress; a run that completed leaves each row once in its output."""
        try:
            if self.writer is not None:
                self.writer.close()
            if complete and self.store is not None:
                rows = {**self.earlier.rows, **self.new}
                rewrite = self.earlier.written + self.written > len(rows)
                self.store.finish(list(rows.values()), rewrite=rewrite)
        finally:
            if self.progress is not None:
                self.progress.close(complete=complete)

    def say_stopped(
        self, call: str, *, not_run: int, total: int | None, reason: str, budget: str | None, resumed: bool
    ) -> None:
        """Say, as a warning (above the progress bar if there is one), what a run that stopped early
        left and ``call``, the call that goes on from it. ``budget``: how to give the resumed run a
        bigger budget, when a budget is why it stopped; ``resumed``: the call had ``resume=True``
        already, so running the same script again resumes."""
        done = f"{total - not_run} of {total} rows are" if total is not None else "the rows before are"
        left = f"{done} {f'in {self.shown}' if self.shown is not None else 'done'}; {not_run} were not run"
        if self.shown is None:
            self.note(f"the run stopped ({reason}): {left}; pass output=... to be able to resume a run")
            return
        script = script_command() if resumed else None
        if budget is not None:
            how = f"{budget}: {call}"
        elif script is not None:
            how = f"run the same command again ({call} has resume=True): {script}"
        elif resumed:
            how = f"run the same call again: {call}"
        else:
            how = f"run the same call with resume=True: {call}"
        self.note(f"the run stopped ({reason}): {left}. To resume, {how}")


def script_command() -> str | None:
    """``python label.py --flag``: how this process was started, when it runs a script (not a notebook's
    kernel, not ``python -c``)."""
    argv = list(sys.argv)
    if not argv or not argv[0].endswith(".py") or "ipykernel" in argv[0] or not os.path.isfile(argv[0]):
        return None
    return shlex.join(["python", *argv])


def refused(rows: Iterable[Mapping[str, Any]]) -> int:
    """Rows a budget refused: not run (or not all of it), so run again by a resumed run."""
    return sum(is_budget_error(row.get("error")) for row in rows)


def summary_of(
    rows: Sequence[Mapping[str, Any]], *, seconds: float, resumed: int, scored: bool, total: int, failure_score: float
) -> RunSummary:
    """Over every row with a result, earlier and new; the score over the whole data, as ``dspy.Evaluate``
    computes it, a row not run counting as ``failure_score``."""
    tally = Tally()
    tally.add(tally_of(rows))
    summary = replace(tally.summary(seconds=seconds, scored=False), resumed=resumed)
    if scored and total:
        not_run = total - len(rows)
        summary = replace(summary, score=round(100 * (tally.score + failure_score * not_run) / total, 2))
    elif scored:
        summary = replace(summary, score=0.0)
    return summary
