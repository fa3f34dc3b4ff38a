"""Usage accounting, in one place: a record per call, its cost, the JSON-lines log, and summaries.

A *call* is what the user asked for: ``lm(...)``, a program's LM call, ``lm.stream(...)``. DSPy
may make several HTTP attempts for it (retries, ``n`` candidates); the engine reports each attempt
(:mod:`._observe`) and the call's record adds them up. A call answered from DSPy's cache makes no
attempt and is recorded as ``cached`` with no tokens and no cost. Token counts the server did not
send are unknown (``None``), and so is the cost then: never 0. Records never hold the key,
headers or prompt text.

The recorder is an observer: if its log cannot be written (a full disk, a file removed under
it), the call still returns its answer and a warning is logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from . import _constants as C
from ._observe import CANCELLED, Attempt, Call, Observer, error_name
from .catalog import Prices, model_info
from .errors import ConfigurationError

logger = logging.getLogger(C.LOGGER_NAME)

_OK, _CACHED = "ok", "cached"


class CostFunction(Protocol):
    """USD for (model, prompt tokens, completion tokens, of the prompt those the server had cached), None
    when unknown: ``CostTable.cost``."""

    def __call__(
        self, model: str, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = None
    ) -> float | None: ...


@dataclass(frozen=True)
class UsageRecord:
    """One call. Tokens and ``cost_usd`` are None when the server did not report the counts (or the
    model has no known price). ``api`` is ``"chat"`` or ``"completions"``; ``endpoint`` names the
    service that answered: a Router's member name, else the LM's ``host:port``. ``module`` is the DSPy
    module that made the call, as its path in the outermost module (``generate_query.predict``; None
    for a direct call). ``cached_tokens``: of the prompt tokens, those the server answered from its
    prompt cache (priced at ``prices["cached_input"]`` when given); ``response_ids`` the answers' own
    ids; ``rate_limit`` the last answer's ``x-ratelimit-*`` headers (names without the prefix);
    ``adapter`` the LoRA adapter the LM is bound to (None: the base model)."""

    timestamp: str
    model: str
    api: str | None
    endpoint: str | None
    status: str  # "ok", "cached", "cancelled", "budget", or the error class name
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None
    attempts: int
    retries: int
    request_ids: tuple[str, ...] = ()
    stream: bool = False
    module: str | None = None
    cached_tokens: int | None = None
    response_ids: tuple[str, ...] = ()
    rate_limit: Mapping[str, str] | None = None
    adapter: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["request_ids"] = list(self.request_ids)
        data["response_ids"] = list(self.response_ids)
        data["rate_limit"] = dict(self.rate_limit) if self.rate_limit else None
        return json.dumps(data, separators=(",", ":"))


class CostTable:
    """Prices per model: the ones given, else the legacy catalogue, else unknown."""

    def __init__(self, prices: Prices | None = None) -> None:
        self.prices = prices

    def price(self, model: str) -> Prices | None:
        if self.prices is not None:
            return self.prices
        info = model_info(model)
        return info.prices if info else None

    def cost(
        self, model: str, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = None
    ) -> float | None:
        prices = self.price(model)
        return prices.cost(prompt_tokens, completion_tokens, cached_tokens) if prices else None

    def estimate(
        self, model: str, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = None
    ) -> tuple[float | None, dict[str, Any]]:
        """(cost, provenance) in the shape of DSPy's history ``cost_details``: an ``estimate`` from this
        package's price table, or ``unknown`` with the reason, so that the two always agree."""
        prices = self.price(model)
        if prices is None:
            return None, _unknown(
                f"no price for {model!r}: pass prices={{'input': ..., 'output': ...}} (USD per million tokens)"
            )
        cost = prices.cost(prompt_tokens, completion_tokens, cached_tokens)
        if cost is None:
            # Also a DSPy cache hit: its history entry carries no usage (nothing was sent for it).
            return None, _unknown(
                "no input and output token counts for this entry (the server sent none, or DSPy's cache answered)"
            )
        table = "prices= (USD per million tokens)" if self.prices is not None else "the legacy Anyscale catalogue"
        return cost, {
            "kind": "estimate",
            "currency": "USD",
            "provider": C.PROVIDER,
            "model": model,
            "metadata": {
                "source": f"{C.LOGGER_NAME} price table: {table}",
                "usd_per_million_tokens": prices.as_dict(),
            },
        }


