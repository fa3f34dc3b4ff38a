"""The sync transport: against ``responses`` mocks (headers, URL, timeouts, failures → lm15 errors),
against the stub (resending, gzip, redirects, fork), the urllib3 connections below it, and the rule
that the whole sync stack stands on public requests/urllib3 API only."""

from __future__ import annotations

import ast
import contextlib
import socket
import struct
import threading
from http.client import RemoteDisconnected
from pathlib import Path

import pytest
import requests
import responses
from dspy import lm15
from urllib3.exceptions import NewConnectionError, ProtocolError

from dspy_anyscale import _constants as C
from dspy_anyscale._config import Endpoint, Timeout
from dspy_anyscale._secrets import Secret
from dspy_anyscale._transport import SyncTransport, urllib3_stack
from dspy_anyscale._transport import sync as _transport_sync
from dspy_anyscale._transport.common import Failure
from dspy_anyscale.errors import UnexpectedResponseError
from dspy_anyscale.testing import Fault

from ..conftest import SECRET

BASE = "https://svc.anyscaleuserdata.com/v1"
CHAT = f"{BASE}/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def transport():
    t = SyncTransport(Endpoint(BASE, Secret(SECRET)), Timeout(3.0, 45.0), headers={"X-Team": "research"})
    yield t
    t.close()


@responses.activate
def test_post_sends_bearer_json_and_timeouts(transport):
    responses.post(CHAT, json={"ok": True}, headers={"x-request-id": "req-42"})
    reply = transport.request_json("POST", "/chat/completions", BODY)
    assert reply.data == {"ok": True} and reply.status == 200 and reply.request_id == "req-42"
    sent = responses.calls[0].request
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["User-Agent"].startswith("dspy-anyscale/")
    assert sent.headers["X-Team"] == "research"
    assert sent.req_kwargs["timeout"] == (3.0, 45.0)
    import json

    assert json.loads(sent.body) == BODY


@responses.activate
def test_no_key_sends_no_authorization():
    t = SyncTransport(Endpoint(BASE), Timeout())
    responses.post(CHAT, json={})
    t.request_json("POST", "/chat/completions", BODY)
    assert "Authorization" not in responses.calls[0].request.headers


@responses.activate
def test_a_stale_keep_alive_connection_is_retried_once_at_once(transport):
    stale = requests.ConnectionError(ProtocolError("Connection aborted.", RemoteDisconnected("closed")))
    responses.post(CHAT, body=stale)
    responses.post(CHAT, json={"ok": 1})
    assert transport.request_json("POST", "/chat/completions", BODY).data == {"ok": 1}
    assert len(responses.calls) == 2


