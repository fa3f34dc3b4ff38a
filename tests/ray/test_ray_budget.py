"""Limits for a whole Ray job (limits=Limits(budget_usd=..., max_requests=...)) on a local Ray (2 CPUs)
against the stub: one ledger in one Ray actor for every worker, refused rows reported as errors and
never sent."""

from __future__ import annotations

import contextlib
import re

import dspy
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")

from dspy_anyscale import Anyscale  # noqa: E402
from dspy_anyscale.errors import BudgetExceededError, ConfigurationError  # noqa: E402
from dspy_anyscale.limits import Limits  # noqa: E402

from ..conftest import MODEL, SECRET  # noqa: E402
from .test_ray import exact, examples, no_ray_work, start_local_ray  # noqa: E402, F401 (no_ray_work: a fixture)

pytestmark = pytest.mark.ray

# USD per million tokens. A stub answer to one Predict row costs about $0.0011 (about 96 prompt +
# 14 completion tokens); its worst case, which the ledger reserves, about $0.0033 (max_tokens=50).
PRICES = {"input": 10.0, "output": 10.0}
REFUSED = "BudgetExceededError: "


@pytest.fixture(scope="module")
def local_ray():
    return start_local_ray()  # shared with tests/ray/test_ray.py, which shuts it down


def priced_lm(base_url: str, **limits) -> Anyscale:
    return Anyscale(
        MODEL, api_base=base_url, api_key=SECRET, use_chat_api=True, cache=False, prices=PRICES, max_tokens=50, **limits
    )


@pytest.fixture
def lm(stub):
    lm = priced_lm(stub.base_url)
    yield lm
    lm.close()


def small_pool(lm, **options):
    """Each test's pool is closed before the next starts: two CPUs hold only so many workers, and
    a pool's start also needs a whole CPU free (for Ray Data's metadata task)."""
    from dspy_anyscale.ray import ProgramPool

    return ProgramPool(lm=lm, num_cpus=0.1, **{"concurrency": 2, "threads_per_actor": 1, **options})


def answered_and_refused(rows, stub):
    """The run's rows split in two: every error is a budget refusal, and only answered rows were sent."""
    answered = [row for row in rows if row["error"] is None]
    refused = [row for row in rows if row["error"] is not None]
    assert all(row["error"].startswith(REFUSED) for row in refused), {row["error"] for row in refused}
    assert all((row["prompt_tokens"], row["cost_usd"]) == (0, 0.0) for row in refused), "nothing of theirs was sent"
    assert len(stub.posts("/chat/completions")) == len(answered), "the stub got exactly the answered rows' requests"
    return answered, refused


def cost(rows) -> float:
    return sum(row["cost_usd"] for row in rows)


def test_a_job_budget_holds_across_4_actors_and_the_job_stops_sending(local_ray, lm, stub):
    from dspy_anyscale.ray import run_program, summarize_run

    budget = 0.02  # about 18 answers; one budget per worker would allow about 70
    results = run_program(
        dspy.Predict("question -> answer"),
        examples(80),
        lm=lm,
        concurrency=4,
        threads_per_actor=2,
        batch_size=5,
        limits=Limits(budget_usd=budget),
    )
    rows = results.take_all()
    answered, refused = answered_and_refused(rows, stub)
    assert len(rows) == 80 and answered and refused
    assert cost(answered) <= budget, "what the server answered costs no more than the job's budget"
    assert cost(answered) > budget / 4, "and the budget was used, not refused from the start"
    summary = summarize_run(results)
    assert (summary.rows, summary.errors, summary.refused) == (80, len(refused), len(refused))
    assert summary.cost_usd == pytest.approx(cost(answered))
    assert f"{len(refused)} errors ({len(refused)} over budget)" in str(summary)
    assert not lm.limiter.enabled, "the job's limits are the job's: the driver's LM has none"


