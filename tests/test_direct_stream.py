"""``lm.stream()`` / ``lm.astream()``: text as it arrives, through DSPy's own call (cache, history, usage)."""

from __future__ import annotations

import asyncio
import threading

import dspy
import pytest

from dspy_anyscale import UnsupportedParameterError


@pytest.fixture
def words(stub):
    stub.responder = lambda endpoint, body: "one two three four"
    return stub


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_chunks_arrive_one_by_one_and_join_to_the_answer(make_lm, words, chat):
    lm = make_lm(use_chat_api=chat, cache=False)
    chunks = list(lm.stream("count"))
    assert len(chunks) == 4 and "".join(chunks) == "one two three four" == lm("count")[0]
    assert words.posts()[0].body["stream"] is True


def test_astream_yields_the_same(make_lm, words):
    lm = make_lm(use_chat_api=True, cache=False)

    async def collect():
        return [chunk async for chunk in lm.astream("count")]

    assert "".join(asyncio.run(collect())) == "one two three four"


def test_a_cached_answer_comes_back_as_one_chunk(make_lm, words):
    lm = make_lm(use_chat_api=True)
    assert len(list(lm.stream("count"))) == 4
    assert list(lm.stream("count")) == ["one two three four"]
    assert len(words.posts()) == 1
    assert [record.status for record in lm.usage] == ["ok", "cached"]


def test_a_stream_is_in_history_and_usage(make_lm, words):
    lm = make_lm(use_chat_api=True)
    "".join(lm.stream("count"))
    assert lm.history[-1]["outputs"] and lm.usage[-1].stream and lm.usage[-1].completion_tokens == 4


def test_a_sync_stream_sees_the_callers_dspy_context(make_lm, words):
    """The sync stream runs on a background loop, in a copy of the caller's context."""
    lm = make_lm(use_chat_api=True, cache=False)
    seen = []

    class Probe(dspy.utils.BaseCallback):
        def on_lm_start(self, call_id, instance, inputs):
            seen.append(threading.current_thread().name)

    with dspy.context(callbacks=[Probe()]):
        "".join(lm.stream("count"))
    assert seen == ["dspy-anyscale-loop"], "the caller's dspy.context reached the call on the background loop"


def test_closing_a_stream_early_stops_reading_and_records_it_cancelled(make_lm, words):
    lm = make_lm(use_chat_api=True, cache=False)
    chunks = lm.stream("count")
    assert next(chunks) == "one "
    chunks.close()
    assert lm.usage[-1].status == "cancelled"
    assert lm("after") == ["one two three four"], "the LM works on afterwards"


@pytest.mark.parametrize("kwargs", [{"n": 2}, {"cache": False}, {"rollout_id": 1}])
def test_a_stream_is_one_completion(make_lm, kwargs):
    with pytest.raises(UnsupportedParameterError, match="a stream is one completion"):
        make_lm().stream("x", **kwargs)


def test_options_are_checked_when_the_stream_is_made_not_when_read(make_lm, words):
    lm = make_lm()
    with pytest.raises(UnsupportedParameterError):
        lm.stream("x", n=2)  # no next() needed
    assert words.posts() == []
