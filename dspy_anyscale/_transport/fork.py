"""Fresh connections after ``fork``: a forked child must never talk over its parent's sockets.

A child made by ``fork`` (``multiprocessing``'s fork start method, pre-fork servers such as
gunicorn) inherits every pooled keep-alive connection of its parent. Two processes writing on
one socket get each other's answers, or a broken stream. Every transport registers here; in the
child, right after the fork, each one drops what it inherited without sending anything on it (the
parent keeps using those sockets) and opens new connections on first use.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

from .. import _constants as C

logger = logging.getLogger(C.LOGGER_NAME)


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_live: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def track(transport: ForkAware) -> None:
    """Have ``transport._after_fork_in_child()`` called in every child forked from now on."""
    _live.add(transport)


def _reset_in_child() -> None:
    for transport in list(_live):
        try:
            transport._after_fork_in_child()
        except Exception:  # a hook must not break the fork itself; the transport stays usable
            logger.debug("resetting %r after fork failed", transport, exc_info=True)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_reset_in_child)
