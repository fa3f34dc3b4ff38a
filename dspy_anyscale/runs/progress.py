"""What a long run shows while it goes: rows done of the total, rows per second, errors, tokens,
USD spent and the time left.

On a terminal, a progress bar (tqdm, installed with DSPy) on stderr. Elsewhere (a log file, CI, a
notebook, a Ray job's log), a plain line every ``RUNS_PROGRESS_LOG_INTERVAL_S`` seconds and at
the start and the end: through the ``dspy_anyscale`` logger (INFO) when logging is configured, else
on stderr. ``progress=False`` shows nothing but warnings (the run stopping, how to resume). Rows
of an earlier run that a resumed run keeps count as done from the start; the speed and the time
left are this run's own.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TextIO

from .. import _constants as C
from .rows import Tally

logger = logging.getLogger(C.LOGGER_NAME)
_BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
_COUNTER_FORMAT = "{desc}{n_fmt} rows [{elapsed}, {rate_fmt}]{postfix}"  # no total: no bar, no time left


class Progress:
    def __init__(
        self, total: int | None, *, done: Tally | None = None, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.tally = replace(done) if done is not None else Tally()
        self.initial = self.tally.rows  # rows of an earlier run, done before this one started
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.logged = self.started
        self.bar: Any = None
        self.lines = False
        if enabled and _is_terminal(self.stream):
            self.bar = _bar(total, self.initial, self.stream)
            self.bar.set_postfix_str(self._counts(), refresh=False)
        elif enabled:
            self.lines = True
            self._line("started")

    def update(self, counts: Mapping[str, Any]) -> None:
        """Rows finished (their tally, ``rows.tally_of``)."""
        self.tally.add(counts)
        if self.bar is not None:
            self.bar.set_postfix_str(self._counts(), refresh=False)
            self.bar.update(counts["rows"])
        else:
            self.refresh()

    def refresh(self) -> None:
        if self.lines and time.monotonic() - self.logged >= C.RUNS_PROGRESS_LOG_INTERVAL_S:
            self._line()

    def note(self, message: str) -> None:
        """A warning for the user (the run stopping, how to resume), above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(f"{C.LOGGER_NAME}: {message}", file=self.stream)
        elif logger.hasHandlers():
            logger.warning("%s", message)
        else:  # Python's last-resort handler would print the bare message: say whose it is, as the lines do
            self.stream.write(f"{C.LOGGER_NAME}: {message}\n")
            self.stream.flush()

    def close(self, *, complete: bool = True) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._counts(), refresh=False)
            self.bar.close()
            self.bar = None
        elif self.lines:
            self.lines = False
            self._line("finished" if complete else "stopped", eta=False)

    def figures(self, *, eta: bool = True) -> str:
        """``120/300 rows (40%), 35.2 rows/s, 2 errors, 14230 tokens, $0.001234, 5 s left`` (a total
        not known ahead, as a Ray Dataset's: ``120 rows, 35.2 rows/s, ...``)."""
        done, total, rate = self.tally.rows, self.total, self.rate()
        if total is None:
            return f"{done} rows, {rate or 0:.1f} rows/s, {self._counts()}"
        percent = f" ({100 * done / total:.0f}%)" if total else ""
        left = (total - done) / rate if rate else None
        time_left = f", {_duration(left)} left" if eta and left is not None and done < total else ""
        return f"{done}/{total} rows{percent}, {rate or 0:.1f} rows/s, {self._counts()}{time_left}"

    def rate(self) -> float | None:
        elapsed = time.monotonic() - self.started
        ran = self.tally.rows - self.initial
        return ran / elapsed if elapsed > 0 and ran else None

    def _counts(self) -> str:
        tally = self.tally
        cost = f"${tally.cost_usd:.6f}" + (" + unknown" if tally.unknown_cost else "")
        tokens = tally.prompt_tokens + tally.completion_tokens
        return f"{tally.errors} errors, {tokens} tokens, {cost}"

    def _line(self, event: str = "", *, eta: bool = True) -> None:
        self.logged = time.monotonic()
        line = f"{self.figures(eta=eta)}{f' ({event})' if event else ''}"
        if logger.hasHandlers():
            logger.info("%s", line)
        else:  # nothing would show an INFO record: the user asked for progress, so it goes to stderr
            self.stream.write(f"{C.LOGGER_NAME}: {line}\n")
            self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _bar(total: int | None, initial: int, stream: TextIO) -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped]  # installed with DSPy, no stubs; loaded for a bar only

    return tqdm(
        total=total,
        initial=initial,
        file=stream,
        unit="rows",
        bar_format=_BAR_FORMAT if total is not None else _COUNTER_FORMAT,
        dynamic_ncols=True,
        mininterval=C.RUNS_PROGRESS_REFRESH_S,
        smoothing=0,  # the average over the run: LLM latencies vary too much row to row for a moving one
        leave=True,
    )


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