def test_an_lm_with_its_own_budget_does_not_get_one_per_worker(local_ray, stub):
    from dspy_anyscale.ray import run_program

    budget = 0.01  # about 8 answers; two workers with a budget each would answer about 16
    lm = priced_lm(stub.base_url, budget_usd=budget)
    try:
        lm("the driver spends first")  # counted before the job: it moves with the ledger
        before = lm.spending()
        rows = run_program(dspy.Predict("question -> answer"), examples(40), lm=lm, concurrency=2, threads_per_actor=2)
        rows = rows.take_all()
        assert len(rows) == 40
        answered = [row for row in rows if row["error"] is None]
        assert all(row["error"].startswith(REFUSED) for row in rows if row["error"] is not None)
        assert answered and len(answered) < 40
        assert len(stub.posts()) == 1 + len(answered)
        spending = lm.spending()  # the driver's LM: the workers' spending is on its ledger
        assert spending.spent_usd <= budget
        assert spending.spent_usd == pytest.approx(before.spent_usd + cost(answered))
        assert (spending.requests, spending.in_flight) == (1 + len(answered), 0)
        # The driver's LM keeps working, on the same ledger: a call is either answered and counted,
        # or refused, and the budget still holds.
        with contextlib.suppress(BudgetExceededError):
            lm("the driver after the job")
        after = lm.spending()
        assert after.requests + after.refused == spending.requests + spending.refused + 1
        assert after.spent_usd <= budget and len(stub.posts()) == after.requests
    finally:
        lm.close()


def test_max_requests_and_a_budget_for_one_run_on_a_pool(local_ray, lm, stub):
    with small_pool(lm, concurrency=4, threads_per_actor=2) as pool:  # no limits of its own
        _runs_with_limits_of_their_own(pool, stub)


def _runs_with_limits_of_their_own(pool, stub):
    from dspy_anyscale.ray import evaluate, run_program, summarize_run

    program = dspy.Predict("question -> answer")
    rows = run_program(program, examples(40), pool=pool, limits=Limits(max_requests=7), batch_size=4).take_all()
    answered, refused = answered_and_refused(rows, stub)
    assert len(answered) == 7, "max_requests is exact across the pool's four workers"

    stub.reset()
    budget = 0.01
    score, results = evaluate(program, examples(40), exact, pool=pool, limits=Limits(budget_usd=budget), batch_size=4)
    rows = results.take_all()
    answered, refused = answered_and_refused(rows, stub)
    assert answered and refused and cost(answered) <= budget
    assert all(row["score"] == 0.0 for row in refused), "a refused row scores failure_score"
    assert score == round(100 * len(answered) / 40, 2) and summarize_run(results).refused == len(refused)

    class TwoCalls(dspy.Module):  # defined here, so that Ray sends it by value
        def __init__(self):
            super().__init__()
            self.first, self.second = dspy.Predict("question -> answer"), dspy.Predict("answer -> question")

        def forward(self, question):
            return self.second(answer=self.first(question=question).answer)

    stub.reset()
    [row] = run_program(TwoCalls(), examples(1), pool=pool, limits=Limits(max_requests=1)).take_all()
    assert row["error"].startswith(REFUSED + "max_requests reached") and len(stub.posts()) == 1
    assert row["prompt_tokens"] > 0 and row["cost_usd"] > 0, "a row refused half-way reports what was billed"

    stub.reset()
    rows = run_program(program, examples(30), pool=pool).take_all()
    assert all(row["error"] is None for row in rows), "a run's limits end with it"
    assert len(stub.posts()) == 30 and not pool.limiter.enabled


