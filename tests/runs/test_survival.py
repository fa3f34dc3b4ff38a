"""Long runs that survive, in a process of their own against a stub of the test's: killed with SIGKILL,
stopped with Ctrl-C (once, twice), watched on a terminal (a pseudo-terminal)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

import dspy_anyscale

from ..conftest import SECRET
from . import job
from .conftest import WAIT_S, finish, lines, read_jsonl, start_job, wait_for

ROWS, THREADS = 300, 8


def resume_here(stub, output: Path, rows: int = ROWS):
    """The same run, resumed in this process (the program, data and LM of tests/runs/job.py)."""
    lm = job.make_lm(stub.base_url, SECRET)
    try:
        return dspy_anyscale.run_program(
            job.program(), job.data(rows), lm=lm, output=str(output), resume=True, num_threads=THREADS, progress=False
        )
    finally:
        lm.close()


def assert_each_row_once(output: Path, rows: int = ROWS) -> None:
    written = read_jsonl(output)
    assert len(written) == rows and len({row["row_id"] for row in written}) == rows
    assert sorted(row["question"] for row in written) == sorted(f"question {i}" for i in range(rows))
    assert all(row["error"] is None for row in written)


def test_a_run_killed_at_40_percent_resumes_with_each_row_once_paying_only_for_rows_in_flight(own_stub, tmp_path):
    own_stub.latency = 0.05
    output = tmp_path / "results.jsonl"
    options = ("--rows", str(ROWS), "--threads", str(THREADS), "--no-progress")
    process = start_job(own_stub, output, *options, tmp_path=tmp_path)
    wait_for(lambda: lines(output) >= 0.4 * ROWS, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=WAIT_S)
    written, sent = lines(output), len(own_stub.posts())
    assert 0.4 * ROWS <= written < ROWS, "killed mid-run"
    assert sent - written <= THREADS, "sent and not written when killed: only the rows in flight"

    result = resume_here(own_stub, output)
    assert result.complete and result.resumed == written and len(result.rows) == ROWS
    assert_each_row_once(output)
    received = len(own_stub.posts())
    # The rerun sent one request per row not written; the killed run's count is taken again here, as a
    # request it sent just before the kill may have reached the stub after `sent` was read.
    killed_run = received - (ROWS - written)
    assert sent <= killed_run <= written + THREADS, "the rerun sent only the rows not written"
    assert received <= ROWS + THREADS


def test_ctrl_c_writes_the_rows_in_flight_and_says_how_to_resume(own_stub, tmp_path):
    own_stub.latency = 0.05
    output = tmp_path / "results.jsonl"
    process = start_job(own_stub, output, "--rows", str(ROWS), "--threads", str(THREADS), tmp_path=tmp_path)
    wait_for(lambda: lines(output) >= 40, process)
    process.send_signal(signal.SIGINT)
    status, _, err = finish(process)
    assert status == -signal.SIGINT, f"the script stops as on Ctrl-C (KeyboardInterrupt):\n{err[-2000:]}"
    # Said on stderr, each line saying whose it is (nothing configured logging).
    assert "\ndspy_anyscale: stopping: interrupted by Ctrl-C. No new rows are sent; waiting up to" in err
    written = read_jsonl(output)
    assert output.read_bytes().endswith(b"\n") and 40 <= len(written) < ROWS
    assert len(own_stub.posts()) == len(written), "every row sent was waited for and written"
    assert (
        f"\ndspy_anyscale: the run stopped (interrupted by Ctrl-C): {len(written)} of {ROWS} rows are in {output}; "
        f"{ROWS - len(written)} were not run" in err
    )
    assert (
        f"To resume, run the same call with resume=True: dspy_anyscale.run_program(program, data, "
        f"output={str(output)!r}, num_threads={THREADS}, resume=True)" in err
    )
    assert "KeyboardInterrupt: the run was stopped" in err
    # Without a terminal, the progress is plain lines on stderr (nothing configured logging).
    assert f"dspy_anyscale: 0/{ROWS} rows (0%), 0.0 rows/s, 0 errors, 0 tokens" in err and "(stopped)" in err

    result = resume_here(own_stub, output)
    assert result.complete and result.resumed == len(written)
    assert_each_row_once(output)
    assert len(own_stub.posts()) == ROWS


def test_a_second_ctrl_c_stops_at_once_leaving_only_whole_rows(own_stub, tmp_path):
    own_stub.latency = 0.02
    output, log = tmp_path / "results.jsonl", tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        # resume=True from the first run (it starts an output that is not there): a script to run again as it is.
        options = ("--rows", str(ROWS), "--threads", str(THREADS), "--resume")
        process = start_job(own_stub, output, *options, tmp_path=tmp_path, stderr=stderr)
        wait_for(lambda: lines(output) >= 40, process)
        own_stub.latency = 10 * WAIT_S  # the rows sent from now on hang: only a second Ctrl-C ends the run
        sent = len(own_stub.posts())
        wait_for(lambda: len(own_stub.posts()) >= sent + THREADS, process)
        process.send_signal(signal.SIGINT)
        wait_for(lambda: "No new rows are sent" in log.read_text(), process)
        process.send_signal(signal.SIGINT)
        status, _, _ = finish(process)  # within WAIT_S, while the rows in flight would hang far longer
    err = log.read_text()
    assert status == -signal.SIGINT and "stopped at once (a second Ctrl-C)" in err
    assert "To resume, run the same command again (dspy_anyscale.run_program(program, data, output=" in err
    assert f"resume=True) has resume=True): python {job.__file__} --base-url" in err
    assert output.read_bytes().endswith(b"\n")
    written = lines(output)
    assert len(own_stub.posts()) - written >= THREADS, "the rows in flight were left, not written"

    own_stub.latency = 0.0
    result = resume_here(own_stub, output)
    assert result.complete and result.resumed == written
    assert_each_row_once(output)


def test_on_a_terminal_the_progress_bar_shows_the_figures(own_stub, tmp_path):
    own_stub.latency = 0.01
    output = tmp_path / "results.jsonl"
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    try:
        process = start_job(
            own_stub, output, "--rows", "40", "--threads", "4", tmp_path=tmp_path, stdout=terminal, stderr=terminal
        )
        os.close(terminal)
        screen = _read_until_closed(master, process)
    finally:
        os.close(master)
    assert process.wait(timeout=WAIT_S) == 0, screen[-2000:]
    final = screen.replace("\r", "\n").splitlines()
    bar = next(line for line in reversed(final) if "40/40 rows" in line)
    assert "100%|" in bar and "rows/s" in bar and "0 errors" in bar and " tokens" in bar and ", $0.0" in bar, bar
    assert any("/40 rows [" in line and "<" in line for line in final), "the time left, while it runs"
    assert "dspy_anyscale: 0/40 rows" not in screen, "a bar on a terminal, not log lines"


def _read_until_closed(master: int, process: subprocess.Popen[str]) -> str:
    chunks, deadline = [], time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    else:
        process.kill()
        pytest.fail("the job on the terminal did not end")
    return b"".join(chunks).decode("utf-8", "replace")
