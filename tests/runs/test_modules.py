"""Per-module attribution in a run's rows and summary (issue 23): each row's ``usage_by_module``, and
``RunResult.summarize(by="module")``, whose modules add up to the run's total, old outputs included."""

from __future__ import annotations

import json

import dspy
import pytest

import dspy_anyscale
from dspy_anyscale.errors import ConfigurationError

from .conftest import read_jsonl

pq = pytest.importorskip("pyarrow.parquet", reason="the Parquet output needs pyarrow: pip install -e '.[parquet]'")


def two_step_program() -> dspy.Module:
    """Two named predictors, each one LM call a row. Built in a function, so that Ray sends the class by
    value (tests/ray/test_ray_modules.py runs it on workers that cannot import the tests)."""

    class TwoSteps(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.draft = dspy.Predict("question -> answer")
            self.check = dspy.Predict("question, draft -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            draft = self.draft(question=question).answer
            return self.check(question=question, draft=draft)

    return TwoSteps()


def examples(n: int, start: int = 0) -> list[dspy.Example]:
    return [dspy.Example(question=f"question {i}").with_inputs("question") for i in range(start, start + n)]


def assert_modules_add_up(summary, names: set[str], calls: int) -> None:
    """Each of ``names`` made ``calls`` calls; the modules' tokens and costs are the run's."""
    modules = {m.module: m for m in summary.modules}
    assert set(modules) == names
    for name in names - {"(not recorded)"}:
        module = modules[name]
        assert module.calls == calls and module.prompt_tokens > 0 and module.completion_tokens > 0
        assert module.cost_usd > 0 and module.p50_ms is not None and module.p95_ms >= module.p50_ms
    assert sum(m.prompt_tokens for m in modules.values()) == summary.prompt_tokens
    assert sum(m.completion_tokens for m in modules.values()) == summary.completion_tokens
    assert sum(m.cost_usd for m in modules.values()) == pytest.approx(summary.cost_usd, rel=1e-9)


@pytest.fixture
def lm(make_lm):
    return make_lm(use_chat_api=True, cache=False, num_retries=0)


def test_the_summary_by_module_names_each_predictor_and_adds_up_to_the_total(lm, stub, tmp_path):
    output = tmp_path / "out.jsonl"
    result = dspy_anyscale.run_program(two_step_program(), examples(3), lm=lm, output=str(output), progress=False)
    assert result.summarize() is result.summary and result.summary.modules == (), "by default: as before"
    summary = result.summarize(by="module")
    assert_modules_add_up(summary, {"draft", "check"}, calls=3)
    assert (summary.rows, summary.cost_usd) == (result.summary.rows, result.summary.cost_usd)
    text = str(summary)
    assert text.startswith(str(result.summary)) and "draft" in text and "check" in text
    row = read_jsonl(output)[0]
    usage = json.loads(row["usage_by_module"])  # written with the row, for a resumed run's summary
    assert set(usage) == {"draft", "check"}
    assert sum(module["cost_usd"] for module in usage.values()) == pytest.approx(row["cost_usd"], rel=1e-9)
    assert all(len(module["latencies_ms"]) == module["calls"] == 1 for module in usage.values())


def test_a_row_that_made_no_call_has_no_usage_by_module(lm, stub):
    class NoCall(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.predict = dspy.Predict("question -> answer")

        def forward(self, question: str) -> dspy.Prediction:
            raise ValueError("no call made")

    result = dspy_anyscale.run_program(NoCall(), examples(2), lm=lm, progress=False)
    assert [row["usage_by_module"] for row in result.rows] == [None, None]
    assert result.summarize(by="module").modules == ()


def test_summarize_by_anything_else_is_refused(lm, stub):
    result = dspy_anyscale.run_program(two_step_program(), examples(1), lm=lm, progress=False)
    with pytest.raises(ConfigurationError, match=r"by must be None .* or 'module'"):
        result.summarize(by="endpoint")  # type: ignore[arg-type]  # the wrong value under test


def test_rows_of_an_older_output_count_as_not_recorded_and_still_add_up(lm, stub, tmp_path):
    output = tmp_path / "out.jsonl"
    dspy_anyscale.run_program(two_step_program(), examples(2), lm=lm, output=str(output), progress=False)
    older = [{k: v for k, v in row.items() if k != "usage_by_module"} for row in read_jsonl(output)]
    output.write_text("".join(json.dumps(row) + "\n" for row in older))  # as a release before the column wrote it
    result = dspy_anyscale.run_program(
        two_step_program(), examples(3), lm=lm, output=str(output), resume=True, progress=False
    )
    assert result.resumed == 2
    summary = result.summarize(by="module")
    assert_modules_add_up(summary, {"draft", "check", "(not recorded)"}, calls=1)
    not_recorded = next(m for m in summary.modules if m.module == "(not recorded)")
    assert not_recorded.cost_usd == pytest.approx(sum(row["cost_usd"] for row in older), rel=1e-9)


def test_a_parquet_output_resumed_from_one_without_the_column_keeps_it(lm, stub, tmp_path):
    """The merged file has every row's columns, even when its first row (an older one) lacks some."""
    output = tmp_path / "out.parquet"
    dspy_anyscale.run_program(two_step_program(), examples(2), lm=lm, output=str(output), progress=False)
    table = pq.read_table(output)
    pq.write_table(table.drop_columns(["usage_by_module"]), output)  # an output of a release before the column
    dspy_anyscale.run_program(two_step_program(), examples(3), lm=lm, output=str(output), resume=True, progress=False)
    rows = pq.read_table(output).to_pylist()
    assert len(rows) == 3
    assert [row["usage_by_module"] is None for row in rows] == [True, True, False]
