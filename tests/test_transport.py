"""The sync transport: against ``responses`` mocks (headers, URL, timeouts, failures → lm15 errors),
against the stub (resending, gzip, redirects, fork), and the urllib3 connections below it."""

from __future__ import annotations

import http.client
import io
import socket
from http.client import RemoteDisconnected

import pytest
import requests
import responses
from dspy import lm15
from urllib3.exceptions import NewConnectionError, ProtocolError

from dspy_anyscale import _constants as C
from dspy_anyscale._config import Endpoint, Timeout
from dspy_anyscale._transport import SyncTransport
from dspy_anyscale._transport import sync as _transport_sync
from dspy_anyscale._transport.common import Failure
from dspy_anyscale._transport.urllib3_stack import _Connection, _Response, parse_head
from dspy_anyscale.errors import UnexpectedResponseError
from dspy_anyscale.testing import Fault

from .conftest import SECRET

BASE = "https://svc.anyscaleuserdata.com/v1"
CHAT = f"{BASE}/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def transport():
    t = SyncTransport(Endpoint(BASE, SECRET), Timeout(3.0, 45.0), headers={"X-Team": "research"})
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
    t = SyncTransport(Endpoint(BASE, None), Timeout())
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
    t = SyncTransport(Endpoint(BASE, SECRET), Timeout())
    assert t._proxies.get("https") == "http://proxy.internal:3128"
    assert t._verify == "/etc/ssl/custom.pem"


# --- the connections below the adapter ---------------------------------------------------------


HEADS = [
    b"Content-Type: application/json\r\nContent-Length: 12\r\nx-request-id: r-1\r\n\r\n",
    b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-Empty:\r\nX-Spaces:   padded  \r\n\r\n",
    b"X-Folded: first\r\n second\r\nContent-Length: 3\r\n\r\n",  # obs-fold: the stock parser's reading
    b"Bad Header: value\r\nContent-Length: 3\r\n\r\n",  # a space in the name: a defect, kept as such
    b":no-name\r\nContent-Length: 3\r\n\r\n",
    b"Content-Length: 3\n\n",  # bare LF line ends
    b"Content-Length: 3\r\nX-Cut: no blank line",  # the head ends with the connection
    b"\r\n",
]


@pytest.mark.parametrize("head", HEADS, ids=range(len(HEADS)))
def test_response_heads_parse_exactly_as_http_client_parses_them(head):
    expected = http.client.parse_headers(io.BytesIO(head))
    lines = io.BytesIO(head).readlines()
    if not lines or lines[-1] not in (b"\r\n", b"\n"):
        lines.append(b"")
    got = parse_head(lines)
    assert got.items() == expected.items()
    assert [repr(defect) for defect in got.defects] == [repr(defect) for defect in expected.defects]
    assert got.get_payload() == expected.get_payload()


class _FakeSocket:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -4\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
    b"HTTP/1.1 503 Busy  \r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("raw", RESPONSES, ids=range(len(RESPONSES)))
@pytest.mark.parametrize("method", ["POST", "HEAD"])
def test_response_begin_matches_http_client(raw, method):
    ours, stock = _Response(_FakeSocket(raw), method=method), http.client.HTTPResponse(_FakeSocket(raw), method=method)
    ours.begin()
    stock.begin()
    for name in ("status", "reason", "version", "chunked", "length", "will_close"):
        assert getattr(ours, name) == getattr(stock, name), name
    assert ours.msg.items() == stock.msg.items()
    assert ours.read() == stock.read()


def test_the_head_and_a_body_leave_in_one_send(stub):
    sent: list[bytes] = []

    class Recorder:
        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def sendall(self, data: bytes) -> None:
            sent.append(bytes(data))
            self._sock.sendall(data)

        def __getattr__(self, name: str):
            return getattr(self._sock, name)

    connection = _Connection("127.0.0.1", stub.port)
    connection.connect()
    connection.sock = Recorder(connection.sock)
    body = b'{"model": "m", "prompt": "hi"}'
    connection.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {SECRET}"})
    assert connection.getresponse().status == 200
    assert len(sent) == 1 and sent[0].startswith(b"POST /v1/completions HTTP/1.1\r\n") and sent[0].endswith(body)
    connection.close()


