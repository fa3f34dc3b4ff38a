"""Which errors move a Router's call on to its next member, and what each says about the member's health.

A small table, pure. By default a call moves on for what another service might not have: a rate
limit (``LMRateLimitError``), a server error (``LMServerError``), a timeout or a transport error
(``LMTimeoutError``, ``LMTransportError``), and a prompt too long for the member
(``ContextWindowExceededError``, on to a member whose context window is larger). Everything else
is raised at once: a bad key (401/403) or an invalid request must not hide behind a backup, and a
refusal of the caller's own limits (``BudgetExceededError``) would be refused by every member.

``fallback_on=`` replaces the set with error classes and/or HTTP statuses (Portkey's
``on_status_codes``). Whatever it says, a connection that could not be made (nothing listening,
an unknown host: nothing was sent) always moves on, so a member that is gone never fails a call
while another can answer; and the caller's own limits and a stopped call never do.
"""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass

from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)

from .._transport.wording import causes
from ..errors import BudgetExceededError, ConfigurationError, LimiterTimeoutError
from .health import Outcome

DEFAULT_FALLBACK_ON: tuple[type[BaseException], ...] = (
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
    ContextWindowExceededError,
)
# Never a reason to try another member: the caller's own limits (every member would be refused too),
# and a call refused before it was sent because of what was passed.
NEVER_MOVES_ON: tuple[type[BaseException], ...] = (BudgetExceededError, LimiterTimeoutError, ConfigurationError)
# Failures to open a connection: nothing was sent, and nothing listens there now.
_NOT_CONNECTED = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})
_FAILURES: tuple[type[BaseException], ...] = (LMServerError, LMTimeoutError, LMTransportError)


@dataclass(frozen=True)
class Policy:
    """The errors that move a call on: instances of ``classes``, or errors whose HTTP status is in ``statuses``."""

    classes: tuple[type[BaseException], ...] = DEFAULT_FALLBACK_ON
    statuses: frozenset[int] = frozenset()

    def moves_on(self, error: BaseException, outcome: Outcome | None = None) -> bool:
        """Whether ``error`` moves the call on; ``outcome``: ``outcome_of(error)`` when the caller has it
        (it walks the error's causes once, not twice)."""
        if not isinstance(error, Exception) or isinstance(error, NEVER_MOVES_ON):
            return False  # KeyboardInterrupt, a cancelled task, a closed stream: the caller stopped
        if outcome is Outcome.REFUSED if outcome is not None else not_connected(error):
            return True
        return isinstance(error, self.classes) or status_of(error) in self.statuses

    def describe(self) -> list[type[BaseException] | int]:
        return [*self.classes, *sorted(self.statuses)]


DEFAULT_POLICY = Policy()


def status_of(error: BaseException) -> int | None:
    status = getattr(error, "status", None)
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def not_connected(error: BaseException) -> bool:
    """True when the request never reached a server: the connection was refused, the host unreachable
    or unknown. (A reset or a timeout after connecting may have reached it.)"""
    if not isinstance(error, LMTransportError | OSError):
        return False
    for cause in causes(error):
        if isinstance(cause, ConnectionRefusedError | socket.gaierror):
            return True
        if isinstance(cause, OSError) and cause.errno in _NOT_CONNECTED:
            return True
    return False


def outcome_of(error: BaseException) -> Outcome:
    """What a failed try says about the member's health."""
    if not isinstance(error, Exception):
        return Outcome.CANCELLED
    if not_connected(error):
        return Outcome.REFUSED
    status = status_of(error)
    if isinstance(error, LMRateLimitError) or status == 429:
        return Outcome.RATE_LIMITED
    if isinstance(error, _FAILURES) or (status is not None and status >= 500):
        return Outcome.FAILED
    if isinstance(error, NEVER_MOVES_ON):
        return Outcome.CANCELLED  # refused before it was sent: nothing learned about the service
    if isinstance(error, LMError):
        return Outcome.REPLIED  # the service answered, if only to refuse the request
    return Outcome.CANCELLED


def retry_after_of(error: BaseException) -> float | None:
    value = getattr(error, "retry_after", None)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# "maximum context length is 4096 tokens", "context size (2048)", "n_ctx: 2048", "context window of 8192"
_CONTEXT_WINDOW = re.compile(
    r"(?:context[ _](?:length|size|window)|n_ctx)\D{0,40}?(\d{3,7})(?!\d)",
    re.IGNORECASE,
)


def context_window_in(error: BaseException) -> int | None:
    """The context window a context-length error states, when its message gives one."""
    if not isinstance(error, ContextWindowExceededError):
        return None
    match = _CONTEXT_WINDOW.search(str(getattr(error, "message", "") or error))
    return int(match.group(1)) if match else None