@responses.activate
def test_a_second_stale_failure_is_a_transport_error(transport):
    stale = requests.ConnectionError(ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")))
    responses.post(CHAT, body=stale)
    responses.post(CHAT, body=stale)
    with pytest.raises(lm15.TransportError, match="failed"):
        transport.request_json("POST", "/chat/completions", BODY)


@responses.activate
def test_connection_refused_is_not_retried_by_the_transport(transport):
    refused = requests.ConnectionError(NewConnectionError(None, "Connection refused"))
    responses.post(CHAT, body=refused)
    with pytest.raises(lm15.TransportError):
        transport.request_json("POST", "/chat/completions", BODY)
    assert len(responses.calls) == 1


@responses.activate
@pytest.mark.parametrize(
    ("exc", "phase"),
    [(requests.ConnectTimeout("x"), "connect timeout 3s"), (requests.ReadTimeout("x"), "read timeout 45s")],
)
def test_timeouts_are_lm15_timeouts_naming_the_phase(transport, exc, phase):
    responses.post(CHAT, body=exc)
    with pytest.raises(lm15.TimeoutError, match=phase):
        transport.request_json("POST", "/chat/completions", BODY)


@responses.activate
@pytest.mark.parametrize(
    ("body", "content_type", "what", "quoted"),
    [
        (
            b"<html><title>Anyscale Endpoints has been shut down</title></html>",
            "text/html",
            "HTML page",
            "Anyscale Endpoints has been shut down",
        ),
        (b'{"choices": [', "application/json", "Expected a JSON body", '{"choices": ['),
        (b"[1, 2]", "application/json", "Expected a JSON object", "[1, 2]"),
    ],
)
def test_a_2xx_body_that_is_not_json_names_url_status_and_content(transport, body, content_type, what, quoted):
    responses.post(CHAT, body=body, content_type=content_type)
    with pytest.raises(UnexpectedResponseError) as caught:
        transport.request_json("POST", "/chat/completions", BODY)
    message = str(caught.value)
    assert what in message and CHAT in message and "HTTP 200" in message
    assert quoted in message


@responses.activate
def test_http_errors_are_mapped_and_never_leak_the_key(transport):
    responses.post(CHAT, json={"error": {"message": f"bad key {SECRET}"}}, status=401)
    with pytest.raises(lm15.AuthError) as caught:
        transport.request_json("POST", "/chat/completions", BODY)
    assert SECRET not in str(caught.value) and "ANYSCALE_API_KEY" in str(caught.value)


def test_repr_has_no_key(transport):
    assert SECRET not in repr(transport)


def test_proxy_and_ca_bundle_are_read_once_at_construction(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/custom.pem")
    t = SyncTransport(Endpoint(BASE, Secret(SECRET)), Timeout())
    assert t._proxies.get("https") == "http://proxy.internal:3128"
    assert t._verify == "/etc/ssl/custom.pem"


def test_pool_size_is_requests_pool_maxsize(transport):
    def maxsize(t: SyncTransport) -> int:
        return t._slot.adapter.poolmanager.connection_pool_kw["maxsize"]

    assert maxsize(transport) == transport.pool_size == C.DEFAULT_POOL_SIZE
    small = SyncTransport(Endpoint(BASE, Secret(SECRET)), Timeout(), pool_size=3)
    assert maxsize(small) == small.pool_size == 3


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (requests.ConnectTimeout("x"), Failure.CONNECT_TIMEOUT),
        (requests.ReadTimeout("x"), Failure.READ_TIMEOUT),
        # requests' report of a body that stalled after the head
        (
            requests.ConnectionError(_transport_sync.ReadTimeoutError(None, "/", "Read timed out.")),
            Failure.READ_TIMEOUT,
        ),
        (requests.exceptions.InvalidURL("x"), Failure.INVALID_URL),
        (requests.exceptions.MissingSchema("x"), Failure.INVALID_URL),
        (requests.ConnectionError("refused"), Failure.TRANSPORT),
        (requests.exceptions.ChunkedEncodingError("cut"), Failure.TRANSPORT),
    ],
)
def test_failures_are_classified(exc, kind):
    assert _transport_sync._classify(exc) is kind


def test_an_unparseable_base_url_is_a_configuration_error():
    t = SyncTransport(Endpoint("not a url", Secret(SECRET)), Timeout())
    with pytest.raises(lm15.ConfigurationError, match="invalid URL"):
        t.request_json("POST", "/chat/completions", BODY)


# --- against the stub: resending, gzip, redirects ---------------------------------------------


@pytest.fixture
def stub_transport(stub):
    t = SyncTransport(Endpoint(stub.base_url, Secret(SECRET)), Timeout(3.0, 5.0))
    yield t
    t.close()


def test_a_kept_alive_connection_closed_by_the_server_is_resent_once(stub, stub_transport):
    stub_transport.request_json("POST", "/chat/completions", BODY)  # opens the connection
    stub.script(Fault(close=True))  # the next request on it: read, then closed unanswered
    reply = stub_transport.request_json("POST", "/chat/completions", BODY)
    assert reply.data["choices"][0]["message"]["content"] == "echo: hi"
    assert len(stub.posts()) == 3


def test_a_new_connection_closed_unanswered_is_not_resent(stub, stub_transport):
    stub.script(Fault(close=True))
    with pytest.raises(lm15.TransportError):
        stub_transport.request_json("POST", "/chat/completions", BODY)
    assert len(stub.posts()) == 1


def test_half_a_body_is_one_request_and_a_transport_error(stub, stub_transport):
    stub_transport.request_json("POST", "/chat/completions", BODY)
    stub.script(Fault(body_cut_after=40))
    with pytest.raises(lm15.TransportError):
        stub_transport.request_json("POST", "/chat/completions", BODY)
    assert len(stub.posts()) == 2, "the answer had begun: the server was generating, never resend"


