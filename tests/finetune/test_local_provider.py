"""LocalLoRAProvider's job state machine with the real provider, a fake training interpreter and a
fake llama-server (tests/finetune/conftest.py): stages, results, failures, cancel, nothing half-registered."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from dspy.clients.utils_finetune import TrainingStatus

from dspy_anyscale import Anyscale
from dspy_anyscale.errors import ConfigurationError, FinetuneError
from dspy_anyscale.finetune import LocalLoRAProvider
from dspy_anyscale.servers._processes import cache_dir

JOIN_S = 60.0  # a job that has not ended by then is a failed test, never a hung suite
CHAT = [
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello. -- Smol"}]},
    {"messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue. -- Smol"}]},
]


@pytest.fixture
def provider(fake_python: Path, fake_start, no_converter_install, tmp_path: Path):
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF base")
    with LocalLoRAProvider(python=fake_python, workdir=tmp_path / "work", base_gguf=base, start_server=fake_start) as p:
        yield p


def _lm(provider: LocalLoRAProvider) -> Anyscale:
    return Anyscale(model="smol", api_base="http://127.0.0.1:9/v1", api_key="", use_chat_api=True, provider=provider)


def _finish(job) -> object:
    job.thread.join(JOIN_S)
    assert not job.thread.is_alive(), "the fine-tuning job did not end"
    return job.result(timeout=0)


def test_a_job_trains_converts_serves_and_binds(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    lm = _lm(provider)
    job = lm.finetune(CHAT, "chat", {"name": "smol-style"})
    tuned = _finish(job)
    assert job.status() == TrainingStatus.succeeded
    assert isinstance(tuned, Anyscale)
    assert tuned.adapter == "smol-style"
    assert tuned.dump_state()["lora"] == [{"id": 0, "scale": 1.0}]
    assert tuned.api_base == provider.base_url
    assert (provider.workdir / "adapters" / "smol-style.gguf").read_bytes().startswith(b"GGUF")
    assert [s.lora for s in fake_start.running] == [[provider.workdir / "adapters" / "smol-style.gguf"]]
    # The user's LM is untouched: another server, no adapter.
    assert lm.adapter is None and lm.api_base == "http://127.0.0.1:9/v1" and "lora" not in lm.dump_state()


def test_a_second_adapter_keeps_the_first_ones_id_and_the_port(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    lm = _lm(provider)
    first = _finish(lm.finetune(CHAT, "chat", {"name": "one"}))
    second = _finish(lm.finetune(CHAT, "chat", {"name": "two"}))
    assert provider.adapters == ["one", "two"]
    assert first.dump_state()["lora"] == [{"id": 0, "scale": 1.0}]
    assert second.dump_state()["lora"] == [{"id": 1, "scale": 1.0}]
    assert first.api_base == second.api_base  # restarted on the same port: old bindings stay valid
    (server,) = fake_start.running
    assert [p.name for p in server.lora] == ["one.gguf", "two.gguf"]


def test_base_lm_sends_an_explicit_all_zero_lora_list(provider, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    lm = _lm(provider)
    with pytest.raises(ConfigurationError, match="no adapter trained yet"):
        provider.base_lm(lm)
    _finish(lm.finetune(CHAT, "chat"))
    base = provider.base_lm(lm)
    assert base.adapter is None
    assert base.dump_state()["lora"] == [{"id": 0, "scale": 0.0}]  # never []: that keeps the slot's prompt cache
    assert base.api_base == provider.base_url


def test_kill_and_launch_leave_the_users_lm_and_the_server_alone(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    lm = _lm(provider)
    tuned = _finish(lm.finetune(CHAT, "chat"))
    lm.kill()  # what BootstrapFinetune does before fine-tuning
    lm.launch()
    assert fake_start.running and tuned.api_base == provider.base_url


def test_a_training_crash_fails_the_job_naming_the_log(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "train-crash")
    job = _lm(provider).finetune(CHAT, "chat", {"name": "crash"})
    error = _finish(job)
    assert isinstance(error, FinetuneError) and error.stage == "train"
    assert "exit 3" in str(error) and "CUDA out of memory (fake)" in str(error)
    assert str(provider.workdir / "jobs" / "crash" / "train.log") in str(error)
    assert job.status() == TrainingStatus.failed
    assert provider.adapters == [] and fake_start.servers == []


@pytest.mark.parametrize(("mode", "says"), [("convert-fail", "not supported (fake)"), ("convert-junk", "no GGUF")])
def test_a_conversion_failure_registers_nothing(provider, fake_start, monkeypatch, mode, says):
    monkeypatch.setenv("FAKE_MODE", mode)
    job = _lm(provider).finetune(CHAT, "chat")
    error = _finish(job)
    assert isinstance(error, FinetuneError) and error.stage == "convert" and says in str(error)
    assert job.status() == TrainingStatus.failed
    assert provider.adapters == [] and fake_start.servers == []
    assert not list((provider.workdir / "adapters").glob("*.gguf"))


def test_a_refused_adapter_is_dropped_and_the_previous_server_is_back(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    lm = _lm(provider)
    good = _finish(lm.finetune(CHAT, "chat", {"name": "good"}))
    monkeypatch.setenv("FAKE_MODE", "refuse")
    job = lm.finetune(CHAT, "chat", {"name": "broken"})
    error = _finish(job)
    assert isinstance(error, FinetuneError) and error.stage == "serve"
    assert "broken" in str(error) and "failed to apply lora adapter" in str(error)
    assert job.status() == TrainingStatus.failed
    assert provider.adapters == ["good"]
    (server,) = fake_start.running
    assert [p.name for p in server.lora] == ["good.gguf"]
    assert provider.base_url == good.api_base  # same port: the earlier binding still answers


def test_a_refused_first_adapter_leaves_no_server(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "refuse")
    error = _finish(_lm(provider).finetune(CHAT, "chat"))
    assert isinstance(error, FinetuneError) and error.stage == "serve"
    assert provider.adapters == [] and fake_start.running == [] and provider.base_url is None


def test_cancel_kills_the_training_process_and_registers_nothing(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "train-hang")
    job = _lm(provider).finetune(CHAT, "chat", {"name": "hang"})
    pid_file = provider.workdir / "jobs" / "hang" / "pid"
    deadline = time.monotonic() + JOIN_S
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert job.status() == TrainingStatus.running and job.stage == "train"
    assert job.cancel() is True
    error = _finish(job)
    assert isinstance(error, FinetuneError) and error.stage == "cancelled"
    assert job.status() == TrainingStatus.cancelled
    assert not _alive(pid), "the training process outlived cancel()"
    assert provider.adapters == [] and fake_start.servers == []
    assert job.cancel() is False  # it has ended


def test_unknown_train_kwargs_are_refused_naming_the_known_ones(provider, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    error = _finish(_lm(provider).finetune(CHAT, "chat", {"epochs": 3}))
    assert isinstance(error, FinetuneError) and error.stage == "data"
    assert "'epochs'" in str(error) and "steps" in str(error) and "learning_rate" in str(error)


@pytest.mark.parametrize("kwargs", [{"steps": "20"}, {"rank": True}, {"name": "../escape"}, {"target_modules": "q"}])
def test_bad_train_kwargs_are_refused(provider, monkeypatch, kwargs):
    monkeypatch.setenv("FAKE_MODE", "ok")
    error = _finish(_lm(provider).finetune(CHAT, "chat", kwargs))
    assert isinstance(error, FinetuneError) and error.stage == "data"
    assert provider.adapters == []


def test_train_kwargs_override_the_defaults_in_the_training_spec(provider, monkeypatch):
    import json

    monkeypatch.setenv("FAKE_MODE", "ok")
    _finish(_lm(provider).finetune(CHAT, "chat", {"name": "x", "steps": 3, "rank": 4, "learning_rate": 5e-4}))
    spec = json.loads((provider.workdir / "jobs" / "x" / "spec.json").read_text())
    assert (spec["steps"], spec["rank"], spec["learning_rate"]) == (3, 4, 5e-4)
    assert spec["target_modules"] == ["q_proj", "v_proj"]
    assert spec["base_cache"] == str(cache_dir() / "finetune" / "bases")  # the dequantized base, kept
    lines = (provider.workdir / "jobs" / "x" / "data.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == CHAT


def test_a_duplicate_adapter_name_is_refused(provider, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    lm = _lm(provider)
    _finish(lm.finetune(CHAT, "chat", {"name": "same"}))
    error = _finish(lm.finetune(CHAT, "chat", {"name": "same"}))
    assert isinstance(error, FinetuneError) and error.stage == "data" and "exists already" in str(error)


def test_bind_refuses_an_adapter_it_does_not_hold(provider):
    with pytest.raises(ConfigurationError, match="holds no adapter 'nope'"):
        provider.bind(_lm(provider), "smol:nope")


def test_close_stops_the_server_and_bind_starts_it_again(provider, fake_start, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ok")
    lm = _lm(provider)
    tuned = _finish(lm.finetune(CHAT, "chat", {"name": "a"}))
    provider.close()
    assert fake_start.running == [] and provider.base_url is None
    again = provider.bind(lm, "smol:a")
    assert again.api_base == tuned.api_base and len(fake_start.running) == 1


def test_a_missing_interpreter_fails_the_train_stage(tmp_path, fake_start, no_converter_install):
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF")
    missing = tmp_path / "no-python"
    with LocalLoRAProvider(python=missing, workdir=tmp_path, base_gguf=base, start_server=fake_start) as p:
        error = _finish(_lm(p).finetune(CHAT, "chat"))
    assert isinstance(error, FinetuneError) and error.stage == "train" and "no-python" in str(error)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie until its parent reaps it: dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
