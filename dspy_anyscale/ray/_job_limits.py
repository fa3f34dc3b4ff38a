"""A job's limits on Ray: one ledger, in one Ray actor, that every worker's LM reserves from.

Where a run's ledger comes from, in the order it is looked for:

1. limits given to the run (``run_program(..., limits=Limits(budget_usd=...))``): a new ledger for
   this run, stopped when the run has executed;
2. limits given to a :class:`ProgramPool` (``ProgramPool(lm=..., limits=Limits(budget_usd=...))``):
   one ledger for every run on the pool, stopped when the pool is closed;
3. limits of the LM itself (``Anyscale(..., budget_usd=...)``): the LM's own ledger moves into a
   Ray actor (``Limiter.share_on_ray``) for the job, so the driver's LM keeps counting against it
   and ``lm.spending()`` covers what the workers spent. When the job is over (a materialised run
   has executed, a pool is closed) it comes home (``Limiter.bring_home``): the counts go back
   into the driver and the actor stops, so the LM goes on after ``ray.shutdown()``. Jobs that
   overlap share one move: the last to finish brings it home. A lazy run
   (``materialize=False``) may execute again later, so its ledger stays in Ray until
   ``lm.limiter.bring_home()``. A ledger the user shared on Ray themselves stays where it is.

One request counts against one ledger, so limits are given in one place: a run's limits on a
pool (or an LM) that has limits of its own are refused, as are a pool's on an LM that has some.
``max_concurrency`` is refused for a job: the limiter's gate holds in one process, and a job's
requests in flight are already bounded by ``concurrency x threads_per_actor``.

The arguments are checked before any Ray work, with every other argument check
(``_validate.job_limits`` and ``_validate.check_job_limits``).
"""

from __future__ import annotations

import logging
import threading

from .. import _constants as C
from ..anyscale import Anyscale
from ..limits import AnyLimiter, Limiter, Limits, SpendReport
from ..limits._ray import RayLedger, first_line
from ..router import Router
from ..runs.budget import BUDGET_ERROR, budget_refusal, used_up

__all__ = [
    "BUDGET_ERROR",
    "budget_refusal",
    "flush",
    "on_the_lm_or_here",
    "return_lm_ledger",
    "share_lm_ledger",
    "start_ledger",
    "stop_ledger",
    "used_up",
    "without_limits",
]

logger = logging.getLogger(C.LOGGER_NAME)


def on_the_lm_or_here(limiter: AnyLimiter) -> str:
    return f"on the lm (every worker then shares its ledger), or here, with an lm without: {without_limits(limiter)}"


def without_limits(limiter: AnyLimiter) -> str:
    """``lm.copy(...)`` that gives the same LM without its limits, for messages."""
    return f"lm.copy({', '.join(f'{name}=None' for name in limiter.limits.as_kwargs())})"


def start_ledger(limits: Limits | None) -> Limiter | None:
    """A new ledger in a Ray actor for ``limits`` (None for none). The actor starts while the workers do."""
    if limits is None:
        return None
    limiter = Limiter(limits)
    limiter.share_on_ray()
    return limiter


# LM limiters whose ledger a job moved into Ray, and how many jobs hold it there.
_lent: dict[Limiter, int] = {}
_lent_lock = threading.Lock()


def share_lm_ledger(lm: Anyscale | Router) -> Limiter | None:
    """The LM's own limiter with its ledger in a Ray actor for a job, or None if it has no limits.

    The driver's LM keeps it: its own calls and ``lm.spending()`` go to the same ledger as the
    workers'. Each call is one hold; ``return_lm_ledger`` gives it back when the job is over.
    """
    limiter = lm.limiter
    if not isinstance(limiter, Limiter):
        return None
    with _lent_lock:
        if not isinstance(limiter.backend, RayLedger):
            limiter.share_on_ray()
            _lent[limiter] = 0
        if limiter in _lent:  # else the user shared it on Ray: it stays where they put it
            _lent[limiter] += 1
    return limiter


def return_lm_ledger(limiter: Limiter | None) -> None:
    """A job holding the LM's ledger is over: the last one brings the ledger home. Never raises:
    a ledger that cannot move (requests in flight in the driver, Ray gone) stays in Ray, and says
    so if it is used after Ray has gone."""
    if limiter is None:
        return
    with _lent_lock:  # held while moving: a job starting now waits, then moves it out again
        if limiter not in _lent:
            return
        _lent[limiter] -= 1
        if _lent[limiter] > 0:
            return
        del _lent[limiter]
        try:
            limiter.bring_home()
        except Exception as exc:
            logger.warning(
                "dspy_anyscale.ray: the lm's ledger stays in its Ray actor (%s); call lm.limiter.bring_home() "
                "before ray.shutdown() to keep using the lm with its counts",
                first_line(exc),
            )


def stop_ledger(limiter: Limiter | None) -> SpendReport | None:
    """The final report of a ledger this package started, then its actor stopped. Never raises."""
    if limiter is None:
        return None
    report = None
    try:
        report = limiter.report()
    except Exception:  # the actor died with its node, Ray was shut down: there is nothing left to report
        logger.debug("dspy_anyscale.ray: could not read the job's ledger", exc_info=True)
    backend = limiter.backend
    if isinstance(backend, RayLedger):
        backend.stop()
    return report


def flush(limiter: AnyLimiter | None) -> None:
    """Wait until the ledger has applied every settlement this process sent it (a Ray ledger sends
    them without waiting): a batch's spending is on the ledger before its results are."""
    backend = getattr(limiter, "backend", None)
    if backend is not None and hasattr(backend, "flush"):
        backend.flush()


# --- in a worker: a refusal, and whether the cap behind it is used up: dspy_anyscale.runs.budget, shared
# with the local runner (these names stay importable from here).
