"""Shared fixtures. Tests never reach the network: servers run on 127.0.0.1, HTTP is mocked with
``responses``, and DSPy/LiteLLM are told to use their bundled model metadata."""

from __future__ import annotations

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before dspy/litellm are imported

import dspy
import pytest

from dspy_anyscale.testing import StubServer, dspy_field_responder

SECRET = "esecret_TEST_KEY_b3f1c2d4e5"
MODEL = "meta-llama/Llama-2-70b-chat-hf"
# A real endpoint for the optional live test, read before the fixtures below clear the variables.
LIVE_ENDPOINT = {name: os.environ.get(name) for name in ("ANYSCALE_API_BASE", "ANYSCALE_API_KEY", "ANYSCALE_MODEL")}


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """No ambient configuration, no .env above the working directory, a fresh DSPy cache and settings."""
    for name in ("ANYSCALE_API_BASE", "ANYSCALE_BASE_URL", "ANYSCALE_API_KEY", "ANYSCALE_USAGE_LOG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    dspy.configure(lm=None, adapter=None, track_usage=False)
    yield
    dspy.configure(lm=None, adapter=None, track_usage=False)


@pytest.fixture(scope="session")
def stub_server():
    with StubServer(api_key=SECRET, model=MODEL) as server:
        yield server


@pytest.fixture
def stub(stub_server: StubServer) -> StubServer:
    stub_server.reset()
    stub_server.latency = 0.0
    stub_server.responder = dspy_field_responder
    stub_server.models = None
    yield stub_server
    stub_server.reset()
    stub_server.responder = dspy_field_responder
    stub_server.models = None
    stub_server.response_headers = {}  # tests/test_server_facts.py: what each answer also says
    stub_server.cached_tokens = None


# The real servers (llama_server, llama_cpp_python_server, portkey_gateway, server) are in
# tests/integration/conftest.py.


@pytest.fixture
def make_lm(stub: StubServer):
    """Build an Anyscale LM pointed at the stub server."""
    from dspy_anyscale import Anyscale

    created = []

    def make(**kwargs):
        kwargs.setdefault("model", MODEL)
        kwargs.setdefault("api_base", stub.base_url)
        kwargs.setdefault("api_key", SECRET)
        lm = Anyscale(**kwargs)
        created.append(lm)
        return lm

    yield make
    for lm in created:
        lm.close()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``, the README's command), the tests that load the CPU run one
    after another on one worker each, as they would alone: the real-server tests (inference and
    training; two at once thrash the two cores: measured 2-4x slower each) and the Ray tests (one
    cluster sized for the machine at a time). The unit tests spread over every worker."""
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.xdist_group("servers"))
