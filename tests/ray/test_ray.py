"""DSPy programs over a Ray Dataset on a local Ray (2 CPUs) against the stub server."""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import dspy
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")

from dspy_anyscale import Anyscale  # noqa: E402

from ..conftest import MODEL, SECRET  # noqa: E402

pytestmark = pytest.mark.ray


def start_local_ray():
    """One local Ray per test session, whichever Ray test file asks first (tests/ray/test_ray_pool.py too)."""
    if ray.is_initialized():
        return ray
    # Workers inherit the environment of ray.init: that is how they get the key, never from the LM.
    previous = os.environ.get("ANYSCALE_API_KEY")
    os.environ.update(ANYSCALE_API_KEY=SECRET, RAY_USAGE_STATS_ENABLED="0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    if previous is None:
        os.environ.pop("ANYSCALE_API_KEY")
    return ray


@pytest.fixture(scope="session")
def local_ray():
    yield start_local_ray()
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


def unruly_program() -> dspy.Module:
    """Exits on the row "exit"; returns an undeclared field as an int or a str, depending on the row."""

    class Unruly(dspy.Module):  # defined in a function, so that Ray sends it by value
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question):
            if question == "exit":
                sys.exit(3)  # a script's exit, or a library's sys.exit(): this row's error, not the worker's end
            answer = self.predict(question=question).answer
            return dspy.Prediction(answer=answer, extra=len(question) if len(question) % 2 else question)

    return Unruly()


def unruly_rows() -> list[dict]:
    """A column mixing str and int (and a program input doing so too), and a row whose program exits."""
    rows = [{"question": f"q{i}", "id": i if i % 2 else f"#{i}"} for i in range(10)]
    return [*rows, {"question": 7, "id": None}, {"question": "exit", "id": 99}]


def check_unruly(results, caplog) -> None:
    from dspy_anyscale.ray import summarize_run

    # One batch of every block: Arrow merges them, which fails if a column has two types in two blocks.
    [merged] = results.iter_batches(batch_size=100, batch_format="pyarrow")
    rows = by_question(merged.to_pylist())
    assert len(rows) == 12
    assert rows["exit"]["error"] == "SystemExit: 3"
    assert all(row["error"] is None for question, row in rows.items() if question != "exit")
    assert rows["7"]["pred_answer"] == "answer for 7" and rows["q3"]["id"] == "3" and rows["7"]["id"] is None
    assert {type(row["pred_extra"]) for question, row in rows.items() if question != "exit"} == {str}
    assert "column 'question' (int and str)" in caplog.text and "column 'id' (int and str)" in caplog.text
    assert summarize_run(results).errors == 1


def test_a_row_that_exits_and_columns_mixing_types_never_stop_a_run(local_ray, lm, caplog):
    from dspy_anyscale.ray import run_program

    outcome: dict = {}

    def run() -> None:
        try:
            program, rows = unruly_program(), unruly_rows()
            outcome["results"] = run_program(
                program, rows, lm=lm, input_keys=["question"], concurrency=1, threads_per_actor=2, batch_size=2
            )
        except BaseException as exc:  # reported below, in the test's thread
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=240)  # before the fix a SystemExit restarted the actor pool forever
    assert not runner.is_alive(), "the run never finished"
    assert "error" not in outcome, repr(outcome.get("error"))
    check_unruly(outcome["results"], caplog)


def test_a_prediction_field_keeps_its_declared_type_or_the_row_says_why(stub):
    from dspy_anyscale.ray._rows import RowRunner, RunSpec, output_columns

    class Counting(dspy.Module):
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict("question -> count: int, share: float | None, note")

        def forward(self, question):
            count = "many" if question == "bad" else 3
            return dspy.Prediction(count=count, share=1, note=7)

    program = Counting()
    lm = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, cache=False)
    runner = RowRunner(RunSpec(program, ("question",), tuple(output_columns(program, None))), lm, None)
    good, bad = runner({"question": "good"}), runner({"question": "bad"})
    assert (good["pred_count"], good["pred_share"], good["pred_note"], good["error"]) == (3, 1.0, "7", None)
    assert type(good["pred_share"]) is float
    assert bad["error"] == (
        "TypeError: pred_count: the signature declares int, and the program returned str 'many'; "
        "a column holds one type"
    )
    lm.close()


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


