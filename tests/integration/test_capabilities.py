"""What each real server itself does, over raw HTTP (no client in between), where the client hides
it: the README's "Servers tested" table (logprobs, tools, /models, errors: test_real_servers.py). A
strict xfail names what a server cannot do, so an upgrade that adds it shows up."""

from __future__ import annotations

import json

import pytest
import requests

from ..conftest import SECRET
from ._servers import (
    ALIAS,
    CONTINUE,
    FRANCE,
    LCP_IGNORES_N,
    LCP_NO_JSON_SCHEMA,
    LCP_NO_STREAM_USAGE,
    on_servers,
)

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def post(server, path: str, key: str = SECRET, **body) -> requests.Response:
    body.setdefault("model", ALIAS)
    body.setdefault("max_tokens", 60)
    body.setdefault("temperature", 0.0)  # the servers' own defaults sample (0.8): a long answer would be cut
    headers = {"Authorization": f"Bearer {key}"}
    stream = bool(body.get("stream"))
    return requests.post(server.base_url + path, json=body, headers=headers, timeout=300, stream=stream)


def ask(server, content: str = FRANCE, **body) -> requests.Response:
    return post(server, "/chat/completions", messages=[{"role": "user", "content": content}], **body)


def stream_chunks(response: requests.Response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines(decode_unicode=True) if line and line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def answer_of(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    return json.loads(response.json()["choices"][0]["message"]["content"])


@on_servers(xfail={"llama-cpp-python": LCP_NO_JSON_SCHEMA})
def test_json_schema_response_format(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA}}
    assert "answer" in answer_of(ask(server, response_format=fmt))


@on_servers()
def test_json_object_with_a_schema_anyscale_form(server):
    assert "answer" in answer_of(ask(server, response_format={"type": "json_object", "schema": SCHEMA}))


@on_servers(xfail={"llama-cpp-python": LCP_IGNORES_N})
def test_n_choices(server):
    response = ask(server, n=2, max_tokens=4)
    assert response.status_code == 200 and len(response.json()["choices"]) == 2


@on_servers(endpoints=True, xfail={"llama-cpp-python": LCP_NO_STREAM_USAGE})
def test_stream_usage(server, chat):
    options = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4}
    if chat:
        response = post(server, "/chat/completions", messages=[{"role": "user", "content": FRANCE}], **options)
    else:
        response = post(server, "/completions", prompt=CONTINUE, **options)
    chunks = stream_chunks(response)
    assert len(chunks) > 1, "a stream came back"
    assert any((chunk.get("usage") or {}).get("completion_tokens") for chunk in chunks)


@on_servers()
def test_a_body_field_of_the_wrong_type(server):
    """llama-server: 400 invalid_request_error; llama-cpp-python: 500 internal_server_error carrying the
    pydantic validation error as text (not FastAPI's {"detail": [...]})."""
    response = ask(server, repeat_penalty="high", max_tokens=4)
    error = response.json()["error"]
    if server.is_llama_cpp_python:
        assert response.status_code == 500 and error["type"] == "internal_server_error"
        assert "validation error" in error["message"] and "'loc': ('body', 'repeat_penalty')" in error["message"]
    else:
        assert response.status_code == 400 and error["type"] == "invalid_request_error"
