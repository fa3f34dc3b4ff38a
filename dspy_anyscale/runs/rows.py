"""One row of a run: running it with an LM, and the shape of the row that comes out.

The local runner (``dspy_anyscale.run_program``) and the Ray workers (``dspy_anyscale.ray``) both run
rows with :class:`RowRunner`, so a row looks the same wherever it ran: the input row's columns,
``pred_<field>`` for each field of the prediction, ``error`` (None or ``"<ErrorClass>: message"``),
``prompt_tokens``, ``completion_tokens``, ``cost_usd``, ``latency_ms``, ``usage_by_module`` (the row's
usage per DSPy module, as JSON text), ``score`` for an evaluation, and ``row_id`` when the run writes
output. Nothing here imports Ray or pyarrow.
"""

from __future__ import annotations

import json
import reprlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import UnionType
from typing import Any, Union, get_args, get_origin

import dspy
from dspy.utils.usage_tracker import UsageTracker

from .._observe import calling_module, current_call
from ..errors import ConfigurationError
from ..limits import Limiter
from ..usage import _percentile, usage_totals
from .budget import BUDGET_ERROR, budget_refusal, is_budget_error, used_up

PREDICTION_PREFIX = "pred_"
USAGE_BY_MODULE = "usage_by_module"  # JSON text: DSPy module path -> its calls, tokens, cost, latencies
USAGE_COLUMNS = ("error", "prompt_tokens", "completion_tokens", "cost_usd", "latency_ms", USAGE_BY_MODULE)
DIRECT_CALL = "(direct call)"  # a call made outside any DSPy module (usage.summarize says the same)
NOT_RECORDED = "(not recorded)"  # the usage of rows written before usage_by_module was (an old output)
SUMMARY_BY = ("module",)  # what summarize_run(..., by=) and RunResult.summarize(by=) group by
ROW_ID = "row_id"  # a row's stable id in a run's output (ids.py)
SCORE = "score"
Metric = Callable[[dspy.Example, dspy.Prediction], float | bool]