def _unknown(reason: str) -> dict[str, Any]:
    return {"kind": "unknown", "reason": reason}


class UsageRecorder(Observer):
    """Turns calls into :class:`UsageRecord` s, keeps the last ones and appends them to a JSON-lines log."""

    def __init__(
        self,
        *,
        prices: Prices | None = None,
        log_path: str | os.PathLike[str] | None = None,
        endpoint: str | None = None,
        adapter: str | None = None,
    ) -> None:
        self.costs = CostTable(prices)
        self.endpoint = endpoint  # the LM's service, for calls no Router names a member for
        self.adapter = adapter  # the LoRA adapter the LM is bound to
        self.log_path = Path(log_path) if log_path else None
        self.records: deque[UsageRecord] = deque(maxlen=C.USAGE_RECORDS_KEPT)
        self._lock = threading.Lock()
        self._log_failed = False

    def __repr__(self) -> str:
        return f"UsageRecorder(prices={self.costs.prices}, log_path={self.log_path})"

    def cost(
        self, model: str, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = None
    ) -> float | None:
        return self.costs.cost(model, prompt_tokens, completion_tokens, cached_tokens)

    def call_finished(self, call: Call, error: BaseException | None) -> None:
        endpoint = call.routed_as or self.endpoint
        record = build_record(
            call.model,
            call.attempts,
            call.started,
            error,
            self.costs.cost,
            endpoint=endpoint,
            module=call.module,
            adapter=self.adapter,
        )
        self.add(record)

    def add(self, record: UsageRecord) -> None:
        with self._lock:
            self.records.append(record)
            if self.log_path is not None:
                self._append(record)

    def _append(self, record: UsageRecord) -> None:
        assert self.log_path is not None
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(record.to_json() + "\n")
        except OSError as exc:
            # The server answered (and may have been paid): a log that cannot be written costs a line, not the call.
            level = logging.DEBUG if self._log_failed else logging.WARNING
            logger.log(
                level,
                "usage log %s could not be written (%s); the call's record is kept in lm.usage",
                self.log_path,
                exc,
            )
            self._log_failed = True


def build_record(
    model: str,
    attempts: list[Attempt],
    started: float,
    error: BaseException | None,
    cost: CostFunction,
    *,
    endpoint: str | None = None,
    module: str | None = None,
    adapter: str | None = None,
) -> UsageRecord:
    attempts = list(attempts)
    succeeded = [a for a in attempts if a.ok]
    # An attempt cut off after the server took it (a stream closed mid-answer, a request cancelled in
    # flight) used tokens nobody counted: the call's tokens and cost are unknown, not those of the rest.
    uncounted = any(_maybe_billed(a) for a in attempts)
    prompt = None if uncounted else _total(a.prompt_tokens for a in succeeded)
    completion = None if uncounted else _total(a.completion_tokens for a in succeeded)
    cached = _cached(succeeded)
    rate_limits = [a.rate_limit for a in attempts if a.rate_limit]
    ttfts = [a.ttft_s for a in attempts if a.ttft_s is not None]
    return UsageRecord(
        timestamp=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        model=attempts[-1].model if attempts else model,
        api=attempts[-1].endpoint if attempts else None,
        endpoint=endpoint,
        status=call_status(error, bool(attempts)),
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
        ttft_ms=round(min(ttfts) * 1000, 3) if ttfts else None,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=_call_cost(model, prompt, completion, cached, succeeded, uncounted, cost),
        attempts=len(attempts),
        retries=count_retries(attempts, error),
        request_ids=tuple(a.request_id for a in attempts if a.request_id),
        stream=any(a.stream for a in attempts),
        module=module,
        cached_tokens=cached,
        response_ids=tuple(a.response_id for a in succeeded if a.response_id),
        rate_limit=rate_limits[-1] if rate_limits else None,
        adapter=adapter,
    )


