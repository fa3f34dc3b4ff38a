"""DSPy's cache never answers for another endpoint or configuration, and never keys on secrets.

Two stub servers serve the same model name and answer "ONE" and "TWO". Every kind of call (program
calls through ``messages=``, direct calls, ``Request`` calls, streams, ``forward``/``aforward`` and
DSPy's ``SandboxLM``; sync and async) must reach its own server once and be served from the cache
on repeats. A routing secret (a Portkey virtual key) enters the identity only as a keyed digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import warnings

import dspy
import pytest
from dspy.lm15 import Config, Message, Request
from dspy.primitives.facade import SandboxLM

from dspy_anyscale import Anyscale, ConfigurationError, portkey_headers
from dspy_anyscale._identity import routing_headers
from dspy_anyscale.errors import InvalidParameterError
from dspy_anyscale.testing import StubServer, dspy_field_responder

from .conftest import MODEL


@pytest.fixture(autouse=True)
def identity_key_file(tmp_path, monkeypatch):
    """The HMAC key for routing secrets lives in this test's directory, never in the user's cache dir."""
    path = tmp_path / "keys" / "identity.key"
    monkeypatch.setenv("DSPY_ANYSCALE_IDENTITY_KEY_FILE", str(path))
    return path


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


def _answer(response) -> str:
    """The text of DSPy's OpenAI-shaped provider response (what forward/aforward return)."""
    return response["choices"][0]["message"]["content"]


def _sandboxed(lm):
    """DSPy's SandboxLM (RLM's sub-LM proxy) reaches the LM through forward/aforward/__call__/acall."""
    sandbox = SandboxLM(lm)
    messages = [{"role": "user", "content": "which server?"}]
    answers = [
        _answer(sandbox.forward(messages=messages)),
        _answer(asyncio.run(sandbox.aforward(messages=messages))),
        sandbox(_request(lm)).text,
        asyncio.run(sandbox.acall(_request(lm))).text,
    ]
    assert len(set(answers)) == 1, answers
    return answers[0]


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
    "forward": lambda lm: _answer(lm.forward(messages=[{"role": "user", "content": "which server?"}])),
    "forward-prompt": lambda lm: _answer(lm.forward(prompt="which server?")),
    "forward-request": lambda lm: _answer(lm.forward(_request(lm))),
    "aforward": lambda lm: _answer(asyncio.run(lm.aforward(messages=[{"role": "user", "content": "which?"}]))),
    "aforward-request": lambda lm: _answer(asyncio.run(lm.aforward(request=_request(lm)))),
    "sandbox": _sandboxed,
}


@pytest.mark.parametrize("kind", list(CALLS))
def test_each_endpoint_answers_for_itself_and_repeats_come_from_the_cache(pair, servers, kind):
    ask = CALLS[kind]
    one, two = pair
    for _ in range(2):
        assert "ONE" in ask(one) and "TWO" not in ask(one)
        assert "TWO" in ask(two) and "ONE" not in ask(two)
    expected = 4 if kind == "sandbox" else 1  # the sandbox asks four ways: four cache entries
    assert [len(server.posts()) for server in servers] == [expected, expected]