def test_a_gzip_answer_is_decompressed(stub, stub_transport):
    stub.script(Fault(gzip=True))
    reply = stub_transport.request_json("POST", "/chat/completions", BODY)
    assert reply.data["choices"][0]["message"]["content"] == "echo: hi"
    assert stub.posts()[-1].headers["Accept-Encoding"] == "gzip, deflate"


def test_a_redirect_is_not_followed(stub, stub_transport):
    stub.script(Fault(status=307, headers={"Location": "https://elsewhere.example/v1/chat/completions"}))
    with pytest.raises(lm15.InvalidRequestError, match="redirected"):
        stub_transport.request_json("POST", "/chat/completions", BODY)
    assert len(stub.posts()) == 1


def test_after_a_fork_the_inherited_pool_is_dropped_without_a_byte_sent(stub, stub_transport):
    """Simulated in this process: the hook a forked child runs. The real fork is tests/transport/test_fork.py."""
    stub_transport.request_json("POST", "/chat/completions", BODY)
    inherited = stub_transport._slot.adapter
    pooled = [conn for conn in urllib3_stack.opened if not conn.is_closed]
    assert pooled, "the warm-up left a kept-alive connection"
    stub_transport._after_fork_in_child()
    assert stub_transport._slot.adapter is not inherited
    assert all(conn.is_closed for conn in pooled), "the child's descriptors are released"
    assert len(stub.posts()) == 1, "nothing was sent on them"
    assert stub_transport.request_json("POST", "/chat/completions", BODY).status == 200


def test_secret_header_values_are_masked_in_reprs_but_sent_as_they_are():
    from dspy_anyscale._transport import build_headers

    headers = build_headers(Secret(SECRET), {"x-portkey-api-key": "pk-secret-9", "X-Team": "research"})
    assert headers["Authorization"] == f"Bearer {SECRET}" and headers["x-portkey-api-key"] == "pk-secret-9"
    assert SECRET not in repr(headers) and "pk-secret-9" not in repr(headers) and "research" in repr(headers)


# --- whether a request went out on a reused connection -------------------------------------------


def test_each_send_says_whether_it_went_out_on_a_reused_connection(stub, stub_transport):
    stub_transport.request_json("POST", "/chat/completions", BODY)
    assert urllib3_stack.last_send_reused() is False, "the first request opens the socket"
    stub_transport.request_json("POST", "/chat/completions", BODY)
    assert urllib3_stack.last_send_reused() is True, "the second one goes out on the kept-alive socket"
    stub.script(Fault(status=200, body={"ok": 1}, headers={"Connection": "close"}))
    stub_transport.request_json("POST", "/chat/completions", BODY)
    stub_transport.request_json("POST", "/chat/completions", BODY)
    assert urllib3_stack.last_send_reused() is False, "the server closed the last one: a new socket"


class _ResettingListener:
    """Accepts TCP connections and resets each one (RST) as soon as its first bytes arrive."""

    def __init__(self) -> None:
        self.accepted = 0
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(8)
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._open = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._open:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # the accept timeout, or the socket closed
                continue
            self.accepted += 1
            with connection:
                connection.settimeout(3)
                with contextlib.suppress(OSError):
                    connection.recv(65536)  # the TLS ClientHello
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self._open = False
        self._thread.join(5)
        self._socket.close()


def test_a_new_tls_connection_reset_in_its_handshake_is_not_resent():
    """A reset looks like a stale keep-alive connection, but this socket was new: nothing to resend."""
    listener = _ResettingListener()
    t = SyncTransport(Endpoint(f"https://127.0.0.1:{listener.port}/v1", Secret(SECRET)), Timeout(3.0, 3.0))
    try:
        with pytest.raises(lm15.TransportError):
            t.request_json("POST", "/chat/completions", BODY)
    finally:
        t.close()
        listener.close()
    assert listener.accepted == 1


@responses.activate
def test_a_mocked_adapter_reaches_no_connection(transport):
    responses.post(CHAT, json={})
    transport.request_json("POST", "/chat/completions", BODY)
    assert urllib3_stack.last_send_reused() is None


