"""GET /models, and construction that never touches the network."""

from __future__ import annotations

import socket

from dspy_anyscale import Anyscale

from .conftest import MODEL, SECRET


def test_models_lists_the_endpoint_with_rayllm_model_type(stub):
    stub.models = [
        {
            "id": "meta-llama/Llama-2-70b-chat-hf",
            "object": "model",
            "owned_by": "system",
            "rayllm_metadata": {
                "engine_config": {"model_id": "meta-llama/Llama-2-70b-chat-hf", "model_type": "text-generation"}
            },
        },
        {
            "id": "thenlper/gte-large",
            "object": "model",
            "owned_by": "system",
            "rayllm_metadata": {"engine_config": {"model_type": "embedding"}},
        },
    ]
    models = Anyscale.models(api_base=stub.base_url, api_key=SECRET)
    assert models == [
        {"id": "meta-llama/Llama-2-70b-chat-hf", "owned_by": "system", "model_type": "text-generation"},
        {"id": "thenlper/gte-large", "owned_by": "system", "model_type": "embedding"},
    ]


def test_construction_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network during construction")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    lm = Anyscale(MODEL, api_base="http://10.255.255.1:9/v1", api_key="k", use_chat_api=True)
    assert lm.api_base == "http://10.255.255.1:9/v1"
