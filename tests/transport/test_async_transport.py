"""The async transport on its own, against a small local aiohttp server: what it sends, how it reads,
how failures become lm15 errors, and one session per event loop, released when the loop ends."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dspy import lm15

import dspy_anyscale
from dspy_anyscale import _constants as C
from dspy_anyscale._config import Endpoint, Timeout
from dspy_anyscale._secrets import Secret
from dspy_anyscale._transport import AsyncTransport
from dspy_anyscale.errors import UnexpectedResponseError
from dspy_anyscale.testing import Fault

from ..conftest import SECRET

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
PACKAGE_ROOT = str(Path(dspy_anyscale.__file__).resolve().parents[1])


# --- a local aiohttp server --------------------------------------------------------------------


class LocalServer:
    """aiohttp.web on 127.0.0.1 in a thread of its own; records what each request carried."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/v1/{name}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _handle(self, request):
        from aiohttp import web

        name = request.match_info["name"]
        raw = await request.read()
        self.seen.append(
            {"method": request.method, "path": request.path, "headers": dict(request.headers), "body": raw}
        )
        if name == "echo":
            return web.json_response({"ok": True, "body": json.loads(raw or b"null")}, headers={"x-request-id": "r-1"})
        if name == "gzip":
            data = gzip.compress(json.dumps({"compressed": True}).encode())
            return web.Response(body=data, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if name == "redirect":
            return web.Response(status=307, headers={"Location": "https://elsewhere.example/v1/echo"})
        if name == "html":
            return web.Response(text="<html><title>Endpoints have shut down</title></html>", content_type="text/html")
        if name.startswith("status-"):
            status = int(name.split("-")[1])
            headers = {"Retry-After": "7"} if status == 429 else {}
            return web.json_response(
                {"error": {"message": f"scripted {status} {SECRET}"}}, status=status, headers=headers
            )
        if name == "slow":
            await asyncio.sleep(float(request.query["delay"]))
            return web.json_response({"slow": True})
        if name == "trickle":  # a byte every `gap` seconds: slow overall, never silent for long
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for index in range(int(request.query["count"])):
                await asyncio.sleep(float(request.query["gap"]))
                await response.write(f"data: {index}\n\n".encode())
            await response.write_eof()
            return response
        if name == "stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "s-1"})
            await response.prepare(request)
            for word in ("one", "two", "three"):
                await response.write(f"data: {word}\n\n".encode())
            await response.write_eof()
            return response
        if name == "json-to-stream":
            return web.json_response({"choices": [{"text": "not streamed"}]})
        return web.json_response({"error": {"message": "no such route"}}, status=404)

    def __enter__(self) -> LocalServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer() as local:
        yield local


@pytest.fixture
def transport(server):
    server.seen.clear()
    return AsyncTransport(Endpoint(server.base_url, Secret(SECRET)), Timeout(3.0, 45.0), headers={"X-Team": "research"})


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(coroutine):
    return asyncio.run(coroutine)


# --- what is sent, what comes back -------------------------------------------------------------


def test_post_sends_bearer_json_compression_and_the_body(server, transport):
    reply = run(transport.request_json("POST", "/echo", BODY))
    assert reply.data == {"ok": True, "body": BODY}
    assert reply.status == 200 and reply.request_id == "r-1" and reply.elapsed > 0
    sent = server.seen[-1]
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["headers"]["Accept-Encoding"] == "gzip, deflate"
    assert sent["headers"]["User-Agent"].startswith("dspy-anyscale/")
    assert sent["headers"]["X-Team"] == "research"
    assert json.loads(sent["body"]) == BODY


def test_no_key_sends_no_authorization(server):
    transport = AsyncTransport(Endpoint(server.base_url), Timeout(3.0, 10.0))
    run(transport.request_json("POST", "/echo", BODY))
    assert "Authorization" not in server.seen[-1]["headers"]


def test_a_gzip_answer_is_decompressed(transport):
    assert run(transport.request_json("POST", "/gzip", BODY)).data == {"compressed": True}


def test_a_redirect_is_not_followed(server, transport):
    with pytest.raises(lm15.InvalidRequestError, match=r"redirected .* to https://elsewhere.example/v1/echo"):
        run(transport.request_json("POST", "/redirect", BODY))
    assert [seen["path"] for seen in server.seen] == ["/v1/redirect"]


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, lm15.AuthError), (429, lm15.RateLimitError), (500, lm15.ServerError), (400, lm15.InvalidRequestError)],
)
def test_statuses_map_to_lm15_errors_without_the_key(transport, status, error):
    with pytest.raises(error) as caught:
        run(transport.request_json("POST", f"/status-{status}", BODY))
    assert caught.value.status == status and SECRET not in str(caught.value)
    if status == 429:
        assert caught.value.retry_after == 7.0