@dataclass(frozen=True)
class ModuleSummary:
    """One DSPy module's share of a run: the LM calls it made (answered from DSPy's cache: not
    counted), their tokens, cost (None if a call's is unknown) and latency (p50, p95; nearest rank)."""

    module: str  # its path in the program (``generate_query.predict``), or DIRECT_CALL, or NOT_RECORDED
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    p50_ms: float | None
    p95_ms: float | None


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
    resumed: int = 0  # of the rows: found done in the output of an earlier run (resume=True), not run again
    # by="module": each module's share, sorted by path; their costs add up to cost_usd. () otherwise.
    modules: tuple[ModuleSummary, ...] = ()

    @property
    def rows_per_second(self) -> float | None:
        """This run's speed: rows it ran (not those it found done) per second."""
        return (self.rows - self.resumed) / self.seconds if self.seconds else None

    def __str__(self) -> str:
        cost = f"${self.cost_usd:.6f}" if self.cost_usd is not None else "cost unknown"
        speed = f", {self.rows_per_second:.1f} rows/s" if self.rows_per_second else ""
        score = f", score {self.score}" if self.score is not None else ""
        refused = f" ({self.refused} over budget)" if self.refused else ""
        resumed = f" ({self.resumed} from an earlier run)" if self.resumed else ""
        line = (
            f"{self.rows} rows{resumed}, {self.errors} errors{refused}, {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} completion tokens, {cost}{speed}{score}"
        )
        return "\n".join([line, *module_table(self.modules)]) if self.modules else line


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
    """Runs one row of a run with an LM: the prediction, its usage, its score or its error.

    Once a refusal shows that the run's cap is used up (``budget_usd`` or ``max_requests``), the
    run stops sending: every row after it fails at once with ``BudgetExceededError``, unrun.
    """

    def __init__(self, spec: RunSpec, lm: Any, adapter: dspy.Adapter | None) -> None:
        self.spec = spec
        self.lm = lm  # a dspy.BaseLM; an Anyscale also prices the row and has a ledger
        self.adapter = adapter
        self.limiter = getattr(lm, "limiter", None)  # the ledger this run's rows count against
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
        usage = ModuleUsage()  # this row's calls, answered or not: a row that fails half-way was still billed
        try:
            with dspy.context(lm=self.lm, adapter=self.adapter, track_usage=True, usage_tracker=usage):
                prediction = spec.program(**{key: row[key] for key in spec.input_keys})
            out.update(self._cells(prediction))
            out["error"] = None
            if spec.metric is not None:
                out[SCORE] = float(spec.metric(example_of(row, spec.input_keys), prediction))
        except KeyboardInterrupt:
            raise  # someone stopping the worker: not this row's failure
        except BaseException as exc:  # SystemExit too: one bad row never stops the job, it is its own error
            out.update(failed_row(self._error(exc), spec))
        out.update(self._usage(usage.get_total_tokens()))
        out[USAGE_BY_MODULE] = self._by_module(usage)

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
        return {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": self._cost(prompt, completion)}

    def _cost(self, prompt: int | None, completion: int | None) -> float | None:
        cost_of = getattr(self.lm, "cost_of", None)  # an Anyscale prices it; another LM's cost is unknown
        return cost_of(prompt, completion) if callable(cost_of) else None

    def _by_module(self, usage: ModuleUsage) -> str | None:
        """The row's ``usage_by_module``: per module, priced as the row is (so the modules' costs add up
        to the row's); None when the row made no call (all answered from DSPy's cache, or not run)."""
        modules = usage.by_module()
        if not modules:
            return None
        for totals in modules.values():
            totals["cost_usd"] = self._cost(totals["prompt_tokens"], totals["completion_tokens"])
        return json.dumps(modules, separators=(",", ":"), sort_keys=True)


class ModuleUsage(UsageTracker):  # type: ignore[misc]  # DSPy ships no types: UsageTracker is Any to mypy
    """DSPy's usage tracker for one row that also notes, for each call, the DSPy module that made it and
    how long it took. DSPy calls ``add_usage`` in the caller's context, inside the call (its threads
    and ``acall`` tasks included), so the module is the caller's, and the call's start is known."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: list[tuple[str, Mapping[str, Any], float | None]] = []
        self._lock = threading.Lock()  # a program's own threads (dspy.Parallel) share the row's tracker

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        super().add_usage(lm, usage_entry)
        if not usage_entry:  # DSPy keeps no empty entry either: the two always count the same calls
            return
        call = current_call()  # an Anyscale's call in progress; another LM's latency is unknown
        latency = None if call is None else round((time.perf_counter() - call.started) * 1000, 3)
        with self._lock:
            self._calls.append((calling_module() or DIRECT_CALL, self._flatten_usage_entry(usage_entry), latency))

    def by_module(self) -> dict[str, dict[str, Any]]:
        """Module path -> {calls, latencies_ms, prompt_tokens, completion_tokens} (tokens None if unknown)."""
        with self._lock:
            calls = list(self._calls)
        merged: dict[str, dict[str, Any]] = {}
        modules: dict[str, dict[str, Any]] = {}
        for module, entry, latency in calls:
            # Entries merged as DSPy merges the row's (get_total_tokens): the modules add up to the row.
            merged[module] = self._merge_usage_entries(merged.get(module), dict(entry))
            totals = modules.setdefault(module, {"calls": 0, "latencies_ms": []})
            totals["calls"] += 1
            if latency is not None:
                totals["latencies_ms"].append(latency)
        for module, totals in modules.items():
            totals["prompt_tokens"], totals["completion_tokens"] = usage_totals({module: merged[module]})
        return modules


@dataclass
class _ModuleTotals:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unknown_cost: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, calls: int, prompt: Any, completion: Any, cost: Any, latencies: Any) -> None:
        self.calls += calls
        self.prompt_tokens += prompt or 0
        self.completion_tokens += completion or 0
        if cost is None:
            self.unknown_cost += 1
        else:
            self.cost_usd += cost
        self.latencies_ms.extend(latencies or ())


class ModuleTally:
    """Per-module totals of a run's rows, from their ``usage_by_module``, added row by row (batch by batch
    on Ray). A row without one (written before the column was) that used tokens counts under
    ``(not recorded)``, so the modules always add up to the run's total."""

    def __init__(self) -> None:
        self.modules: dict[str, _ModuleTotals] = {}

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            modules = _modules_of(row.get(USAGE_BY_MODULE))
            if modules is not None:
                for module, usage in modules.items():
                    self._totals(module).add(
                        usage.get("calls", 0),
                        usage.get("prompt_tokens"),
                        usage.get("completion_tokens"),
                        usage.get("cost_usd"),
                        usage.get("latencies_ms"),
                    )
            elif _used_anything(row):
                self._totals(NOT_RECORDED).add(
                    0, row.get("prompt_tokens"), row.get("completion_tokens"), row.get("cost_usd"), ()
                )

    def _totals(self, module: str) -> _ModuleTotals:
        return self.modules.setdefault(module, _ModuleTotals())

    def summaries(self) -> tuple[ModuleSummary, ...]:
        return tuple(_module_summary(module, totals) for module, totals in sorted(self.modules.items()))


