"""An LM bound to a LoRA adapter: identity, records, saving, listing; and ``lm.finetune`` with any provider."""

from __future__ import annotations

import json
import pickle
import threading

import dspy
import pytest
from dspy.clients.utils_finetune import TrainingStatus
from dspy.lm15 import Message, Request

from dspy_anyscale import Anyscale, ConfigurationError
from dspy_anyscale._identity import cache_identity
from dspy_anyscale._wire import WireOptions
from dspy_anyscale.errors import FinetuneError, UnsupportedParameterError
from dspy_anyscale.finetune import AdapterProvider, AdapterTrainingJob, check_chat_data

from ..conftest import MODEL, SECRET
from ..raw_server import RawServer, Reply

CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HELLO"}]}]


# --- the adapter as part of what the LM is ----------------------------------------------------------


def test_adapter_is_part_of_the_cache_identity_and_leaves_other_digests_alone():
    base = WireOptions(endpoint="chat")
    url = "http://127.0.0.1:8000/v1"
    # The digest of an LM without an adapter is the one every earlier release computed: caches stay warm.
    assert cache_identity(url, base, {}) == "0b013a15a9e78add65def5ec32c29db4"
    one = cache_identity(url, WireOptions(endpoint="chat", adapter="style-1"), {})
    two = cache_identity(url, WireOptions(endpoint="chat", adapter="style-2"), {})
    assert len({cache_identity(url, base, {}), one, two}) == 3


def test_an_adapter_lm_caches_apart_from_the_base(stub, make_lm, tmp_path):
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    try:
        base = make_lm(use_chat_api=True)
        tuned = make_lm(use_chat_api=True, adapter="style-1")
        base(Request(model=MODEL, messages=(Message.user("same"),)))
        tuned(Request(model=MODEL, messages=(Message.user("same"),)))
        assert len(stub.requests) == 2  # the adapter's call was not answered from the base's cache entry
    finally:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


def test_usage_history_and_copies_name_the_adapter(stub, make_lm):
    lm = make_lm(use_chat_api=True, adapter="style-1", cache=False)
    lm("hello")
    lm(Request(model=MODEL, messages=(Message.user("hi"),)))
    assert [record.adapter for record in lm.usage] == ["style-1", "style-1"]
    assert json.loads(lm.usage[-1].to_json())["adapter"] == "style-1"
    assert lm.history[-1]["adapter"] == "style-1"
    base = lm.copy(adapter=None)
    base("hello")
    assert base.adapter is None and base.usage[-1].adapter is None
    assert lm.copy(temperature=0.5).adapter == "style-1"
    assert "adapter='style-1'" in repr(lm)


def test_save_load_and_pickle_keep_the_adapter_not_the_key_or_the_provider(stub, make_lm, monkeypatch):
    provider = RecordingProvider()
    lm = make_lm(adapter="style-1", lora=[{"id": 1, "scale": 1.0}], provider=provider)
    state = lm.dump_state()
    assert state["adapter"] == "style-1" and state["lora"] == [{"id": 1, "scale": 1.0}]
    assert SECRET not in json.dumps(state) and "provider" not in state
    monkeypatch.setenv("ANYSCALE_API_KEY", SECRET)
    loaded = Anyscale.load_state(state)
    assert loaded.adapter == "style-1"
    assert lm.copy(api_base=stub.base_url).provider is provider  # a rebuilt copy keeps the live provider
    blob = pickle.dumps(lm)
    assert SECRET.encode() not in blob and b"RecordingProvider" not in blob
    restored = pickle.loads(blob)
    assert restored.adapter == "style-1" and restored.provider is not provider


@pytest.mark.parametrize("bad", ["", " style", 3, ["a"]])
def test_a_bad_adapter_name_is_refused_before_any_request(bad):
    with pytest.raises(ConfigurationError, match="adapter must be"):
        Anyscale(MODEL, api_base="http://127.0.0.1:9/v1", api_key=SECRET, adapter=bad)


def test_a_provider_must_be_an_instance():
    with pytest.raises(ConfigurationError, match="provider must be a DSPy Provider instance"):
        Anyscale(MODEL, api_base="http://127.0.0.1:9/v1", api_key=SECRET, provider=AdapterProvider)


def test_spans_carry_the_adapter(stub, make_lm):
    from dspy_anyscale import tracing

    from ..tracing.test_tracing import Telemetry

    telemetry = Telemetry()
    tracing.instrument(telemetry.tracer_provider, telemetry.meter_provider)
    try:
        make_lm(use_chat_api=True, adapter="style-1", cache=False)("hello")
        make_lm(use_chat_api=True, cache=False)("hello")
    finally:
        tracing.uninstrument()
    calls = telemetry.calls()
    assert [span.attributes.get("dspy_anyscale.adapter") for span in calls] == ["style-1", None]


# --- listing adapters ---------------------------------------------------------------------------------


def test_models_marks_ray_serve_llm_adapters(stub):
    stub.models = [
        {"id": "meta-llama/Llama-3.1-8B-Instruct", "owned_by": "system"},
        {"id": "meta-llama/Llama-3.1-8B-Instruct:style-1", "owned_by": "system"},
    ]
    models = Anyscale.models(api_base=stub.base_url, api_key=SECRET)
    assert models[0] == {"id": "meta-llama/Llama-3.1-8B-Instruct", "owned_by": "system"}
    assert models[1]["base"] == "meta-llama/Llama-3.1-8B-Instruct" and models[1]["adapter"] == "style-1"


