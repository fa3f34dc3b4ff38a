"""Fixtures for the Router tests: several stub servers on 127.0.0.1, a port nothing listens on, and
Anyscale members pointed at them (closed after the test)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from dspy_anyscale import Anyscale, Router
from dspy_anyscale.testing import StubServer

from ..conftest import MODEL, SECRET


@pytest.fixture
def stubs() -> Iterator[Callable[[], StubServer]]:
    """Start stub servers on demand (each with the test key); all stopped after the test."""
    started: list[StubServer] = []

    def start(**kwargs: object) -> StubServer:
        server = StubServer(api_key=SECRET, model=MODEL, **kwargs).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    # Each stop waits for its server's poll loop (up to half a second): stop them together.
    stopping = [threading.Thread(target=server.stop) for server in started]
    for thread in stopping:
        thread.start()
    for thread in stopping:
        thread.join(10)


@pytest.fixture
def closed_port() -> str:
    """The base URL of a port on 127.0.0.1 that nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def member() -> Iterator[Callable[..., Anyscale]]:
    """Build an Anyscale member: member(server_or_url, **kwargs); chat API, no cache unless asked."""
    made: list[Anyscale] = []

    def make(where: StubServer | str, **kwargs: object) -> Anyscale:
        kwargs.setdefault("model", MODEL)
        kwargs.setdefault("api_key", SECRET)
        kwargs.setdefault("use_chat_api", True)
        kwargs.setdefault("cache", False)
        api_base = where if isinstance(where, str) else where.base_url
        lm = Anyscale(api_base=api_base, **kwargs)  # type: ignore[arg-type]
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close()


@pytest.fixture
def routers() -> Iterator[Callable[..., Router]]:
    """Build Routers whose probe threads are stopped after the test."""
    made: list[Router] = []

    def make(*args: object, **kwargs: object) -> Router:
        router = Router(*args, **kwargs)  # type: ignore[arg-type]
        made.append(router)
        return router

    yield make
    for router in made:
        if router._probes is not None:
            router._probes.stop()
