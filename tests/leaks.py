"""A check that a block leaves no socket open: it counts this process's socket descriptors (Linux) and
records ResourceWarnings, including those raised in finalizers, which never reach a test as errors."""

from __future__ import annotations

import gc
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

SETTLE_SECONDS = 3.0  # the in-process stub closes its side of a connection a moment after the client does


def socket_descriptors() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
        except OSError:  # closed while listing
            continue
    return found


@contextmanager
def no_leaked_sockets() -> Iterator[None]:
    gc.collect()
    before = socket_descriptors()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    deadline = time.monotonic() + SETTLE_SECONDS
    while (opened := socket_descriptors() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, f"ResourceWarning: {unclosed}"
    assert not opened, f"{len(opened)} socket(s) left open: {sorted(opened)}"