def test_forward_keeps_dspys_engine_path_without_deprecation_warnings(pair):
    """forward/aforward carry the identity without looking like a deprecated custom forward to DSPy."""
    lm = pair[0]
    assert type(lm).forward is dspy.LM.forward and type(lm).aforward is dspy.LM.aforward
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _predict(lm)
        lm.forward(messages=[{"role": "user", "content": "no warning"}])
        asyncio.run(lm.aforward(messages=[{"role": "user", "content": "no warning"}]))
    assert [record.status for record in lm.usage] == ["ok", "ok", "ok"], "one observed call per forward"


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
    "gateway virtual key": (
        {"headers": portkey_headers(virtual_key="vk-upstream-one", api_key="pk-same-key")},
        {"headers": portkey_headers(virtual_key="vk-upstream-two", api_key="pk-same-key")},
    ),
    "gateway config target virtual key": (
        {"headers": portkey_headers(config={"targets": [{"virtual_key": "vk-upstream-one"}]}, api_key="")},
        {"headers": portkey_headers(config={"targets": [{"virtual_key": "vk-upstream-two"}]}, api_key="")},
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
    "same virtual key, rotated Portkey key": (
        {"headers": portkey_headers(virtual_key="vk-upstream-one", api_key="pk-old-key-1")},
        {"headers": portkey_headers(virtual_key="vk-upstream-one", api_key="pk-new-key-2")},
    ),
    "same config virtual key, rotated target key": (
        {"headers": portkey_headers(config={"targets": [{"virtual_key": "vk-one", "api_key": "k1"}]}, api_key="")},
        {"headers": portkey_headers(config={"targets": [{"virtual_key": "vk-one", "api_key": "k2"}]}, api_key="")},
    ),
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


# --- routing secrets: a keyed digest, never the value ---------------------------------------------

VIRTUAL_KEY = "vk-upstream-one"


def _virtual_key_lm(server, virtual_key=VIRTUAL_KEY):
    return Anyscale(
        MODEL, api_base=server.base_url, api_key="", use_chat_api=True, headers={"x-portkey-virtual-key": virtual_key}
    )


def test_a_routing_secret_enters_the_identity_as_a_keyed_digest_only(servers, identity_key_file):
    headers = {
        "x-portkey-virtual-key": VIRTUAL_KEY,
        "x-portkey-config": json.dumps(
            {"targets": [{"virtual_key": "vk-target-two", "api_key": "sk-target-credential"}]}
        ),
    }
    material = json.dumps(routing_headers(headers))
    for value in (VIRTUAL_KEY, "vk-target-two", "sk-target-credential"):
        assert value not in material
        assert hashlib.sha256(value.encode()).hexdigest() not in material, "an unkeyed digest can be guessed"
    assert "api_key" not in material, "a credential that does not route stays out entirely"
    assert identity_key_file.exists()
    assert stat.S_IMODE(identity_key_file.stat().st_mode) == 0o600
    assert len(identity_key_file.read_bytes().strip()) >= 32


def test_without_the_key_file_the_identity_of_a_known_value_cannot_be_recomputed(
    servers, identity_key_file, tmp_path, monkeypatch
):
    """Whoever reads the cache (not the key file) cannot test a guess of the virtual key: the same value
    under another key gives another identity; under the same key file, the same one."""
    first = _virtual_key_lm(servers[0])._cache_identity()
    assert _virtual_key_lm(servers[0])._cache_identity() == first
    monkeypatch.setenv("DSPY_ANYSCALE_IDENTITY_KEY_FILE", str(tmp_path / "attacker.key"))
    assert _virtual_key_lm(servers[0])._cache_identity() != first
    monkeypatch.setenv("DSPY_ANYSCALE_IDENTITY_KEY_FILE", str(identity_key_file))
    assert _virtual_key_lm(servers[0])._cache_identity() == first


def test_configurations_without_routing_secrets_never_touch_the_key_file(servers, identity_key_file):
    Anyscale(MODEL, api_base=servers[0].base_url, api_key="k", headers=portkey_headers(api_key="pk-1"))
    assert not identity_key_file.exists()


_VIRTUAL_KEY_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    from dspy_anyscale import Anyscale
    lm = Anyscale("{model}", api_base=sys.argv[1], api_key="", headers={{"x-portkey-virtual-key": "{virtual_key}"}})
    print(lm._cache_identity())
    """
).format(model=MODEL, virtual_key=VIRTUAL_KEY)


def test_processes_sharing_the_key_file_share_the_identity(servers, identity_key_file):
    done = subprocess.run(
        [sys.executable, "-c", _VIRTUAL_KEY_SCRIPT, servers[0].base_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "DSPY_ANYSCALE_IDENTITY_KEY_FILE": str(identity_key_file)},
    )
    assert identity_key_file.exists(), "the first process made the key file"
    here = Anyscale(MODEL, api_base=servers[0].base_url, api_key="", headers={"x-portkey-virtual-key": VIRTUAL_KEY})
    assert done.stdout.strip().splitlines()[-1] == here._cache_identity()


def test_an_unwritable_key_location_falls_back_to_a_process_key_with_a_warning(servers, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DSPY_ANYSCALE_IDENTITY_KEY_FILE", str(blocker / "identity.key"))
    with caplog.at_level(logging.WARNING, logger="dspy_anyscale"):
        one, two = _virtual_key_lm(servers[0]), _virtual_key_lm(servers[0], "vk-upstream-two")
    assert one._cache_identity() != two._cache_identity()
    assert _virtual_key_lm(servers[0])._cache_identity() == one._cache_identity(), "one key per process"
    warned = [r.getMessage() for r in caplog.records if "DSPY_ANYSCALE_IDENTITY_KEY_FILE" in r.getMessage()]
    assert len(warned) == 1 and VIRTUAL_KEY not in warned[0]


def test_a_key_file_too_short_to_be_a_key_is_refused_with_what_to_do(servers, identity_key_file):
    identity_key_file.parent.mkdir(parents=True)
    identity_key_file.write_text("short")
    with pytest.raises(ConfigurationError, match=r"fewer than 32.*delete it"):
        _virtual_key_lm(servers[0])


# --- a user's own metadata["dspy_anyscale"] is refused before any request ------------------------

RESERVED = {"dspy_anyscale": "mine", "team": "a"}


def _request_with_metadata(lm):
    return Request(model=lm.model, messages=(Message.user("q"),), config=Config(extensions={"metadata": RESERVED}))


RESERVED_METADATA_CALLS = {
    "program": lambda lm: _predict(lm, metadata=RESERVED),
    "messages": lambda lm: lm(messages=[{"role": "user", "content": "q"}], metadata=RESERVED),
    "acall": lambda lm: asyncio.run(lm.acall(messages=[{"role": "user", "content": "q"}], metadata=RESERVED)),
    "forward": lambda lm: lm.forward(messages=[{"role": "user", "content": "q"}], metadata=RESERVED),
    "aforward": lambda lm: asyncio.run(lm.aforward(prompt="q", metadata=RESERVED)),
    "direct": lambda lm: lm("q", metadata=RESERVED),
    "generate": lambda lm: lm._generate("q", metadata=RESERVED),
    "stream": lambda lm: lm.stream("q", metadata=RESERVED),
    "request": lambda lm: lm(_request_with_metadata(lm)),
    "copy default": lambda lm: lm.copy(metadata=RESERVED)("q"),
    "constructor default": lambda lm: Anyscale(MODEL, api_base=lm.api_base, api_key="", metadata=RESERVED),
}


@pytest.mark.parametrize("kind", list(RESERVED_METADATA_CALLS))
def test_a_users_own_metadata_key_of_ours_is_refused_before_any_request(servers, kind):
    server = servers[0]
    server.reset()
    lm = Anyscale(MODEL, api_base=server.base_url, api_key="", use_chat_api=True)
    with pytest.raises(InvalidParameterError, match=r"metadata\['dspy_anyscale'\] is reserved") as caught:
        RESERVED_METADATA_CALLS[kind](lm)
    assert caught.value.parameter == "metadata"
    assert server.posts() == []
