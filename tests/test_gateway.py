"""Portkey's headers, on every request, with secrets kept out of saved state."""

from __future__ import annotations

import json
import pickle

from dspy_anyscale import PORTKEY_GATEWAY_URL, Anyscale, portkey_headers

from .conftest import SECRET


def test_portkey_headers(monkeypatch):
    monkeypatch.setenv("PORTKEY_API_KEY", "pk-env")
    headers = portkey_headers(
        custom_host="http://svc:8000/v1/",
        trace_id="run-1",
        metadata={"team": "search"},
        cache="simple",
        retry_count=2,
        virtual_key="vk-1",
    )
    assert headers == {
        "x-portkey-api-key": "pk-env",
        "x-portkey-provider": "anyscale",
        "x-portkey-virtual-key": "vk-1",
        "x-portkey-custom-host": "http://svc:8000/v1",
        "x-portkey-trace-id": "run-1",
        "x-portkey-metadata": '{"team":"search"}',
        "x-portkey-cache": "simple",
        "x-portkey-retry-count": "2",
    }
    config = {"strategy": {"mode": "fallback"}, "targets": [{"provider": "anyscale"}, {"provider": "openai"}]}
    with_config = portkey_headers(api_key="pk-arg", config=config)
    assert json.loads(with_config["x-portkey-config"]) == config and "x-portkey-provider" not in with_config
    assert with_config["x-portkey-api-key"] == "pk-arg"
    assert PORTKEY_GATEWAY_URL == "https://api.portkey.ai/v1"


def test_portkey_without_a_key_sends_none(monkeypatch):
    monkeypatch.delenv("PORTKEY_API_KEY", raising=False)
    assert "x-portkey-api-key" not in portkey_headers()


def test_gateway_headers_go_on_every_request_and_secrets_stay_out_of_saved_state(make_lm, stub, monkeypatch):
    headers = portkey_headers(api_key="pk-secret-9", trace_id="run-7")
    lm = make_lm(use_chat_api=True, headers=headers)
    lm("via gateway")
    sent = stub.posts()[0].headers
    assert sent["x-portkey-api-key"] == "pk-secret-9" and sent["x-portkey-trace-id"] == "run-7"
    state = lm.dump_state()
    assert "pk-secret-9" not in json.dumps(state) and state["secret_headers"] == ["x-portkey-api-key"]
    data = pickle.dumps(lm)
    assert b"pk-secret-9" not in data
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    monkeypatch.setenv("PORTKEY_API_KEY", "pk-from-env")
    restored = pickle.loads(data)
    restored("after unpickling")
    assert stub.posts()[-1].headers["x-portkey-api-key"] == "pk-from-env"
    loaded = Anyscale.load_state(state)
    loaded("after loading")
    assert stub.posts()[-1].headers["x-portkey-api-key"] == "pk-from-env"
    assert stub.posts()[-1].headers["x-portkey-trace-id"] == "run-7"
