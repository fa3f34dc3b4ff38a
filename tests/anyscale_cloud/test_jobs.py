"""AnyscaleJobsProvider: config generation (golden), and the job's life against the fake control
plane with the REAL Anyscale SDK (submit, status, logs, terminate)."""

from __future__ import annotations

import json
import time

import pytest
from dspy.clients.utils_finetune import TrainingStatus

from dspy_anyscale import Anyscale
from dspy_anyscale.errors import ConfigurationError, FinetuneError
from dspy_anyscale.finetune import AnyscaleJobsProvider
from dspy_anyscale.finetune._anyscale_jobs import build_working_dir, dataset_info, llamafactory_yaml
from dspy_anyscale.testing import StubServer

from .fake_control_plane import FakeControlPlane

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TOKEN = "svc_token_0123456789abcdef"
TRAIN = [
    {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    },
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Four"}]},
]
WAIT_S = 60  # every job.result() is bounded: a hang fails the test, not the suite
# The SDK zips the working_dir with pathspec's deprecated pattern name: its warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


@pytest.fixture
def service_stub():
    with StubServer(api_key=TOKEN, model=MODEL) as server:
        yield server


@pytest.fixture
def service(control_plane: FakeControlPlane, service_stub: StubServer):
    return control_plane.add_service("llm-svc", service_stub.base_url.removesuffix("/v1"), TOKEN)


def _provider(tmp_path, **kwargs) -> AnyscaleJobsProvider:
    kwargs.setdefault("image_uri", "anyscale/ray-llm:2.44.1-py311-cu124")
    return AnyscaleJobsProvider("llm-svc", "s3://bucket/lora/", workdir=tmp_path / "jobs", poll_s=0.01, **kwargs)


def _lm(provider: AnyscaleJobsProvider, stub: StubServer) -> Anyscale:
    return Anyscale(MODEL, api_base=stub.base_url, api_key=TOKEN, use_chat_api=True, cache=False, provider=provider)


# --- config generation (golden) ---------------------------------------------------------------------


def test_train_yaml_golden():
    text = llamafactory_yaml(
        {
            "lora_rank": 8,
            "learning_rate": 1.0e-4,
            "bf16": True,
            "model_name_or_path": "meta-llama/X",
            "template": "llama3",
        }
    )
    assert text == (
        "# LoRA SFT for LLaMA-Factory (llamafactory-cli train train.yaml), written by dspy-anyscale\n"
        'stage: "sft"\n'
        "do_train: true\n"
        'finetuning_type: "lora"\n'
        'dataset: "dspy_train"\n'
        'dataset_dir: "data"\n'
        'output_dir: "output"\n'
        "overwrite_output_dir: true\n"
        'report_to: "none"\n'
        "lora_rank: 8\n"
        "learning_rate: 0.0001\n"
        "bf16: true\n"
        'model_name_or_path: "meta-llama/X"\n'
        'template: "llama3"\n'
    )


def test_train_yaml_reads_back_as_the_same_values():
    yaml = pytest.importorskip("yaml")
    args = {"model_name_or_path": "s3://b/m: odd # name", "template": "qwen", "num_train_epochs": 3.0, "seed": 0}
    loaded = yaml.safe_load(llamafactory_yaml(args))
    assert {key: loaded[key] for key in args} == args
    assert loaded["finetuning_type"] == "lora" and loaded["stage"] == "sft"