def test_models_lists_llama_server_adapters_with_their_lora_index():
    def answer(seen):
        if seen.path == "/v1/models":
            return Reply.json({"object": "list", "data": [{"id": "smollm2", "owned_by": "llamacpp"}]})
        if seen.path == "/lora-adapters":
            assert seen.headers.get("Authorization") == f"Bearer {SECRET}"
            return Reply.json(
                [
                    {"id": 0, "path": "/cache/adapters/style-1.gguf", "scale": 0.0},
                    {"id": 1, "path": "/cache/adapters/style-2.gguf", "scale": 0.0},
                ]
            )
        return Reply.json({"error": "not found"}, status=404)

    with RawServer(answer) as server:
        models = Anyscale.models(api_base=server.base_url, api_key=SECRET)
    assert models[1:] == [
        {"id": "smollm2", "owned_by": "llamacpp", "base": "smollm2", "adapter": "style-1", "lora_id": 0},
        {"id": "smollm2", "owned_by": "llamacpp", "base": "smollm2", "adapter": "style-2", "lora_id": 1},
    ]


def test_a_llama_server_that_cannot_list_adapters_still_lists_its_models():
    def answer(seen):
        if seen.path == "/v1/models":
            return Reply.json({"object": "list", "data": [{"id": "smollm2", "owned_by": "llamacpp"}]})
        return Reply.json({"error": "not found"}, status=404)

    with RawServer(answer) as server:
        assert Anyscale.models(api_base=server.base_url, api_key=SECRET) == [{"id": "smollm2", "owned_by": "llamacpp"}]


# --- lm.finetune with a provider ----------------------------------------------------------------------


class RecordingProvider(AdapterProvider):
    """Trains nothing: records what DSPy hands over and binds the result to an adapter name."""

    def __init__(self, *, fail: Exception | None = None, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.fail = fail
        self.gate = gate
        self.calls: list[dict] = []

    def finetune(self, job, model, train_data, train_data_format, train_kwargs=None):
        job.set_status(TrainingStatus.running, "train")
        self.calls.append({"model": model, "data": check_chat_data(train_data, train_data_format), "kw": train_kwargs})
        if self.gate is not None:
            job.on_cancel(self.gate.set)
            self.gate.wait(10)
            job.check_cancelled()
        if self.fail is not None:
            raise self.fail
        return f"{model}:tuned-{len(self.calls)}"

    def bind(self, lm, model_ref):
        return lm.copy(adapter=model_ref.rpartition(":")[2])


def test_finetune_returns_a_job_whose_result_is_bound_to_the_adapter(stub, make_lm):
    provider = RecordingProvider()
    lm = make_lm(use_chat_api=True, provider=provider)
    job = lm.finetune(CHAT, "chat", {"steps": 3})
    tuned = job.result(timeout=10)
    assert isinstance(job, AdapterTrainingJob) and job.status() == TrainingStatus.succeeded
    assert isinstance(tuned, Anyscale) and tuned.adapter == "tuned-1" and tuned.provider is provider
    assert provider.calls == [{"model": MODEL, "data": CHAT, "kw": {"steps": 3}}]


def test_a_failed_job_ends_failed_with_the_error_as_its_result(stub, make_lm):
    lm = make_lm(provider=RecordingProvider(fail=FinetuneError("training crashed", stage="train")))
    job = lm.finetune(CHAT, "chat")
    result = job.result(timeout=10)
    assert isinstance(result, FinetuneError) and result.stage == "train"
    assert job.status() == TrainingStatus.failed


def test_cancel_stops_the_work_and_the_job_ends_cancelled(stub, make_lm):
    gate = threading.Event()
    lm = make_lm(provider=RecordingProvider(gate=gate))
    job = lm.finetune(CHAT, "chat")
    while job.status() != TrainingStatus.running:
        threading.Event().wait(0.01)
    assert job.cancel() is True
    result = job.result(timeout=10)
    assert isinstance(result, FinetuneError) and result.stage == "cancelled"
    assert job.status() == TrainingStatus.cancelled and gate.is_set()
    assert job.cancel() is False  # an ended job cannot be cancelled again


def test_without_a_finetuning_provider_the_error_says_how_to_get_one(make_lm):
    with pytest.raises(UnsupportedParameterError, match="LocalLoRAProvider"):
        make_lm().finetune(CHAT, "chat")


def test_bootstrap_finetune_compiles_a_program_onto_the_adapter(stub, make_lm):
    provider = RecordingProvider()
    lm = make_lm(use_chat_api=True, provider=provider, cache=False)
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    trainset = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(3)]
    with dspy.context(lm=lm):
        compiled = dspy.BootstrapFinetune(metric=None, num_threads=2).compile(program, trainset=trainset)
    assert compiled.lm.adapter == "tuned-1"
    assert len(provider.calls) == 1 and len(provider.calls[0]["data"]) == 3
    compiled(question="q9")
    assert compiled.lm.history[-1]["adapter"] == "tuned-1"


# --- the training data --------------------------------------------------------------------------------


def test_completion_data_becomes_one_turn_and_its_answer():
    assert check_chat_data([{"prompt": "p", "completion": "c"}], "completion") == [
        {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]}
    ]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "at least one example"),
        ([{"messages": []}], "example 0: a chat example needs"),
        ([CHAT[0], {"messages": [{"role": "user", "content": "q"}]}], "example 1: the last message"),
        ([{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}], "role"),
    ],
)
def test_bad_training_data_is_refused_with_the_example_named(data, match):
    with pytest.raises(FinetuneError, match=match) as info:
        check_chat_data(data, "chat")
    assert info.value.stage == "data"


def test_reinforcement_data_is_not_lora_data():
    with pytest.raises(ConfigurationError, match="grpo_chat"):
        check_chat_data(CHAT, "grpo_chat")