def test_a_2xx_html_page_says_what_came_back(server, transport):
    with pytest.raises(UnexpectedResponseError, match="Endpoints have shut down") as caught:
        run(transport.request_json("POST", "/html", BODY))
    assert f"{server.base_url}/html" in str(caught.value) and "HTTP 200" in str(caught.value)


def test_a_stream_yields_chunks_as_they_come(transport):
    async def read():
        async with transport.stream("/stream", BODY) as reply:
            return reply.status, reply.request_id, b"".join([chunk async for chunk in reply.chunks])

    status, request_id, data = run(read())
    assert status == 200 and request_id == "s-1"
    assert data == b"data: one\n\ndata: two\n\ndata: three\n\n"


def test_a_stream_answered_with_plain_json_is_an_error_that_quotes_it(transport):
    async def read():
        async with transport.stream("/json-to-stream", BODY):
            pass

    with pytest.raises(UnexpectedResponseError, match=r"Expected an event stream.*not streamed"):
        run(read())


def test_a_failed_stream_status_is_mapped(transport):
    async def read():
        async with transport.stream("/status-503", BODY):
            pass

    with pytest.raises(lm15.ServerError):
        run(read())


# --- timeouts and connection failures ----------------------------------------------------------


def test_read_timeout_names_the_phase_and_the_limit(server):
    transport = AsyncTransport(Endpoint(server.base_url, Secret(SECRET)), Timeout(3.0, 0.2))
    with pytest.raises(lm15.TimeoutError, match=r"read timeout 0\.2s"):
        run(transport.request_json("POST", "/slow?delay=1", BODY))


def test_read_timeout_is_the_longest_silence_not_a_deadline(server):
    """Five chunks 0.15 s apart take 0.75 s in all, three times the limit: each gap is under it."""
    transport = AsyncTransport(Endpoint(server.base_url, Secret(SECRET)), Timeout(3.0, 0.5))

    async def read():
        async with transport.stream("/trickle?count=5&gap=0.15", BODY) as reply:
            return b"".join([chunk async for chunk in reply.chunks])

    assert run(read()).count(b"data:") == 5


def test_silence_mid_stream_is_a_read_timeout(server):
    transport = AsyncTransport(Endpoint(server.base_url, Secret(SECRET)), Timeout(3.0, 0.2))

    async def read():
        async with transport.stream("/trickle?count=2&gap=0.8", BODY) as reply:
            return [chunk async for chunk in reply.chunks]

    with pytest.raises(lm15.TimeoutError, match=r"read timeout 0\.2s"):
        run(read())


def test_connection_refused_is_a_transport_error():
    transport = AsyncTransport(Endpoint(f"http://127.0.0.1:{closed_port()}/v1", Secret(SECRET)), Timeout(1.0, 1.0))
    with pytest.raises(lm15.TransportError, match="failed"):
        run(transport.request_json("POST", "/echo", BODY))


def test_an_invalid_url_is_a_configuration_error():
    transport = AsyncTransport(Endpoint("http:///v1", Secret(SECRET)), Timeout(1.0, 1.0))
    with pytest.raises(lm15.ConfigurationError, match="invalid URL"):
        run(transport.request_json("POST", "/echo", BODY))