# --- bad input: refused before any Ray work, naming the parameter ----------------------------------


@pytest.fixture
def no_ray_work(monkeypatch):
    """Any Ray work (a dataset, an object, an actor, a map) fails the test: checks must come first."""

    def started(*args, **kwargs):
        raise AssertionError("Ray work started before the arguments were checked")

    import ray.data

    for target, name in [(ray, "init"), (ray, "put"), (ray, "remote"), (ray.data, "from_items")]:
        monkeypatch.setattr(target, name, started)
    monkeypatch.setattr(ray.data.Dataset, "map_batches", started)
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", started)


def exact(example, prediction, trace=None):
    return example.answer == prediction.answer


NOT_POSITIVE_INTS = [0, -1, 2.5, True, "4", None]
NOT_POSITIVE_NUMBERS = [0, -0.5, float("nan"), float("inf"), True, "1"]

RUN_PROGRAM_CASES = [
    ({"program": "qa"}, "program must be a dspy.Module"),
    ({"program": dspy.Predict}, "program must be a dspy.Module"),
    ({"lm": SECRET}, "lm must be a dspy_anyscale.Anyscale"),
    ({"lm": None}, "lm must be a dspy_anyscale.Anyscale"),
    ({"lm": dspy.LM("openai/gpt-4o-mini")}, "lm must be a dspy_anyscale.Anyscale"),
    ({"adapter": "json"}, "adapter must be None or a dspy.Adapter"),
    ({"adapter": dspy.JSONAdapter}, "adapter must be None or a dspy.Adapter"),
    ({"dataset": "question 1"}, "dataset must be a ray.data.Dataset or an iterable"),
    ({"dataset": {"question": "q"}}, "dataset must be a ray.data.Dataset or an iterable"),
    ({"dataset": 42}, "dataset must be a ray.data.Dataset or an iterable"),
    ({"dataset": [{"question": "q"}, "q2"]}, r"dataset\[1\] must be a dict or a dspy.Example"),
    ({"input_keys": "question"}, "input_keys must be a non-empty list of column names"),
    ({"input_keys": []}, "input_keys must be a non-empty list of column names"),
    ({"input_keys": [1]}, "input_keys must be a non-empty list of column names"),
    ({"input_keys": ["query"]}, "input_keys names 'query', not a column of the dataset"),
    *[({"concurrency": value}, "concurrency must be a positive int") for value in NOT_POSITIVE_INTS[:-1]],
    *[({"threads_per_actor": value}, "threads_per_actor must be a positive int") for value in NOT_POSITIVE_INTS[:-1]],
    *[({"batch_size": value}, "batch_size must be a positive int") for value in NOT_POSITIVE_INTS],
    *[({"num_cpus": value}, "num_cpus must be a positive number") for value in NOT_POSITIVE_NUMBERS],
    ({"metric": "exact"}, "metric must be None or a callable"),
    ({"failure_score": "0"}, "failure_score must be a number"),
    ({"failure_score": None}, "failure_score must be a number"),
    ({"materialize": "yes"}, "materialize must be True or False"),
    ({"pool": "warm"}, "pool must be a ProgramPool"),
]


def _ids(cases):
    # Without memory addresses: pytest-xdist's workers must collect the same names.
    names = [f"{next(iter(kwargs))}={next(iter(kwargs.values()))!r}" for kwargs, _ in cases]
    return [re.sub(r" object at 0x[0-9a-f]+", " object", name)[:40] for name in names]


@pytest.mark.parametrize(("bad", "message"), RUN_PROGRAM_CASES, ids=_ids(RUN_PROGRAM_CASES))
def test_run_program_refuses_bad_arguments_before_any_ray_work(bad, message, lm, no_ray_work):
    from dspy_anyscale.errors import ConfigurationError
    from dspy_anyscale.ray import run_program

    kwargs = {"program": dspy.Predict("question -> answer"), "dataset": examples(3), "lm": lm, **bad}
    with pytest.raises(ConfigurationError, match=message) as raised:
        run_program(kwargs.pop("program"), kwargs.pop("dataset"), **kwargs)
    assert isinstance(raised.value, ValueError)
    assert SECRET not in str(raised.value)


