"""A budget refusal inside a row, and whether the cap behind it is used up (no Ray needed: the local
runner and the Ray workers read refusals the same way)."""

from __future__ import annotations

from .. import _constants as C
from ..errors import BudgetExceededError

BUDGET_ERROR = BudgetExceededError.__name__
# How a row refused by a budget starts its ``error``: such a row was never (fully) run, so a resumed
# run runs it again whatever ``retry_errors`` says.
BUDGET_ERROR_PREFIX = f"{BUDGET_ERROR}:"


def budget_refusal(exc: BaseException) -> BudgetExceededError | None:
    """The ``BudgetExceededError`` behind ``exc`` (itself, or one a program wrapped), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BudgetExceededError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def used_up(refusal: BudgetExceededError) -> str | None:
    """Why no request like the refused one can ever be admitted again, or None if one may be.

    A refusal counts what is in flight too: those requests may settle for less than their worst
    case, or fail unbilled, and make room. What is spent and made only grows, so when those alone
    leave no room the cap is used up, and the run stops sending.
    """
    if refusal.limit == "max_requests":
        if refusal.max_requests is not None and refusal.requests >= refusal.max_requests:
            return f"max_requests={refusal.max_requests} are used up ({refusal.requests} requests made)"
        return None
    if refusal.budget_usd is None:
        return None
    if _pico(refusal.spent_usd) + _pico(refusal.request_usd) > _pico(refusal.budget_usd):
        left = max(0.0, refusal.budget_usd - refusal.spent_usd)
        return (
            f"budget_usd is used up: ${refusal.spent_usd:.6f} spent of ${refusal.budget_usd:g}, and the ${left:.6f} "
            f"left is less than a request's worst case (${refusal.request_usd:.6f})"
        )
    return None


def is_budget_error(error: str | None) -> bool:
    """True for a row's ``error`` that says a budget refused it (the row was not run, or not all of it)."""
    return error is not None and error.startswith(BUDGET_ERROR_PREFIX)


def _pico(usd: float) -> int:
    """Back to the ledger's integer pico-USD: its figures came as ``pico / 1e12``, so rounding is exact."""
    return round(usd * C.PICO_PER_USD)