def _cached(succeeded: list[Attempt]) -> int | None:
    """Cached prompt tokens of the answers: the sum of those the server reported (None: none reported;
    an answer that said nothing had none priced as cached, so the cost errs high, never low)."""
    counts = [a.cached_tokens for a in succeeded if a.cached_tokens is not None]
    return sum(counts) if counts else None


def _maybe_billed(attempt: Attempt) -> bool:
    """A failed attempt the server may have generated for: it had started answering, or it was cancelled
    in flight. One refused with an error status, or never connected, cost nothing."""
    if attempt.ok:
        return False
    answering = attempt.ttft_s is not None or (attempt.status is not None and 200 <= attempt.status <= 299)
    return answering or (attempt.error == CANCELLED and attempt.status is None)


def _call_cost(
    model: str,
    prompt: int | None,
    completion: int | None,
    cached: int | None,
    succeeded: list[Attempt],
    uncounted: bool,
    cost: CostFunction,
) -> float | None:
    """USD for the call: 0 when nothing could have been billed, None (unknown) when a count or the price is."""
    if uncounted:
        return None
    return cost(model, prompt, completion, cached) if succeeded else 0.0


def count_retries(attempts: list[Attempt], error: BaseException | None) -> int:
    """Attempts that were resent after a failure: failed attempts, less the one that ended a failed call.

    A request that is cancelled, refused or fails for good was not retried: one request, no retry.
    """
    failed = sum(not a.ok for a in attempts)
    return max(0, failed - (1 if error is not None and failed else 0))


def _total(counts: Iterable[int | None]) -> int | None:
    """The sum of the counts, or None if any is unknown (a partial sum would understate usage)."""
    values = list(counts)
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def call_status(error: BaseException | None, attempted: bool) -> str:
    """``ok`` / ``cached`` / ``cancelled`` / ``budget`` / the error's class name."""
    if error is None:
        return _OK if attempted else _CACHED
    if getattr(error, "code", None) == "budget_exceeded":
        return "budget"
    return error_name(error)