def test_a_connect_timeout_is_classified_as_one():
    import aiohttp

    from dspy_anyscale._transport import aiohttp_stack as stack
    from dspy_anyscale._transport.common import Failure

    assert stack.classify(aiohttp.ConnectionTimeoutError("Connection timeout")) is Failure.CONNECT_TIMEOUT
    assert stack.classify(aiohttp.SocketTimeoutError("Timeout on reading")) is Failure.READ_TIMEOUT
    assert stack.classify(aiohttp.ClientPayloadError("cut")) is Failure.TRANSPORT


# --- resending, and only before any response byte ------------------------------------------------


def test_a_kept_alive_connection_closed_by_the_server_is_resent_once(stub):
    transport = AsyncTransport(Endpoint(stub.base_url, Secret(SECRET)), Timeout(3.0, 5.0))

    async def two_calls():
        await transport.request_json("POST", "/chat/completions", BODY)  # opens the connection
        stub.script(Fault(close=True))  # the next request on it: read, then closed unanswered
        return await transport.request_json("POST", "/chat/completions", BODY)

    assert run(two_calls()).data["choices"][0]["message"]["content"] == "echo: hi"
    assert len(stub.posts()) == 3


def test_a_new_connection_closed_unanswered_is_not_resent(stub):
    transport = AsyncTransport(Endpoint(stub.base_url, Secret(SECRET)), Timeout(3.0, 5.0))
    stub.script(Fault(close=True))
    with pytest.raises(lm15.TransportError):
        run(transport.request_json("POST", "/chat/completions", BODY))
    assert len(stub.posts()) == 1


def test_half_a_body_is_one_request_and_a_transport_error(stub):
    transport = AsyncTransport(Endpoint(stub.base_url, Secret(SECRET)), Timeout(3.0, 5.0))

    async def two_calls():
        await transport.request_json("POST", "/chat/completions", BODY)  # a reused connection next
        stub.script(Fault(body_cut_after=40))
        await transport.request_json("POST", "/chat/completions", BODY)

    with pytest.raises(lm15.TransportError):
        run(two_calls())
    assert len(stub.posts()) == 2, "the answer had begun: the server was generating, never resend"


# --- one session per event loop ----------------------------------------------------------------


def test_one_session_per_loop_released_when_the_loop_ends(transport):
    async def session_of_this_loop():
        await transport.request_json("POST", "/echo", BODY)
        first = await transport._sessions.get()
        await transport.request_json("POST", "/echo", BODY)
        assert await transport._sessions.get() is first
        return first

    sessions = [run(session_of_this_loop()) for _ in range(3)]
    assert len({id(session) for session in sessions}) == 3
    assert all(session.closed for session in sessions)
    assert len(transport._sessions) == 0, "an ended loop keeps nothing in the table"


def test_aclose_closes_the_running_loops_session(transport):
    async def use_and_close():
        await transport.request_json("POST", "/echo", BODY)
        session = await transport._sessions.get()
        await transport.aclose()
        return session, len(transport._sessions)

    session, left = run(use_and_close())
    assert session.closed and left == 0


def test_a_loop_closed_without_shutting_down_is_dropped_at_the_next_use(transport):
    loop = asyncio.new_event_loop()
    loop.run_until_complete(transport.request_json("POST", "/echo", BODY))
    loop.close()  # no shutdown_asyncgens: the session could not be closed in its loop
    assert len(transport._sessions) == 1
    run(transport.request_json("POST", "/echo", BODY))
    assert len(transport._sessions) == 0


def test_sessions_of_loops_on_other_threads_are_their_own(transport):
    seen: list[object] = []

    def worker():
        async def go():
            await transport.request_json("POST", "/echo", BODY)
            seen.append(await transport._sessions.get())

        asyncio.run(go())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len({id(session) for session in seen}) == 4 and len(transport._sessions) == 0


def test_pool_size_is_the_connection_limit_per_loop(server):
    transport = AsyncTransport(Endpoint(server.base_url, Secret(SECRET)), Timeout(3.0, 10.0), pool_size=7)

    async def limits():
        await transport.request_json("POST", "/echo", BODY)
        connector = (await transport._sessions.get()).connector
        return connector.limit, connector.limit_per_host

    assert run(limits()) == (7, 7)
    assert AsyncTransport(Endpoint(server.base_url, Secret(SECRET)), Timeout()).pool_size == C.DEFAULT_POOL_SIZE


