"""A Router over the two real stand-in servers (llama.cpp's llama-server and llama-cpp-python's server):
one is killed in the middle of a dspy.Evaluate over 16 examples, and every example is still answered, once;
restarted on the same port, it gets traffic again after its cool-down.

The servers are started here (not the session's fixtures): this test kills one of them."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import threading
import time

import dspy
import pytest

from dspy_anyscale import Anyscale, Router

from ..conftest import SECRET
from ._servers import ALIAS

pytestmark = pytest.mark.integration

EXAMPLES = 16  # enough for calls before, during and after the kill; each costs ~1-3 s on 2 cores
KILL_AFTER = 5  # answered calls before the primary is killed
COOLDOWN_S = 5.0  # LiteLLM's default, the Router's too
BOUND_S = 600.0  # the whole evaluation, on 2 cores: a hang fails the test instead of the suite


def _member(server) -> Anyscale:
    return Anyscale(ALIAS, api_base=server.base_url, api_key=SECRET, use_chat_api=True, cache=False, max_tokens=32)


def _question(entry) -> str:
    return entry["messages"][-1]["content"].split("[[ ## question ## ]]")[-1].split("\n\n")[0].strip()


def _wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout:g}s"
        time.sleep(0.05)


def test_killing_a_member_mid_evaluate_loses_no_example_and_its_restart_gets_traffic_again():
    from dspy_anyscale.servers import llama_cpp_python, llama_server

    primary = llama_server.start(api_key=SECRET)
    backup = llama_cpp_python.start(api_key=SECRET)
    restarted = None
    lm = Router({"llama-server": _member(primary), "llama-cpp-python": _member(backup)}, cooldown_s=COOLDOWN_S)
    try:
        devset = [
            dspy.Example(question=f"Question {i}: what is {i} plus {i}?", answer=str(2 * i)).with_inputs("question")
            for i in range(EXAMPLES)
        ]
        evaluate = dspy.Evaluate(
            devset=devset,
            metric=lambda example, prediction, trace=None: prediction is not None and prediction.answer is not None,
            num_threads=2,
            max_errors=0,
            provide_traceback=True,
            display_progress=False,
        )
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                with dspy.context(lm=lm):
                    outcome["result"] = evaluate(dspy.Predict("question -> answer"))
            except BaseException as exc:  # handed to the test below
                outcome["error"] = exc

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        _wait(lambda: len(lm.history) >= KILL_AFTER, BOUND_S)
        os.kill(primary.pid, signal.SIGKILL)  # mid-run: a request may be in flight on it
        killed = time.monotonic()
        runner.join(BOUND_S)
        down_for = time.monotonic() - killed
        assert not runner.is_alive(), "the evaluation hung"
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert result.score == 100.0, "every example answered"

        # Every example answered, and no call answered twice (by one member, then the other): each distinct
        # request is in the history once. (DSPy's ChatAdapter may make a second, different call for an example
        # when the tiny model's answer does not parse: that is the program's, not a duplicate.)
        assert {_question(entry) for entry in lm.history} == {example.question for example in devset}
        calls = collections.Counter(json.dumps(entry["messages"], sort_keys=True) for entry in lm.history)
        assert set(calls.values()) == {1}, [call for call, count in calls.items() if count > 1][:2]
        by_member = collections.Counter(entry["endpoint"] for entry in lm.history)
        assert by_member["llama-server"] >= KILL_AFTER - 2 and by_member["llama-cpp-python"] > 0, by_member
        records = {name: [r for r in member.usage] for name, member in lm.members.items()}
        ok = {name: sum(r.status == "ok" for r in rs) for name, rs in records.items()}
        assert ok == dict(by_member), "one answered request per answered call, on the member that answered"
        # The killed member got the requests in flight when it died, then one trial per cool-down (each
        # refused at once, and moved on): never one request per call.
        failed = [r for r in records["llama-server"] if r.status != "ok"]
        assert len(failed) <= 2 + math.ceil(down_for / COOLDOWN_S) + 1, (len(failed), down_for)
        assert len(failed) < by_member["llama-cpp-python"], "fewer tries than the calls the backup answered"
        assert lm.health()["llama-server"].state == "down"

        # A new process on the same port: after its cool-down, the primary answers again.
        restarted = llama_server.start(port=primary.port, api_key=SECRET)
        until = lm.health()["llama-server"].until
        time.sleep(max(0.0, (until or 0.0) - time.time()) + 0.1)
        before = len(lm.members["llama-server"].usage)
        for i in range(3):
            lm(f"After the restart, say {i}.")
        assert lm.health()["llama-server"].state == "healthy"
        after = [r for r in lm.members["llama-server"].usage[before:] if r.status == "ok"]
        assert len(after) == 3 and [e["endpoint"] for e in lm.history[-3:]] == ["llama-server"] * 3
    finally:
        lm.close()
        for server in (restarted, backup, primary):
            if server is not None:
                with contextlib.suppress(Exception):  # already killed
                    server.stop()
