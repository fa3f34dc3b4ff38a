"""Run a DSPy program over a Ray Dataset: ``pip install 'dspy-anyscale[ray]'``.

    import ray
    from dspy_anyscale.ray import Limits, ProgramPool, evaluate, run_program, summarize_run

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
are retried by DSPy as everywhere else. A row that fails (its program raised anything, even
``SystemExit``) gets an ``error`` string, never stops the job, and is counted. Arrow holds one
type per column: a column of the rows that mixes types is turned into text, with a warning.

Output rows: the input row's columns, the prediction's fields as ``pred_<field>``, ``error``
(None or ``"<ErrorClass>: message"``), ``prompt_tokens``, ``completion_tokens``, ``cost_usd``,
``latency_ms`` and ``usage_by_module`` (the row's usage per DSPy module, as JSON text, summed by
``summarize_run(results, by="module")``) (and ``score`` from :func:`evaluate`), in completion order.

Limits for the whole job, ``limits=Limits(budget_usd=..., max_requests=..., requests_per_minute=...,
tokens_per_minute=...)`` (``Anyscale``'s limits as one value), go to ``run_program`` / ``evaluate``
(one run) or to ``ProgramPool`` (every run on the pool); the five as keywords (``budget_usd=...``)
are deprecated, still taken for one release. They are kept by one ledger in one Ray actor that
every worker's LM reserves from; an ``lm`` with limits of its own has its ledger moved into such
an actor for the job, never copied into each worker, and back into the driver when the job is
over (so the ``lm`` goes on after ``ray.shutdown()``). A row whose request does not fit fails with
``BudgetExceededError`` (nothing sent); once a cap is used up the run stops sending, and the rows
left fail at once. ``max_concurrency`` is refused for a job (a per-process limit):
``concurrency * threads_per_actor`` bounds what is in flight.

Wrong arguments (types, values, input keys missing from the data, limits that cannot hold)
raise :class:`~dspy_anyscale.errors.ConfigurationError` before any Ray work starts.
"""

from __future__ import annotations

from ..errors import PoolError
from ..limits import Limits
from ..runs.rows import RunSummary
from ._pool import ProgramPool
from ._run import evaluate, run_program, summarize_run

__all__ = ["Limits", "PoolError", "ProgramPool", "RunSummary", "evaluate", "run_program", "summarize_run"]