def test_a_pool_budget_spans_its_runs(local_ray, lm, stub):
    from dspy_anyscale.ray import run_program

    budget = 0.02
    program = dspy.Predict("question -> answer")
    with small_pool(lm, limits=Limits(budget_usd=budget)) as pool:
        first = run_program(program, examples(8), pool=pool).take_all()
        assert all(row["error"] is None for row in first), "8 answers fit: about $0.009 of $0.02"
        # A budget per run would answer about 17 of these; the pool's budget has about 10 left.
        second = run_program(program, examples(30), pool=pool).take_all()
        answered, refused = answered_and_refused(first + second, stub)
        assert refused and cost(answered) <= budget
        spending = pool.spending()
        assert spending.spent_usd == pytest.approx(cost(answered)) and spending.requests == len(answered)
        with pytest.raises(
            ConfigurationError, match=r"max_requests: a run on this pool .* the pool's \(budget_usd=0.02\)"
        ):
            run_program(program, examples(2), pool=pool, limits=Limits(max_requests=1))
    assert pool.spending() == spending, "the pool's last report outlives it"
    assert not lm.limiter.enabled


def test_a_pool_on_an_lm_with_its_own_budget_shares_the_lms_ledger(local_ray, stub):
    from dspy_anyscale.ray import run_program

    budget = 0.01
    lm = priced_lm(stub.base_url, budget_usd=budget)
    program = dspy.Predict("question -> answer")
    try:
        with small_pool(lm) as pool:
            assert pool.limiter is lm.limiter
            rows = run_program(program, examples(4), pool=pool).take_all()
            rows += run_program(program, examples(30), pool=pool).take_all()
            answered, refused = answered_and_refused(rows, stub)
            spending = lm.spending()
            assert refused and spending.spent_usd == pytest.approx(cost(answered)) and spending.spent_usd <= budget
            with pytest.raises(ConfigurationError, match=r"budget_usd: .*the pool's lm's .*ProgramPool\(lm=lm.copy"):
                run_program(program, examples(2), pool=pool, limits=Limits(budget_usd=1.0))
        assert lm.spending().requests == len(answered), "the LM's ledger stays with the LM after close()"
        assert type(lm.limiter.backend).__name__ == "LocalLedger", "close() brought it home, counts and all"
    finally:
        lm.close()


def test_after_a_job_and_ray_shutdown_the_lm_goes_on_and_never_starts_ray(local_ray, stub, tmp_path, monkeypatch):
    """The LM's ledger comes home when the job is over; a ledger left in Ray (shared by hand, or
    pickled by program.save(save_program=True)) refuses at once, saying what happened and what to do."""
    from dspy_anyscale.ray import run_program

    lm = priced_lm(stub.base_url, budget_usd=0.05)
    kept = priced_lm(stub.base_url, max_requests=5)
    kept.limiter.share_on_ray()  # shared by hand: it stays in Ray, where its user put it
    saved = dspy.Predict("question -> answer")
    saved.lm = kept
    saved.save(tmp_path / "saved", save_program=True)  # a cloudpickle: the LM's ledger travels as its Ray handle
    try:
        rows = run_program(dspy.Predict("question -> answer"), examples(4), lm=lm, concurrency=1).take_all()
        assert [row["error"] for row in rows] == [None] * 4
        job = lm.spending()
        assert (job.requests, job.in_flight) == (4, 0)
        local_ray.shutdown()

        assert lm("after the job") == ["echo: after the job"]  # its own ledger, with the job's counts
        spending = lm.spending()
        assert spending.requests == 5 and spending.spent_usd > job.spent_usd
        assert not local_ray.is_initialized(), "the LM started no Ray"

        refusal = r"Ray is not running in this process.*lm.copy\(max_requests=5\)"
        with pytest.raises(ConfigurationError, match=refusal):
            kept("a ledger left in Ray")
        with pytest.raises(ConfigurationError, match="Ray is not running"):
            kept.spending()
        assert len(stub.posts()) == 5 and not local_ray.is_initialized(), "nothing sent, no Ray started"

        monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)  # a loaded LM reads the key from its environment
        loaded = dspy.load(str(tmp_path / "saved"), allow_pickle=True)
        with pytest.raises(ConfigurationError, match=r"save_program=True.*lm.copy\(max_requests=5\)"):
            loaded(question="loaded elsewhere")
        loaded.set_lm(loaded.lm.copy(max_requests=5))  # the way out the message names
        assert loaded(question="loaded elsewhere").answer == "answer for loaded elsewhere"
        assert not local_ray.is_initialized()

        start_local_ray()  # a new Ray session: the old ledger's actor is not in it
        with pytest.raises(ConfigurationError, match=r"that actor cannot be reached.*lm.copy\(max_requests=5\)"):
            kept("a ledger from an ended Ray session")
    finally:
        lm.close()
        kept.close()
        start_local_ray()  # for the tests after this one (a no-op if Ray runs)


