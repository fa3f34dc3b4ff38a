"""Which service answered, everywhere a call is accounted for: history entries, usage records (``endpoint``,
and ``api`` for chat / completions), the usage log and its CLI, and spans (one per member try)."""

from __future__ import annotations

import json

import dspy
import pytest

from dspy_anyscale import Anyscale, summarize
from dspy_anyscale.cli import main as cli
from dspy_anyscale.testing import Fault
from dspy_anyscale.usage import read_log

from ..conftest import SECRET


def test_history_usage_and_the_log_name_the_member_that_answered(stubs, member, routers, tmp_path, closed_port):
    primary, backup = stubs(), stubs()
    log = tmp_path / "usage.jsonl"
    primary.script(Fault(status=503, headers={"Retry-After": "0"}))
    lm = routers(
        {
            "primary": member(primary, usage_log=log),
            "backup": member(backup, usage_log=log),
            "gone": member(closed_port, usage_log=log),
        }
    )
    lm("one")
    lm("two")
    assert [entry["endpoint"] for entry in lm.history] == ["backup", "primary"]
    assert [(r.endpoint, r.api, r.status) for r in lm.usage] == [
        ("primary", "chat", "LMServerError"),
        ("backup", "chat", "ok"),
        ("primary", "chat", "ok"),
    ]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["endpoint"], line["api"]) for line in lines] == [
        ("primary", "chat"),
        ("backup", "chat"),
        ("primary", "chat"),
    ]
    assert SECRET not in log.read_text()
    by_endpoint = {s.model: s for s in summarize(read_log(log), by="endpoint")}
    assert (by_endpoint["primary"].calls, by_endpoint["primary"].errors, by_endpoint["backup"].calls) == (2, 1, 1)


def test_a_plain_lm_names_its_host_and_port(make_lm, stub):
    lm = make_lm(use_chat_api=True)
    lm("q")
    assert lm.history[-1]["endpoint"] == lm.usage[-1].endpoint == f"127.0.0.1:{stub.port}"


def test_a_program_calls_history_names_the_member(stubs, member, routers):
    primary, backup = stubs(), stubs()
    lm = routers({"primary": member(primary), "backup": member(backup)})
    with dspy.context(lm=lm):
        dspy.ChainOfThought("question -> answer")(question="What?")
    (entry,) = lm.history
    assert entry["endpoint"] == "primary" and entry["model"] == lm.members["primary"].model
    assert lm.members["primary"].history == [entry]
    lm.inspect_history()


def test_the_usage_log_reader_takes_lines_written_before_api_existed(tmp_path):
    log = tmp_path / "old.jsonl"
    old = {"timestamp": "t", "model": "m", "endpoint": "chat", "status": "ok", "latency_ms": 5.0, "attempts": 1}
    new = {**old, "api": "completions", "endpoint": "backup"}
    log.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    first, second = read_log(log)
    assert (first["api"], first["endpoint"]) == ("chat", None)
    assert (second["api"], second["endpoint"]) == ("completions", "backup")
    assert [s.model for s in summarize([first, second], by="endpoint")] == ["(not recorded)", "backup"]


def test_the_usage_cli_groups_by_endpoint(stubs, member, routers, tmp_path, capsys):
    primary, backup = stubs(), stubs()
    log = tmp_path / "usage.jsonl"
    primary.script(Fault(status=503, headers={"Retry-After": "0"}))
    lm = routers({"primary": member(primary, usage_log=log), "backup": member(backup, usage_log=log)})
    lm("one")
    lm("two")
    assert cli(["usage", str(log), "--by", "endpoint"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("endpoint ")
    assert any(line.startswith("backup ") for line in out.splitlines())
    assert any(line.startswith("primary ") for line in out.splitlines())
    assert cli(["usage", str(log)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("model ")


def test_summarize_refuses_an_unknown_grouping():
    with pytest.raises(ValueError, match="by must be one of 'model', 'endpoint'"):
        summarize([], by="color")


def test_each_member_try_is_a_span_naming_the_member(stubs, member, routers):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from dspy_anyscale import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider)
    try:
        primary, backup = stubs(), stubs()
        primary.script(Fault(status=503, headers={"Retry-After": "0"}))
        lm = routers({"primary": member(primary), "backup": member(backup)})
        lm("q")
    finally:
        tracing.uninstrument()
    calls = [span for span in exporter.get_finished_spans() if span.name.startswith("chat ")]
    assert [(span.attributes["dspy_anyscale.endpoint"], span.attributes["dspy_anyscale.status"]) for span in calls] == [
        ("primary", "LMServerError"),
        ("backup", "ok"),
    ]


def test_anyscale_with_an_unusual_port_and_path_is_named_by_host_and_port(stub):
    lm = Anyscale("m", api_base=f"http://localhost:{stub.port}/v1", api_key=SECRET, use_chat_api=True)
    try:
        lm("q")
        assert lm.usage[-1].endpoint == f"localhost:{stub.port}"
    finally:
        lm.close()
