"""One record per call: model, endpoint, status, latency, time to first token, tokens, cost,
retries and the server's request ids; an optional JSON-lines log of them; a summary per model.

A *call* is what the user asked for: ``lm(...)``, a program's LM call, ``lm.stream(...)``. DSPy
may make several HTTP attempts for it (retries, ``n`` candidates); the engine reports each
attempt and the call's record adds them up. A call answered from DSPy's cache makes no attempt
and is recorded as ``cached`` with no tokens and no cost. Records never hold the key, headers or
prompt text.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .catalog import Prices, model_info

RECORDS_KEPT = 10_000  # per LM, in memory; the log file keeps everything


@dataclass(frozen=True)
class Attempt:
    """One HTTP exchange, as the engine saw it."""

    endpoint: str
    model: str
    ok: bool
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request_id: str | None = None
    stream: bool = False


@dataclass(frozen=True)
class UsageRecord:
    """One call. ``cost_usd`` is None when the model has no known price or tokens were not reported."""

    timestamp: str
    model: str
    endpoint: str | None
    status: str  # "ok", "cached", "cancelled", or the error class name
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    attempts: int
    retries: int
    request_ids: tuple[str, ...] = ()
    stream: bool = False

    def to_json(self) -> str:
        data = asdict(self)
        data["request_ids"] = list(self.request_ids)
        return json.dumps(data, separators=(",", ":"))


@dataclass
class CallStats:
    """The attempts of one call in progress, collected through a context variable."""

    started: float = field(default_factory=time.perf_counter)
    attempts: list[Attempt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, attempt: Attempt) -> None:
        with self.lock:  # candidates of one call may run concurrently
            self.attempts.append(attempt)


class UsageRecorder:
    """Turns calls into :class:`UsageRecord` s, keeps the last ones and appends them to a JSON-lines log."""

    def __init__(self, *, prices: Prices | None = None, log_path: str | os.PathLike[str] | None = None) -> None:
        self.prices = prices
        self.log_path = Path(log_path) if log_path else None
        self.records: deque[UsageRecord] = deque(maxlen=RECORDS_KEPT)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"UsageRecorder(prices={self.prices}, log_path={self.log_path})"

    def price(self, model: str) -> Prices | None:
        if self.prices is not None:
            return self.prices
        info = model_info(model)
        return info.prices if info else None

    def cost(self, model: str, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        prices = self.price(model)
        return prices.cost(prompt_tokens, completion_tokens) if prices else None

    def finish(self, model: str, stats: CallStats, error: BaseException | None = None) -> UsageRecord:
        record = build_record(model, stats, error, self.cost)
        with self._lock:
            self.records.append(record)
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with self.log_path.open("a", encoding="utf-8") as log:
                    log.write(record.to_json() + "\n")
        return record


def build_record(model: str, stats: CallStats, error: BaseException | None, cost: Any) -> UsageRecord:
    attempts = list(stats.attempts)
    succeeded = [a for a in attempts if a.ok]
    prompt = sum(a.prompt_tokens or 0 for a in succeeded)
    completion = sum(a.completion_tokens or 0 for a in succeeded)
    known = all(a.prompt_tokens is not None and a.completion_tokens is not None for a in succeeded)
    status = _status(error) if error is not None else ("ok" if attempts else "cached")
    ttfts = [a.ttft_s for a in succeeded if a.ttft_s is not None]
    return UsageRecord(
        timestamp=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        model=attempts[-1].model if attempts else model,
        endpoint=attempts[-1].endpoint if attempts else None,
        status=status,
        latency_ms=round((time.perf_counter() - stats.started) * 1000, 3),
        ttft_ms=round(min(ttfts) * 1000, 3) if ttfts else None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=(cost(model, prompt, completion) if known else None) if succeeded else 0.0,
        attempts=len(attempts),
        retries=len(attempts) - len(succeeded),
        request_ids=tuple(a.request_id for a in attempts if a.request_id),
        stream=any(a.stream for a in attempts),
    )


def _status(error: BaseException) -> str:
    # A stream the consumer stopped reading, or a cancelled task, is not a failure of the server.
    if isinstance(error, GeneratorExit | asyncio.CancelledError | KeyboardInterrupt):
        return "cancelled"
    return type(error).__name__


# --- reading a log back ------------------------------------------------------------------------


def read_log(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as log:
        for number, line in enumerate(log, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number} is not a JSON line: {exc}") from exc


@dataclass(frozen=True)
class ModelSummary:
    model: str
    calls: int
    errors: int
    cached: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    p50_ms: float | None
    p95_ms: float | None


def summarize(records: Iterable[Mapping[str, Any] | UsageRecord]) -> list[ModelSummary]:
    """Per model: calls, errors, cache hits, tokens, cost (None if any call's cost is unknown), latency."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        row = asdict(record) if isinstance(record, UsageRecord) else record
        grouped.setdefault(row["model"], []).append(row)
    summaries = []
    for model, rows in sorted(grouped.items()):
        costs = [row.get("cost_usd") for row in rows if row.get("status") == "ok"]
        latencies = sorted(row["latency_ms"] for row in rows if row.get("status") == "ok")
        summaries.append(
            ModelSummary(
                model=model,
                calls=len(rows),
                errors=sum(row.get("status") not in ("ok", "cached") for row in rows),
                cached=sum(row.get("status") == "cached" for row in rows),
                prompt_tokens=sum(row.get("prompt_tokens") or 0 for row in rows),
                completion_tokens=sum(row.get("completion_tokens") or 0 for row in rows),
                cost_usd=None if any(c is None for c in costs) else sum(costs),
                p50_ms=_percentile(latencies, 50),
                p95_ms=_percentile(latencies, 95),
            )
        )
    return summaries


def _percentile(sorted_values: list[float], percent: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def format_summary(summaries: list[ModelSummary]) -> str:
    header = (
        f"{'model':40} {'calls':>6} {'errors':>6} {'cached':>6} {'prompt tok':>11} {'compl. tok':>11} "
        f"{'cost USD':>10} {'p50 ms':>8} {'p95 ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        cost = f"{s.cost_usd:10.6f}" if s.cost_usd is not None else f"{'unknown':>10}"
        p50 = f"{s.p50_ms:8.0f}" if s.p50_ms is not None else f"{'-':>8}"
        p95 = f"{s.p95_ms:8.0f}" if s.p95_ms is not None else f"{'-':>8}"
        lines.append(
            f"{s.model[:40]:40} {s.calls:6d} {s.errors:6d} {s.cached:6d} {s.prompt_tokens:11d} "
            f"{s.completion_tokens:11d} {cost} {p50} {p95}"
        )
    return "\n".join(lines)
