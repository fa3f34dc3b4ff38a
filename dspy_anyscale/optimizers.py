"""Optimizers that end when an ``Anyscale`` budget does: GEPA returns its best program so far, and any
other optimizer (MIPROv2, ...) ends with one ``BudgetExceededError`` that says so.

DSPy's GEPA refuses ``max_reflection_cost``: DSPy LMs expose no cumulative cost. An ``Anyscale``
LM with ``budget_usd`` is that cap, and more (it covers the task LM too, and refuses a request
before it is sent rather than noticing after). What it cannot do alone is end the optimizer
cleanly: a refusal raised inside an optimizer's iteration surfaces as a traceback from deep
inside it (GEPA re-raises it; ``dspy.Evaluate`` turns it into "Execution cancelled due to
errors"). :func:`compile_within_budget` runs ``optimizer.compile`` so that it ends well::

    reflection = Anyscale(MODEL, budget_usd=2.0, max_tokens=2000)
    gepa = dspy.GEPA(metric=metric, reflection_lm=reflection, max_metric_calls=500)
    best = compile_within_budget(gepa, program, trainset=train, valset=val)

* GEPA stops at the next iteration once a watched LM's budget has refused a request (or has less
  than ``min_remaining_usd`` left), through GEPA's own ``stop_callbacks``, and returns its best
  program so far; a refusal inside an iteration (the reflection LM's) ends it the same way.
* Any other optimizer whose run a budget refusal ends raises ``BudgetExceededError`` naming the
  optimizer and the ledger, without the optimizer's internals in the traceback.

The LMs watched are ``lms=`` if given, else every ``Anyscale`` with a budget among the
optimizer's attributes (``reflection_lm``, ``prompt_model``, ``task_model``, ...), the student's
predictors and ``dspy.settings.lm``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from . import _constants as C
from .errors import BudgetExceededError

logger = logging.getLogger(C.LOGGER_NAME)

__all__ = ["BudgetStop", "compile_within_budget"]


class BudgetStop:
    """A GEPA stopper (``gepa_kwargs={"stop_callbacks": [BudgetStop(lm)]}``): True once a watched LM's
    budget has refused a request since this stopper was made, or has at most ``min_remaining_usd``
    left. It remembers the last GEPA state it saw, for :func:`compile_within_budget`."""

    def __init__(self, *lms: Any, min_remaining_usd: float = 0.0) -> None:
        self.lms = tuple(lms)
        self.min_remaining_usd = min_remaining_usd
        self._refused = {id(lm): _report(lm).refused for lm in self.lms}
        self.state: Any = None  # the last GEPA state seen

    def __repr__(self) -> str:
        return f"BudgetStop({len(self.lms)} LMs, min_remaining_usd={self.min_remaining_usd})"

    def __call__(self, gepa_state: Any) -> bool:
        self.state = gepa_state
        return self.spent()

    def spent(self) -> bool:
        """Whether a watched budget has ended: a refusal since the start, or too little left."""
        for lm in self.lms:
            report = _report(lm)
            if report.refused > self._refused[id(lm)]:
                return True
            if report.remaining_usd is not None and report.remaining_usd <= self.min_remaining_usd:
                return True
        return False

    def ledgers(self) -> str:
        return "; ".join(f"{getattr(lm, 'model', lm)}: {_report(lm)}" for lm in self.lms)


def compile_within_budget(
    optimizer: Any,
    student: Any,
    *,
    lms: Sequence[Any] | None = None,
    min_remaining_usd: float = 0.0,
    **compile_kwargs: Any,
) -> Any:
    """``optimizer.compile(student, **compile_kwargs)``, ended cleanly by the LMs' budgets (see the module)."""
    watched = list(lms) if lms is not None else budgeted_lms(optimizer, student)
    stop = BudgetStop(*watched, min_remaining_usd=min_remaining_usd)
    name = type(optimizer).__name__
    if _is_gepa(optimizer) and watched:
        _add_stopper(optimizer, stop)
    try:
        result = optimizer.compile(student, **compile_kwargs)
    except Exception as exc:
        if not (_budget_refusal(exc) or (watched and stop.spent())):
            raise
        best = _gepa_best(optimizer, student, stop) if _is_gepa(optimizer) else None
        if best is not None:
            logger.warning("%s ended by budget_usd: returning its best program so far (%s)", name, stop.ledgers())
            return best
        raise _ended_by_budget(name, exc, stop) from None
    finally:
        if _is_gepa(optimizer) and watched:
            _remove_stopper(optimizer, stop)
    if watched and stop.spent():
        logger.warning("%s ended by budget_usd (%s)", name, stop.ledgers())
    return result