def worst_case_usd(stub, program, row) -> float:
    """What the ledger reserves for the row's request (its worst case), read from a refusal: the
    prompt estimate is the limiter's business, and this test must not depend on it."""
    from dspy_anyscale.ray._job_limits import budget_refusal

    probe = priced_lm(stub.base_url, budget_usd=1e-9)
    try:
        with dspy.context(lm=probe), pytest.raises(Exception) as raised:
            program(**row)
    finally:
        probe.close()
    refusal = budget_refusal(raised.value)
    assert refusal is not None, raised.value
    return refusal.request_usd


@pytest.mark.parametrize("cap", ["max_requests", "budget_usd"])
def test_a_used_up_cap_stops_the_run_without_asking_again(cap, stub):
    """In one worker, rows one at a time: the first is answered, the second's refusal shows the cap is
    used up (nothing is in flight to free it), and the rows after it fail without asking the ledger."""
    from dspy_anyscale.ray._rows import RowRunner, RunSpec, output_columns

    program = dspy.Predict("question -> answer")
    # A budget of exactly one request's worst case: it fits the first, and after its answer, not another.
    limit = 1 if cap == "max_requests" else worst_case_usd(stub, program, examples(1)[0].inputs().toDict())
    lm = priced_lm(stub.base_url, **{cap: limit})
    runner = RowRunner(RunSpec(program, ("question",), tuple(output_columns(program, None))), lm, None)
    rows = [runner(example.toDict()) for example in examples(4)]
    assert rows[0]["error"] is None and rows[0]["cost_usd"] > 0
    assert rows[1]["error"].startswith(REFUSED) and "the request was not sent" in rows[1]["error"]
    used_up = "max_requests=1 are used up" if cap == "max_requests" else "budget_usd is used up"
    assert all(row["error"].startswith(f"{REFUSED}this row was not run: {used_up}") for row in rows[2:])
    assert len(stub.posts()) == 1 and lm.spending().refused == 1, "the rows after it never asked"
    lm.close()


# --- bad limits: refused before any Ray work, naming the option -----------------------------------

BAD_LIMITS = [
    ({"budget_usd": "5"}, "budget_usd must be a positive number"),
    ({"budget_usd": 0}, "budget_usd must be a positive number"),
    ({"budget_usd": float("nan")}, "budget_usd must be a positive number"),
    ({"max_requests": 1.5}, "max_requests must be a positive integer"),
    ({"max_requests": 0}, "max_requests must be a positive integer"),
    ({"max_requests": True}, "max_requests must be a positive integer"),
    ({"requests_per_minute": -1}, "requests_per_minute must be a positive number"),
    ({"tokens_per_minute": "many"}, "tokens_per_minute must be a positive number"),
    ({"max_concurrency": 0}, "max_concurrency must be a positive integer"),
]
ENTRY_POINTS = ["run_program", "evaluate", "ProgramPool"]


def call(entry: str, lm, **options):
    from dspy_anyscale.ray import ProgramPool, evaluate, run_program

    program, data = dspy.Predict("question -> answer"), examples(3)
    if entry == "run_program":
        return run_program(program, data, lm=lm, **options)
    if entry == "evaluate":
        return evaluate(program, data, exact, lm=lm, **options)
    return ProgramPool(lm=lm, **options)


@pytest.mark.parametrize(
    ("bad", "message"), BAD_LIMITS, ids=[f"{k}={v!r}" for b, _ in BAD_LIMITS for k, v in b.items()]
)
def test_bad_limits_are_refused_by_limits_itself(bad, message):
    with pytest.raises(ConfigurationError, match=message):
        Limits(**bad)


