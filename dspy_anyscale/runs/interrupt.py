"""Ctrl-C during a long run: the first one asks the run to stop, the second one stops it at once.

The first SIGINT only sets a flag: the run's loop sees it within ``RUNS_POLL_S``, stops sending
rows, waits (at most ``RUNS_INTERRUPT_WAIT_S``) for the rows in flight, writes them, says how to
resume and raises ``KeyboardInterrupt``. A second SIGINT raises ``KeyboardInterrupt`` where the
loop is: the rows written so far stay written, the rows in flight are left to the resumed run.

The handler is installed only from the main thread (Python delivers signals there alone), not when
SIGINT is ignored (a process started in the background with ``nohup``), and the previous one is put
back when the run ends. The handler does nothing but set the flag or raise: printing from a signal
handler could re-enter a write to stderr that it interrupted.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class StopSignal:
    """``with StopSignal() as stop: ... if stop.requested: ...``"""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if current is not signal.SIG_IGN:
                self._previous = current
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt("stopped at once (a second Ctrl-C): the rows in flight were not written")
        self.requested = True
