"""Long runs on a local Ray (2 CPUs, 2 actors) against the stub: output written by the driver as
batches come back, resume, a killed driver, a lost worker, Ctrl-C, a budget used up, the progress
on the driver and Ray Data kept quiet."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import dspy
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install -e '.[test,ray]'")

from dspy_anyscale import Anyscale  # noqa: E402
from dspy_anyscale import _constants as C  # noqa: E402
from dspy_anyscale.errors import ConfigurationError  # noqa: E402
from dspy_anyscale.limits import Limits  # noqa: E402

from ..conftest import MODEL, SECRET  # noqa: E402
from ..runs import job  # noqa: E402
from ..runs.conftest import WAIT_S, finish, job_env, lines, read_jsonl, wait_for  # noqa: E402
from .test_ray import examples, start_local_ray  # noqa: E402

pytestmark = pytest.mark.ray

ROWS, BATCH = 300, 5
# Rows a pool holds at once, handed to its workers and not yet back: 2 workers x 2 batches each.
POOL_IN_FLIGHT = 2 * 2 * BATCH


@pytest.fixture(scope="module")
def local_ray():
    return start_local_ray()  # shared with tests/ray/test_ray.py, which shuts it down


def make_lm(base_url: str) -> Anyscale:
    return Anyscale(MODEL, api_base=base_url, api_key=SECRET, use_chat_api=True, cache=False, num_retries=0)


@pytest.fixture
def lm(stub):
    lm = make_lm(stub.base_url)
    yield lm
    lm.close()


def assert_each_row_once(output: Path, rows: int) -> None:
    written = read_jsonl(output)
    assert sorted(row["question"] for row in written) == sorted(f"question {i}" for i in range(rows))
    assert len({row["row_id"] for row in written}) == rows and all(row["error"] is None for row in written)


def test_a_ray_data_run_resumes_an_output_and_keeps_ray_data_quiet(local_ray, lm, stub, tmp_path, capfd, caplog):
    import dspy_anyscale
    from dspy_anyscale.ray import evaluate, summarize_run

    def exact(example, prediction, trace=None):  # defined here, so that Ray sends it by value
        return example.answer == prediction.answer

    output = tmp_path / "scored.jsonl"
    program = dspy.Predict("question -> answer")
    data = [*examples(12), *[dspy.Example(question=f"odd {i}", answer="no").with_inputs("question") for i in range(8)]]
    # Started on this machine (threads), finished on Ray: the same output, the same rows.
    dspy_anyscale.evaluate(program, data[:10], exact, lm=lm, output=str(output), progress=False)
    assert len(read_jsonl(output)) == 10 and len(stub.posts()) == 10
    options = {"lm": lm, "concurrency": 2, "threads_per_actor": 2, "batch_size": BATCH, "output": str(output)}
    with caplog.at_level(logging.INFO, logger=C.LOGGER_NAME):
        score, scored = evaluate(program, data, exact, resume=True, **options)
    assert len(stub.posts()) == 20, "the resumed run ran only the 10 rows not in the output"
    assert score == 60.0, "the score is over the rows kept and the rows run, together"
    assert scored.count() == 20 and summarize_run(scored).rows == 20
    assert sorted(row["question"] for row in read_jsonl(output)) == sorted(e.question for e in data)
    err = capfd.readouterr().err
    assert "Starting execution of Dataset" not in err and "Running Dataset" not in err, "Ray Data kept quiet"
    # The run's own figures on the driver instead (log lines: no terminal here), the kept rows done from the start.
    progress = [r.getMessage() for r in caplog.records if r.funcName == "_line"]
    assert progress[0].startswith("10/20 rows (50%), 0.0 rows/s, ") and progress[0].endswith("(started)"), progress
    assert progress[-1].startswith("20/20 rows (100%), ") and progress[-1].endswith("(finished)"), progress
    assert " errors, " in progress[-1] and " tokens, $" in progress[-1]


def test_a_ray_dataset_needs_an_id_column_to_write_an_output(local_ray, lm, stub, tmp_path):
    from dspy_anyscale.ray import run_program

    dataset = ray.data.from_items([{"id": i, "question": f"question {i}"} for i in range(4)])
    with pytest.raises(ConfigurationError, match="output= with a Ray Dataset needs id_column="):
        run_program(dspy.Predict("question -> answer"), dataset, lm=lm, input_keys=["question"], output=str(tmp_path))
    with pytest.raises(ConfigurationError, match="materialize=False returns a run that has not executed"):
        run_program(dspy.Predict("question -> answer"), examples(2), lm=lm, output="o.jsonl", materialize=False)
    assert not stub.posts()


@pytest.fixture(scope="module")
def pool(local_ray, stub_server):
    from dspy_anyscale.ray import ProgramPool

    lm = make_lm(stub_server.base_url)
    with ProgramPool(lm=lm, concurrency=2, threads_per_actor=4, num_cpus=0.1) as pool:
        yield pool
    lm.close()


def test_a_killed_driver_resumes_from_its_output(pool, stub, tmp_path):
    """The driver (a process of its own, on this Ray) is killed at about 40 %; the next run goes on."""
    from dspy_anyscale.ray import run_program

    stub.latency = 0.05
    output = tmp_path / "results.jsonl"
    process = _driver(stub, output, tmp_path, "--no-progress")
    wait_for(lambda: lines(output) >= 0.4 * ROWS, process)
    process.send_signal(signal.SIGKILL)
    finish(process)
    written = lines(output)
    assert 0.4 * ROWS <= written < ROWS, "killed mid-run"

    results = run_program(job.program(), job.data(ROWS), pool=pool, batch_size=BATCH, output=str(output), resume=True)
    assert results.count() == ROWS
    assert_each_row_once(output, ROWS)
    assert len(stub.posts()) <= ROWS + POOL_IN_FLIGHT, "paid again only for the batches in flight at the kill"


def test_a_lost_worker_loses_no_row_and_writes_none_twice(pool, stub, tmp_path):
    from dspy_anyscale.ray import run_program

    stub.latency = 0.02
    output = tmp_path / "results.jsonl"
    pids = ray.get([slot.actor.ready.remote() for slot in pool._slots])
    restarts = pool.restarts

    def kill_a_worker():
        wait_for(lambda: lines(output) >= 0.4 * ROWS)
        os.kill(pids[0], signal.SIGKILL)  # as the OOM killer, or a lost node, would

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    results = run_program(job.program(), job.data(ROWS), pool=pool, batch_size=BATCH, output=str(output))
    killer.join(timeout=WAIT_S)
    assert pool.restarts == restarts + 1, "the dead worker was replaced"
    assert results.count() == ROWS
    assert_each_row_once(output, ROWS)
    assert len(stub.posts()) <= ROWS + 2 * BATCH, "only the dead worker's batches ran twice"


def test_ctrl_c_on_a_pool_run_writes_the_batches_in_flight_and_says_how_to_resume(pool, stub, tmp_path):
    """The driver (a process of its own) gets one SIGINT at about 40 %: no batch is sent after it, those
    in flight are waited for and written, and the run says how to resume."""
    from dspy_anyscale.ray import run_program

    stub.latency = 0.05
    output = tmp_path / "results.jsonl"
    process = _driver(stub, output, tmp_path)
    wait_for(lambda: lines(output) >= 0.4 * ROWS, process)
    process.send_signal(signal.SIGINT)
    status, _, err = finish(process)
    # KeyboardInterrupt (the exit status is 1: Ray's driver has a SIGINT handler of its own at exit).
    assert status != 0 and "KeyboardInterrupt: the run was stopped" in err, err[-2000:]
    assert "stopping: interrupted by Ctrl-C. No new batches are sent" in err
    written = read_jsonl(output)
    assert output.read_bytes().endswith(b"\n") and 0.4 * ROWS <= len(written) < ROWS
    assert len(stub.posts()) == len(written), "every batch sent was waited for and written"
    assert f"{len(written)} of {ROWS} rows are in {output}; {ROWS - len(written)} were not run" in err
    call = f"dspy_anyscale.ray.run_program(program, dataset, output={str(output)!r}, resume=True)"
    assert f"To resume, run the same call with resume=True: {call}" in err

    results = run_program(job.program(), job.data(ROWS), pool=pool, batch_size=BATCH, output=str(output), resume=True)
    assert results.count() == ROWS and len(stub.posts()) == ROWS
    assert_each_row_once(output, ROWS)


def test_a_budget_used_up_on_a_pool_ends_the_run_reporting_the_rows_not_run(pool, stub, tmp_path, caplog):
    from dspy_anyscale.ray import run_program

    output = tmp_path / "results.jsonl"
    program, data = job.program(), job.data(60)
    with caplog.at_level(logging.WARNING, logger=C.LOGGER_NAME):
        results = run_program(
            program, data, pool=pool, batch_size=BATCH, output=str(output), limits=Limits(max_requests=20)
        )
    rows = results.take_all()
    answered = [row for row in rows if row["error"] is None]
    assert len(answered) == len(stub.posts()) == 20 and len(rows) == 60
    said = caplog.text
    assert f"20 of 60 rows are in {output}; 40 were not run" in said and "Execution cancelled" not in said
    assert "To resume, run with a bigger budget" in said and "resume=True" in said

    more = run_program(program, data, pool=pool, batch_size=BATCH, output=str(output), resume=True)
    assert more.count() == 60 and len(stub.posts()) == 60, "the resumed run ran only the rows the budget refused"
    assert_each_row_once(output, 60)


def _driver(stub, output: Path, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """tests/runs/job.py on this Ray, with a ProgramPool of 2 actors, as its own driver process."""
    env = job_env(tmp_path, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    command = [str(job.__file__), "--base-url", stub.base_url, "--output", str(output), "--rows", str(ROWS)]
    return subprocess.Popen(
        [sys.executable, *command, "--ray", "--pool", "--batch-size", str(BATCH), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
