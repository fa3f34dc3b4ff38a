"""Anyscale Services by name: the real SDK against the fake control plane, the LM against a StubServer."""

from __future__ import annotations

import asyncio
import pickle
import threading

import dspy
import pytest

from dspy_anyscale import Anyscale, Router
from dspy_anyscale.errors import ConfigurationError, LMAuthError, ServiceError
from dspy_anyscale.testing import StubServer

from .fake_control_plane import FakeControlPlane

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TOKEN = "svc_token_0123456789abcdef"
ROTATED = "svc_token_rotated_fedcba9876"


@pytest.fixture
def service_stub():
    with StubServer(api_key=TOKEN, model=MODEL) as server:
        yield server


def _root(server: StubServer) -> str:
    return server.base_url.removesuffix("/v1") + "/"  # a service's query_url is its root


def _service(control_plane: FakeControlPlane, server: StubServer, **kwargs):
    return control_plane.add_service("llm-svc", _root(server), TOKEN, **kwargs)


def _ask(lm, text: str) -> str:
    """One uncached call, bounded: a hang fails the test instead of the suite."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = lm(text)[0]
        except Exception as error:  # re-raised in the test's thread
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the call did not end"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return str(result["value"])


def test_from_service_resolves_query_url_and_token(control_plane, service_stub):
    _service(control_plane, service_stub)
    lm = Anyscale.from_service("llm-svc", model=MODEL, cache=False)

    assert lm.api_base == service_stub.base_url  # query_url + /v1
    assert "echo" in _ask(lm, "hello")
    sent = service_stub.posts()[-1]
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "X-ANYSCALE-VERSION" not in sent.headers  # no pin: the load balancer splits
    # What the SDK sent: the service listed by name, authenticated with the CLI token cookie.
    listed = control_plane.calls("GET", r"^/api/v2/services-v2/?$")
    assert listed and listed[-1].query["name"] == ["llm-svc"]
    assert {r.cookie_token for r in control_plane.requests} == {control_plane.token}


def test_the_token_never_shows(control_plane, service_stub):
    _service(control_plane, service_stub)
    lm = Anyscale.from_service("llm-svc", model=MODEL, cache=False)
    assert TOKEN not in repr(lm)
    assert TOKEN not in str(lm.dump_state())
    with pytest.raises(TypeError):
        pickle.dumps(lm.engine.transport.endpoint.api_key)


@pytest.mark.parametrize("version", ["primary", "canary", "v2"])
def test_version_pins_one_version(control_plane, service_stub, version):
    _service(control_plane, service_stub, canary_version="v2", canary_weight=10)
    lm = Anyscale.from_service("llm-svc", model=MODEL, version=version, cache=False)
    _ask(lm, f"pinned {version}")
    assert service_stub.posts()[-1].headers["X-ANYSCALE-VERSION"] == version


def test_canary_without_a_rollout_is_refused(control_plane, service_stub):
    _service(control_plane, service_stub)
    with pytest.raises(ServiceError, match="no canary version"):
        Anyscale.from_service("llm-svc", model=MODEL, version="canary")
    with pytest.raises(ServiceError, match=r"no version 'v9'.*v1"):
        Anyscale.from_service("llm-svc", model=MODEL, version="v9")


def test_unknown_service_says_what_to_do(control_plane):
    with pytest.raises(ServiceError, match=r"'nope'.*anyscale service list"):
        Anyscale.from_service("nope", model=MODEL)


@pytest.mark.parametrize("state", ["STARTING", "TERMINATED", "SYSTEM_FAILURE"])
def test_a_service_that_is_not_serving_is_refused(control_plane, service_stub, state):
    _service(control_plane, service_stub, state=state)
    with pytest.raises(ServiceError, match=rf"is {state}, not serving.*anyscale service wait"):
        Anyscale.from_service("llm-svc", model=MODEL)


def test_api_base_and_key_are_not_taken(control_plane, service_stub):
    _service(control_plane, service_stub)
    with pytest.raises(ConfigurationError, match="finds api_base and api_key itself"):
        Anyscale.from_service("llm-svc", model=MODEL, api_key="x")


def test_a_rotated_token_is_fetched_once_and_used(control_plane, service_stub):
    service = _service(control_plane, service_stub)
    lm = Anyscale.from_service("llm-svc", model=MODEL, cache=False)
    copy = lm.copy(use_chat_api=True)  # a rebuilt copy shares the rotating key
    _ask(lm, "before rotation")
    fetched = len(control_plane.calls("GET", r"^/api/v2/services-v2/?$"))

    service.token = ROTATED  # Anyscale rotated the token: the service now refuses the old one
    service_stub.api_key = ROTATED
    assert "echo" in _ask(lm, "after rotation")
    statuses = [r.headers["Authorization"] for r in service_stub.posts()[-2:]]
    assert statuses == [f"Bearer {TOKEN}", f"Bearer {ROTATED}"]  # refused once, then resent
    assert len(control_plane.calls("GET", r"^/api/v2/services-v2/?$")) == fetched + 1

    _ask(copy, "the copy")  # already has the new value: no 401, no second fetch
    assert service_stub.posts()[-1].headers["Authorization"] == f"Bearer {ROTATED}"
    assert len(control_plane.calls("GET", r"^/api/v2/services-v2/?$")) == fetched + 1


def test_rotation_on_the_async_path(control_plane, service_stub):
    service = _service(control_plane, service_stub)
    lm = Anyscale.from_service("llm-svc", model=MODEL, cache=False)
    service.token = ROTATED
    service_stub.api_key = ROTATED

    async def call() -> str:
        return str((await asyncio.wait_for(lm.acall("async after rotation"), 60))[0])

    assert "echo" in asyncio.run(call())
    assert service_stub.posts()[-1].headers["Authorization"] == f"Bearer {ROTATED}"


def test_a_token_still_refused_after_the_refetch_fails_once(control_plane, service_stub):
    _service(control_plane, service_stub)  # the control plane still hands out the old token
    lm = Anyscale.from_service("llm-svc", model=MODEL, cache=False, num_retries=0)
    fetched = len(control_plane.calls("GET", r"^/api/v2/services-v2/?$"))
    service_stub.api_key = ROTATED  # ... but the service refuses it
    with pytest.raises(LMAuthError) as caught:
        _ask(lm, "refused")
    assert TOKEN not in str(caught.value)
    assert len(control_plane.calls("GET", r"^/api/v2/services-v2/?$")) == fetched + 1  # once, no loop
    assert len(service_stub.posts()) == 1  # same token again: not resent


def test_router_from_service_splits_by_the_services_weights(control_plane, service_stub):
    _service(control_plane, service_stub, canary_version="v2", canary_weight=10)
    router = Router.from_service("llm-svc", model=MODEL, cache=False)

    assert router.strategy == "weighted"
    assert set(router.members) == {"primary", "canary"}
    assert router._weights == {"primary": 90.0, "canary": 10.0}
    for name, member in router.members.items():
        _ask(member, f"member {name}")
        assert service_stub.posts()[-1].headers["X-ANYSCALE-VERSION"] == name
    dspy.configure(lm=router)
    assert "echo" in _ask(router, "through the router")


def test_router_from_service_without_a_rollout_has_the_primary_only(control_plane, service_stub):
    _service(control_plane, service_stub)
    router = Router.from_service("llm-svc", model=MODEL)
    assert set(router.members) == {"primary"}