# --- through a proxy: requests' proxy manager, built from the same connection classes ----------------


@pytest.fixture
def via_stub_proxy(monkeypatch, stub):
    """The stub as a forward proxy for a host that does not exist: it receives the absolute URL."""
    monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{stub.port}")
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    t = SyncTransport(Endpoint("http://api.invalid/v1", Secret(SECRET)), Timeout(3.0, 5.0))
    yield t
    t.close()


def test_a_forward_proxy_gets_the_request_and_its_own_credentials(stub, via_stub_proxy):
    import base64

    reply = via_stub_proxy.request_json("POST", "/chat/completions", BODY)
    assert reply.data["choices"][0]["message"]["content"] == "echo: hi"
    sent = stub.posts()[-1]
    assert sent.path == "http://api.invalid/v1/chat/completions"
    assert sent.headers["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert sent.headers["Authorization"] == f"Bearer {SECRET}"


def test_a_stale_connection_to_a_proxy_is_resent_once_as_well(stub, via_stub_proxy):
    via_stub_proxy.request_json("POST", "/chat/completions", BODY)
    stub.script(Fault(close=True))
    assert via_stub_proxy.request_json("POST", "/chat/completions", BODY).status == 200
    assert urllib3_stack.last_send_reused() is False, "the resend went out on a new connection"
    assert len(stub.posts()) == 3


class _RecordingProxy:
    """A TCP listener that records the first request head it receives, then refuses it (403)."""

    def __init__(self) -> None:
        self.head = b""
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(8)
        self.port = self._socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self._socket.accept()
        with connection:
            while b"\r\n\r\n" not in self.head:
                data = connection.recv(65536)
                if not data:
                    break
                self.head += data
            connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self._socket.close()


def test_an_https_endpoint_through_a_proxy_sends_only_proxy_credentials_in_the_connect(monkeypatch):
    proxy = _RecordingProxy()
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:pw@127.0.0.1:{proxy.port}")
        for name in ("NO_PROXY", "no_proxy", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        t = SyncTransport(Endpoint(BASE, Secret(SECRET)), Timeout(3.0, 5.0))
        with pytest.raises(lm15.TransportError):
            t.request_json("POST", "/chat/completions", BODY)
        t.close()
    finally:
        proxy.close()
    head = proxy.head.decode("latin-1")
    assert head.startswith("CONNECT svc.anyscaleuserdata.com:443 ")
    assert "Proxy-Authorization: Basic dXNlcjpwdw==" in head
    assert SECRET not in head, "the API key goes inside the tunnel only"


# --- public API only ---------------------------------------------------------------------------------

SYNC_STACK = ["sync.py", "urllib3_stack.py", "common.py", "env.py", "fork.py", "wording.py"]


def _transport_tree(name: str) -> ast.Module:
    import dspy_anyscale

    path = Path(dspy_anyscale.__file__).parent / "_transport" / name
    return ast.parse(path.read_text(), str(path))


def _our_private_names() -> set[str]:
    """Underscored names the transport package defines itself (functions, attributes, class members)."""
    import dspy_anyscale

    names: set[str] = set()
    for path in (Path(dspy_anyscale.__file__).parent / "_transport").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ entries
    return {name for name in names if name.startswith("_")}


@pytest.mark.parametrize("module", SYNC_STACK)
def test_the_sync_stack_touches_no_private_name_of_another_library(module):
    """No underscored attribute of requests, urllib3 or http.client is read, called or imported:
    a new release of any of them cannot break the sync path silently."""
    ours = _our_private_names()
    found = []
    for node in ast.walk(_transport_tree(module)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr not in ours:
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


@pytest.mark.parametrize("module", SYNC_STACK)
def test_every_type_ignore_in_the_sync_stack_says_why(module):
    import dspy_anyscale

    text = (Path(dspy_anyscale.__file__).parent / "_transport" / module).read_text()
    bare = [
        line.strip()
        for line in text.splitlines()
        if "type: ignore" in line and "  # " not in line.split("type: ignore")[1]
    ]
    assert bare == []