@pytest.mark.usefixtures("no_ray_work")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_concurrency_limit_is_refused_for_a_job_before_any_ray_work(entry, lm):
    message = r"max_concurrency=4: .* cannot hold it.*concurrency x threads_per_actor"
    with pytest.raises(ConfigurationError, match=message):
        call(entry, lm, limits=Limits(max_concurrency=4))


@pytest.mark.usefixtures("no_ray_work")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("bad", "message"), BAD_LIMITS, ids=[f"{k}={v!r}" for b, _ in BAD_LIMITS for k, v in b.items()]
)
def test_the_old_limit_keywords_warn_and_are_checked_by_limits_before_any_ray_work(entry, bad, message, lm):
    (name, value), *_ = bad.items()
    spelled = (
        re.escape(f"{entry}({name}={value!r})")
        + " is deprecated .* pass "
        + re.escape(f"limits=Limits({name}={value!r})")
    )
    with pytest.warns(DeprecationWarning, match=spelled) as warned, pytest.raises(ConfigurationError, match=message):
        call(entry, lm, **bad)
    assert all(w.filename == __file__ for w in warned), "the warning points at the caller's line"


@pytest.mark.usefixtures("no_ray_work")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_old_limit_keyword_still_sets_the_limit(entry, lm):
    """The deprecated spelling means what limits=Limits(...) means (here: a limit a job refuses)."""
    refused = r"max_concurrency=4: .* cannot hold"
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigurationError, match=refused):
        call(entry, lm, max_concurrency=4)


@pytest.mark.usefixtures("no_ray_work")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_limits_and_an_old_keyword_together_are_refused_saying_which_to_keep(entry, lm):
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ConfigurationError, match=r"both set limits: keep one, either limits=Limits\(\.\.\.\)"),
    ):
        call(entry, lm, limits=Limits(budget_usd=1.0), max_requests=3)


@pytest.mark.usefixtures("no_ray_work")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_limits_must_be_a_limits(entry, lm):
    with pytest.raises(
        ConfigurationError, match=r"limits must be None or a dspy_anyscale.limits.Limits\(\.\.\.\), got dict"
    ):
        call(entry, lm, limits={"budget_usd": 1.0})


@pytest.mark.usefixtures("no_ray_work")
@pytest.mark.parametrize("entry", ["run_program", "ProgramPool"])
def test_an_unknown_keyword_is_a_type_error_naming_it(entry, lm):
    with pytest.raises(TypeError, match=rf"{entry}\(\) got an unexpected keyword argument 'budget'"):
        call(entry, lm, budget=1.0)


@pytest.mark.usefixtures("no_ray_work")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_limits_that_cannot_hold_are_refused_before_any_ray_work(entry, stub):
    unpriced = Anyscale("my-org/unpriced-model", api_base=stub.base_url, api_key=SECRET, max_tokens=50)
    with pytest.raises(ConfigurationError, match=r"budget_usd needs prices.*'my-org/unpriced-model' has none"):
        call(entry, unpriced, limits=Limits(budget_usd=1.0))
    unbounded = Anyscale(MODEL, api_base=stub.base_url, api_key=SECRET, prices=PRICES, max_tokens=None)
    with pytest.raises(ConfigurationError, match=r"tokens_per_minute: .*max_tokens=None"):
        call(entry, unbounded, limits=Limits(tokens_per_minute=10_000))
    own = priced_lm(stub.base_url, budget_usd=5.0, requests_per_minute=600)
    with pytest.raises(
        ConfigurationError, match=r"max_requests: .*the lm's \(requests_per_minute=600, budget_usd=5.0\)"
    ):
        call(entry, own, limits=Limits(max_requests=10))
    assert type(own.limiter.backend).__name__ == "LocalLedger", "a refused job leaves the LM's ledger where it was"
