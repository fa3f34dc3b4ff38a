"""Run a DSPy program over a Ray Dataset: ``pip install 'dspy-anyscale[ray]'``.

    import ray
    from dspy_anyscale.ray import ProgramPool, evaluate, run_program, summarize_run

    ray.init()                                   # a laptop; ray.init(address="auto") on a cluster
    results = run_program(program, dataset, lm=lm, input_keys=["question"], concurrency=4)
    print(summarize_run(results))

    with ProgramPool(lm=lm, concurrency=4) as pool:      # start the workers once ...
        for candidate in candidates:                     # ... and run on them many times
            score, scored = evaluate(candidate, devset, metric, pool=pool)

Without a pool, each run builds a new Ray Data actor pool (seconds of start-up: each actor imports
DSPy). A :class:`ProgramPool` starts its actors once and keeps them, with their LMs and connection
pools, until it is closed; each run on it sends only the program (once, through the object store)
and the rows.

Each actor builds its own ``Anyscale`` LM once, from ``lm.dump_state()`` (never the key: every
worker reads ``ANYSCALE_API_KEY`` from its own environment, or from a Ray runtime env you give it),
keeps its connection pool, and runs rows on ``threads_per_actor`` threads. At most
``concurrency * threads_per_actor`` requests are in flight, whatever the size of the dataset; 429s
are retried by DSPy as everywhere else. A row that fails gets an ``error`` string, never stops the
job, and is counted.

Output rows: the input row's columns, the prediction's fields as ``pred_<field>``, ``error``
(None or ``"<ErrorClass>: message"``), ``prompt_tokens``, ``completion_tokens``, ``cost_usd`` and
``latency_ms`` (and ``score`` from :func:`evaluate`), in completion order.

Wrong arguments (types, values, input keys missing from the data) raise
:class:`~dspy_anyscale.errors.ConfigurationError` before any Ray work starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import reprlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import dspy

from . import _constants as C
from .anyscale import Anyscale
from .errors import AnyscaleError, ConfigurationError

try:
    import ray
    import ray.data
    from ray.data.block import BlockAccessor
    from ray.exceptions import ActorUnschedulableError, RayActorError, RayError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("dspy_anyscale.ray needs Ray Data: pip install 'dspy-anyscale[ray]'") from exc

if TYPE_CHECKING:
    from ray.data import Dataset

logger = logging.getLogger(C.LOGGER_NAME)

PREDICTION_PREFIX = "pred_"
USAGE_COLUMNS = ("error", "prompt_tokens", "completion_tokens", "cost_usd", "latency_ms")
Metric = Callable[[dspy.Example, dspy.Prediction], float | bool]

# run_program's defaults without a pool (with one, the pool's settings apply).
DEFAULT_CONCURRENCY = 4
DEFAULT_THREADS_PER_ACTOR = 8
DEFAULT_NUM_CPUS = 0.25
# Batches a pool worker holds at once: the second fills its threads while the first one's last
# rows finish, so a batch's tail never leaves threads idle. Requests in flight stay bounded by
# the worker's threads, which both batches share.
BATCHES_PER_WORKER = 2
_POLL_SECONDS = 1.0  # how often a run looks at workers that are (re)starting


class PoolError(AnyscaleError, RuntimeError):
    """A :class:`ProgramPool` cannot run: it is closed, its workers did not start, or all of them died."""


@dataclass(frozen=True)
class RunSummary:
    rows: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    seconds: float | None = None
    score: float | None = None

    @property
    def rows_per_second(self) -> float | None:
        return self.rows / self.seconds if self.seconds else None

    def __str__(self) -> str:
        cost = f"${self.cost_usd:.6f}" if self.cost_usd is not None else "cost unknown"
        speed = f", {self.rows_per_second:.1f} rows/s" if self.rows_per_second else ""
        score = f", score {self.score}" if self.score is not None else ""
        return (
            f"{self.rows} rows, {self.errors} errors, {self.prompt_tokens} prompt + {self.completion_tokens} "
            f"completion tokens, {cost}{speed}{score}"
        )


# --- running rows (inside a worker) ----------------------------------------------------------------


@dataclass(frozen=True)
class _RunSpec:
    """What one run sends its workers once: the program as it is now, and how to read its rows."""

    program: dspy.Module
    input_keys: tuple[str, ...]
    output_columns: tuple[str, ...]
    metric: Metric | None = None
    failure_score: float = 0.0


class _RowRunner:
    """Runs one row of a run with a worker's LM: the prediction, its usage, its score or its error."""

    def __init__(self, spec: _RunSpec, lm: Anyscale, adapter: dspy.Adapter | None) -> None:
        self.spec = spec
        self.lm = lm
        self.adapter = adapter

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        started = time.perf_counter()
        out: dict[str, Any] = dict(row)
        try:
            with dspy.context(lm=self.lm, adapter=self.adapter, track_usage=True):
                prediction = spec.program(**{key: row[key] for key in spec.input_keys})
            out.update({PREDICTION_PREFIX + key: _plain(value) for key, value in prediction.items()})
            out.update(self._usage(prediction.get_lm_usage() or {}))
            out["error"] = None
            if spec.metric is not None:
                out["score"] = float(spec.metric(_example(row, spec.input_keys), prediction))
        except Exception as exc:  # one bad row never stops the job: it is reported in its own row
            out.update(_failure(f"{type(exc).__name__}: {exc}", spec))
        out["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return out

    def _usage(self, usage: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        prompt = sum(u.get("prompt_tokens") or 0 for u in usage.values())
        completion = sum(u.get("completion_tokens") or 0 for u in usage.values())
        cost = self.lm.engine.recorder.cost(self.lm.model, prompt, completion) if usage else 0.0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": cost}


def _worker_lm(lm_state: Mapping[str, Any], threads: int) -> Anyscale:
    # The state has no key: load_state finds it in this worker's environment.
    return Anyscale.load_state({**lm_state, "pool_size": max(threads, 1)})


class _ProgramActor:
    """One per slot of a Ray Data actor pool (a run without ``pool=``): builds the LM once, runs rows on threads."""

    def __init__(self, spec: _RunSpec, lm_state: dict[str, Any], adapter: dspy.Adapter | None, threads: int) -> None:
        self.runner = _RowRunner(spec, _worker_lm(lm_state, threads), adapter)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dspy-anyscale-row")

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch.to_pylist()  # a pyarrow Table: nulls stay None (numpy would make them NaN)
        return _columns(list(self.pool.map(self.runner, rows)), self.runner.spec.output_columns)


class _PoolWorker:
    """One actor of a :class:`ProgramPool`: the LM and threads live as long as the pool; programs come per run."""

    def __init__(self, lm_state: dict[str, Any], adapter: dspy.Adapter | None, threads: int) -> None:
        self.lm = _worker_lm(lm_state, threads)
        self.adapter = adapter
        self.rows = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dspy-anyscale-row")
        self._runners: dict[str, _RowRunner] = {}
        self._lock = threading.Lock()

    def ready(self) -> int:
        return os.getpid()

    def run_batch(self, run_id: str, spec_ref: list[Any], rows: Any) -> tuple[Any, dict[str, Any]]:
        """The batch's output block and its tally. ``spec_ref`` is ``[ObjectRef]``: nested, so Ray
        does not fetch and unpickle the program again for every batch of the run."""
        runner = self._runner(run_id, spec_ref[0])
        results = list(self.rows.map(runner, _as_rows(rows)))
        return _block(results, runner.spec.output_columns), _tally(results)

    def _runner(self, run_id: str, spec_ref: Any) -> _RowRunner:
        with self._lock:
            if run_id not in self._runners:
                # Only the current run's program is kept: an optimizer's old candidates are dropped.
                self._runners = {run_id: _RowRunner(ray.get(spec_ref), self.lm, self.adapter)}
            return self._runners[run_id]


# --- the warm pool (on the driver) ------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    index: int
    actor: Any
    ready_ref: Any | None  # set while the worker is starting
    started: float
    outstanding: int = 0
    alone: bool = False  # running a retried batch, with nothing else beside it
    dead: bool = False

    @property
    def up(self) -> bool:
        return not self.dead and self.ready_ref is None and not self.alone


class ProgramPool:
    """Ray actors started once and kept, to run DSPy programs many times without paying their start-up.

    ::

        import dspy, ray
        from dspy_anyscale import Anyscale
        from dspy_anyscale.ray import ProgramPool, evaluate, run_program

        ray.init()
        lm = Anyscale("meta-llama/Llama-2-70b-chat-hf", use_chat_api=True)
        with ProgramPool(lm=lm, adapter=dspy.JSONAdapter(), concurrency=4, threads_per_actor=8) as pool:
            results = run_program(qa, devset, pool=pool)              # start-up paid once, in ProgramPool()
            for candidate in candidates:                              # later runs start in milliseconds
                score, scored = evaluate(candidate, devset, metric, pool=pool)

    ``ProgramPool(...)`` starts ``concurrency`` actors and waits (up to ``start_timeout`` seconds)
    until each has imported DSPy and built its LM from ``lm.dump_state()``; each reads the key
    from its own environment, so a missing key fails here, with the worker's error. Each actor
    reserves ``num_cpus`` (it waits on the network) and runs rows on ``threads_per_actor``
    threads: at most ``concurrency * threads_per_actor`` requests are in flight.

    The pool owns the LM and the adapter: a run on it uses them, so omit ``lm=`` and ``adapter=``
    (passing the very same ones is accepted; different ones are refused with ``ConfigurationError``:
    build another pool for another LM). The program is not the pool's: each run sends the program
    as it is at that moment (new demos, new instructions), once, through the object store.

    Runs on one pool execute one after another. A worker that dies (its process crashed, its node
    went away) is replaced, at most ``max_restarts`` times over the pool's life, and the batches it
    was running are retried once, each alone on a worker; a batch whose worker died again gets an
    ``error`` in each of its rows (it is what killed them) and the run goes on. When no worker is
    left, the run raises :class:`PoolError` and the pool refuses further work. ``close()`` (or
    leaving the ``with`` block) stops the actors; it is idempotent, and a closed pool refuses work
    with :class:`PoolError`.
    """

    def __init__(
        self,
        *,
        lm: Anyscale,
        adapter: dspy.Adapter | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        threads_per_actor: int = DEFAULT_THREADS_PER_ACTOR,
        num_cpus: float = DEFAULT_NUM_CPUS,
        max_restarts: int = 3,
        start_timeout: float = 300.0,
    ) -> None:
        _check_lm(lm)
        _check_adapter(adapter)
        _check_positive_ints(concurrency=concurrency, threads_per_actor=threads_per_actor)
        _check_positive_number("num_cpus", num_cpus)
        _check_positive_number("start_timeout", start_timeout)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            _fail("max_restarts", "an int >= 0", max_restarts)
        self.lm, self.adapter = lm, adapter
        self.concurrency, self.threads_per_actor, self.num_cpus = concurrency, threads_per_actor, num_cpus
        self.max_restarts, self.start_timeout = max_restarts, float(start_timeout)
        self.restarts = 0  # workers replaced so far
        self._lm_state = lm.dump_state()
        self._closed: str | None = None  # why the pool refuses work, once it does
        self._lock = threading.Lock()
        self._worker_class = ray.remote(_PoolWorker).options(
            num_cpus=num_cpus, max_concurrency=BATCHES_PER_WORKER, max_restarts=0, max_task_retries=0
        )
        started = time.perf_counter()
        self._slots = [self._start(index) for index in range(concurrency)]
        # A run ends in ray.data.from_arrow_refs, whose metadata tasks need a Ray worker process:
        # start one now, while the actors import DSPy, rather than in the first run (~1.4 s).
        ray.data.from_arrow_refs([ray.put(_block([], ()))])
        self._await_start()
        logger.info("dspy_anyscale.ray: %r ready in %.2f s", self, time.perf_counter() - started)

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> ProgramPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        """Stop the actors (and their connection pools). Safe to call more than once."""
        self._shutdown("it was closed")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{sum(not s.dead for s in self._slots)} workers"
        return (
            f"ProgramPool(model={self.lm.model!r}, concurrency={self.concurrency}, "
            f"threads_per_actor={self.threads_per_actor}, {state})"
        )

    def _shutdown(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        for slot in self._slots:
            slot.dead = True
            _kill(slot.actor)

    def _check_open(self) -> None:
        if self._closed is not None:
            raise PoolError(f"this ProgramPool refuses work: {self._closed}. Start a new ProgramPool(...).")

    # --- workers -------------------------------------------------------------------------------------

    def _start(self, index: int) -> _Slot:
        actor = self._worker_class.remote(self._lm_state, self.adapter, self.threads_per_actor)
        return _Slot(index, actor, actor.ready.remote(), time.monotonic())

    def _await_start(self) -> None:
        """Wait for the first workers; any failure here is a configuration problem, so it is raised."""
        refs = [slot.ready_ref for slot in self._slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout)
        try:
            if len(ready) < len(refs):
                raise PoolError(
                    f"{len(refs) - len(ready)} of {len(refs)} pool workers did not start within "
                    f"{self.start_timeout:g} s: does the cluster have num_cpus={self.num_cpus:g} free per worker?"
                )
            for slot in self._slots:
                _get_ready(slot)
        except BaseException:
            self._shutdown("its workers did not start")
            raise

    def _starting(self) -> dict[Any, _Slot]:
        return {slot.ready_ref: slot for slot in self._slots if slot.ready_ref is not None and not slot.dead}

    def _on_started(self, slot: _Slot) -> None:
        try:
            _get_ready(slot)
        except PoolError as exc:
            self._worker_died(slot, slot.actor, exc)

    def _expire_starting(self) -> None:
        for slot in self._starting().values():
            if time.monotonic() - slot.started > self.start_timeout:
                self._worker_died(slot, slot.actor, PoolError(f"not started within {self.start_timeout:g} s"))

    def _worker_died(self, slot: _Slot, actor: Any, exc: BaseException) -> None:
        """Replace a dead worker (once per death: its other batches report the same death)."""
        if slot.dead or slot.actor is not actor or self.closed:
            return
        slot.dead = True
        _kill(actor)
        replace = self.restarts < self.max_restarts
        logger.warning(
            "dspy_anyscale.ray: pool worker %d died (%s); %s",
            slot.index,
            _first_line(exc),
            "starting a replacement" if replace else f"not replaced (max_restarts={self.max_restarts} used up)",
        )
        if replace:
            self.restarts += 1
            self._slots[slot.index] = self._start(slot.index)

    def _free_slot(self) -> _Slot | None:
        free = [slot for slot in self._slots if slot.up and slot.outstanding < BATCHES_PER_WORKER]
        return min(free, key=lambda slot: slot.outstanding) if free else None

    def _idle_slot(self) -> _Slot | None:
        return next((slot for slot in self._slots if slot.up and not slot.outstanding), None)

    # --- runs ----------------------------------------------------------------------------------------

    def _run(self, spec: _RunSpec, batches: Iterator[Any]) -> tuple[list[Any], _Tally]:
        with self._lock:  # one run at a time: each run's back-pressure counts on all the workers
            self._check_open()
            try:
                return _PoolRun(self, spec, batches).execute()
            except PoolError as exc:
                if not any(not slot.dead for slot in self._slots):
                    self._shutdown(f"all its workers died ({exc})")
                raise

    def _check_run_settings(self, lm: Any, adapter: Any, **settings: Any) -> None:
        """The rule for ``run_program(..., pool=pool)``: the pool's LM, adapter and sizes, or nothing."""
        if lm is not None and lm is not self.lm and (not isinstance(lm, Anyscale) or lm.dump_state() != self._lm_state):
            raise ConfigurationError(
                f"lm: this pool's workers run {self.lm!r}; omit lm= with pool= (or pass that same LM). "
                "For another LM, start another ProgramPool(lm=...)."
            )
        if adapter is not None and not _same_adapter(adapter, self.adapter):
            raise ConfigurationError(
                f"adapter: this pool's workers use {self.adapter!r}; omit adapter= with pool= (or pass that same "
                "adapter). For another adapter, start another ProgramPool(adapter=...)."
            )
        for name, value in settings.items():
            if value is not None and value != getattr(self, name):
                raise ConfigurationError(
                    f"{name}={value!r}: with pool= the pool's {name}={getattr(self, name)!r} applies; omit it"
                )


@dataclass(eq=False)
class _Batch:
    rows: Any  # a list of dicts or a pyarrow Table
    ref: Any = None  # put once, so a retry does not send the rows again
    attempts: int = 0


@dataclass(eq=False)
class _Task:
    batch: _Batch
    slot: _Slot
    actor: Any
    block_ref: Any


class _PoolRun:
    """One run on a pool: hands batches to free workers, collects the result blocks as they complete."""

    def __init__(self, pool: ProgramPool, spec: _RunSpec, batches: Iterator[Any]) -> None:
        self.pool, self.spec, self.batches = pool, spec, batches
        self.run_id = uuid.uuid4().hex
        self.spec_ref = [ray.put(spec)]  # the program travels once per run, not once per batch
        self.retries: deque[_Batch] = deque()
        self.pending: dict[Any, _Task] = {}  # tally ref -> task
        self.blocks: list[Any] = []
        self.tally = _Tally()
        self.more = True  # batches left in the input

    def execute(self) -> tuple[list[Any], _Tally]:
        try:
            return self._loop()
        except BaseException:
            self._cancel()  # Ctrl-C or a failed run: leave the workers free for the next one
            raise

    def _loop(self) -> tuple[list[Any], _Tally]:
        while True:
            self.pool._check_open()  # closed from another thread while this run waited
            self._submit()
            if not self.pending and not self.retries and not self.more:
                return self.blocks, self.tally
            starting = self.pool._starting()
            if not self.pending and not starting:
                raise PoolError("no pool worker is left to run the remaining rows (every worker died)")
            done, _ = ray.wait([*self.pending, *starting], num_returns=1, timeout=_POLL_SECONDS)
            for ref in done:
                if ref in self.pending:
                    self._collect(ref)
                else:
                    self.pool._on_started(starting[ref])
            self.pool._expire_starting()

    def _cancel(self) -> None:
        for ref in self.pending:
            try:
                ray.cancel(ref)
            except Exception:  # a task that just finished, a worker already gone: nothing to cancel
                logger.debug("dspy_anyscale.ray: could not cancel %s", ref, exc_info=True)

    def _submit(self) -> None:
        while True:
            if self.retries:
                # A batch whose worker died runs again alone on an idle worker: if that worker dies
                # too, this batch killed it, not a batch beside it. New batches wait meanwhile.
                if (slot := self.pool._idle_slot()) is None:
                    return
                self._send(self.retries.popleft(), slot, alone=True)
            elif (slot := self.pool._free_slot()) is not None and (batch := self._next_batch()) is not None:
                self._send(batch, slot, alone=False)
            else:
                return

    def _send(self, batch: _Batch, slot: _Slot, *, alone: bool) -> None:
        batch.attempts += 1
        if batch.ref is None:
            batch.ref = ray.put(batch.rows)
        call = slot.actor.run_batch.options(num_returns=2)
        block_ref, tally_ref = call.remote(self.run_id, self.spec_ref, batch.ref)
        self.pending[tally_ref] = _Task(batch, slot, slot.actor, block_ref)
        slot.outstanding += 1
        slot.alone = alone

    def _next_batch(self) -> _Batch | None:
        if self.more:
            rows = next(self.batches, None)
            if rows is not None:
                return _Batch(rows)
            self.more = False
        return None

    def _collect(self, ref: Any) -> None:
        task = self.pending.pop(ref)
        if task.slot.actor is task.actor:
            task.slot.outstanding -= 1
            task.slot.alone = False
        try:
            self.tally.add(ray.get(ref))
            self.blocks.append(task.block_ref)
        except (RayActorError, ActorUnschedulableError) as exc:
            self.pool._worker_died(task.slot, task.actor, exc)
            self._retry_or_fail(task.batch, exc)
        except RayError as exc:  # not a row's failure (those are caught in the row): the run cannot go on
            raise PoolError(f"a batch failed on pool worker {task.slot.index}: {_first_line(exc)}") from exc

    def _retry_or_fail(self, batch: _Batch, exc: BaseException) -> None:
        if batch.attempts < 2:
            self.retries.append(batch)
            return
        # Twice is enough: a row that kills its worker would kill every replacement.
        error = f"{type(exc).__name__}: the pool worker running this row's batch died (twice); see Ray's logs"
        rows = [{**row, **_failure(error, self.spec), "latency_ms": None} for row in _as_rows(batch.rows)]
        self.tally.add(_tally(rows))
        self.blocks.append(ray.put(_block(rows, self.spec.output_columns)))


def _get_ready(slot: _Slot) -> None:
    """The worker's start-up result; a failure (the LM could not be built, ...) as a PoolError."""
    try:
        ray.get(slot.ready_ref)
    except RayError as exc:
        raise PoolError(
            f"pool worker {slot.index} failed to start: {_first_line(exc, last=True)} (a worker builds its LM from "
            "lm.dump_state() and reads ANYSCALE_API_KEY from its own environment: set it before ray.init(), "
            "or in a runtime_env)"
        ) from exc
    slot.ready_ref = None


def _kill(actor: Any) -> None:
    if ray.is_initialized():
        ray.kill(actor, no_restart=True)


def _same_adapter(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and vars(a) == vars(b))


# --- public functions --------------------------------------------------------------------------------


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
    **run_options: Any,
) -> tuple[float, Dataset]:
    """``dspy.Evaluate`` over a Ray Dataset: (score in percent, the per-row results with ``score``).

    ::

        score, scored = evaluate(qa, devset, metric, lm=lm, concurrency=4)
        with ProgramPool(lm=lm) as pool:
            scores = [evaluate(candidate, devset, metric, pool=pool)[0] for candidate in candidates]

    The score is computed as ``dspy.Evaluate`` computes it: ``round(100 * sum(scores) / rows, 2)``,
    with ``failure_score`` for a row whose program raised. ``run_options`` are
    :func:`run_program`'s (``adapter``, ``concurrency``, ``batch_size``, ...).
    """
    if not callable(metric):
        _fail("metric", "a callable metric(example, prediction, trace=None)", metric)
    unknown = sorted(set(run_options) - _RUN_OPTIONS)
    if unknown:
        raise TypeError(
            f"evaluate() got unexpected keyword arguments {unknown}; run_program's are {sorted(_RUN_OPTIONS)}"
        )
    options = {"lm": lm, "input_keys": input_keys, "failure_score": failure_score, "pool": pool, **run_options}
    results, tally = _run(program, dataset, metric=metric, **options)
    if tally is not None:  # a pool run counted as it went: no second pass over the results
        return (round(100 * tally.score / tally.rows, 2) if tally.rows else 0.0), results
    rows = results.count()
    return (round(100 * results.sum("score") / rows, 2) if rows else 0.0), results


def summarize_run(results: Dataset, *, seconds: float | None = None) -> RunSummary:
    """Rows, errors, tokens, cost (None if a row's cost is unknown) and, for :func:`evaluate`, the score.

    ::

        print(summarize_run(run_program(qa, devset, lm=lm)))
        # 500 rows, 0 errors, 150000 prompt + 11500 completion tokens, $0.161500

    One pass over the few columns it needs, batch by batch: fine for a dataset of any size.
    """
    if not isinstance(results, ray.data.Dataset):
        _fail("results", "the ray.data.Dataset that run_program or evaluate returned", results)
    if seconds is not None and (not _is_number(seconds) or seconds < 0):
        _fail("seconds", "None or a number of seconds >= 0", seconds)
    columns = ["error", "prompt_tokens", "completion_tokens", "cost_usd"]
    known = results.columns(fetch_if_missing=False)  # a lazy dataset's columns are checked as it runs
    missing = [name for name in columns if known is not None and name not in known]
    if missing:
        raise ConfigurationError(
            f"results must come from run_program or evaluate: it has no {', '.join(missing)} column(s)"
        )
    scored = "score" in (results.columns() or ())
    tally = _Tally()
    for batch in results.select_columns([*columns, "score"] if scored else columns).iter_batches(
        batch_format="pyarrow"
    ):
        tally.add(_tally(batch.to_pylist()))
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
) -> tuple[Dataset, _Tally | None]:
    """Check every argument (no Ray work before that), then run; a pool run also returns its tally."""
    sizes = {"concurrency": concurrency, "threads_per_actor": threads_per_actor, "num_cpus": num_cpus}
    _check_run_arguments(program, lm, adapter, pool, sizes, batch_size, materialize, metric, failure_score)
    inputs = _inputs(dataset, input_keys)
    spec = _RunSpec(program, tuple(inputs.keys), tuple(_output_columns(program, metric)), metric, float(failure_score))
    if pool is not None:
        return _run_on_pool(pool, inputs, spec, batch_size)
    return _run_on_ray_data(inputs, spec, lm, adapter, batch_size, materialize, **sizes), None


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
    _check_program(program)
    _check_adapter(adapter)
    _check_positive_ints(batch_size=batch_size)
    _check_optional(**sizes)
    if not isinstance(materialize, bool):
        _fail("materialize", "True or False", materialize)
    if metric is not None and not callable(metric):
        _fail("metric", "None or a callable metric(example, prediction, trace=None)", metric)
    if not _is_number(failure_score):
        _fail("failure_score", "a number (the score of a row whose program raised)", failure_score)
    if pool is not None:
        if not isinstance(pool, ProgramPool):
            _fail("pool", "a ProgramPool (or None)", pool)
        pool._check_run_settings(lm, adapter, **sizes)
    else:
        _check_lm(lm)


def _run_on_pool(pool: ProgramPool, inputs: _Inputs, spec: _RunSpec, batch_size: int) -> tuple[Dataset, _Tally]:
    started = time.perf_counter()
    blocks, tally = pool._run(spec, inputs.batches(batch_size))
    # from_arrow_refs keeps the blocks where the workers stored them: nothing comes through the driver.
    results = ray.data.from_arrow_refs(blocks) if blocks else ray.data.from_arrow(_block([], spec.output_columns))
    summary = tally.summary(seconds=time.perf_counter() - started, scored=spec.metric is not None)
    logger.info("dspy_anyscale.ray: %s", summary)
    return results, tally


def _run_on_ray_data(
    inputs: _Inputs,
    spec: _RunSpec,
    lm: Anyscale,
    adapter: dspy.Adapter | None,
    batch_size: int,
    materialize: bool,
    *,
    concurrency: int | None,
    threads_per_actor: int | None,
    num_cpus: float | None,
) -> Dataset:
    """Today's path: a Ray Data actor pool built for this run (each actor imports DSPy: seconds)."""
    threads = threads_per_actor or DEFAULT_THREADS_PER_ACTOR
    started = time.perf_counter()
    results = inputs.dataset().map_batches(
        _ProgramActor,
        fn_constructor_kwargs={"spec": spec, "lm_state": lm.dump_state(), "adapter": adapter, "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=concurrency or DEFAULT_CONCURRENCY),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=DEFAULT_NUM_CPUS if num_cpus is None else num_cpus,
    )
    if not materialize:
        return results
    results = results.materialize()
    logger.info("dspy_anyscale.ray: %s", summarize_run(results, seconds=time.perf_counter() - started))
    return results


# --- inputs --------------------------------------------------------------------------------------


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
    rows = [dict(item.toDict() if isinstance(item, dspy.Example) else item) for item in items]
    if input_keys is None:
        declared = [set(i.inputs().keys()) for i in items if isinstance(i, dspy.Example) and i._input_keys]
        if not declared:
            _require_input_keys()
        input_keys = sorted(set.union(*declared))
    columns = set().union(*(row.keys() for row in rows)) if rows else None
    return _Inputs(_check_input_keys(input_keys, columns), rows=rows)


def _items(dataset: Any) -> list[Any]:
    expected = "a ray.data.Dataset or an iterable (list, generator) of dicts or dspy.Example"
    if hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # a DataFrame iterates over its column names
        _fail("dataset", f"{expected} (for a pandas DataFrame: ray.data.from_pandas(df))", dataset)
    if isinstance(dataset, str | bytes | Mapping | dspy.Example) or not isinstance(dataset, Iterable):
        _fail("dataset", expected, dataset)
    items = list(dataset)
    for index, item in enumerate(items):
        if not isinstance(item, Mapping | dspy.Example):
            _fail(f"dataset[{index}]", "a dict or a dspy.Example", item)
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
        _fail("input_keys", "a non-empty list of column names, such as ['question']", keys, show=True)
    if columns is not None:
        known = set(columns)
        missing = [key for key in keys if key not in known]
        if missing:
            raise ConfigurationError(
                f"input_keys names {', '.join(map(repr, missing))}, not a column of the dataset "
                f"(its columns: {', '.join(map(repr, sorted(known)))})"
            )
    return list(keys)


# --- argument checks: each names the parameter and what it takes ------------------------------------


def _fail(name: str, expected: str, value: Any, *, show: bool = False) -> NoReturn:
    # Objects are described by type only: a value could be a key passed in the wrong place.
    shown = f"{type(value).__name__} {reprlib.repr(value)}" if show else type(value).__name__
    raise ConfigurationError(f"{name} must be {expected}, got {shown}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_program(program: Any) -> None:
    if not isinstance(program, dspy.Module):
        _fail("program", "a dspy.Module (dspy.Predict(...), dspy.ChainOfThought(...), your own Module)", program)


def _check_lm(lm: Any) -> None:
    if not isinstance(lm, Anyscale):
        _fail("lm", "a dspy_anyscale.Anyscale (each worker rebuilds it from lm.dump_state())", lm)


def _check_adapter(adapter: Any) -> None:
    if adapter is not None and not isinstance(adapter, dspy.Adapter):
        _fail("adapter", "None or a dspy.Adapter, such as dspy.JSONAdapter()", adapter)


def _check_positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(name, "a positive int", value, show=True)


def _check_positive_number(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        _fail(name, "a positive number", value, show=True)


def _check_optional(*, concurrency: Any, threads_per_actor: Any, num_cpus: Any) -> None:
    ints = {"concurrency": concurrency, "threads_per_actor": threads_per_actor}
    _check_positive_ints(**{name: value for name, value in ints.items() if value is not None})
    if num_cpus is not None:
        _check_positive_number("num_cpus", num_cpus)


# --- results -------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Running totals of a run's rows; workers send one per batch, so a summary needs no second pass."""

    rows: int = 0
    errors: int = 0
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
        )


def _tally(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "rows": len(rows),
        "errors": sum(row["error"] is not None for row in rows),
        "prompt_tokens": sum(row["prompt_tokens"] or 0 for row in rows),
        "completion_tokens": sum(row["completion_tokens"] or 0 for row in rows),
        "cost_usd": sum(row["cost_usd"] or 0.0 for row in rows),
        "unknown_cost": sum(row["cost_usd"] is None for row in rows),
        "score": sum(row.get("score") or 0.0 for row in rows),
    }


def _failure(message: str, spec: _RunSpec) -> dict[str, Any]:
    failed: dict[str, Any] = {"error": message, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    if spec.metric is not None:
        failed["score"] = spec.failure_score
    return failed


def _block(rows: list[dict[str, Any]], always: Sequence[str]) -> Any:
    """An Arrow block, converted as Ray Data converts a ``map_batches`` output."""
    return BlockAccessor.batch_to_block(_columns(rows, always))


def _as_rows(rows: Any) -> list[dict[str, Any]]:
    # A pyarrow Table: nulls stay None (numpy would make them NaN).
    return rows.to_pylist() if hasattr(rows, "to_pylist") else list(rows)


def _first_line(exc: BaseException, *, last: bool = False) -> str:
    """Ray's errors run over many lines (tracebacks, ids); a log line or a message needs one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if last else lines[0]


def _output_columns(program: dspy.Module, metric: Metric | None) -> list[str]:
    """Columns every output batch has, even one whose rows all failed: the last predictor's outputs."""
    predictors = program.predictors()
    fields = list(predictors[-1].signature.output_fields) if predictors else []
    return [PREDICTION_PREFIX + name for name in fields] + list(USAGE_COLUMNS) + (["score"] if metric else [])


def _columns(rows: list[dict[str, Any]], always: Sequence[str]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys([*(key for row in rows for key in row), *always]))  # failed rows lack pred_ fields
    return {key: [row.get(key) for row in rows] for key in keys}


def _example(row: Mapping[str, Any], input_keys: Sequence[str]) -> dspy.Example:
    return dspy.Example(**row).with_inputs(*input_keys)


def _plain(value: Any) -> Any:
    """A value Arrow can store: primitives as they are, anything else as JSON text."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    try:
        return json.dumps(value.model_dump() if hasattr(value, "model_dump") else value, default=str)
    except (TypeError, ValueError):
        return str(value)


__all__ = ["PoolError", "ProgramPool", "RunSummary", "evaluate", "run_program", "summarize_run"]
