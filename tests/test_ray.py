"""DSPy programs over a Ray Dataset on a local Ray (2 CPUs) against the stub server."""

from __future__ import annotations

import os
from pathlib import Path

import dspy
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")

from dspy_anyscale import Anyscale  # noqa: E402

from .conftest import MODEL, SECRET  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="session")
def local_ray():
    # Workers inherit the environment of ray.init: that is how they get the key, never from the LM.
    previous = os.environ.get("ANYSCALE_API_KEY")
    os.environ.update(ANYSCALE_API_KEY=SECRET, RAY_USAGE_STATS_ENABLED="0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    if previous is None:
        os.environ.pop("ANYSCALE_API_KEY")
    yield ray
    ray.shutdown()


@pytest.fixture
def lm(stub):
    lm = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, use_chat_api=True, cache=False, num_retries=6)
    yield lm
    lm.close()


def examples(n: int) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"question {i}", answer=f"answer for question {i}").with_inputs("question")
        for i in range(n)
    ]


def by_question(rows):
    return {row["question"]: row for row in rows}


def test_200_examples_give_200_rows_identical_to_a_sequential_run(local_ray, lm, stub):
    from dspy_anyscale.ray import run_program, summarize_run

    program = dspy.ChainOfThought("question -> answer")
    data = examples(200)
    results = run_program(program, data, lm=lm, concurrency=2, threads_per_actor=4, batch_size=25)
    rows = by_question(results.take_all())
    assert len(rows) == 200
    with dspy.context(lm=lm):
        for example in data:
            expected = program(**example.inputs())
            row = rows[example.question]
            assert (row["pred_reasoning"], row["pred_answer"]) == (expected.reasoning, expected.answer)
            assert row["error"] is None and row["prompt_tokens"] > 0 and row["cost_usd"] > 0
    summary = summarize_run(results)
    assert (summary.rows, summary.errors) == (200, 0)
    assert summary.prompt_tokens == sum(row["prompt_tokens"] for row in rows.values())
    assert stub.max_in_flight <= 2 * 4, "concurrency bounds the requests in flight"


def test_transient_faults_are_retried_and_a_bad_row_is_reported_not_fatal(local_ray, lm, stub):
    from dspy_anyscale.ray import run_program, summarize_run
    from dspy_anyscale.testing import dspy_field_responder

    def responder(endpoint, body):
        # The "poison" question gets an empty answer, which DSPy cannot parse: a bad row.
        if "poison" in body["messages"][-1]["content"]:
            return {"content": None}
        return dspy_field_responder(endpoint, body)

    stub.responder = responder
    stub.chaos(0.15, seed=7)  # 15% of requests fail transiently: 5xx, 429, resets
    data = examples(60)
    data[17] = dspy.Example(question="poison", answer="-").with_inputs("question")
    results = run_program(
        dspy.Predict("question -> answer"), data, lm=lm, concurrency=2, threads_per_actor=4, batch_size=10
    )
    rows = by_question(results.take_all())
    assert len(rows) == 60, "none lost"
    assert "AdapterParseError" in rows["poison"]["error"]
    assert all(row["error"] is None for question, row in rows.items() if question != "poison")
    assert summarize_run(results).errors == 1
    assert len(stub.posts()) > 60, "faults were injected and retried"


def test_the_key_never_travels_with_the_job(local_ray, lm, stub):
    import cloudpickle

    from dspy_anyscale.ray import run_program

    program = dspy.Predict("question -> answer")
    program.lm = lm  # even an LM attached to the program
    assert SECRET not in repr(lm.dump_state())
    assert SECRET.encode() not in cloudpickle.dumps((program, lm.dump_state()))
    results = run_program(program, examples(10), lm=lm, concurrency=1)
    assert all(row["error"] is None for row in results.take_all()), "workers read the key from their environment"
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for path in session.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert SECRET.encode() not in path.read_bytes(), f"the key is in {path}"


def test_evaluate_matches_dspy_evaluate(local_ray, lm):
    from dspy_anyscale.ray import evaluate

    data = examples(20)
    for example in data[::3]:  # a third of the gold answers are wrong
        example["answer"] = "something else"

    def metric(example, prediction, trace=None):
        return example.answer == prediction.answer

    program = dspy.Predict("question -> answer")
    score, results = evaluate(program, data, metric, lm=lm, concurrency=2)
    with dspy.context(lm=lm):
        expected = dspy.Evaluate(devset=data, metric=metric, num_threads=4)(program)
    assert score == expected.score == round(100 * 13 / 20, 2)
    assert results.count() == 20 and "score" in results.columns()


def test_input_keys_are_required_when_they_cannot_be_inferred(local_ray, lm):
    from dspy_anyscale.ray import run_program

    with pytest.raises(ValueError, match="input_keys"):
        run_program(dspy.Predict("question -> answer"), [{"question": "q", "answer": "a"}], lm=lm)
    results = run_program(
        dspy.Predict("question -> answer"),
        [{"question": "q", "answer": "a"}],
        lm=lm,
        input_keys=["question"],
        concurrency=1,
    )
    assert results.take_all()[0]["pred_answer"] == "answer for q"
