"""Helpers for the long-run tests: a stub server of their own (a killed run leaves requests hanging on
it), a job in a subprocess, reading what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dspy_anyscale.testing import StubServer

from ..conftest import MODEL, SECRET

JOB = Path(__file__).with_name("job.py")
WAIT_S = 120  # the most any wait below takes before the test fails: a bound, never a measure


@pytest.fixture
def own_stub():
    """A stub server for one test: the session's is shared, and a killed job leaves requests on it."""
    with StubServer(api_key=SECRET, model=MODEL) as server:
        yield server


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANYSCALE_", "PYTEST_"))}
    env.update(
        ANYSCALE_API_KEY=SECRET,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        RAY_USAGE_STATS_ENABLED="0",
        DSPY_CACHEDIR=str(tmp_path / "dspy-cache"),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def start_job(stub: StubServer, output: Path, *args: str, tmp_path: Path, **popen: object) -> subprocess.Popen[str]:
    command = [sys.executable, str(JOB), "--base-url", stub.base_url, "--output", str(output), *args]
    options: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    options.update(popen)
    return subprocess.Popen(command, env=job_env(tmp_path), cwd=tmp_path, **options)  # type: ignore[call-overload]


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str] | None = None, timeout: float = WAIT_S):
    """Poll until ``condition()``; fail (never hang) if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the job ended (status {process.returncode}) before the test's moment:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s in vain")
        time.sleep(0.01)


def finish(process: subprocess.Popen[str], timeout: float = WAIT_S) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{err[-3000:]}")
    return process.returncode, out, err


def lines(path: Path) -> int:
    """Whole rows in a JSONL output (a line cut short by a kill does not count)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def read_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1].decode()
    return [json.loads(line) for line in whole.splitlines() if line.strip()]
