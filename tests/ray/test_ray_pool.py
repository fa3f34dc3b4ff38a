"""A warm ProgramPool on a local Ray (2 CPUs) against the stub server: many runs, one start-up."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dspy
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")

from dspy_anyscale import Anyscale  # noqa: E402

from ..conftest import MODEL, SECRET  # noqa: E402
from .test_ray import by_question, check_unruly, examples, start_local_ray, unruly_program, unruly_rows  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="session")
def local_ray():
    return start_local_ray()  # shared with tests/ray/test_ray.py, which shuts it down


def pool_lm(base_url: str) -> Anyscale:
    return Anyscale(MODEL, api_base=base_url, api_key=SECRET, use_chat_api=True, cache=False, num_retries=6)


@pytest.fixture(scope="module")
def pool(local_ray, stub_server):
    """One pool for most tests of this file: its start-up (actors importing DSPy) is paid once."""
    from dspy_anyscale.ray import ProgramPool

    lm = pool_lm(stub_server.base_url)
    with ProgramPool(lm=lm, concurrency=2, threads_per_actor=4) as pool:
        yield pool
    lm.close()


@pytest.fixture
def lm(stub):
    lm = pool_lm(stub.base_url)
    yield lm
    lm.close()


def expected_rows(program, data, lm):
    with dspy.context(lm=lm):
        return {example.question: program(**example.inputs()) for example in data}


def test_a_pool_gives_correct_rows_on_each_of_three_runs(pool, lm, stub):
    from dspy_anyscale.ray import run_program, summarize_run

    cot, predict = dspy.ChainOfThought("question -> answer"), dspy.Predict("question -> answer")
    runs = [
        (cot, examples(60), {}),
        (predict, examples(25), {"materialize": False, "batch_size": 4}),  # the same eager run with a pool
        (cot, ray.data.from_items([e.toDict() for e in examples(30)]), {"input_keys": ["question"]}),
    ]
    for program, data, options in runs:
        stub.reset()
        results = run_program(program, data, pool=pool, **options)
        rows = by_question(results.take_all())
        truth = expected_rows(program, examples(len(rows)), lm)
        assert set(rows) == set(truth), "every row, once"
        for question, prediction in truth.items():
            row = rows[question]
            assert row["pred_answer"] == prediction.answer and row["error"] is None
            assert row["prompt_tokens"] > 0 and row["cost_usd"] > 0 and row["latency_ms"] > 0
        assert summarize_run(results).rows == len(truth)
        assert stub.max_in_flight <= 2 * 4, "the pool's concurrency x threads_per_actor bounds the requests"
    assert set(results.columns()) >= {"pred_reasoning", "pred_answer", "error", "prompt_tokens", "latency_ms"}


def test_the_program_as_changed_between_runs_is_the_one_that_runs(pool, stub):
    from dspy_anyscale.ray import run_program

    program = dspy.Predict("question -> answer")
    run_program(program, examples(8), pool=pool)
    assert not any("pirate" in str(post.body) for post in stub.posts())
    # What an optimizer does between two evaluations: new instructions, new demos.
    program.signature = program.signature.with_instructions("Answer like a pirate.")
    program.demos = [dspy.Example(question="demo question", answer="demo answer")]
    stub.reset()
    rows = run_program(program, examples(8), pool=pool).take_all()
    assert len(rows) == 8 and all(row["error"] is None for row in rows)
    bodies = [str(post.body) for post in stub.posts("/chat/completions")]
    assert len(bodies) == 8 and all("pirate" in body and "demo question" in body for body in bodies)


def test_runs_after_the_first_start_much_faster_than_a_new_pool(local_ray, lm, stub):
    from dspy_anyscale.errors import ConfigurationError
    from dspy_anyscale.ray import PoolError, ProgramPool, run_program

    program, data = dspy.Predict("question -> answer"), examples(2)
    started = time.perf_counter()
    with ProgramPool(lm=lm, concurrency=1, threads_per_actor=2) as pool:
        assert run_program(program, data, pool=pool).count() == 2
        cold = time.perf_counter() - started
        warm = []
        for _ in range(2):
            started = time.perf_counter()
            assert run_program(program, data, pool=pool).count() == 2
            warm.append(time.perf_counter() - started)
    # Generous: here ~0.1 s against ~3 s; the machine is shared, so only the ratio is asserted.
    assert max(warm) < cold / 4, (cold, warm)
    assert pool.closed
    pool.close()  # idempotent
    with pytest.raises(PoolError, match="refuses work: it was closed"):
        run_program(program, data, pool=pool)
    with pytest.raises(ConfigurationError, match="lm: this pool's workers run"):
        run_program(program, data, pool=pool, lm=Anyscale("other-model", api_base=stub.base_url, api_key=SECRET))


def test_evaluate_on_a_pool_matches_dspy_evaluate(pool, lm):
    from dspy_anyscale.ray import evaluate

    data = examples(20)
    for example in data[::3]:  # a third of the gold answers are wrong
        example["answer"] = "something else"

    def metric(example, prediction, trace=None):
        return example.answer == prediction.answer

    program = dspy.Predict("question -> answer")
    score, results = evaluate(program, data, metric, pool=pool)
    with dspy.context(lm=lm):
        expected = dspy.Evaluate(devset=data, metric=metric, num_threads=4)(program)
    assert score == expected.score == round(100 * 13 / 20, 2)
    assert results.count() == 20 and results.sum("score") == 13


def test_errors_are_reported_per_row_on_a_pool(pool, stub):
    from dspy_anyscale.ray import evaluate, summarize_run
    from dspy_anyscale.testing import dspy_field_responder

    def responder(endpoint, body):
        if "poison" in body["messages"][-1]["content"]:  # an empty answer DSPy cannot parse
            return {"content": None}
        return dspy_field_responder(endpoint, body)

    stub.responder = responder
    stub.chaos(0.15, seed=11)  # transient 5xx, 429, resets: retried inside each row
    data = examples(40)
    data[5] = dspy.Example(question="poison", answer="-").with_inputs("question")
    score, results = evaluate(dspy.Predict("question -> answer"), data, lambda e, p, trace=None: 1.0, pool=pool)
    rows = by_question(results.take_all())
    assert len(rows) == 40 and "AdapterParseError" in rows["poison"]["error"]
    # The server did answer the poison row (DSPy could not parse it): its tokens were billed, and counted.
    assert rows["poison"]["score"] == 0.0 and rows["poison"]["prompt_tokens"] > 0
    assert all(row["error"] is None for question, row in rows.items() if question != "poison")
    assert (summarize_run(results).errors, score) == (1, 97.5)
    assert len(stub.posts()) > 40, "faults were injected and retried"


def test_a_row_that_exits_kills_no_worker_and_mixed_columns_do_not_stop_the_run(pool, caplog):
    from dspy_anyscale.ray import run_program

    restarts = pool.restarts
    results = run_program(unruly_program(), unruly_rows(), pool=pool, input_keys=["question"], batch_size=2)
    check_unruly(results, caplog)
    assert pool.restarts == restarts and not pool.closed, "the SystemExit stayed in its row"


def test_a_pool_owns_its_lm_adapter_and_sizes(pool):
    from dspy_anyscale.errors import ConfigurationError
    from dspy_anyscale.ray import run_program

    program, data = dspy.Predict("question -> answer"), examples(2)
    same = {"lm": pool.lm, "concurrency": 2, "threads_per_actor": 4, "num_cpus": 0.25}
    assert run_program(program, data, pool=pool, **same).count() == 2, "the pool's own settings are accepted"
    refused = [
        ({"lm": pool.lm.copy(model="another-model")}, "lm: this pool's workers run"),
        ({"adapter": dspy.JSONAdapter()}, "adapter: this pool's workers use None"),
        ({"concurrency": 8}, "concurrency=8: with pool= the pool's concurrency=2 applies"),
        ({"threads_per_actor": 1}, "threads_per_actor=1"),
        ({"num_cpus": 1}, "num_cpus=1"),
    ]
    for options, message in refused:
        with pytest.raises(ConfigurationError, match=message):
            run_program(program, data, pool=pool, **options)


def test_the_key_travels_neither_with_the_pool_nor_with_a_run(pool):
    import cloudpickle

    from dspy_anyscale.ray import run_program
    from dspy_anyscale.ray._rows import RunSpec

    program = dspy.Predict("question -> answer")
    program.lm = pool.lm  # even an LM attached to the program
    assert SECRET not in repr(pool._lm_state)
    spec = RunSpec(program, ("question",), ("pred_answer",))
    assert SECRET.encode() not in cloudpickle.dumps((spec, pool._lm_state, pool.adapter))
    results = run_program(program, examples(10), pool=pool)
    assert all(row["error"] is None for row in results.take_all()), "workers read the key from their environment"
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for path in session.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), f"the key is in {path}"


def test_a_dead_worker_is_replaced_its_batch_retried_and_the_pool_never_hangs(local_ray, lm, caplog):
    from dspy_anyscale.ray import PoolError, ProgramPool, run_program

    class Crashing(dspy.Module):  # defined here, so that Ray sends it by value
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question):
            if question == "crash":
                os._exit(1)  # the worker process dies, as on an OOM kill or a lost node
            return self.predict(question=question)

    data = [*examples(10), dspy.Example(question="crash", answer="-").with_inputs("question")]
    with ProgramPool(lm=lm, concurrency=2, threads_per_actor=2, max_restarts=1) as pool:
        # The crash kills a worker (replaced), then on retry the other one (no restart left):
        # the batch's row reports it, the other rows complete on the replacement.
        rows = by_question(run_program(Crashing(), data, pool=pool, batch_size=1).take_all())
        assert len(rows) == 11 and pool.restarts == 1
        assert rows["crash"]["error"].startswith("ActorDiedError: the pool worker running this row's batch died")
        assert all(row["error"] is None for question, row in rows.items() if question != "crash")
        assert "pool worker" in caplog.text and "died" in caplog.text
        # The last worker dies too: the run raises (it does not wait forever) and the pool is done.
        with pytest.raises(PoolError, match="every worker died"):
            run_program(Crashing(), data[-2:], pool=pool, batch_size=1)
        assert pool.closed
        with pytest.raises(PoolError, match="refuses work: all its workers died"):
            run_program(Crashing(), data[:1], pool=pool)