def test_environment_proxy_is_used_with_its_credentials(monkeypatch, server):
    """The proxy is the local server itself: it receives the absolute URL, as a forward proxy does."""
    monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    transport = AsyncTransport(Endpoint("http://api.invalid/v1", Secret(SECRET)), Timeout(3.0, 5.0))
    assert run(transport.request_json("POST", "/echo", BODY)).data["ok"] is True
    import base64

    sent = server.seen[-1]["headers"]
    assert sent["Host"] == "api.invalid"
    assert sent["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert sent["Authorization"] == f"Bearer {SECRET}"


def test_the_key_is_never_sent_to_a_proxy_as_its_credentials(monkeypatch, server):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    transport = AsyncTransport(Endpoint("http://api.invalid/v1", Secret(SECRET)), Timeout(3.0, 5.0))
    run(transport.request_json("POST", "/echo", BODY))
    assert "Proxy-Authorization" not in server.seen[-1]["headers"]


def test_no_proxy_is_honoured(monkeypatch, server):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    transport = AsyncTransport(Endpoint(server.base_url, Secret(SECRET)), Timeout(3.0, 5.0))
    assert run(transport.request_json("POST", "/echo", BODY)).data["ok"] is True


def test_importing_the_package_does_not_import_aiohttp():
    code = (
        "import sys, dspy_anyscale, dspy_anyscale._transport\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp imported at import time'\n"
        "assert 'dspy_anyscale._transport.aiohttp_stack' not in sys.modules\n"
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": PACKAGE_ROOT}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


class RecordingProxy:
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
    proxy = RecordingProxy()
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:pw@127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        transport = AsyncTransport(Endpoint("https://svc.anyscaleuserdata.com/v1", Secret(SECRET)), Timeout(3.0, 5.0))
        with pytest.raises(lm15.TransportError):
            run(transport.request_json("POST", "/echo", BODY))
    finally:
        proxy.close()
    head = proxy.head.decode("latin-1")
    assert head.startswith("CONNECT svc.anyscaleuserdata.com:443 ")
    assert "Proxy-Authorization: Basic dXNlcjpwdw==" in head
    assert SECRET not in head, "the API key goes inside the tunnel only"


# --- the environment, read once ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "base_url", "expected"),
    [
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://svc.example/v1", ("http://proxy:3128", None, None)),
        ({"HTTPS_PROXY": "proxy:3128"}, "https://svc.example/v1", ("http://proxy:3128", None, None)),
        ({"HTTP_PROXY": "http://u%3Ax:p%40w@proxy:8080"}, "http://svc.example/v1", ("http://proxy:8080", "u:x", "p@w")),
        ({"ALL_PROXY": "http://proxy:1080"}, "https://svc.example/v1", ("http://proxy:1080", None, None)),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "svc.example"}, "https://svc.example/v1", None),
        ({}, "https://svc.example/v1", None),
    ],
)
def test_the_proxy_for_a_base_url_comes_from_the_environment(monkeypatch, variables, base_url, expected):
    from dspy_anyscale._transport.env import read_environment

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    proxy = read_environment(base_url).proxy_for(base_url)
    assert (proxy and (proxy.url, proxy.username, proxy.password)) == expected
    assert proxy is None or "p@w" not in repr(proxy)


def test_the_ca_bundle_variables_are_honoured_in_order(monkeypatch):
    from dspy_anyscale._transport.env import read_environment

    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert read_environment("https://svc.example/v1").verify is True
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/c.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/b.pem")
    assert read_environment("https://svc.example/v1").ca_path == "/etc/ssl/b.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/a.pem")
    assert read_environment("https://svc.example/v1").ca_path == "/etc/ssl/a.pem"


def test_the_tls_context_verifies_and_is_built_once():
    import ssl

    from dspy_anyscale._transport.env import ssl_context

    context = ssl_context(None)
    assert context is ssl_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
