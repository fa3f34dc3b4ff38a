"""Long runs that survive: output written as rows finish, resume after a crash, progress, Ctrl-C.

    import dspy_anyscale

    result = dspy_anyscale.run_program(qa, devset, lm=lm, output="results.jsonl")           # threads
    result = dspy_anyscale.run_program(qa, devset, lm=lm, output="results.jsonl", resume=True)
    score, result = dspy_anyscale.evaluate(qa, devset, metric, lm=lm, output="scored.jsonl")

The same options (``output=``, ``resume=``, ``retry_errors=``, ``progress=``, ``id_column=``) on
``dspy_anyscale.ray.run_program`` / ``evaluate``. One module per job: ``rows`` (running a row, its
shape, shared with the Ray workers), ``ids`` (``row_id``), ``manifest`` (what a run was),
``output`` and ``parquet`` (writing and reading outputs), ``resume`` (what is done), ``progress``,
``interrupt`` (Ctrl-C), ``session`` (one run's output, progress and words, local or on Ray),
``loop`` (the threads), ``local`` (the entry points), ``result``. Nothing here imports Ray, and
pyarrow only for a Parquet output.
"""

from __future__ import annotations

from .local import evaluate, run_program
from .result import RunResult
from .rows import RunSummary

__all__ = ["RunResult", "RunSummary", "evaluate", "run_program"]
