"""Bookkeeping never costs an answer; streams closed early leave nothing behind; unknown counts stay unknown."""

from __future__ import annotations

import asyncio
import gc
import logging

import dspy
import pytest

from dspy_anyscale import Anyscale
from dspy_anyscale._observe import Observer

from .conftest import MODEL, SECRET
from .raw_server import RawServer, Reply, chat_answer, chat_chunk


class Exploding(Observer):
    def __init__(self, hook: str) -> None:
        self.hook = hook

    def __getattribute__(self, name: str):
        if name == object.__getattribute__(self, "hook"):
            raise RuntimeError(f"{name} broke")
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("hook", ["call_started", "attempt_started", "attempt_finished", "call_finished"])
@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
def test_an_observer_that_raises_never_fails_the_call(make_lm, caplog, hook, mode):
    lm = make_lm(use_chat_api=True)
    for engine in (lm.engine, lm._async_engine_spec):
        engine.observers = (Exploding(hook), *engine.observers)
    with caplog.at_level(logging.WARNING, logger="dspy_anyscale"):
        if mode == "sync":
            assert lm("q") == ["echo: q"]
        elif mode == "async":
            assert asyncio.run(lm.acall("q")) == ["echo: q"]
        else:
            assert "".join(lm.stream("q")) == "echo: q"
    assert any(f"{hook} failed" in record.getMessage() for record in caplog.records)
    assert lm.usage[-1].status == "ok", "the other observers still heard of the call"


def test_a_usage_log_that_stops_being_writable_costs_a_warning_not_the_answer(make_lm, tmp_path, caplog):
    path = tmp_path / "usage.jsonl"
    lm = make_lm(usage_log=path)
    lm("first")
    path.unlink()
    path.mkdir()  # now a directory: every write fails
    with caplog.at_level(logging.DEBUG, logger="dspy_anyscale"):
        assert lm("second") == ["echo: second"]
        assert lm("third") == ["echo: third"]
    failures = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG], "warned once, then quietly"
    assert [r.status for r in lm.usage] == ["ok", "ok", "ok"]


# --- streams closed early ----------------------------------------------------------------------


def test_an_abandoned_async_stream_is_silent_and_recorded_as_cancelled(make_lm, stub):
    stub.responder = lambda endpoint, body: "one two three four five six"
    lm = make_lm(use_chat_api=True, cache=False)
    problems: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
        async for _ in lm.astream("q"):
            break
        gc.collect()
        await asyncio.sleep(0.05)
        return await lm.acall("after")

    assert asyncio.run(main()) == ["one two three four five six"]
    gc.collect()
    assert problems == [], "no 'Task exception was never retrieved', no Context errors"
    assert sorted(r.status for r in lm.usage) == ["cancelled", "ok"]
    assert [r.stream for r in lm.usage if r.status == "ok"] == [False], "the next call is a call of its own"


def test_an_abandoned_sync_stream_does_not_swallow_the_next_call(make_lm, stub):
    stub.responder = lambda endpoint, body: "one two three four five six"
    lm = make_lm(use_chat_api=True, cache=False)
    chunks = lm.stream("q")
    next(chunks)
    assert lm("after") == ["one two three four five six"]
    assert [r.status for r in lm.usage] == ["ok"], "the open stream did not absorb the next call"
    chunks.close()
    assert [r.status for r in lm.usage] == ["ok", "cancelled"]


# --- unknown token counts -------------------------------------------------------------------------------


def _no_usage(seen):
    text = '{"answer": "an answer"}' if "response_format" in seen.body else "an answer"
    if seen.body.get("stream"):
        return Reply.sse(chat_chunk(text), chat_chunk(finish="stop"), "[DONE]")
    return Reply.json(chat_answer(text))


@pytest.fixture
def usage_less():
    with RawServer(_no_usage) as raw:
        yield raw


@pytest.mark.parametrize("mode", ["direct", "stream", "program"])
def test_counts_the_server_did_not_send_are_unknown_never_zero(usage_less, mode):
    lm = Anyscale(
        MODEL, api_base=usage_less.base_url, api_key=SECRET, use_chat_api=True, prices={"input": 1, "output": 1}
    )
    with dspy.context(track_usage=True):
        if mode == "direct":
            assert lm("q") == ["an answer"]
        elif mode == "stream":
            assert "".join(lm.stream("q")) == "an answer"
        else:
            with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
                prediction = dspy.Predict("question -> answer")(question="q")
            assert prediction.get_lm_usage() in ({}, None), "DSPy's tracker claims no tokens"
    record = lm.usage[-1]
    assert (record.status, record.prompt_tokens, record.completion_tokens, record.cost_usd) == ("ok", None, None, None)
    entry = lm.history[-1]
    assert "prompt_tokens" not in (entry["usage"] or {}) and entry["cost"] is None


@pytest.mark.parametrize(
    "usage", [{"prompt_tokens": "12", "completion_tokens": 3}, {"prompt_tokens": -1, "completion_tokens": 3}]
)
def test_malformed_counts_keep_the_answer_and_are_unknown(usage):
    with RawServer(lambda seen: Reply.json(chat_answer("kept", usage=usage))) as raw:
        lm = Anyscale(MODEL, api_base=raw.base_url, api_key=SECRET, use_chat_api=True)
        assert lm("q") == ["kept"]
    assert (lm.usage[-1].prompt_tokens, lm.usage[-1].completion_tokens) == (None, 3)


def test_content_given_as_parts_is_joined_as_it_is():
    answer = chat_answer("x")
    answer["choices"][0]["message"]["content"] = [{"type": "text", "text": "part1 "}, {"type": "text", "text": "part2"}]
    with RawServer(lambda seen: Reply.json(answer)) as raw:
        lm = Anyscale(MODEL, api_base=raw.base_url, api_key=SECRET, use_chat_api=True)
        assert lm("q") == ["part1 part2"]


def test_a_non_text_content_part_is_refused_not_dropped():
    from dspy.utils.exceptions import LMProviderError

    answer = chat_answer("x")
    answer["choices"][0]["message"]["content"] = [
        {"type": "text", "text": "see "},
        {"type": "image_url", "image_url": {}},
    ]
    with RawServer(lambda seen: Reply.json(answer)) as raw:
        lm = Anyscale(MODEL, api_base=raw.base_url, api_key=SECRET, use_chat_api=True)
        with pytest.raises(LMProviderError, match="image_url"):
            lm("q")
