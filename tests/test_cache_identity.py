"""DSPy's cache never answers for another endpoint or configuration, and never keys on secrets.

Two stub servers serve the same model name and answer "ONE" and "TWO". Every kind of call (program
calls through ``messages=``, direct calls, ``Request`` calls, streams; sync and async) must reach
its own server once and be served from the cache on repeats.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import dspy
import pytest
from dspy.lm15 import Config, Message, Request

from dspy_anyscale import Anyscale, portkey_headers
from dspy_anyscale.testing import StubServer, dspy_field_responder

from .conftest import MODEL


def _labelled(label: str):
    def responder(endpoint, body):
        answer = dspy_field_responder(endpoint, body)
        return answer.replace(" for ", f" from {label} for ") if " for " in answer else f"{label} {answer}"

    return responder


@pytest.fixture(scope="module")
def servers():
    with (
        StubServer(responder=_labelled("ONE"), model=MODEL) as one,
        StubServer(responder=_labelled("TWO"), model=MODEL) as two,
    ):
        yield one, two


@pytest.fixture
def pair(servers):
    one, two = servers
    one.reset()
    two.reset()
    lms = [Anyscale(MODEL, api_base=server.base_url, api_key="", use_chat_api=True) for server in servers]
    yield lms
    for lm in lms:
        lm.close()


def _predict(lm, **config):
    with dspy.context(lm=lm):
        return dspy.Predict("question -> answer")(question="which server?", config=config).answer


def _apredict(lm):
    async def run():
        with dspy.context(lm=lm):
            return (await dspy.Predict("question -> answer").acall(question="which server?")).answer

    return asyncio.run(run())


def _request(lm):
    return Request(model=lm.model, messages=(Message.user("which server?"),), config=Config(max_tokens=32))


def _stream(lm):
    return "".join(lm.stream("which server?"))


def _astream(lm):
    async def run():
        return "".join([chunk async for chunk in lm.astream("which server?")])

    return asyncio.run(run())


CALLS = {
    "program": _predict,
    "program-async": _apredict,
    "direct": lambda lm: lm("which server?")[0],
    "generate": lambda lm: lm._generate("which server?")["choices"][0]["text"],
    "direct-async": lambda lm: asyncio.run(lm.acall("which server?"))[0],
    "request": lambda lm: lm(_request(lm)).text,
    "request-async": lambda lm: asyncio.run(lm.acall(_request(lm))).text,
    "stream": _stream,
    "stream-async": _astream,
}


@pytest.mark.parametrize("kind", list(CALLS))
def test_each_endpoint_answers_for_itself_and_repeats_come_from_the_cache(pair, servers, kind):
    ask = CALLS[kind]
    one, two = pair
    for _ in range(2):
        assert "ONE" in ask(one) and "TWO" not in ask(one)
        assert "TWO" in ask(two) and "ONE" not in ask(two)
    assert [len(server.posts()) for server in servers] == [1, 1]


def _counting_server_lms(server, variants):
    return [Anyscale(MODEL, **{"api_base": server.base_url, **variant}) for variant in variants]


DIFFERENT = {
    "system_prompt": ({"system_prompt": "Be brief."}, {"system_prompt": "Be verbose."}),
    "prompt_template": ({"prompt_template": "[INST]{prompt}[/INST]"}, {"prompt_template": "<s>{prompt}"}),
    "response_format_style": ({"response_format_style": "openai"}, {"response_format_style": "anyscale"}),
    "provider parameter": ({"repetition_penalty": 1.1}, {"repetition_penalty": 1.3}),
    "provider parameter present": ({}, {"min_p": 0.05}),
    "routing header": (
        {"headers": portkey_headers(provider="openai", api_key="")},
        {"headers": portkey_headers(provider="anyscale", api_key="")},
    ),
    "gateway custom host": (
        {"headers": {"x-portkey-custom-host": "https://a.example/v1"}},
        {"headers": {"x-portkey-custom-host": "https://b.example/v1"}},
    ),
    "gateway config route": (
        {"headers": portkey_headers(config={"targets": [{"provider": "openai", "api_key": "k1"}]}, api_key="")},
        {"headers": portkey_headers(config={"targets": [{"provider": "anyscale", "api_key": "k1"}]}, api_key="")},
    ),
}
ALIKE = {
    "same configuration": ({}, {}),
    "rotated key": ({"api_key": "key-one-1234567"}, {"api_key": "key-two-7654321"}),
    "secret header value": ({"headers": {"x-portkey-api-key": "pk-1"}}, {"headers": {"x-portkey-api-key": "pk-2"}}),
    "gateway config keys": (
        {"headers": portkey_headers(config={"targets": [{"provider": "openai", "api_key": "k1"}]}, api_key="")},
        {"headers": portkey_headers(config={"targets": [{"provider": "openai", "api_key": "k2"}]}, api_key="")},
    ),
    "tracing label": ({"headers": {"x-portkey-trace-id": "run-1"}}, {"headers": {"x-portkey-trace-id": "run-2"}}),
    "base URL spelling": ({}, {"api_base": None}),  # the same server, with a trailing slash (below)
}


def _variants(server, pair_of_options, chat: bool):
    out = []
    for options in pair_of_options:
        options = {"api_key": "", "use_chat_api": chat, **options}
        if options.get("api_base", server.base_url) is None:
            options["api_base"] = server.base_url + "/"
        out.append(options)
    return out


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("what", list(DIFFERENT))
def test_instances_that_differ_in_what_decides_the_answer_never_share_an_entry(servers, what, chat):
    if what == "prompt_template" and chat:
        pytest.skip("prompt_template applies to /completions only")  # same identity rule, other endpoint
    server = servers[0]
    server.reset()
    lms = _counting_server_lms(server, _variants(server, DIFFERENT[what], chat))
    assert lms[0]._cache_identity() != lms[1]._cache_identity()
    for lm in lms:
        _predict(lm)
        lm._generate("same prompt")
    assert len(server.posts()) == 4, "each instance asked the server itself, for both kinds of call"


@pytest.mark.parametrize("what", list(ALIKE))
def test_instances_configured_alike_share_entries(servers, what):
    server = servers[0]
    server.reset()
    lms = _counting_server_lms(server, _variants(server, ALIKE[what], True))
    assert lms[0]._cache_identity() == lms[1]._cache_identity()
    for lm in lms:
        _predict(lm)
        lm._generate("same prompt")
    assert len(server.posts()) == 2, "the second instance was answered from the first one's entries"


def test_the_wire_is_unchanged(servers):
    server = servers[0]
    server.reset()
    lm = Anyscale(MODEL, api_base=server.base_url, api_key="", use_chat_api=True, headers={"X-Team": "a"})
    _predict(lm)
    _predict(lm, metadata={"team": "search"}, temperature=0.5)
    lm._generate("direct")
    lm(_request(lm))
    "".join(lm.stream("streamed"))
    bodies = [post.body for post in server.posts()]
    assert len(bodies) == 5
    for body in bodies:
        assert "dspy_anyscale" not in json.dumps(body)
    assert "metadata" not in bodies[0] and bodies[1]["metadata"] == {"team": "search"}
    sent_headers = {name.lower() for post in server.posts() for name in post.headers}
    assert not any("dspy" in name or "identity" in name for name in sent_headers)


def test_lm_kwargs_history_and_saved_state_do_not_show_the_identity(servers):
    lm = Anyscale(MODEL, api_base=servers[0].base_url, api_key="", use_chat_api=True)
    kwargs_before = dict(lm.kwargs)
    _predict(lm)
    _predict(lm, metadata={"team": "search"}, temperature=0.5)
    assert lm.kwargs == kwargs_before
    assert "metadata" not in lm.history[0]["kwargs"]
    assert lm.history[1]["kwargs"]["metadata"] == {"team": "search"}
    assert lm._cache_identity() not in json.dumps(lm.dump_state())


def test_user_metadata_set_on_the_constructor_still_reaches_the_server(servers):
    server = servers[0]
    server.reset()
    lm = Anyscale(MODEL, api_base=server.base_url, api_key="", use_chat_api=True, metadata={"team": "a"})
    _predict(lm)
    assert server.posts()[0].body["metadata"] == {"team": "a"}


def test_copies_share_the_identity_and_rebuilt_copies_get_their_own(servers):
    lm = Anyscale(MODEL, api_base=servers[0].base_url, api_key="", use_chat_api=True)
    assert lm.copy(temperature=0.5)._cache_identity() == lm._cache_identity()
    assert lm.copy(api_base=servers[1].base_url)._cache_identity() != lm._cache_identity()
    assert lm.copy(system_prompt="x")._cache_identity() != lm._cache_identity()


_IDENTITY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import dspy
    from dspy_anyscale import Anyscale
    base, cache_dir, key = sys.argv[1:4]
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=False, disk_cache_dir=cache_dir)
    lm = Anyscale("{model}", api_base=base, api_key=key, use_chat_api=True, system_prompt="Be brief.",
                  repetition_penalty=1.1)
    dspy.configure(lm=lm)
    answer = dspy.Predict("question -> answer")(question="which server?").answer
    print(json.dumps({{"identity": lm._cache_identity(), "answer": answer}}))
    """
).format(model=MODEL)


def test_the_identity_is_stable_across_processes_and_a_rerun_hits_the_disk_cache(servers, tmp_path):
    server = servers[0]
    server.reset()
    runs = []
    for key in ("first-key-0123456", "rotated-key-6543210"):
        done = subprocess.run(
            [sys.executable, "-c", _IDENTITY_SCRIPT, server.base_url, str(tmp_path / "cache"), key],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] and "ONE" in runs[0]["answer"]
    assert len(server.posts()) == 1, "the second process, with a rotated key, was answered from the disk cache"
    here = Anyscale(
        MODEL,
        api_base=server.base_url,
        api_key="",
        use_chat_api=True,
        system_prompt="Be brief.",
        repetition_penalty=1.1,
    )
    assert here._cache_identity() == runs[0]["identity"]
    assert "first-key" not in "".join(
        p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*") if p.is_file()
    )