def _modules_of(text: Any) -> dict[str, Mapping[str, Any]] | None:
    """A row's ``usage_by_module`` read back; None when it has none, or it is not what a run wrote."""
    if not isinstance(text, str) or not text:
        return None
    try:
        modules = json.loads(text)
    except ValueError:
        return None
    if not isinstance(modules, dict) or not all(isinstance(usage, dict) for usage in modules.values()):
        return None
    return modules


def _used_anything(row: Mapping[str, Any]) -> bool:
    return any(row.get(name) != 0 for name in ("prompt_tokens", "completion_tokens", "cost_usd"))


def _module_summary(module: str, totals: _ModuleTotals) -> ModuleSummary:
    latencies = sorted(totals.latencies_ms)
    return ModuleSummary(
        module=module,
        calls=totals.calls,
        prompt_tokens=int(totals.prompt_tokens),
        completion_tokens=int(totals.completion_tokens),
        cost_usd=None if totals.unknown_cost else float(totals.cost_usd),
        p50_ms=_percentile(latencies, 50),
        p95_ms=_percentile(latencies, 95),
    )


def check_summary_by(by: object) -> None:
    if by is not None and by not in SUMMARY_BY:
        raise ConfigurationError(
            f"by must be None (the run's totals) or 'module' (each DSPy module's share), got {by!r}"
        )


def module_table(modules: Sequence[ModuleSummary]) -> list[str]:
    """The lines of a per-module table, as ``RunSummary`` prints it."""
    width = max(24, *(len(m.module) for m in modules))
    header = (
        f"{'module':{width}} {'calls':>6} {'prompt tok':>11} {'compl. tok':>11} {'cost USD':>10} "
        f"{'p50 ms':>8} {'p95 ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for m in modules:
        cost = f"{m.cost_usd:10.6f}" if m.cost_usd is not None else f"{'unknown':>10}"
        p50 = f"{m.p50_ms:8.0f}" if m.p50_ms is not None else f"{'-':>8}"
        p95 = f"{m.p95_ms:8.0f}" if m.p95_ms is not None else f"{'-':>8}"
        lines.append(
            f"{m.module:{width}} {m.calls:6d} {m.prompt_tokens:11d} {m.completion_tokens:11d} {cost} {p50} {p95}"
        )
    return lines


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
        "refused": sum(is_budget_error(row["error"]) for row in rows),
        "prompt_tokens": sum(row["prompt_tokens"] or 0 for row in rows),
        "completion_tokens": sum(row["completion_tokens"] or 0 for row in rows),
        "cost_usd": sum(row["cost_usd"] or 0.0 for row in rows),
        "unknown_cost": sum(row["cost_usd"] is None for row in rows),
        "score": sum(row.get(SCORE) or 0.0 for row in rows),
    }


def failed_row(message: str, spec: RunSpec) -> dict[str, Any]:
    failed: dict[str, Any] = {"error": message, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    if spec.metric is not None:
        failed[SCORE] = spec.failure_score
    return failed


def output_columns(program: dspy.Module, metric: Metric | None) -> list[str]:
    """Columns every output batch has, even one whose rows all failed: the last predictor's outputs."""
    predictors = program.predictors()
    fields = list(predictors[-1].signature.output_fields) if predictors else []
    return [PREDICTION_PREFIX + name for name in fields] + list(USAGE_COLUMNS) + ([SCORE] if metric else [])


def columns_of(rows: list[dict[str, Any]], always: Sequence[str]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys([*(key for row in rows for key in row), *always]))  # failed rows lack pred_ fields
    return {key: [row.get(key) for row in rows] for key in keys}


def example_of(row: Mapping[str, Any], input_keys: Sequence[str]) -> dspy.Example:
    return dspy.Example(**row).with_inputs(*input_keys)


# --- one type per column: Ray Data and Parquet store rows as Arrow, which cannot merge blocks whose
# column types differ (int64 in one, string in another), and would fail the whole run. -------------

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
    for name, declared in predictors[-1].signature.output_fields.items():
        kind = _declared_kind(declared.annotation)
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
