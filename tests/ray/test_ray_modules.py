"""Per-module attribution on Ray (issue 23): ``summarize_run(results, by="module")`` names each
predictor of a program run on a local Ray, and the modules add up to the run's total."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")

from dspy_anyscale.errors import ConfigurationError  # noqa: E402

from ..runs.test_modules import assert_modules_add_up, examples, two_step_program  # noqa: E402
from .test_ray import start_local_ray  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    return start_local_ray()  # shared with tests/ray/test_ray.py, which shuts it down


@pytest.fixture
def lm(make_lm):
    return make_lm(use_chat_api=True, cache=False, num_retries=0)


def test_summarize_run_by_module_names_each_predictor_and_adds_up(local_ray, lm, stub):
    from dspy_anyscale.ray import run_program, summarize_run

    results = run_program(two_step_program(), examples(4), lm=lm, concurrency=1, threads_per_actor=2, batch_size=2)
    summary = summarize_run(results)
    assert summary.rows == 4 and summary.modules == (), "without by=: as before"
    by_module = summarize_run(results, by="module")
    assert_modules_add_up(by_module, {"draft", "check"}, calls=4)
    assert by_module.cost_usd == summary.cost_usd and "draft" in str(by_module)
    row = results.take(1)[0]
    assert set(json.loads(row["usage_by_module"])) == {"draft", "check"}, "the row carries its modules"
    with pytest.raises(ConfigurationError, match="by must be None"):
        summarize_run(results, by="model")  # type: ignore[arg-type]  # the wrong value under test


def test_rows_without_the_column_count_as_not_recorded(local_ray):
    """A dataset of an older release's run (no usage_by_module): its costs still add up."""
    from dspy_anyscale.ray import summarize_run

    rows = [
        {"error": None, "prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.5, "latency_ms": 1.0},
        {"error": "ValueError: x", "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "latency_ms": 1.0},
    ]
    summary = summarize_run(ray.data.from_items(rows), by="module")
    assert [(m.module, m.calls, m.prompt_tokens, m.cost_usd) for m in summary.modules] == [
        ("(not recorded)", 0, 10, 0.5)
    ]