def budgeted_lms(optimizer: Any, student: Any) -> list[Any]:
    """The ``Anyscale`` LMs with a budget the optimizer and the student will call."""
    import dspy

    candidates: list[Any] = [value for value in vars(optimizer).values()]
    candidates += [predictor.lm for predictor in student.predictors()]
    candidates.append(dspy.settings.lm)
    found: dict[int, Any] = {}
    for lm in candidates:
        limiter = getattr(lm, "limiter", None)
        if limiter is not None and getattr(limiter.limits, "budget_usd", None) is not None:
            found.setdefault(id(lm), lm)
    return list(found.values())


def _report(lm: Any) -> Any:
    return lm.spending()


def _is_gepa(optimizer: Any) -> bool:
    return hasattr(optimizer, "gepa_kwargs") and isinstance(optimizer.gepa_kwargs, dict)


def _add_stopper(optimizer: Any, stop: BudgetStop) -> None:
    stoppers = optimizer.gepa_kwargs.get("stop_callbacks")
    optimizer.gepa_kwargs["stop_callbacks"] = [*_as_list(stoppers), stop]


def _remove_stopper(optimizer: Any, stop: BudgetStop) -> None:
    stoppers = [s for s in _as_list(optimizer.gepa_kwargs.get("stop_callbacks")) if s is not stop]
    if stoppers:
        optimizer.gepa_kwargs["stop_callbacks"] = stoppers
    else:
        optimizer.gepa_kwargs.pop("stop_callbacks", None)


def _as_list(stoppers: Any) -> list[Any]:
    if stoppers is None:
        return []
    return list(stoppers) if isinstance(stoppers, Iterable) and not callable(stoppers) else [stoppers]


def _budget_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a budget refusal (DSPy and GEPA may wrap it)."""
    return _first_refusal(exc) is not None


def _gepa_best(optimizer: Any, student: Any, stop: BudgetStop) -> Any:
    """The best candidate GEPA had scored on its validation set when the budget ended it, as a program;
    None when it had none yet."""
    state = stop.state
    candidates = list(getattr(state, "program_candidates", None) or ())
    try:
        scores = list(state.program_full_scores_val_set)
    except Exception:
        return None
    if not candidates or len(scores) != len(candidates):
        return None
    best = max(range(len(candidates)), key=lambda index: scores[index])
    program = student.deepcopy()
    for name, predictor in program.named_predictors():
        if name in candidates[best]:
            predictor.signature = predictor.signature.with_instructions(candidates[best][name])
    return program


def _ended_by_budget(name: str, exc: BaseException, stop: BudgetStop) -> BudgetExceededError:
    refusal = _first_refusal(exc)
    ledgers = stop.ledgers() or "no budgeted LM watched"
    error = BudgetExceededError(
        f"{name} was ended by budget_usd before it could return a program ({ledgers}); "
        "raise the budget, or ask less of the optimizer (fewer trials, a smaller auto setting)",
        **(_figures(refusal) if refusal is not None else {}),
    )
    return error


def _first_refusal(exc: BaseException) -> BudgetExceededError | None:
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if isinstance(current, BudgetExceededError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _figures(refusal: BudgetExceededError) -> dict[str, Any]:
    return {
        "limit": refusal.limit,
        "spent_usd": refusal.spent_usd,
        "reserved_usd": refusal.reserved_usd,
        "request_usd": refusal.request_usd,
        "budget_usd": refusal.budget_usd,
    }
