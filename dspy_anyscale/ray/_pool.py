"""The warm pool: Ray actors started once and kept, each run sending only its program and rows."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dspy
from ray.exceptions import ActorUnschedulableError, ObjectLostError, RayActorError, RayError

from .. import _constants as C
from .._validate import check_job_limits, check_pool_arguments
from ..anyscale import Anyscale
from ..errors import PoolError
from ..limits import AnyLimiter, Limiter, Limits, SpendReport
from ..limits._config import job_limits
from ..limits._ray import first_line
from ..router import Router
from ..runs.rows import RunSpec, Tally, failed_row, tally_of
from ._job_limits import on_the_lm_or_here, return_lm_ledger, share_lm_ledger, start_ledger, stop_ledger
from ._ray import ray
from ._rows import PoolWorker, as_rows, to_block

logger = logging.getLogger(C.LOGGER_NAME)


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

    Limits for every run on the pool (an optimisation loop's whole budget):
    ``limits=Limits(budget_usd=..., max_requests=..., requests_per_minute=..., tokens_per_minute=...)``
    (``Anyscale``'s limits, ``from dspy_anyscale.limits import Limits``), held by one ledger in a
    Ray actor that every worker's LM reserves from, from the first run to ``close()``;
    ``pool.spending()`` reports it (after ``close()`` too: its last report). An ``lm`` with limits
    of its own keeps them instead: its ledger moves into a Ray actor that the workers and the
    driver's ``lm`` share, and back into the driver at ``close()`` (so the ``lm`` goes on after
    ``ray.shutdown()``). A run on a pool without either may have limits of its own
    (``run_program(..., pool=pool, limits=Limits(budget_usd=...))``): a ledger for that run only.
    A run that uses its cap up stops sending; the rows left are errors, unrun (see
    :func:`run_program`). ``max_concurrency`` is refused: at most ``concurrency *
    threads_per_actor`` requests are in flight already. The five limits as keywords
    (``ProgramPool(..., budget_usd=...)``) are deprecated, accepted for one release.
    """

    def __init__(
        self,
        *,
        lm: Anyscale | Router,
        adapter: dspy.Adapter | None = None,
        concurrency: int = C.RAY_DEFAULT_CONCURRENCY,
        threads_per_actor: int = C.RAY_DEFAULT_THREADS_PER_ACTOR,
        num_cpus: float = C.RAY_DEFAULT_NUM_CPUS,
        max_restarts: int = C.RAY_POOL_MAX_RESTARTS,
        start_timeout: float = C.RAY_POOL_START_TIMEOUT_S,
        limits: Limits | None = None,
        **legacy_limits: Any,
    ) -> None:
        given = job_limits(limits, legacy_limits, where="ProgramPool")
        check_pool_arguments(
            lm=lm,
            adapter=adapter,
            concurrency=concurrency,
            threads_per_actor=threads_per_actor,
            num_cpus=num_cpus,
            max_restarts=max_restarts,
            start_timeout=start_timeout,
            anyscale=(Anyscale, Router),
        )
        own_limits = check_job_limits(
            given,
            lm=lm,
            where="a ProgramPool",
            sizes=(concurrency, threads_per_actor),
            existing=lm.limiter,
            hint=on_the_lm_or_here(lm.limiter),
        )
        # --- Ray work from here on.
        self.limits: Limits | None = own_limits  # the pool's own limits (None: none given to ProgramPool)
        self._own_ledger = start_ledger(own_limits)  # started while the workers start
        self._final_report: SpendReport | None = None  # the pool's ledger's last report, once stopped
        # The LM's own ledger, moved into Ray while the pool is open; home again at close().
        self._lent = None if self._own_ledger is not None else share_lm_ledger(lm)
        self._worker_limiter: Limiter | None = self._own_ledger or self._lent
        self.lm, self.adapter = lm, adapter
        self.concurrency, self.threads_per_actor, self.num_cpus = concurrency, threads_per_actor, num_cpus
        self.max_restarts, self.start_timeout = max_restarts, float(start_timeout)
        self.restarts = 0  # workers replaced so far
        self._lm_state = lm.dump_state()  # what the workers build their LM from
        self._closed: str | None = None  # why the pool refuses work, once it does
        self._lock = threading.Lock()
        self._worker_class = ray.remote(PoolWorker).options(
            num_cpus=num_cpus, max_concurrency=C.RAY_POOL_BATCHES_PER_WORKER, max_restarts=0, max_task_retries=0
        )
        started = time.perf_counter()
        self._slots: list[_Slot] = []
        try:
            self._slots = [self._start(index) for index in range(concurrency)]
            # A run ends in ray.data.from_arrow_refs, whose metadata tasks need a Ray worker process:
            # start one now, while the actors import DSPy, rather than in the first run (~1.4 s).
            ray.data.from_arrow_refs([ray.put(to_block([], ()))])
        except BaseException:
            self._shutdown("its workers did not start")
            raise
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
        """Stop the actors (and their connection pools), and the pool's ledger. Safe to call more than once."""
        self._shutdown("it was closed")

    @property
    def limiter(self) -> AnyLimiter:
        """What every run on the pool counts against: the pool's limits, else its LM's (both may have none)."""
        return self._worker_limiter if self._worker_limiter is not None else self.lm.limiter

    def spending(self) -> SpendReport:
        """The pool's ledger (every run on it so far; its LM's when the limits are the LM's): spent, left, refused."""
        if self._final_report is not None:
            return self._final_report
        return self.limiter.report()

    def _report_if_limited(self) -> SpendReport | None:
        return self.spending() if self.limiter.enabled else None

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
        if self._own_ledger is not None:
            self._final_report = stop_ledger(self._own_ledger)
            self._own_ledger = None
        if self._lent is not None:  # the LM's own ledger comes home: the driver's LM goes on with it
            return_lm_ledger(self._lent)
            self._lent = None

    def _check_open(self) -> None:
        if self._closed is not None:
            raise PoolError(f"this ProgramPool refuses work: {self._closed}. Start a new ProgramPool(...).")

    # --- workers -------------------------------------------------------------------------------------

    def _start(self, index: int) -> _Slot:
        actor = self._worker_class.remote(self._lm_state, self.adapter, self.threads_per_actor, self._worker_limiter)
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
            first_line(exc),
            "starting a replacement" if replace else f"not replaced (max_restarts={self.max_restarts} used up)",
        )
        if replace:
            self.restarts += 1
            self._slots[slot.index] = self._start(slot.index)

    def _free_slot(self) -> _Slot | None:
        free = [slot for slot in self._slots if slot.up and slot.outstanding < C.RAY_POOL_BATCHES_PER_WORKER]
        return min(free, key=lambda slot: slot.outstanding) if free else None

    def _idle_slot(self) -> _Slot | None:
        return next((slot for slot in self._slots if slot.up and not slot.outstanding), None)

    # --- runs ----------------------------------------------------------------------------------------

    def _run(
        self,
        spec: RunSpec,
        batches: Iterator[Any],
        on_batch: OnBatch | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[list[Any], Tally]:
        with self._lock:  # one run at a time: each run's back-pressure counts on all the workers
            self._check_open()
            try:
                return _PoolRun(self, spec, batches, on_batch, should_stop).execute()
            except PoolError as exc:
                if not any(not slot.dead for slot in self._slots):
                    self._shutdown(f"all its workers died ({exc})")
                raise


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


# Told of each batch's result block as it reaches the driver (a long run writes it), with its tally.
OnBatch = Callable[[Any, Mapping[str, Any]], None]


class _PoolRun:
    """One run on a pool: hands batches to free workers, collects the result blocks as they complete.

    ``on_batch`` is called once per batch that completes (a batch retried after its worker died is
    reported once, when its retry completes). ``should_stop`` (a Ctrl-C) stops sending batches; the
    run then waits up to ``RUNS_INTERRUPT_WAIT_S`` for those in flight and returns what it has.
    """

    def __init__(
        self,
        pool: ProgramPool,
        spec: RunSpec,
        batches: Iterator[Any],
        on_batch: OnBatch | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.pool, self.spec, self.batches = pool, spec, batches
        self.on_batch, self.should_stop = on_batch, should_stop
        self.stopping: float | None = None  # when should_stop first said so
        self.run_id = uuid.uuid4().hex
        self.spec_ref = [ray.put(spec)]  # the program travels once per run, not once per batch
        self.retries: deque[_Batch] = deque()
        self.pending: dict[Any, _Task] = {}  # tally ref -> task
        self.blocks: list[Any] = []
        self.tally = Tally()
        self.more = True  # batches left in the input

    def execute(self) -> tuple[list[Any], Tally]:
        try:
            return self._loop()
        except BaseException:
            self._cancel()  # Ctrl-C or a failed run: leave the workers free for the next one
            raise

    def _loop(self) -> tuple[list[Any], Tally]:
        while True:
            self.pool._check_open()  # closed from another thread while this run waited
            if self._stopped():
                return self.blocks, self.tally
            self._submit()
            if not self.pending and not self.retries and not self.more:
                return self.blocks, self.tally
            starting = self.pool._starting()
            if not self.pending and not starting:
                raise PoolError("no pool worker is left to run the remaining rows (every worker died)")
            done, _ = ray.wait([*self.pending, *starting], num_returns=1, timeout=C.RAY_POOL_POLL_S)
            for ref in done:
                if ref in self.pending:
                    self._collect(ref)
                else:
                    self.pool._on_started(starting[ref])
            self.pool._expire_starting()

    def _stopped(self) -> bool:
        """Asked to stop: no batch is sent any more; True once those in flight are back or the wait is over."""
        if self.stopping is None and self.should_stop is not None and self.should_stop():
            self.stopping = time.monotonic()
            self.more = False
            self.retries.clear()  # a dead worker's batch: left to the resumed run
        if self.stopping is None:
            return False
        if not self.pending:
            return True
        if time.monotonic() - self.stopping > C.RUNS_INTERRUPT_WAIT_S:
            self._cancel()
            return True
        return False

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
            counts = ray.get(ref)
            if self.on_batch is not None:  # before counting it: a block lost with its worker is run again
                self.on_batch(task.block_ref, counts)
        except (RayActorError, ActorUnschedulableError, ObjectLostError) as exc:  # its block lost with its node too
            self.pool._worker_died(task.slot, task.actor, exc)
            self._retry_or_fail(task.batch, exc)
        except RayError as exc:  # not a row's failure (those are caught in the row): the run cannot go on
            raise PoolError(f"a batch failed on pool worker {task.slot.index}: {first_line(exc)}") from exc
        else:
            self.tally.add(counts)
            self.blocks.append(task.block_ref)

    def _retry_or_fail(self, batch: _Batch, exc: BaseException) -> None:
        if batch.attempts < 2:
            self.retries.append(batch)
            return
        # Twice is enough: a row that kills its worker would kill every replacement.
        error = f"{type(exc).__name__}: the pool worker running this row's batch died (twice); see Ray's logs"
        rows = [{**row, **failed_row(error, self.spec), "latency_ms": None} for row in as_rows(batch.rows)]
        counts = tally_of(rows)
        self.tally.add(counts)
        self.blocks.append(ray.put(to_block(rows, self.spec.output_columns)))
        if self.on_batch is not None:
            self.on_batch(self.blocks[-1], counts)


def _get_ready(slot: _Slot) -> None:
    """The worker's start-up result; a failure (the LM could not be built, ...) as a PoolError."""
    try:
        ray.get(slot.ready_ref)
    except RayError as exc:
        raise PoolError(
            f"pool worker {slot.index} failed to start: {first_line(exc, last=True)} (a worker builds its LM from "
            "lm.dump_state() and reads ANYSCALE_API_KEY from its own environment: set it before ray.init(), "
            "or in a runtime_env)"
        ) from exc
    slot.ready_ref = None


def _kill(actor: Any) -> None:
    if ray.is_initialized():
        ray.kill(actor, no_restart=True)
