"""``lm.spending(by="module")``: a limiter's ledger, per DSPy module that made the requests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .limits import SpendReport

SPENDING_GROUPS = ("module",)


def spending_by(limiter: Any, by: Any) -> dict[str | None, SpendReport]:
    """The limiter's report per ``by`` (only ``"module"``); ``{}`` for a limiter that keeps no ledger
    (an LM without limits), whose requests nobody counted."""
    if by not in SPENDING_GROUPS:
        raise ConfigurationError(f"spending(by=...) takes None or 'module', got {by!r}")
    report_by_module = getattr(limiter, "report_by_module", None)
    return dict(report_by_module()) if callable(report_by_module) else {}