def test_working_dir_golden(tmp_path):
    build_working_dir(tmp_path, TRAIN, {"template": "llama3"}, "s3://bucket/lora/a1")
    assert json.loads((tmp_path / "data" / "dspy_train.json").read_text()) == TRAIN
    assert json.loads((tmp_path / "data" / "dataset_info.json").read_text()) == {
        "dspy_train": {
            "file_name": "dspy_train.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    assert dataset_info()["dspy_train"]["file_name"] == "dspy_train.json"
    assert "copy_files" in (tmp_path / "copy_adapter.py").read_text()
    assert (tmp_path / "train.yaml").read_text().endswith('template: "llama3"\n')


# --- a job, end to end through the real SDK -----------------------------------------------------------


def test_a_job_trains_and_binds_the_adapter(control_plane, service, service_stub, tmp_path):
    provider = _provider(tmp_path, lora={"lora_rank": 16})
    lm = _lm(provider, service_stub)
    job = lm.finetune(TRAIN, "chat", {"name": "qa-1", "num_train_epochs": 1.0})
    tuned = job.result(timeout=WAIT_S)

    assert not isinstance(tuned, Exception), tuned
    assert job.status() == TrainingStatus.succeeded
    assert tuned.model == f"{MODEL}:qa-1" and tuned.adapter == "qa-1"
    assert tuned.api_base == service_stub.base_url  # the service's query_url + /v1, from the SDK

    # What the SDK sent to create the job: our entrypoint, the uploaded working_dir, our image.
    created = control_plane.calls("POST", r"/decorated_ha_jobs/create$")[-1].body
    assert created["name"] == "dspy-lora-qa-1"
    config = created["config"]
    assert config["entrypoint"] == (
        "llamafactory-cli train train.yaml && python copy_adapter.py output s3://bucket/lora/qa-1"
    )
    assert config["runtime_env"]["working_dir"].startswith("s3://fake-bucket/pkg_")
    assert config["runtime_env"]["pip"] == ["llamafactory"]
    assert config["max_retries"] == 0
    assert control_plane.calls("POST", r"/get_or_create_build_from_image_uri$")[-1].body == {
        "image_uri": "anyscale/ray-llm:2.44.1-py311-cu124"
    }
    files = control_plane.uploaded_files()
    train_yaml = next(body for name, body in files.items() if name.endswith("train.yaml")).decode()
    assert "lora_rank: 16\n" in train_yaml and "num_train_epochs: 1.0\n" in train_yaml
    assert f'model_name_or_path: "{MODEL}"\n' in train_yaml and 'template: "llama3"\n' in train_yaml
    uploaded = next(body for name, body in files.items() if name.endswith("data/dspy_train.json"))
    assert json.loads(uploaded) == TRAIN

    tuned("which adapter?")
    assert service_stub.posts()[-1].body["model"] == f"{MODEL}:qa-1"  # Ray Serve LLM's multi-LoRA name


def test_a_failed_job_reports_its_log_tail(control_plane, service, service_stub, tmp_path):
    control_plane.next_job_states = ["PENDING", "RUNNING", "OUT_OF_RETRIES"]
    control_plane.next_job_logs = (
        "loading model\nTraceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory\n"
    )
    job = _lm(_provider(tmp_path), service_stub).finetune(TRAIN, "chat")
    error = job.result(timeout=WAIT_S)

    assert isinstance(error, FinetuneError) and error.stage == "job"
    assert (
        "FAILED" in str(error)
        and "CUDA out of memory" in str(error)
        and "anyscale job logs --id prodjob_1" in str(error)
    )
    assert job.status() == TrainingStatus.failed
    assert control_plane.calls("GET", r"/logs/job_logs_download_v2/prodjob_1_run$")


def test_cancel_terminates_the_job(control_plane, service, service_stub, tmp_path):
    control_plane.next_job_states = ["PENDING", "RUNNING"]  # runs until terminated
    job = _lm(_provider(tmp_path), service_stub).finetune(TRAIN, "chat")
    deadline = time.monotonic() + WAIT_S
    while job.status() != TrainingStatus.running:
        assert time.monotonic() < deadline, f"the job never ran: {job.status()}"
        time.sleep(0.01)

    assert job.cancel() is True
    error = job.result(timeout=WAIT_S)
    assert isinstance(error, FinetuneError) and error.stage == "cancelled"
    assert job.status() == TrainingStatus.cancelled
    assert control_plane.calls("POST", r"/production_jobs/prodjob_1/terminate$")
    assert control_plane.jobs["prodjob_1"].terminated


def test_a_job_terminated_elsewhere_is_a_failure(control_plane, service, service_stub, tmp_path):
    control_plane.next_job_states = ["PENDING", "TERMINATED"]
    error = _lm(_provider(tmp_path), service_stub).finetune(TRAIN, "chat").result(timeout=WAIT_S)
    assert isinstance(error, FinetuneError) and error.stage == "job" and "terminated outside" in str(error)


def test_bad_train_kwargs_submit_nothing(control_plane, service, service_stub, tmp_path):
    lm = _lm(_provider(tmp_path), service_stub)
    for bad, says in (({"name": "no spaces"}, "adapter's name"), ({"lora_target": ["q_proj"]}, "lora_target")):
        error = lm.finetune(TRAIN, "chat", bad).result(timeout=WAIT_S)
        assert isinstance(error, FinetuneError) and error.stage == "data" and says in str(error)
    assert not control_plane.calls("POST", r"/decorated_ha_jobs/create$")


def test_bad_data_submits_nothing(control_plane, service, service_stub, tmp_path):
    bad = [{"messages": [{"role": "user", "content": "no answer"}]}]
    error = _lm(_provider(tmp_path), service_stub).finetune(bad, "chat").result(timeout=WAIT_S)
    assert isinstance(error, FinetuneError) and error.stage == "data"
    assert not control_plane.calls("POST", r"/decorated_ha_jobs/create$")


def test_an_unknown_base_model_asks_for_a_template(control_plane, service, service_stub, tmp_path):
    provider = _provider(tmp_path, model_source="my-org/custom-model")
    error = _lm(provider, service_stub).finetune(TRAIN, "chat").result(timeout=WAIT_S)
    assert isinstance(error, FinetuneError) and "template=" in str(error)
    assert not control_plane.calls("POST", r"/decorated_ha_jobs/create$")


def test_a_refused_submit_is_a_submit_failure(control_plane, service, service_stub, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSCALE_CLI_TOKEN", "aph0_not_the_right_token")  # the control plane says 401
    error = _lm(_provider(tmp_path), service_stub).finetune(TRAIN, "chat").result(timeout=WAIT_S)
    assert isinstance(error, FinetuneError) and error.stage == "submit"
    assert "anyscale login" in str(error)


def test_job_options_are_checked_by_the_sdk_at_once(tmp_path):
    with pytest.raises(ConfigurationError, match="refused the job options"):
        AnyscaleJobsProvider("svc", "s3://b/lora", max_retries="twice")
    with pytest.raises(ConfigurationError, match="dynamic_lora_loading_path"):
        AnyscaleJobsProvider("svc", "")
    with pytest.raises(ConfigurationError, match=r"lora\['lora_target'\] must be"):
        AnyscaleJobsProvider("svc", "s3://b/lora", lora={"lora_target": ["q_proj"]})


def test_without_a_service_the_lm_keeps_its_endpoint(control_plane, service_stub, tmp_path):
    provider = AnyscaleJobsProvider(None, "s3://bucket/lora", workdir=tmp_path, poll_s=0.01)
    tuned = _lm(provider, service_stub).finetune(TRAIN, "chat", {"name": "a2"}).result(timeout=WAIT_S)
    assert tuned.model == f"{MODEL}:a2" and tuned.adapter == "a2" and tuned.api_base == service_stub.base_url


# --- the contract: what the SDK sends, in order (a new SDK that sends otherwise fails here first) --------

SUBMIT_CALLS = [
    ("GET", "/api/v2/userinfo/"),  # the SDK checks its token once per process
    ("GET", "/ext/v0/clouds/default"),
    ("GET", "/ext/v0/cluster_computes/default"),
    ("GET", "/ext/v0/cluster_computes/cpt_1"),
    ("GET", "/ext/v0/projects/default_project"),
    ("GET", "/api/v2/workos/deployment_infra"),
    ("POST", "/api/v2/builds/get_or_create_build_from_image_uri"),
    ("GET", "/ext/v0/cluster_computes/default"),
    ("GET", "/api/v2/compute_templates/cpt_1"),
    ("GET", "/ext/v0/clouds/cld_1"),
    ("POST", "/api/v2/clouds/cld_1/generate_cloud_data_bucket_presigned_url"),
    ("PUT", "/upload/<zip>"),  # the presigned URL the control plane gave: the working_dir zip
    ("POST", "/api/v2/decorated_ha_jobs/create"),
]
STATUS_CALLS = [("GET", "/ext/v0/production_jobs/prodjob_1"), ("POST", "/api/v2/decorated_ha_jobs/job_runs/search")]


def test_what_the_sdk_sends(control_plane, service, service_stub, tmp_path):
    tuned = _lm(_provider(tmp_path), service_stub).finetune(TRAIN, "chat", {"name": "c1"}).result(timeout=WAIT_S)
    assert not isinstance(tuned, Exception), tuned

    sent = [(r.method, "/upload/<zip>" if r.path.startswith("/upload/") else r.path) for r in control_plane.requests]
    created = sent.index(("POST", "/api/v2/decorated_ha_jobs/create"))
    assert sent[: created + 1] == SUBMIT_CALLS, sent
    after = sent[created + 1 :]
    assert after[:2] == STATUS_CALLS, after  # each poll: the job, then its runs
    assert after.count(STATUS_CALLS[0]) == 3  # PENDING, RUNNING, SUCCESS: one poll each
    assert control_plane.calls("GET", r"^/api/v2/services-v2/?$")[-1].query["name"] == ["llm-svc"]  # bind
    presign = control_plane.calls("POST", r"generate_cloud_data_bucket_presigned_url$")[-1].body
    assert presign["file_type"] == "runtime_env_packages" and presign["access_mode"] == "WRITE"


def test_the_fake_answers_the_sdks_own_follow_calls(control_plane, tmp_path):
    """The SDK's wait / get_logs / terminate against the fake, without the provider in between."""
    import anyscale
    from anyscale.job.models import JobConfig, JobState

    (tmp_path / "main.py").write_text("print('hi')\n")
    control_plane.next_job_logs = "line 1\nline 2\n"
    control_plane.next_job_states = ["SUCCESS"]  # the SDK's public wait() polls every 10 s, fixed: end at once
    job_id = anyscale.job.submit(
        JobConfig(name="raw", entrypoint="python main.py", working_dir=str(tmp_path), max_retries=0)
    )
    anyscale.job.wait(id=job_id, state=JobState.SUCCEEDED, interval_s=0.01, timeout_s=WAIT_S)
    assert anyscale.job.status(id=job_id).state == JobState.SUCCEEDED
    assert anyscale.job.get_logs(id=job_id) == "line 1\nline 2\n"
    assert anyscale.job.terminate(id=job_id) == job_id
    assert anyscale.job.status(id=job_id).state == JobState.TERMINATED
    assert any(name.endswith("main.py") for name in control_plane.uploaded_files())


def test_bootstrap_finetune_compiles_through_an_anyscale_job(control_plane, service, service_stub, tmp_path):
    """DSPy's BootstrapFinetune, unchanged: traces from the program, one job, the program bound to the adapter."""
    import dspy

    lm = _lm(_provider(tmp_path), service_stub)
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    trainset = [dspy.Example(question=f"q{i}?", answer=f"a{i}").with_inputs("question") for i in range(3)]
    dspy.settings.experimental = True  # BootstrapFinetune is experimental in DSPy 3.x
    try:
        compiled = dspy.BootstrapFinetune(metric=None, train_kwargs={lm: {"name": "bf-1"}}).compile(
            program, trainset=trainset
        )
    finally:
        dspy.settings.experimental = False
    tuned = compiled.get_lm()
    assert tuned.model == f"{MODEL}:bf-1" and tuned.adapter == "bf-1"
    uploaded = next(body for name, body in control_plane.uploaded_files().items() if name.endswith("dspy_train.json"))
    conversations = json.loads(uploaded)
    assert len(conversations) == 3 and conversations[0]["messages"][-1]["role"] == "assistant"
    compiled(question="after fine-tuning?")
    assert service_stub.posts()[-1].body["model"] == f"{MODEL}:bf-1"
