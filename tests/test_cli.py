"""python -m dspy_anyscale: demo, models, ask, usage; bad input gets a message, not a traceback."""

from __future__ import annotations

import json

import pytest
from dspy.utils.exceptions import LMAuthError

from dspy_anyscale.cli import main as cli
from dspy_anyscale.testing import Fault

from .conftest import MODEL, SECRET


def test_usage_cli_summarises_a_log(make_lm, stub, tmp_path, capsys):
    log = tmp_path / "usage.jsonl"
    lm = make_lm(use_chat_api=True, usage_log=log, cache=False)
    for i in range(4):
        lm(f"call {i}")
    stub.script(Fault(status=401))
    with pytest.raises(LMAuthError):
        lm("denied")
    assert cli(["usage", str(log)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(MODEL))
    calls, errors, cached = row.split()[1:4]
    assert (calls, errors, cached) == ("5", "1", "0")
    total = sum(r.cost_usd for r in lm.usage if r.status == "ok")
    assert f"{total:.6f}" in row and "p50 ms" in out and "p95 ms" in out


def test_usage_cli_on_a_missing_file_says_so(capsys, tmp_path):
    assert cli(["usage", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_models_cli(stub, capsys, monkeypatch):
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    assert cli(["models", "--api-base", stub.base_url]) == 0
    assert capsys.readouterr().out.strip() == MODEL


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"model": "m", "status": "ok", "latency_ms": 1}', "[1, 2]"], ":2 is not a usage record"),
        (['"just a string"'], ":1 is not a usage record"),
        (["{not json"], ":1 is not a JSON line"),
        (['{"status": "ok"}'], ":1 is not a usage record"),
    ],
)
def test_usage_cli_names_the_bad_line(tmp_path, capsys, lines, message):
    log = tmp_path / "usage.jsonl"
    log.write_text("\n".join(lines) + "\n")
    assert cli(["usage", str(log)]) == 1
    assert message in capsys.readouterr().err


def test_usage_cli_marks_unknown_token_counts(tmp_path, capsys):
    log = tmp_path / "usage.jsonl"
    rows = [
        {"model": "m", "status": "ok", "latency_ms": 5, "prompt_tokens": 10, "completion_tokens": 2, "cost_usd": None},
        {"model": "m", "status": "ok", "latency_ms": 7, "prompt_tokens": None, "completion_tokens": None},
        {"model": "m", "status": "budget", "latency_ms": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0},
    ]
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli(["usage", str(log)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("m "))
    assert row.split()[1:5] == ["3", "0", "0", "1"], "calls, errors, cached, refused"
    assert "10*" in row and "unknown" in row and "were not sent by the server" in out


@pytest.mark.parametrize("argv", [["demo", "--max-tokens", "zero"], ["nope"], []])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        cli(argv)
    assert caught.value.code == 2 and "usage:" in capsys.readouterr().err


def test_a_bad_option_value_is_an_error_message_not_a_traceback(stub, capsys, monkeypatch):
    monkeypatch.setenv("ANYSCALE_API_BASE", stub.base_url)
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    assert cli(["demo", "--model", MODEL, "--max-tokens", "0"]) == 1
    assert "max_tokens must be a positive integer" in capsys.readouterr().err