EVALUATE_CASES = [
    ({"metric": None}, "metric must be a callable"),
    ({"metric": "exact"}, "metric must be a callable"),
    ({"failure_score": "low"}, "failure_score must be a number"),
    ({"program": object()}, "program must be a dspy.Module"),
    ({"concurrency": 0}, "concurrency must be a positive int"),
    ({"input_keys": "question"}, "input_keys must be a non-empty list"),
]


@pytest.mark.parametrize(("bad", "message"), EVALUATE_CASES, ids=_ids(EVALUATE_CASES))
def test_evaluate_refuses_bad_arguments_before_any_ray_work(bad, message, lm, no_ray_work):
    from dspy_anyscale.errors import ConfigurationError
    from dspy_anyscale.ray import evaluate

    kwargs = {"program": dspy.Predict("question -> answer"), "dataset": examples(3), "metric": exact, **bad}
    with pytest.raises(ConfigurationError, match=message):
        evaluate(kwargs.pop("program"), kwargs.pop("dataset"), kwargs.pop("metric"), lm=lm, **kwargs)


POOL_CASES = [
    ({"lm": "m"}, "lm must be a dspy_anyscale.Anyscale"),
    ({"adapter": dspy.ChatAdapter}, "adapter must be None or a dspy.Adapter"),
    *[({"concurrency": value}, "concurrency must be a positive int") for value in NOT_POSITIVE_INTS],
    *[({"threads_per_actor": value}, "threads_per_actor must be a positive int") for value in NOT_POSITIVE_INTS],
    *[({"num_cpus": value}, "num_cpus must be a positive number") for value in NOT_POSITIVE_NUMBERS],
    ({"max_restarts": -1}, "max_restarts must be an int >= 0"),
    ({"start_timeout": 0}, "start_timeout must be a positive number"),
]


@pytest.mark.parametrize(("bad", "message"), POOL_CASES, ids=_ids(POOL_CASES))
def test_program_pool_refuses_bad_arguments_before_starting_actors(bad, message, lm, no_ray_work):
    from dspy_anyscale.errors import ConfigurationError
    from dspy_anyscale.ray import ProgramPool

    with pytest.raises(ConfigurationError, match=message):
        ProgramPool(**{"lm": lm, **bad})


def test_a_ray_dataset_is_checked_against_its_known_columns(local_ray, lm):
    from dspy_anyscale.errors import ConfigurationError
    from dspy_anyscale.ray import run_program

    data = ray.data.from_items([{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigurationError, match="input_keys names 'query', not a column"):
        run_program(dspy.Predict("question -> answer"), data, lm=lm, input_keys=["query"])
    with pytest.raises(ConfigurationError, match="pass input_keys"):
        run_program(dspy.Predict("question -> answer"), data, lm=lm)


@pytest.mark.parametrize(
    ("results", "seconds", "message"),
    [
        ([{"error": None}], None, "results must be the ray.data.Dataset"),
        ("dataset", None, "results must be the ray.data.Dataset"),
        ("rows", -1, "seconds must be None or a number of seconds >= 0"),
        ("rows", "3", "seconds must be None or a number of seconds >= 0"),
        ("questions", None, "results must come from run_program or evaluate: it has no error"),
    ],
)
def test_summarize_run_refuses_what_is_not_a_run(local_ray, results, seconds, message):
    from dspy_anyscale.errors import ConfigurationError
    from dspy_anyscale.ray import summarize_run

    if results == "rows":
        row = {"error": None, "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.0}
        results = ray.data.from_items([row])
    elif results == "questions":
        results = ray.data.from_items([{"question": "q"}])
    with pytest.raises(ConfigurationError, match=message):
        summarize_run(results, seconds=seconds)


def test_evaluate_names_an_unknown_option(lm, no_ray_work):
    from dspy_anyscale.ray import evaluate

    with pytest.raises(TypeError, match="concurency"):
        evaluate(dspy.Predict("question -> answer"), examples(2), exact, lm=lm, concurency=2)