def usage_totals(usage: Mapping[str, Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens summed over DSPy's per-model usage (``prediction.get_lm_usage()``).

    None when a call's counts were unknown; (0, 0) for no usage at all (every call cached).
    """
    prompt: int | None = 0
    completion: int | None = 0
    for entry in usage.values():
        prompt = None if prompt is None or entry.get("prompt_tokens") is None else prompt + entry["prompt_tokens"]
        completion = (
            None
            if completion is None or entry.get("completion_tokens") is None
            else completion + entry["completion_tokens"]
        )
    return prompt, completion


# --- reading a log back ------------------------------------------------------------------------


def read_log(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a usage log; a line that is not a JSON object is an error naming the line."""
    with Path(path).open(encoding="utf-8") as log:
        for number, line in enumerate(log, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not a JSON line: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("model"), str):
                raise ValueError(f"{path}:{number} is not a usage record (a JSON object with a 'model')")
            yield _current_shape(record)


_APIS = ("chat", "completions")


def _current_shape(record: dict[str, Any]) -> dict[str, Any]:
    """A record as this release writes it. Lines written before ``api`` existed said ``endpoint`` for the API
    (``chat`` / ``completions``); the service that answered was not recorded (``endpoint`` None)."""
    if "api" not in record and record.get("endpoint") in _APIS:
        return {**record, "api": record["endpoint"], "endpoint": None}
    return record


SUMMARY_GROUPS = C.USAGE_SUMMARY_GROUPS
_NO_ENDPOINT = "(not recorded)"  # an old log line's endpoint (or module: written before modules were)
_DIRECT = "(direct call)"  # a call made outside any DSPy module


@dataclass(frozen=True)
class ModelSummary:
    model: str  # the group: a model, or by="endpoint" the service that answered, or by="module" the DSPy module
    calls: int
    errors: int
    cached: int
    refused: int  # refused by the client before sending (budget)
    prompt_tokens: int
    completion_tokens: int
    unknown_tokens: int  # calls whose token counts are unknown (not sent by the server, or stopped mid-answer)
    cost_usd: float | None
    p50_ms: float | None
    p95_ms: float | None


def summarize(records: Iterable[Mapping[str, Any] | UsageRecord], by: str = "model") -> list[ModelSummary]:
    """Per model (or per ``by="endpoint"``: the service that answered, a Router's member name or a
    ``host:port``; or per ``by="module"``: the DSPy module that made the call, ``(direct call)`` for
    calls made outside any): calls, errors, cache hits, refusals, tokens, cost (None if any is
    unknown), latency. Every record is in exactly one group: the groups add up to the whole."""
    if by not in SUMMARY_GROUPS:
        raise ConfigurationError(f"by must be one of {', '.join(map(repr, SUMMARY_GROUPS))}, got {by!r}")
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        row = asdict(record) if isinstance(record, UsageRecord) else record
        grouped.setdefault(_group(row, by), []).append(row)
    return [_summary(model, rows) for model, rows in sorted(grouped.items())]


def _group(row: Mapping[str, Any], by: str) -> str:
    value = row.get(by)
    if value:
        return str(value)
    return _DIRECT if by == "module" and by in row else _NO_ENDPOINT


def _summary(model: str, rows: list[Mapping[str, Any]]) -> ModelSummary:
    answered = [row for row in rows if row.get("status") == _OK]
    # Every call that reached the server counts: a stream stopped mid-answer was billed for what it made.
    sent = [row for row in rows if row.get("status") not in (_CACHED, "budget")]
    costs = [row.get("cost_usd") for row in sent]
    latencies = sorted(_number(row.get("latency_ms")) for row in answered)
    unknown = [row for row in sent if row.get("prompt_tokens") is None or row.get("completion_tokens") is None]
    return ModelSummary(
        model=model,
        calls=len(rows),
        errors=sum(row.get("status") not in (_OK, _CACHED, "budget") for row in rows),
        cached=sum(row.get("status") == _CACHED for row in rows),
        refused=sum(row.get("status") == "budget" for row in rows),
        prompt_tokens=sum(_tokens(row.get("prompt_tokens")) for row in rows),
        completion_tokens=sum(_tokens(row.get("completion_tokens")) for row in rows),
        unknown_tokens=len(unknown),
        cost_usd=None if any(c is None for c in costs) else sum(_number(c) for c in costs),
        p50_ms=_percentile(latencies, 50),
        p95_ms=_percentile(latencies, 95),
    )


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value: Any) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _percentile(sorted_values: list[float], percent: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def format_summary(summaries: list[ModelSummary], by: str = "model") -> str:
    header = (
        f"{by:40} {'calls':>6} {'errors':>6} {'cached':>6} {'refused':>7} {'prompt tok':>11} "
        f"{'compl. tok':>11} {'cost USD':>10} {'p50 ms':>8} {'p95 ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        cost = f"{s.cost_usd:10.6f}" if s.cost_usd is not None else f"{'unknown':>10}"
        mark = "*" if s.unknown_tokens else " "
        p50 = f"{s.p50_ms:8.0f}" if s.p50_ms is not None else f"{'-':>8}"
        p95 = f"{s.p95_ms:8.0f}" if s.p95_ms is not None else f"{'-':>8}"
        lines.append(
            f"{s.model[:40]:40} {s.calls:6d} {s.errors:6d} {s.cached:6d} {s.refused:7d} {s.prompt_tokens:10d}{mark} "
            f"{s.completion_tokens:10d}{mark} {cost} {p50} {p95}"
        )
    if any(s.unknown_tokens for s in summaries):
        lines.append(
            "* some calls' token counts were not sent by the server (or the call was stopped mid-answer): "
            "the totals leave them out"
        )
    return "\n".join(lines)
