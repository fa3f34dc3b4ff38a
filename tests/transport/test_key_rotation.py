"""A rotating key (an Anyscale Service's token): after a 401 the transport fetches the current value
once, resends once, and every copy of the LM uses it. No Anyscale SDK here: the fetch is a function
(tests/anyscale_cloud/test_services.py runs the same through the SDK against a fake control plane)."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dspy_anyscale import Anyscale
from dspy_anyscale._secrets import RotatingSecret, Secret, key_generation
from dspy_anyscale.errors import LMAuthError
from dspy_anyscale.testing import StubServer

OLD = "rot_old_token_0123456789"
NEW = "rot_new_token_9876543210"
MODEL = "stub-model"


class Issuer:
    """Hands out the current token and counts the fetches."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.fetches = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self.fetches += 1
            return self.token


@pytest.fixture
def server():
    with StubServer(api_key=OLD, model=MODEL) as stub:
        yield stub


def _lm(server: StubServer, key: Secret, **kwargs) -> Anyscale:
    return Anyscale(MODEL, api_base=server.base_url, api_key=key, cache=False, **kwargs)  # type: ignore[arg-type]


def _bounded(function, *args):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result(timeout=60)


def test_refresh_fetches_only_for_the_value_that_was_refused():
    issuer = Issuer(NEW)
    key = RotatingSecret(OLD, issuer)
    assert key.refresh(0) is True and key.reveal() == NEW and key_generation(key) == 1
    assert key.refresh(0) is True and issuer.fetches == 1  # someone already rotated past generation 0
    assert key.refresh(1) is False and issuer.fetches == 2  # the issuer has nothing newer
    assert key_generation(Secret(OLD)) == 0


def test_a_fetch_that_fails_is_logged_without_the_key(caplog):
    def broken() -> str:
        raise RuntimeError(f"control plane down while holding {OLD}")

    key = RotatingSecret(OLD, broken)
    with caplog.at_level(logging.WARNING):
        assert key.refresh(0) is False
    assert "could not fetch a rotated key" in caplog.text and OLD not in caplog.text
    assert repr(key) == "Secret('***')"


def test_sync_call_after_rotation_is_resent_once_with_the_new_key(server):
    issuer = Issuer(OLD)
    lm = _lm(server, RotatingSecret(OLD, issuer))
    _bounded(lm, "first")
    issuer.token = server.api_key = NEW

    assert "echo" in _bounded(lm, "second")[0]
    sent = [r.headers["Authorization"] for r in server.posts()]
    assert sent == [f"Bearer {OLD}", f"Bearer {OLD}", f"Bearer {NEW}"]
    assert issuer.fetches == 1


def test_many_threads_refused_at_once_fetch_once(server):
    issuer = Issuer(OLD)
    lm = _lm(server, RotatingSecret(OLD, issuer))
    issuer.token = server.api_key = NEW
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: lm(f"call {i}")[0], range(8), timeout=60))
    assert all("echo" in answer for answer in answers)
    assert issuer.fetches == 1


def test_a_copy_uses_the_rotated_key_without_a_401(server):
    issuer = Issuer(OLD)
    lm = _lm(server, RotatingSecret(OLD, issuer))
    copy = lm.copy(use_chat_api=True)  # its own transport, the same key object
    issuer.token = server.api_key = NEW
    _bounded(lm, "rotates")
    before = len(server.posts())
    _bounded(copy, "copy")
    assert [r.headers["Authorization"] for r in server.posts()[before:]] == [f"Bearer {NEW}"]


def test_streaming_after_rotation(server):
    issuer = Issuer(OLD)
    lm = _lm(server, RotatingSecret(OLD, issuer), use_chat_api=True)
    issuer.token = server.api_key = NEW

    def stream() -> str:
        return "".join(lm.stream("stream me"))

    assert _bounded(stream)
    assert server.posts()[-1].headers["Authorization"] == f"Bearer {NEW}"


def test_async_call_after_rotation(server):
    issuer = Issuer(OLD)
    lm = _lm(server, RotatingSecret(OLD, issuer))
    issuer.token = server.api_key = NEW

    async def call():
        return await asyncio.wait_for(lm.acall("async"), 60)

    assert "echo" in asyncio.run(call())[0]
    assert issuer.fetches == 1


def test_a_plain_key_is_not_resent(server):
    lm = _lm(server, Secret(OLD), num_retries=0)
    server.api_key = NEW
    with pytest.raises(LMAuthError) as caught:
        _bounded(lm, "refused")
    assert len(server.posts()) == 1 and OLD not in str(caught.value)


def test_the_rotated_key_is_redacted_too(server):
    issuer = Issuer(NEW)
    lm = _lm(server, RotatingSecret(OLD, issuer))
    server.api_key = NEW
    _bounded(lm, "rotate")
    assert lm.engine.transport.secrets.redact(f"{OLD} and {NEW}") == "*** and ***"


def test_async_streaming_after_rotation(server):
    issuer = Issuer(OLD)
    lm = _lm(server, RotatingSecret(OLD, issuer), use_chat_api=True)
    issuer.token = server.api_key = NEW

    async def stream() -> str:
        async def collect() -> str:
            return "".join([chunk async for chunk in lm.astream("async stream me")])

        return await asyncio.wait_for(collect(), 60)

    assert asyncio.run(stream())
    assert server.posts()[-1].headers["Authorization"] == f"Bearer {NEW}"
    assert server.posts()[-1].body.get("stream") is True
