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


def test_ask_without_model_lists_the_models_of_the_api_base_given(stub, capsys, monkeypatch):
    # No ANYSCALE_API_BASE anywhere (the isolated fixture): the model list must come from --api-base.
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    monkeypatch.delenv("ANYSCALE_MODEL", raising=False)
    assert cli(["ask", "What is 2+2?", "--api-base", stub.base_url]) == 0, capsys.readouterr().err
    assert stub.posts(), "the question went to the --api-base endpoint"
    assert all(post.body["model"] == MODEL for post in stub.posts())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--max-tokens", "-5"], "max_tokens must be a positive integer"),
        (["demo", "--model", " padded "], "model must be a non-empty string"),
        (["ask", "hi", "--api-base", "ftp://example.invalid/v1"], "--api-base must be an http(s) URL"),
        (["ask", "hi", "--model", ""], "model must be a non-empty string"),
    ],
)
def test_options_are_checked_before_anything_starts(argv, message, capsys, monkeypatch):
    from dspy_anyscale.servers import llama_server

    def no_start(*args, **kwargs):
        raise AssertionError("the stand-in was started before the options were checked")

    monkeypatch.setattr(llama_server, "start", no_start)
    monkeypatch.delenv("ANYSCALE_MODEL", raising=False)
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "stand-in" not in err.lower()


def test_usage_cli_reads_the_log_named_by_the_environment(make_lm, tmp_path, capsys, monkeypatch):
    log = tmp_path / "env-usage.jsonl"
    lm = make_lm(usage_log=log, cache=False)
    lm("one call")
    monkeypatch.setenv("ANYSCALE_USAGE_LOG", str(log))
    assert cli(["usage"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(MODEL))
    assert row.split()[1] == "1"


def test_usage_cli_without_a_log_says_how_to_name_one(capsys):
    assert cli(["usage"]) == 1
    assert "ANYSCALE_USAGE_LOG" in capsys.readouterr().err
