"""A network failure says what happened in the user's words, the same on both stacks: never a library's
class names (``_Pool(host=...): Max retries exceeded``, ``ClientConnectorError``, ``[Errno 111]``)."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl

import pytest
from dspy.utils.exceptions import LMError, LMTimeoutError, LMTransportError

from dspy_anyscale._transport.wording import explain
from dspy_anyscale.testing import Fault

MODES = ("sync", "async")
# What a user should never have to read: class names, reprs, errno tags, aiohttp's ssl:default.
LIBRARY_TALK = re.compile(r"\b_?[A-Z][A-Za-z]+(Error|Exception|Pool|Connection)\b|_Pool|Max retries|Errno|ssl:default")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def failure(lm, mode: str) -> LMError:
    with pytest.raises(LMError) as caught:
        if mode == "sync":
            lm("q")
        else:
            asyncio.run(asyncio.wait_for(lm.acall("q"), 30))
    return caught.value


def said(error: LMError) -> str:
    message = str(error)
    assert not LIBRARY_TALK.search(message), f"library talk in {message!r}"
    return message


@pytest.mark.parametrize("mode", MODES)
def test_a_refused_connection_says_so(make_lm, mode):
    port = closed_port()
    lm = make_lm(api_base=f"http://127.0.0.1:{port}/v1", num_retries=0, cache=False)
    error = failure(lm, mode)
    assert isinstance(error, LMTransportError)
    assert f"could not connect to 127.0.0.1:{port}: connection refused" in said(error)


@pytest.mark.parametrize("mode", MODES)
def test_a_name_that_does_not_resolve_says_so(make_lm, mode, monkeypatch):
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):  # no DNS query leaves the machine
        if host == "no-such-host.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    lm = make_lm(api_base="http://no-such-host.test:8000/v1", num_retries=0, cache=False)
    message = said(failure(lm, mode))
    assert "could not resolve the host name no-such-host.test: name or service not known" in message


@pytest.mark.parametrize("mode", MODES)
def test_tls_to_a_plain_http_server_says_the_handshake_failed(make_lm, stub, mode):
    lm = make_lm(api_base=stub.base_url.replace("http://", "https://"), num_retries=0, cache=False)
    message = said(failure(lm, mode))
    assert f"the TLS handshake with 127.0.0.1:{stub.port} failed: wrong version number" in message
    assert "plain http://" in message


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("fault", "words"),
    [
        (Fault(reset=True), "the connection to 127.0.0.1:{port} was reset"),
        (Fault(close=True), "127.0.0.1:{port} closed the connection without answering"),
        (Fault(body_cut_after=5), "127.0.0.1:{port} closed the connection before the answer was complete"),
    ],
    ids=["reset", "closed", "cut"],
)
def test_a_connection_dropped_by_the_server_says_how(make_lm, stub, mode, fault, words):
    stub.script(fault, fault)  # twice: a fresh-connection resend must fail the same way
    lm = make_lm(num_retries=0, cache=False)
    assert words.format(port=stub.port) in said(failure(lm, mode))


@pytest.mark.parametrize("mode", MODES)
def test_a_read_timeout_names_the_phase_and_the_host(make_lm, stub, mode):
    stub.script(Fault(delay=1.0))
    lm = make_lm(num_retries=0, cache=False, timeout=(5, 0.2))
    error = failure(lm, mode)
    assert isinstance(error, LMTimeoutError)
    assert f"timed out (read timeout 0.2s): no answer from 127.0.0.1:{stub.port} in time" in said(error)


# --- the wording of failures no local server can stage ------------------------------------------------


def _wrapped(inner: BaseException) -> BaseException:
    """How urllib3 and aiohttp bury an OS error: a wrapper raised from it."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("_Pool(host='h', port=1): Max retries exceeded") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("inner", "words"),
    [
        (
            ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
            "the TLS certificate of api.example:443 could not be verified",
        ),
        (OSError(101, "Network is unreachable"), "could not connect to api.example:443: network is unreachable"),
        (BrokenPipeError(32, "Broken pipe"), "closed while the request was being sent"),
        (TimeoutError("timed out"), "no answer from api.example:443 in time"),
    ],
)
def test_failures_in_the_users_words(inner, words):
    message = explain(_wrapped(inner), "https://api.example/v1/chat/completions")
    assert words in message and not LIBRARY_TALK.search(message)
