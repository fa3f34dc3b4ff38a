"""A Router is a DSPy LM like any other: programs, Evaluate, acall, streamify, optimizers' copies, saving and
pickling, with each member's cache kept apart, and never a deprecation warning."""

from __future__ import annotations

import asyncio
import copy
import pickle
import warnings

import dspy
import pytest
from dspy.lm15 import Message, Request
from dspy.streaming import StreamListener, StreamResponse

from dspy_anyscale import Anyscale, Router
from dspy_anyscale.testing import Fault

from ..conftest import MODEL, SECRET
from ..limits.test_limits import run_bounded


def test_evaluate_over_a_router_with_the_primary_down_answers_every_example(stubs, member, routers, closed_port):
    backup = stubs()
    lm = routers({"primary": member(closed_port), "backup": member(backup)})
    devset = [dspy.Example(question=f"q{i}", answer=f"answer for q{i}").with_inputs("question") for i in range(20)]
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm):
        result = dspy.Evaluate(devset=devset, metric=lambda e, p, trace=None: e.answer == p.answer, num_threads=4)(
            program
        )
    assert result.score == 100.0
    assert len(backup.posts()) == 20
    assert {entry["endpoint"] for entry in lm.history} == {"backup"} and len(lm.history) == 20


def test_no_deprecation_warning_on_any_entry_point(stubs, member, routers):
    primary, backup = stubs(), stubs()
    lm = routers({"primary": member(primary), "backup": member(backup)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="sync")
            asyncio.run(dspy.Predict("question -> answer").acall(question="async"))
        lm("direct")
        asyncio.run(lm.acall("direct async"))
        lm(Request(model=MODEL, messages=(Message.user("a request"),)))
        lm.forward(Request(model=MODEL, messages=(Message.user("forward"),)))
        asyncio.run(lm.aforward(Request(model=MODEL, messages=(Message.user("aforward"),))))
        list(lm.stream("a stream"))
    assert len(primary.posts()) == 8 and not backup.posts()


def test_a_program_run_with_deprecation_warnings_as_errors_in_a_fresh_interpreter(stubs, tmp_path):
    """``python -W error::DeprecationWarning``: nothing the Router does warns (a custom forward would)."""
    import subprocess
    import sys

    server = stubs()
    code = (
        "import dspy\n"
        "from dspy_anyscale import Anyscale, Router\n"
        f"a = Anyscale('m', api_base='{server.base_url}', api_key='{SECRET}', use_chat_api=True)\n"
        "lm = Router({'a': a, 'b': a.copy(temperature=0.5)})\n"
        "dspy.configure(lm=lm)\n"
        "print(dspy.ChainOfThought('question -> answer')(question='x').answer)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**__import__("os").environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "answer for x"


def test_streamify_falls_back_before_the_first_chunk(stubs, member, routers):
    primary, backup = stubs(), stubs()
    primary.script(Fault(status=503, headers={"Retry-After": "0"}))
    lm = routers({"primary": member(primary), "backup": member(backup)})
    program = dspy.streamify(
        dspy.Predict("question -> answer"), stream_listeners=[StreamListener(signature_field_name="answer")]
    )

    async def run():
        with dspy.context(lm=lm):
            return [item async for item in program(question="streamed?")]

    items = run_bounded(lambda: asyncio.run(run()))
    chunks = [item.chunk for item in items if isinstance(item, StreamResponse)]
    assert "".join(chunks).strip() == "answer for streamed?"
    assert items[-1].answer == "answer for streamed?"
    assert len(primary.posts()) == 1 and backup.posts()[0].body["stream"] is True


def test_streamify_does_not_move_on_once_a_chunk_was_sent(stubs, member, routers):
    primary, backup = stubs(), stubs()
    primary.script(Fault(stream_cut_after=4))
    lm = routers({"primary": member(primary), "backup": member(backup)})
    program = dspy.streamify(dspy.Predict("question -> answer"))

    async def run():
        with dspy.context(lm=lm):
            return [item async for item in program(question="cut?")]

    with pytest.raises(Exception):  # noqa: B017 - DSPy wraps the member's error its own way
        run_bounded(lambda: asyncio.run(run()))
    assert not backup.posts(), "the caller already had the primary's first chunks"


def test_an_answer_cached_from_the_backup_is_never_served_for_the_primary(stubs, member, routers):
    primary, backup = stubs(), stubs()
    lm = routers({"primary": member(primary, cache=True), "backup": member(backup, cache=True)})
    primary.script(Fault(status=503, headers={"Retry-After": "0"}))
    with dspy.context(lm=lm):
        program = dspy.Predict("question -> answer")
        program(question="cached?")  # the primary fails: the backup answers, and its cache keeps it
        assert len(backup.posts()) == 1
        program(question="cached?")  # the primary is healthy: its own answer, not the backup's cached one
        assert len(primary.posts()) == 2
        program(question="cached?")  # now the primary's cache has it
    assert len(primary.posts()) == 2 and len(backup.posts()) == 1
    assert [entry["endpoint"] for entry in lm.history] == ["backup", "primary", "primary"]


def test_copies_share_health_and_the_ledger_and_copy_every_member(stubs, member, routers, closed_port):
    backup = stubs()
    lm = routers({"gone": member(closed_port), "backup": member(backup)}, max_requests=10)
    lm("q")
    clone = lm.copy(rollout_id=1, temperature=1.0)
    assert all(m.kwargs["temperature"] == 1.0 and m.kwargs["rollout_id"] == 1 for m in clone.members.values())
    assert lm.members["backup"].kwargs["temperature"] == 0.0
    assert clone.health()["gone"].state == "down", "a copy knows what the original learned"
    clone("q")
    # One ledger: the refused connection counts too, as for an Anyscale's own max_requests (errs safe).
    assert (lm.spending().requests, lm.spending().failed) == (3, 1)
    assert clone.history and not lm.history[1:]
    unlimited = lm.copy(max_requests=None)
    assert not unlimited.limiter.enabled and lm.limiter.enabled
    deep = copy.deepcopy(lm)
    assert deep("deep") == ["echo: deep"] and deep.health()["gone"].state == "down"


def test_batch_and_an_optimizer_run_over_a_router_with_the_primary_down(stubs, member, routers, closed_port):
    backup = stubs()
    lm = routers({"primary": member(closed_port), "backup": member(backup)})
    trainset = [dspy.Example(question=f"q{i}", answer=f"answer for q{i}").with_inputs("question") for i in range(4)]
    with dspy.context(lm=lm):
        program = dspy.Predict("question -> answer")
        predictions = program.batch([example.inputs() for example in trainset], num_threads=2)
        optimizer = dspy.BootstrapFewShot(metric=lambda e, p, trace=None: e.answer == p.answer, max_rounds=1)
        compiled = optimizer.compile(dspy.Predict("question -> answer"), trainset=trainset)
        assert compiled(question="new").answer == "answer for new"
    assert [p.answer for p in predictions] == [e.answer for e in trainset]
    assert {entry["endpoint"] for entry in lm.history} == {"backup"}


def test_best_of_n_runs_over_a_router(stubs, member, routers):
    backup = stubs()
    lm = routers({"a": member(stubs()), "b": member(backup)}, strategy="weighted")
    with dspy.context(lm=lm):
        prediction = dspy.BestOfN(
            dspy.Predict("question -> answer"), N=3, reward_fn=lambda args, pred: 1.0, threshold=1.0
        )(question="best?")
    assert prediction.answer == "answer for best?"


def test_dump_state_and_load_state_rebuild_it_without_keys(stubs, member, routers, monkeypatch, tmp_path):
    primary, backup = stubs(), stubs()
    lm = routers(
        {"primary": member(primary), "backup": member(backup)},
        strategy="weighted",
        weights={"primary": 3, "backup": 1},
        fallback_on=[503, dspy.utils.exceptions.LMTimeoutError],
        cooldown_s=7.0,
        routing_key="prompt",
        max_requests=50,
    )
    state = lm.dump_state()
    assert SECRET not in repr(state)
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    loaded = dspy.BaseLM.load_state(state, allow_custom_lm_class=True)
    assert isinstance(loaded, Router) and loaded.dump_state() == state
    assert loaded("again") == ["echo: again"]
    program = dspy.Predict("question -> answer")
    program.lm = lm
    program.save(tmp_path / "program.json")
    assert SECRET not in (tmp_path / "program.json").read_text()
    restored = dspy.Predict("question -> answer")
    restored.load(tmp_path / "program.json", allow_unsafe_lm_state=True)
    assert isinstance(restored.lm, Router) and restored.lm.members["backup"].api_base == backup.base_url


def test_a_routing_key_function_is_saved_by_its_import_path_and_a_lambda_is_refused(stubs, member, routers):
    a = stubs()
    lm = routers({"a": member(a), "b": member(stubs())}, strategy="weighted", routing_key=_question_of)
    assert lm.dump_state()["routing_key"] == f"{__name__}:_question_of"
    lambda_keyed = routers({"a": member(a), "b": member(stubs())}, strategy="weighted", routing_key=lambda p: "x")
    with pytest.raises(ValueError, match=r"routing_key=.*cannot be saved"):
        lambda_keyed.dump_state()


def _question_of(messages):
    return str(messages)[-40:]


def test_pickling_drops_every_key_and_a_rebuilt_router_answers(stubs, member, routers, monkeypatch):
    primary, backup = stubs(), stubs()
    lm = routers({"primary": member(primary), "backup": member(backup)}, health_check_interval_s=30)
    data = pickle.dumps(lm)
    assert SECRET.encode() not in data
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    restored = pickle.loads(data)
    try:
        assert restored("after unpickling") == ["echo: after unpickling"]
        assert restored.health()["primary"].state == "healthy" and restored._probes.running
    finally:
        restored.close()


def test_what_dspy_reads_of_an_lm(stubs, member, routers):
    a, b = stubs(), stubs()
    chat = member(a)
    lm = routers({"chat": chat, "text": member(b, use_chat_api=False, supports_tools=False)})
    assert lm.model == "router(chat, text)" and lm.model_type == "chat"
    assert lm.kwargs is chat.kwargs and lm.num_retries == chat.num_retries
    assert not lm.supports_function_calling and not lm.supports_response_schema
    assert "response_format" not in lm.supported_params
    lm.cache = True
    assert lm.cache and all(m.cache for m in lm.members.values())
    assert isinstance(lm, dspy.BaseLM) and "Router({'chat': Anyscale(" in repr(lm)


def test_a_list_of_members_is_named_model_at_host(stubs, member, routers):
    a = stubs()
    first, second = member(a), member(a)
    lm = routers([first, second])
    assert list(lm.members) == [f"{MODEL}@127.0.0.1:{a.port}", f"{MODEL}@127.0.0.1:{a.port}#2"]


def test_anyscale_is_what_members_are():
    with pytest.raises(ValueError, match=r"members\['x'\] must be a dspy_anyscale.Anyscale or Router"):
        Router({"x": dspy.LM("openai/gpt-4o-mini")})
    assert issubclass(Router, dspy.BaseLM) and not issubclass(Anyscale, Router)
