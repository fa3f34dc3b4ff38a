"""dspy_anyscale.run_program / evaluate on threads, against the stub: rows, ids, resume, refusals,
budgets, progress, and every wrong argument refused before anything runs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

import dspy_anyscale
from dspy_anyscale import _constants as C
from dspy_anyscale.errors import ConfigurationError
from dspy_anyscale.limits import Limits

from ..conftest import MODEL, SECRET
from .conftest import read_jsonl

PRICES = {"input": 10.0, "output": 10.0}  # USD per million tokens: a stub row costs about $0.0013


def examples(n: int, start: int = 0) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"question {i}", answer=f"answer for question {i}").with_inputs("question")
        for i in range(start, start + n)
    ]


def exact(example, prediction, trace=None) -> bool:
    return example.answer == prediction.answer


class Flaky(dspy.Module):
    """Fails the rows whose question is in ``failing`` (a set the test changes between runs)."""

    def __init__(self, failing: set[str]) -> None:
        super().__init__()
        self.failing = failing
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        if question in self.failing:
            raise ValueError(f"cannot answer {question}")
        return self.predict(question=question)


@pytest.fixture
def lm(make_lm):
    return make_lm(use_chat_api=True, cache=False, num_retries=0)


def run(program, data, lm, **options):
    return dspy_anyscale.run_program(program, data, lm=lm, progress=False, **options)


# --- rows and ids ------------------------------------------------------------------------------------


def test_rows_look_like_the_ray_runners_with_a_row_id_from_the_inputs(lm, stub, tmp_path):
    data = [*examples(5), dspy.Example(question="question 0", answer="again").with_inputs("question")]
    result = run(dspy.ChainOfThought("question -> answer"), data, lm, output=str(tmp_path / "out.jsonl"), num_threads=3)
    rows = result.rows
    assert [row["question"] for row in rows] == [example.question for example in data], "in the data's order"
    first = rows[0]
    assert first["pred_answer"] == "answer for question 0" and first["pred_reasoning"]
    assert first["error"] is None and first["prompt_tokens"] > 0 and first["cost_usd"] > 0 and first["latency_ms"] > 0
    ids = [row["row_id"] for row in rows]
    assert ids[-1] == f"{ids[0]}-2", "the same inputs again: told apart by their turn"
    assert len(set(ids)) == 6 and all(len(row_id.split("-")[0]) == C.RUNS_ROW_ID_DIGITS for row_id in ids)
    again = run(dspy.ChainOfThought("question -> answer"), data[:2], lm)
    assert [row["row_id"] for row in again.rows] == ids[:2], "the same inputs, the same ids, in any process"
    assert sorted(json.dumps(r, sort_keys=True) for r in read_jsonl(tmp_path / "out.jsonl")) == sorted(
        json.dumps(r, sort_keys=True) for r in rows
    ), "the output holds the rows returned"
    assert stub.max_in_flight <= 3
    assert result.complete and result.summary.rows == 6 and str(result.summary).startswith("6 rows, 0 errors")


def test_an_id_column_names_the_rows_and_must_be_unique(lm, stub):
    data = [{"id": 7, "question": "q7"}, {"id": "8", "question": "q8"}]
    result = run(dspy.Predict("question -> answer"), data, lm, input_keys=["question"], id_column="id")
    assert [row["row_id"] for row in result.rows] == ["7", "8"]
    options = {"input_keys": ["question"], "id_column": "id"}
    with pytest.raises(ConfigurationError, match=r"id_column='id': rows 0 and 1 share the id '7'"):
        run(dspy.Predict("question -> answer"), [data[0], {"id": 7.0, "question": "q"}], lm, **options)
    with pytest.raises(ConfigurationError, match=r"row 1 has no value"):
        run(dspy.Predict("question -> answer"), [data[0], {"question": "q"}], lm, **options)
    assert len(stub.posts()) == 2, "refused before anything was sent"


# --- resume ------------------------------------------------------------------------------------------


def test_resume_skips_done_rows_and_runs_error_rows_again_only_when_asked(lm, stub, tmp_path):
    output = str(tmp_path / "out.jsonl")
    failing = {"question 1", "question 3"}
    program = Flaky(failing)
    first = run(program, examples(4), lm, output=output)
    assert [row["error"] is not None for row in first.rows] == [False, True, False, True]
    assert first.complete, "a row whose program raised is done: its error is its result"
    assert len(stub.posts()) == 2
    failing.clear()  # fixed: the error rows would now succeed
    kept = run(program, examples(6), lm, output=output, resume=True)
    assert len(stub.posts()) == 4, "only the two new rows ran"
    assert kept.resumed == 4
    assert [row["error"] is not None for row in kept.rows] == [False, True, False, True, False, False]
    retried = run(program, examples(6), lm, output=output, resume=True, retry_errors=True)
    assert len(stub.posts()) == 6, "the two error rows ran again, nothing else"
    assert retried.resumed == 4 and all(row["error"] is None for row in retried.rows)
    written = read_jsonl(Path(output))
    assert sorted(row["question"] for row in written) == [f"question {i}" for i in range(6)], "each row once"
    assert all(row["error"] is None for row in written)


def test_evaluate_scores_the_rows_kept_and_the_rows_run_together(lm, stub, tmp_path):
    output = str(tmp_path / "scored.jsonl")
    data = [*examples(6), *[dspy.Example(question=f"odd {i}", answer="no").with_inputs("question") for i in range(4)]]
    program = dspy.Predict("question -> answer")
    first, _ = dspy_anyscale.evaluate(program, data[:4], exact, lm=lm, output=output, progress=False)
    assert first == 100.0
    score, result = dspy_anyscale.evaluate(program, data, exact, lm=lm, output=output, resume=True, progress=False)
    with dspy.context(lm=lm):
        expected = dspy.Evaluate(devset=data, metric=exact, num_threads=2)(program).score
    assert score == expected == 60.0 and result.summary.score == score
    assert result.resumed == 4 and len(stub.posts()) == 10 + 10, "6 rows ran for the evaluation, 10 for dspy.Evaluate"


@pytest.mark.parametrize(
    ("second", "change"),
    [
        (
            {"program": dspy.Predict("question -> answer, confidence")},
            r"signature of 'self' changed: outputs \(answer: str\), now \(answer: str, confidence: str\)",
        ),
        ({"program": dspy.Predict("question: str -> answer: int")}, r"outputs \(answer: str\), now \(answer: int\)"),
        ({"program": dspy.ChainOfThought("question -> answer")}, r"predictors were \['self'\], now \['predict'\]"),
        ({"input_keys": ["question", "answer"]}, r"input columns were \['question'\], now \['question', 'answer'\]"),
        ({"id_column": "answer"}, r"identified by a digest of the input fields, now by the column 'answer'"),
        ({"metric": exact}, r"the metric was None, now 'exact'"),
    ],
)
def test_an_output_of_another_run_is_refused_naming_what_changed(second, change, lm, stub, tmp_path):
    output = str(tmp_path / "out.jsonl")
    run(dspy.Predict("question -> answer"), examples(3), lm, output=output)
    program = second.pop("program", dspy.Predict("question -> answer"))
    with pytest.raises(ConfigurationError, match=change):
        run(program, examples(3), lm, output=output, resume=True, **second)
    assert len(stub.posts()) == 3, "refused before anything was sent"


def test_an_output_is_never_overwritten_without_resume(lm, stub, tmp_path):
    output = tmp_path / "out.jsonl"
    run(dspy.Predict("question -> answer"), examples(2), lm, output=str(output))
    before = output.read_bytes()
    with pytest.raises(ConfigurationError, match="already holds 2 rows of an earlier run: pass resume=True"):
        run(dspy.Predict("question -> answer"), examples(2), lm, output=str(output))
    (tmp_path / "foreign.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ConfigurationError, match="holds rows but no manifest"):
        run(dspy.Predict("question -> answer"), examples(2), lm, output=str(tmp_path / "foreign.jsonl"), resume=True)
    assert output.read_bytes() == before and len(stub.posts()) == 2


def test_a_line_cut_short_by_a_kill_is_run_again(lm, stub, tmp_path):
    output = tmp_path / "out.jsonl"
    run(dspy.Predict("question -> answer"), examples(3), lm, output=str(output))
    rows = read_jsonl(output)
    whole = b"".join(json.dumps(row).encode() + b"\n" for row in rows[:2])
    output.write_bytes(whole + json.dumps(rows[2]).encode()[:30])  # the third row, cut short
    result = run(dspy.Predict("question -> answer"), examples(3), lm, output=str(output), resume=True)
    assert result.resumed == 2 and len(stub.posts()) == 4
    assert sorted(row["question"] for row in read_jsonl(output)) == [f"question {i}" for i in range(3)]


@pytest.mark.parametrize("where", ["dir", "file.parquet", "memory"])
def test_parquet_outputs_resume_and_hold_each_row_once(where, lm, stub, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    options = {"output": str(tmp_path / where)}
    if where == "memory":  # any fsspec filesystem (here fsspec's in-memory one)
        fsspec = pytest.importorskip("fsspec")
        options = {"output": f"/run-{tmp_path.name}", "filesystem": fsspec.filesystem("memory")}
    failing = {"question 2"}
    program = Flaky(failing)
    run(program, examples(4), lm, **options)
    cut = tmp_path / "dir" / "_tmp-part-killed-while-written.parquet"
    if where == "dir":  # a part a killed run was writing (written under this name, renamed when whole)
        cut.write_bytes(b"PAR1 cut short")
    failing.clear()
    result = run(program, examples(7), lm, resume=True, retry_errors=True, **options)
    assert not cut.exists()
    assert result.resumed == 3 and len(stub.posts()) == 3 + 4
    if where == "memory":
        return
    table = pq.read_table(options["output"])
    assert sorted(table.column("question").to_pylist()) == [f"question {i}" for i in range(7)], "each row once"
    assert table.column("error").null_count == 7
    if where == "file.parquet":
        assert not (tmp_path / "file.parquet.parts").exists(), "the parts were merged into the file"
        assert table.schema.metadata[C.RUNS_PARQUET_METADATA_KEY.encode()]


def test_a_parquet_output_without_pyarrow_says_what_to_install(lm, stub, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as in an environment without the parquet extra
    monkeypatch.delitem(sys.modules, "dspy_anyscale.runs.parquet", raising=False)
    with pytest.raises(ConfigurationError, match=r"needs pyarrow: pip install 'dspy-anyscale\[parquet\]'"):
        run(dspy.Predict("question -> answer"), examples(2), lm, output=str(tmp_path / "results"))
    assert not stub.posts() and not list(tmp_path.iterdir())


def test_importing_the_package_loads_no_run_machinery_and_a_jsonl_run_no_pyarrow(stub, tmp_path):
    code = (
        "import os, sys\n"
        "os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] = 'True'\n"
        "import dspy, dspy_anyscale\n"
        "print(sorted(m for m in sys.modules if m.startswith('dspy_anyscale.runs')))\n"
        "lm = dspy_anyscale.Anyscale(sys.argv[3], api_base=sys.argv[1], api_key=sys.argv[2], use_chat_api=True)\n"
        "data = [dspy.Example(question='q').with_inputs('question')]\n"
        "dspy_anyscale.run_program(dspy.Predict('question -> answer'), data, lm=lm, output='o.jsonl', progress=False)\n"
        "print('pyarrow' in sys.modules, 'dspy_anyscale.runs.parquet' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, stub.base_url, SECRET, MODEL],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "DSPY_CACHEDIR": str(tmp_path / "dspy-cache")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "False False"], "runs/ on first use; pyarrow only for Parquet"


# --- budgets, progress, Ctrl-C handlers ----------------------------------------------------------------


def test_a_budget_that_runs_out_ends_the_run_saying_how_to_resume(make_lm, stub, tmp_path, caplog):
    output = str(tmp_path / "out.jsonl")
    lm = make_lm(use_chat_api=True, cache=False, num_retries=0, prices=PRICES, max_tokens=50)
    program, data = dspy.Predict("question -> answer"), examples(12)
    with caplog.at_level(logging.WARNING, logger=C.LOGGER_NAME):
        result = run(program, data, lm, output=output, num_threads=1, limits=Limits(budget_usd=0.01))
    answered = [row for row in result.rows if row["error"] is None]
    assert 0 < len(answered) < 12 and not result.complete
    assert result.not_run == 12 - len(answered) and "budget_usd is used up" in result.stopped
    assert len(stub.posts()) == len(answered), "nothing of the rows left was sent"
    said = caplog.text
    assert f"{len(answered)} of 12 rows are in {output}; {12 - len(answered)} were not run" in said
    assert "To resume, run with a bigger budget: dspy_anyscale.run_program(program, data, output=" in said
    assert "resume=True, limits=Limits(budget_usd=...)" in said and "Execution cancelled" not in said
    assert result.resume_hint is not None and "resume=True" in result.resume_hint
    assert not lm.limiter.enabled, "the run's limits were the run's"
    more = run(program, data, lm, output=output, resume=True, limits=Limits(budget_usd=1.0))
    assert more.complete and more.resumed == len(answered) and len(stub.posts()) == 12
    assert sorted(row["question"] for row in read_jsonl(Path(output))) == sorted(e.question for e in data)


def test_rows_a_budget_refused_while_others_were_in_flight_are_reported_as_not_run(make_lm, stub, tmp_path):
    """Refused because of what 16 rows in flight hold, not because the budget is used up: the run goes on
    (refusals send nothing) and the rows refused are reported as not run, with the reason."""
    stub.latency = 0.02
    lm = make_lm(use_chat_api=True, cache=False, num_retries=0, max_tokens=100)  # $1/M tokens: ~$0.0002 a row
    output = str(tmp_path / "out.jsonl")
    result = run(dspy.Predict("question -> answer"), examples(200), lm, output=output, limits=Limits(budget_usd=0.01))
    answered = [row for row in result.rows if row["error"] is None]
    assert 0 < len(answered) < 200 and result.not_run == 200 - len(answered) and not result.complete
    assert result.stopped, "why the rows were not run, whether or not the budget is used up"
    assert f"{result.not_run} rows not run: {result.stopped}" in repr(result) and ": None" not in repr(result)


def test_without_a_terminal_progress_is_log_lines_with_the_figures(lm, monkeypatch, caplog):
    monkeypatch.setattr(C, "RUNS_PROGRESS_LOG_INTERVAL_S", 0.0)  # a line per row, for the test
    with caplog.at_level(logging.INFO, logger=C.LOGGER_NAME):
        dspy_anyscale.run_program(dspy.Predict("question -> answer"), examples(4), lm=lm, num_threads=1)
    lines = [r.getMessage() for r in caplog.records if r.name == C.LOGGER_NAME and r.funcName == "_line"]
    assert lines[0].startswith("0/4 rows (0%), 0.0 rows/s, 0 errors, 0 tokens, $0.000000") and "(started)" in lines[0]
    assert any(line.startswith("2/4 rows (50%)") and " left" in line for line in lines), lines
    assert lines[-1].startswith("4/4 rows (100%)") and lines[-1].endswith("(finished)") and "$0.00" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=C.LOGGER_NAME):
        run(dspy.Predict("question -> answer"), examples(2), lm)  # progress=False
    assert not [r for r in caplog.records if r.funcName == "_line"]


def test_the_ctrl_c_handler_is_the_runs_only_while_it_runs(lm):
    before = signal.getsignal(signal.SIGINT)
    seen = []

    class Peek(dspy.Module):
        def forward(self, question):
            seen.append(signal.getsignal(signal.SIGINT))
            return dspy.Prediction(answer="a")

    run(Peek(), examples(2), lm, num_threads=1)
    assert seen and all(handler is not before for handler in seen)
    assert signal.getsignal(signal.SIGINT) is before


# --- wrong arguments: refused before anything runs ---------------------------------------------------

BAD = [
    ({"output": 42}, "output must be a path or URI"),
    ({"output": "results.csv"}, "a run writes JSONL"),
    ({"output": "s3://bucket/results.jsonl"}, "a JSONL output is appended and flushed row by row"),
    ({"output": "out/", "filesystem": "s3"}, "filesystem must be None, a pyarrow.fs.FileSystem"),
    ({"resume": True}, r"resume=True continues an earlier run from its output: pass output="),
    ({"output": "o.jsonl", "retry_errors": True}, "retry_errors=True runs the error rows of an earlier run again"),
    ({"resume": "yes", "output": "o.jsonl"}, "resume must be True or False"),
    ({"progress": "ray"}, "progress must be True or False"),
    ({"num_threads": 0}, "num_threads must be a positive int"),
    ({"num_threads": True}, "num_threads must be a positive int"),
    ({"id_column": "id"}, "id_column='id' is not a column of the data"),
    ({"id_column": 3}, "id_column must be None or a column name"),
    ({"lm": "gpt"}, "lm must be a dspy LM"),
    ({"metric": "exact"}, "metric must be None or a callable"),
    ({"failure_score": "0"}, "failure_score must be a number"),
    ({"limits": "5 USD"}, "limits must be None or a dspy_anyscale.limits.Limits"),
    ({"data": [{"question": "q", "row_id": 1}], "input_keys": ["question"]}, "the data has a 'row_id' column"),
    ({"data": "questions"}, "dataset must be"),
    ({"input_keys": ["query"]}, "input_keys names 'query', not a column"),
]


@pytest.mark.parametrize(("bad", "message"), BAD, ids=[f"{next(iter(bad))}-{i}" for i, (bad, _) in enumerate(BAD)])
def test_wrong_arguments_are_refused_before_anything_runs(bad, message, lm, stub, tmp_path):
    options = {"lm": lm, **bad}
    data = options.pop("data", examples(2))
    with pytest.raises(ConfigurationError, match=message):
        dspy_anyscale.run_program(dspy.Predict("question -> answer"), data, **options)
    assert not stub.posts() and not list(tmp_path.iterdir())


def test_a_run_with_limits_needs_an_lm_that_can_hold_them(make_lm, stub):
    lm = make_lm(use_chat_api=True, prices=PRICES, max_tokens=50, budget_usd=1.0)
    with pytest.raises(ConfigurationError, match="already count against the lm's"):
        run(dspy.Predict("question -> answer"), examples(1), lm, limits=Limits(max_requests=3))
    unpriced = make_lm(model="stub-model", use_chat_api=True)
    with pytest.raises(ConfigurationError, match="budget_usd needs prices"):
        run(dspy.Predict("question -> answer"), examples(1), unpriced, limits=Limits(budget_usd=1.0))
    with pytest.raises(ConfigurationError, match=r"limits for a run need a dspy_anyscale\.Anyscale lm"):
        run(dspy.Predict("question -> answer"), examples(1), dspy.LM("openai/x"), limits=Limits(max_requests=3))
    assert not stub.posts()


def test_evaluate_needs_a_metric_and_names_an_unknown_option(lm):
    with pytest.raises(ConfigurationError, match="metric must be a callable"):
        dspy_anyscale.evaluate(dspy.Predict("question -> answer"), examples(1), None, lm=lm)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['concurrency'\]"):
        dspy_anyscale.evaluate(dspy.Predict("question -> answer"), examples(1), exact, lm=lm, concurrency=2)


def test_the_lm_and_adapter_default_to_dspys_settings(lm, stub):
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        result = dspy_anyscale.run_program(dspy.Predict("question -> answer"), examples(2), progress=False)
    assert all(row["error"] is None for row in result.rows)
    assert all("JSON" in json.dumps(post.body) for post in stub.posts()), "the JSON adapter's prompts"
    with pytest.raises(ConfigurationError, match="lm must be a dspy LM"):
        dspy_anyscale.run_program(dspy.Predict("question -> answer"), examples(1), progress=False)
    assert SECRET not in repr(result) and MODEL
