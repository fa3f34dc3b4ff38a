"""A Router as the ``lm`` of the Ray entry points: run_program, evaluate and ProgramPool, against stubs, with
its limits shared by every worker (one ledger for the job) and its members' keys never sent to the workers."""

from __future__ import annotations

import dspy
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")

from dspy_anyscale import Anyscale, ConfigurationError, Router  # noqa: E402
from dspy_anyscale.limits import Limits  # noqa: E402
from dspy_anyscale.testing import StubServer  # noqa: E402

from ..conftest import MODEL, SECRET  # noqa: E402
from .test_ray import examples, local_ray  # noqa: E402, F401

pytestmark = pytest.mark.ray


@pytest.fixture
def two_stubs():
    with StubServer(api_key=SECRET, model=MODEL) as a, StubServer(api_key=SECRET, model=MODEL) as b:
        yield a, b


def _router(a, b, **options) -> Router:
    member = dict(api_key=SECRET, use_chat_api=True, cache=False, prices={"input": 1.0, "output": 1.0})
    return Router(
        {"a": Anyscale(MODEL, api_base=a.base_url, **member), "b": Anyscale(MODEL, api_base=b.base_url, **member)},
        **options,
    )


def test_run_program_and_evaluate_take_a_router(local_ray, two_stubs):  # noqa: F811
    from dspy_anyscale.ray import evaluate, run_program, summarize_run

    a, b = two_stubs
    lm = _router(a, b, strategy="weighted", max_requests=200)
    program = dspy.Predict("question -> answer")
    results = run_program(program, examples(40), lm=lm, concurrency=2, threads_per_actor=4, batch_size=10)
    rows = results.take_all()
    assert len(rows) == 40 and all(row["error"] is None for row in rows)
    assert len(a.posts()) > 0 and len(b.posts()) > 0 and len(a.posts()) + len(b.posts()) == 40
    assert all(SECRET not in str(request.body) for request in a.posts())
    assert summarize_run(results).cost_usd > 0, "both members share one price: each row's cost is known"
    assert lm.spending().requests == 40, "the workers counted against the Router's one ledger"
    score, _ = evaluate(
        program,
        examples(10),
        lambda example, prediction, trace=None: example.answer == prediction.answer,
        lm=lm,
        concurrency=2,
        threads_per_actor=2,
    )
    assert score == 100.0 and lm.spending().requests == 50
    lm.close()


def test_a_program_pool_takes_a_router_and_the_router_falls_back_inside_the_workers(local_ray, two_stubs):  # noqa: F811
    from dspy_anyscale.ray import ProgramPool, run_program

    a, b = two_stubs
    a.chaos(1.0, [__import__("dspy_anyscale").testing.Fault(status=503, headers={"Retry-After": "0"})])
    lm = _router(a, b, allowed_fails=1, cooldown_s=600)
    with ProgramPool(lm=lm, concurrency=1, threads_per_actor=2) as pool:
        results = run_program(dspy.Predict("question -> answer"), examples(12), pool=pool)
        assert all(row["error"] is None for row in results.take_all())
    assert len(b.posts()) == 12 and 1 <= len(a.posts()) <= 2, "each worker cooled the failing member at once"
    lm.close()


def test_a_routers_members_with_their_own_budgets_are_refused_for_a_ray_job(local_ray, two_stubs):  # noqa: F811
    from dspy_anyscale.ray import run_program

    a, b = two_stubs
    budgeted = Anyscale(
        MODEL, api_base=a.base_url, api_key=SECRET, prices={"input": 1.0, "output": 1.0}, budget_usd=1.0
    )
    lm = Router({"a": budgeted, "b": Anyscale(MODEL, api_base=b.base_url, api_key=SECRET)})
    with pytest.raises(ConfigurationError, match=r"has limits of its own .* Set them on the Router"):
        run_program(dspy.Predict("question -> answer"), examples(2), lm=lm)
    with pytest.raises(ConfigurationError, match="budget_usd needs prices"):
        unpriced = Router({"a": Anyscale("my-model", api_base=a.base_url, api_key=SECRET)})
        run_program(dspy.Predict("question -> answer"), examples(2), lm=unpriced, limits=Limits(budget_usd=1.0))
    lm.close()
