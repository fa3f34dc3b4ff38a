"""Per-module attribution: every usage record, history entry and ledger count names the DSPy module
that made the call, under threads, acall, dspy.Parallel and dspy.Evaluate, and the per-module totals
add up to the LM's."""

from __future__ import annotations

import asyncio
import json
import threading

import dspy
import pytest

from dspy_anyscale._attribution import child_name, module_path
from dspy_anyscale.cli import main as cli
from dspy_anyscale.errors import ConfigurationError
from dspy_anyscale.limits import Limits
from dspy_anyscale.limits._ledger import Ask, LedgerState
from dspy_anyscale.usage import format_summary, read_log, summarize

PRICES = {"input": 1.0, "output": 2.0}
MODULES = {"generate_query.predict", "answer"}
JOIN_S = 60  # a hung thread fails the test instead of the suite


class TwoStep(dspy.Module):
    """Two named predictors: a ChainOfThought (whose Predict is ``.predict``) and a Predict."""

    def __init__(self) -> None:
        super().__init__()
        self.generate_query = dspy.ChainOfThought("question -> query")
        self.answer = dspy.Predict("question, query -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        query = self.generate_query(question=question).query
        return self.answer(question=question, query=query)

    async def aforward(self, question: str) -> dspy.Prediction:
        query = (await self.generate_query.acall(question=question)).query
        return await self.answer.acall(question=question, query=query)


@pytest.fixture
def priced(make_lm, tmp_path):
    """An LM with prices and a budget (so it keeps a ledger), a usage log, and no cache."""
    log = tmp_path / "usage.jsonl"
    lm = make_lm(use_chat_api=True, prices=PRICES, budget_usd=10.0, cache=False, usage_log=log)
    dspy.configure(lm=lm)
    return lm, log


def assert_adds_up(lm) -> None:
    """Per-module usage and spending add up to the LM's totals."""
    by_module = summarize(lm.usage, by="module")
    (whole,) = summarize(lm.usage, by="model")
    assert sum(s.calls for s in by_module) == whole.calls == len(lm.usage)
    assert sum(s.prompt_tokens for s in by_module) == whole.prompt_tokens
    assert sum(s.completion_tokens for s in by_module) == whole.completion_tokens
    assert sum(s.cost_usd for s in by_module) == pytest.approx(whole.cost_usd)
    spending = lm.spending(by="module")
    total = lm.spending()
    assert sum(r.spent_usd for r in spending.values()) == pytest.approx(total.spent_usd)
    assert sum(r.requests for r in spending.values()) == total.requests
    assert sum(r.prompt_tokens for r in spending.values()) == total.prompt_tokens
    # The ledger and the usage records priced the same answers.
    assert total.spent_usd == pytest.approx(whole.cost_usd)


def test_threads_name_each_predictor_and_the_totals_add_up(priced):
    lm, _ = priced
    program = TwoStep()
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            program(question=f"question {i}")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
    assert not any(t.is_alive() for t in threads) and not errors
    assert sorted(r.module for r in lm.usage) == sorted(["answer", "generate_query.predict"] * 4)
    assert set(lm.spending(by="module")) == MODULES
    assert {entry["module"] for entry in lm.history} == MODULES
    assert_adds_up(lm)


def test_acall_names_each_predictor(priced):
    lm, _ = priced
    program = TwoStep()

    async def main() -> None:
        await asyncio.gather(*(program.acall(question=f"q {i}") for i in range(4)))

    asyncio.run(asyncio.wait_for(main(), JOIN_S))
    assert sorted(r.module for r in lm.usage) == sorted(["answer", "generate_query.predict"] * 4)
    assert_adds_up(lm)


def test_dspy_parallel_and_evaluate_name_the_predictors(priced):
    lm, _ = priced
    program = TwoStep()
    examples = [dspy.Example(question=f"q {i}").with_inputs("question") for i in range(4)]
    dspy.Parallel(num_threads=4, disable_progress_bar=True)([(program, ex) for ex in examples])
    assert {r.module for r in lm.usage} == MODULES and len(lm.usage) == 8
    evaluate = dspy.Evaluate(devset=examples, metric=lambda ex, pred, trace=None: 1.0, num_threads=4)
    evaluate(program)
    assert {r.module for r in lm.usage} == MODULES and len(lm.usage) == 16
    assert_adds_up(lm)


def test_a_direct_call_has_no_module_and_a_bare_predictor_is_its_class(priced):
    lm, _ = priced
    lm("hello")
    dspy.Predict("question -> answer")(question="hi")
    assert [r.module for r in lm.usage] == [None, "Predict"]
    assert [entry["module"] for entry in lm.history] == [None, "Predict"]
    assert set(lm.spending(by="module")) == {None, "Predict"}
    rows = {s.model: s.calls for s in summarize(lm.usage, by="module")}
    assert rows == {"(direct call)": 1, "Predict": 1}


def test_the_cli_groups_a_log_by_module_as_summarize_does(priced, capsys):
    lm, log = priced
    program = TwoStep()
    for i in range(2):
        program(question=f"q {i}")
    lm("direct")
    assert cli(["usage", str(log), "--by", "module"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out == format_summary(summarize(read_log(log), by="module"), by="module")
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(lines) == {"(direct", "answer", "generate_query.predict"}
    assert lines["answer"][1] == lines["generate_query.predict"][1] == "2"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["module"] for r in records} == {None, "answer", "generate_query.predict"}


def test_a_log_written_before_modules_were_recorded_says_so():
    old = {"model": "m", "status": "ok", "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.1}
    new = {**old, "module": None}
    rows = {s.model: s.calls for s in summarize([old, new, {**old, "module": "answer"}], by="module")}
    assert rows == {"(not recorded)": 1, "(direct call)": 1, "answer": 1}


def test_spending_by_something_else_is_refused_and_an_lm_without_limits_has_no_ledger(make_lm):
    lm = make_lm()
    assert lm.spending(by="module") == {}
    with pytest.raises(ConfigurationError, match="module"):
        lm.spending(by="model")  # type: ignore[call-overload]


# --- the path of a module --------------------------------------------------------------------------


class Holder(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.steps = [dspy.Predict("a -> b"), dspy.Predict("b -> c")]
        self.by_name = {"judge": dspy.Predict("c -> d")}
        self.inner = TwoStep()


def test_paths_follow_dspys_names_lists_dicts_and_nesting():
    holder = Holder()
    assert module_path([holder, holder.steps[1]]) == "steps[1]"
    assert module_path([holder, holder.by_name["judge"]]) == "by_name['judge']"
    inner = holder.inner
    assert module_path([holder, inner, inner.generate_query, inner.generate_query.predict]) == (
        "inner.generate_query.predict"
    )
    # Names agree with DSPy's own (named_predictors).
    assert dict(holder.named_predictors()).keys() >= {"steps[1]", "by_name['judge']", "inner.generate_query.predict"}
    # A module built inside forward is named by its class; a module repeated back to back is one step.
    assert child_name(holder, dspy.Predict("x -> y")) == "Predict"
    assert module_path([holder, holder, holder.steps[0]]) == "steps[0]"


# --- the ledger ----------------------------------------------------------------------------------


def test_a_ledger_moved_elsewhere_keeps_its_modules():
    from dspy_anyscale.catalog import Prices

    state = LedgerState(Limits(budget_usd=1.0))
    prices = Prices(1.0, 1.0)
    for ticket, module in enumerate(["a", "b", None, "a"]):
        assert state.reserve(ticket, Ask(cost=10**9, tokens=0, prices=prices, module=module), 0.0).granted
        state.settle(ticket, 100, 10)
    moved = LedgerState(Limits(budget_usd=1.0))
    moved.restore(state.export(0.0), 0.0)
    before, after = state.report_by_module(), moved.report_by_module()
    assert before == after and set(after) == {"a", "b", None}
    assert after["a"].requests == 2 and after["a"].spent_usd == pytest.approx(2 * 110 / 1e6)
    assert sum(r.spent_usd for r in after.values()) == pytest.approx(moved.report(0.0).spent_usd)


def test_the_ray_ledger_actor_reports_by_module_too():
    """A job's shared ledger (a Ray actor, run bare here) counts each module across the workers."""
    from dspy_anyscale.catalog import Prices
    from dspy_anyscale.limits._ray import LedgerActor

    actor = LedgerActor(Limits(budget_usd=1.0))
    for ticket, module in enumerate(["answer", "answer", "generate_query.predict"]):
        actor.reserve(("worker", ticket), Ask(cost=10**9, tokens=0, prices=Prices(1.0, 1.0), module=module))
        actor.settle(("worker", ticket), 10, 10)
    reports = actor.report_by_module()
    assert {module: report.requests for module, report in reports.items()} == {"answer": 2, "generate_query.predict": 1}
