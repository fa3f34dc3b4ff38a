"""The real local fine-tuning loop (issue 21): train -> convert -> serve -> BootstrapFinetune.

Runs ``examples/finetune_loop.py``'s loop against the session's llama-server: the training
environment (``dspy_anyscale.finetune._env``, a cached venv with torch, transformers, peft, gguf;
~1 min to install the first time) trains a LoRA adapter on SmolLM2-135M in a child process,
llama.cpp's converter makes it a GGUF adapter, the provider's own llama-server serves it, and the
fine-tuned program must answer differently from the base and score higher on the example's metric.
Then a broken adapter must be refused by the real llama-server with nothing half-registered.
Budget: ~3-5 min cold on 2 cores (the install, ~50 s of training), ~2-3 min warm.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import dspy
import pytest

from dspy_anyscale import Anyscale
from dspy_anyscale.errors import FinetuneError
from dspy_anyscale.finetune import LocalLoRAProvider

from ..conftest import SECRET
from ..finetune.conftest import FAKE_PYTHON

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_loop.py"
PROVIDER_KEY = "lora-server-key-for-tests"
JOIN_S = 600.0


@pytest.fixture(scope="module")
def training_python(pytestconfig) -> Path:
    from dspy_anyscale.finetune._env import ensure_env
    from dspy_anyscale.servers import llama_server

    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the first install takes a minute: show its progress
        python = ensure_env()
        llama_server.ensure_converter()
    return python


def _example():
    spec = importlib.util.spec_from_file_location("finetune_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_loop"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _lm(server, provider: LocalLoRAProvider) -> Anyscale:
    return Anyscale(
        model=server.alias,
        api_base=server.base_url,
        api_key=SECRET,
        use_chat_api=True,
        max_tokens=40,
        cache=False,
        provider=provider,
    )


def test_bootstrap_finetune_trains_an_adapter_that_beats_the_base(llama_server, training_python, tmp_path):
    loop = _example()
    with LocalLoRAProvider(python=training_python, workdir=tmp_path, api_key=PROVIDER_KEY) as provider:
        # Half the example's questions: the base model's rambling answers are most of the time.
        # One torch thread: the tests beside this one keep the other core busy, and two threads that
        # wait for each other on a busy core train ~2-7x slower (measured; docs/finetuning.md).
        result = loop.run_loop(_lm(llama_server, provider), provider, dev=loop.DEV[:8], train_kwargs={"threads": 1})
        assert result.finetuned > result.baseline, result
        assert result.adapter_answer != result.base_answer
        assert result.adapter_answer.strip().endswith(loop.SIGN_OFF)
        assert len(provider.adapters) == 1
        assert (tmp_path / "adapters" / f"{provider.adapters[0]}.gguf").is_file()
    assert provider.base_url is None  # close() stopped the provider's server


def test_a_broken_adapter_is_refused_by_llama_server_and_dropped(llama_server, training_python, tmp_path, monkeypatch):
    """The converter 'succeeds' with a GGUF llama-server cannot load: the serve stage fails cleanly."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_MODE", "refuse")
    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello -- Smol"}]}]
    with LocalLoRAProvider(python=fake, workdir=tmp_path / "work", api_key=PROVIDER_KEY) as provider:
        job = _lm(llama_server, provider).finetune(chat, "chat", {"name": "broken"})
        job.thread.join(JOIN_S)
        assert not job.thread.is_alive()
        error = job.result(timeout=0)
        assert isinstance(error, FinetuneError) and error.stage == "serve", error
        assert "broken" in str(error) and "llama-server" in str(error)
        assert provider.adapters == [] and provider.base_url is None
    dspy.configure(adapter=None)