def test_a_request_without_a_body_still_sends_its_head(stub):
    connection = _Connection("127.0.0.1", stub.port)
    connection.request("GET", "/v1/models", headers={"Authorization": f"Bearer {SECRET}"})
    assert connection.getresponse().status == 200
    connection.close()


def test_pool_size_is_requests_pool_maxsize(transport):
    assert transport._slot.adapter._pool_maxsize == transport.pool_size == C.DEFAULT_POOL_SIZE
    small = SyncTransport(Endpoint(BASE, SECRET), Timeout(), pool_size=3)
    assert small._slot.adapter._pool_maxsize == 3


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
    t = SyncTransport(Endpoint("not a url", SECRET), Timeout())
    with pytest.raises(lm15.ConfigurationError, match="invalid URL"):
        t.request_json("POST", "/chat/completions", BODY)


# --- against the stub: resending, gzip, redirects ---------------------------------------------


@pytest.fixture
def stub_transport(stub):
    t = SyncTransport(Endpoint(stub.base_url, SECRET), Timeout(3.0, 5.0))
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
    """Simulated in this process: the hook a forked child runs. The real fork is tests/test_fork.py."""
    stub_transport.request_json("POST", "/chat/completions", BODY)
    inherited = stub_transport._slot.adapter
    pooled = [conn for pool in inherited.handed_out.values() for conn in pool.pool.queue if conn is not None]
    assert pooled and all(conn.sock is not None for conn in pooled)
    stub_transport._after_fork_in_child()
    assert stub_transport._slot.adapter is not inherited
    assert all(conn.sock is None for conn in pooled), "the child's descriptors are released"
    assert stub_transport.request_json("POST", "/chat/completions", BODY).status == 200


def test_secret_header_values_are_masked_in_reprs_but_sent_as_they_are():
    from dspy_anyscale._transport import build_headers

    headers = build_headers(SECRET, {"x-portkey-api-key": "pk-secret-9", "X-Team": "research"})
    assert headers["Authorization"] == f"Bearer {SECRET}" and headers["x-portkey-api-key"] == "pk-secret-9"
    assert SECRET not in repr(headers) and "pk-secret-9" not in repr(headers) and "research" in repr(headers)


class _Recorder:
    """Stands in for a connected socket: records what is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def settimeout(self, timeout: object) -> None:
        pass


def _head_bytes(connection, headers: dict[str, str], body: bytes) -> bytes:
    recorder = _Recorder()
    connection.sock = recorder
    connection.request("POST", "/v1/completions", body=body, headers=headers)
    connection._HTTPConnection__state = http.client._CS_IDLE  # ready for the next request
    connection._response_options = None
    return b"".join(recorder.sent)


def test_repeated_header_lines_are_sent_exactly_as_http_client_writes_them():
    import urllib3

    headers = {"Authorization": f"Bearer {SECRET}", "X-Team": "research", "Content-Length": "2"}
    ours, stock = _Connection("127.0.0.1", 9), urllib3.connection.HTTPConnection("127.0.0.1", 9)
    first, second = _head_bytes(ours, headers, b"{}"), _head_bytes(ours, {**headers, "Content-Length": "3"}, b"{} ")
    assert first == _head_bytes(stock, headers, b"{}")
    assert second == _head_bytes(stock, {**headers, "Content-Length": "3"}, b"{} ")


def test_an_invalid_header_value_is_refused_every_time():
    connection = _Connection("127.0.0.1", 9)
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid header value"):
            _head_bytes(connection, {"X-Injected": "a\r\nX-Evil: 1"}, b"{}")
        connection._HTTPConnection__state = http.client._CS_IDLE
        connection._buffer = []
