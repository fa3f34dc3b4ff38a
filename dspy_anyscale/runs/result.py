"""What a local run returns, and the words that say how to resume one that stopped."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from .rows import ModuleTally, RunSummary, check_summary_by


@dataclass(frozen=True)
class RunResult:
    """A local run (``dspy_anyscale.run_program`` / ``evaluate``): its rows and what they add up to.

    ``rows`` has one row per row of the data that has a result, in the data's order: rows this run
    ran and rows a resumed run found done in its output. A run that stopped early (a budget used up)
    has ``complete == False``, says why in ``stopped`` and how many rows were not run in ``not_run``;
    ``resume_hint`` is the call that goes on from its output.
    """

    rows: list[dict[str, Any]]
    summary: RunSummary
    not_run: int = 0
    stopped: str | None = None
    output: str | None = None
    resumed: int = 0  # rows found done in the output, not run again
    resume_hint: str | None = None

    @property
    def complete(self) -> bool:
        return self.not_run == 0

    @property
    def score(self) -> float | None:
        return self.summary.score

    def summarize(self, by: Literal["module"] | None = None) -> RunSummary:
        """``summary``; with ``by="module"``, also each DSPy module's share in ``modules`` (calls, tokens,
        cost, p50/p95 latency per module path, e.g. ``generate_query.predict``), adding up to its cost.
        Rows found in an output written before ``usage_by_module`` existed count under ``(not recorded)``."""
        check_summary_by(by)
        if by is None:
            return self.summary
        modules = ModuleTally()
        modules.add(self.rows)
        return replace(self.summary, modules=modules.summaries())

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{self.not_run} rows not run: {self.stopped}"
        return f"RunResult({self.summary}; {state})"


def resume_call(function: str, positional: str, options: Mapping[str, Any], *, more: str = "") -> str:
    """``dspy_anyscale.run_program(program, data, output='results.jsonl', ..., resume=True)``: the
    options given (as written), ``resume=True``, and ``more`` (a bigger budget)."""
    shown = [f"{name}={value!r}" for name, value in options.items() if name not in ("resume", "limits")]
    return f"{function}({positional}, {', '.join([*shown, 'resume=True', *([more] if more else [])])})"
