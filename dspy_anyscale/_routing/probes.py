"""Active health checks: a daemon thread that asks each cooling or down member ``GET /models`` every
``health_check_interval_s``, and closes its breaker when it answers.

Off by default (a member is tried again after its cool-down anyway, by one trial call). The probe
goes through the member's own configuration (its base URL, key and headers, as ``Anyscale.models()``
would), with short timeouts; what it logs is the member's name and the transport's words, which
never hold the key. The thread holds the Router only weakly, ends with ``close()``, with the Router,
or at interpreter exit, and never keeps the process alive (a daemon thread).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .. import _constants as C
from .health import Breaker
from .members import leaves

logger = logging.getLogger(C.LOGGER_NAME)


class Probed(Protocol):
    """What the probe thread needs of its Router."""

    def _probe_cooling(self) -> None: ...


def probe(lm: Any) -> bool:
    """True when ``lm``'s service answers ``GET /models`` (an ``Anyscale``'s endpoint, key and headers)."""
    from .._config import Timeout
    from .._models import list_models

    connect, read = C.ROUTER_PROBE_TIMEOUT
    try:
        list_models(lm.engine.transport.endpoint, Timeout(connect, read), lm._settings.headers)
    except Exception as exc:  # a probe that fails is a member still cooling, nothing more
        logger.debug("health probe of %s: %s", getattr(lm, "model", "?"), exc)
        return False
    return True


class Prober:
    """What the probe thread asks: the breakers of members that cool, and their services (shared by a
    Router's copies, which share its health; the thread holds this weakly)."""

    def __init__(self, breakers: dict[str, Breaker], lms: dict[str, Any]) -> None:
        self.breakers = breakers
        self.lms = lms

    def _probe_cooling(self) -> None:
        for name, breaker in self.breakers.items():
            if breaker.snapshot().state == "healthy":
                continue
            found = list(leaves(self.lms[name]))
            if found and all(probe(lm) for lm in found):
                breaker.probe_answered()


class ProbeThread:
    """The one probe thread of a Router (and its copies)."""

    def __init__(self, owner: Probed, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run,
            args=(weakref.ref(owner), self._stop, interval_s),
            name="dspy-anyscale-router-probes",
            daemon=True,
        )
        _live.add(self)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, wait_s: float = C.ROUTER_PROBE_STOP_WAIT_S) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(wait_s)


def _run(owner: Callable[[], Probed | None], stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        router = owner()
        if router is None:
            return  # the Router is gone: nothing left to probe for
        try:
            router._probe_cooling()
        except Exception:  # never let a probe end the thread
            logger.debug("router health probes failed", exc_info=True)
        del router


_live: weakref.WeakSet[ProbeThread] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for thread in list(_live):
        thread._stop.set()
