"""The sync transport against ``responses`` mocks: headers, URL, timeouts, failures → lm15 errors."""

from __future__ import annotations

from http.client import RemoteDisconnected

import pytest
import requests
import responses
from dspy import lm15
from urllib3.exceptions import NewConnectionError, ProtocolError

from dspy_anyscale._config import Endpoint, Timeout
from dspy_anyscale._transport import SyncTransport
from dspy_anyscale.errors import UnexpectedResponseError

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
