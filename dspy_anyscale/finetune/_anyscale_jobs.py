"""``AnyscaleJobsProvider``: LoRA adapters trained by an Anyscale Job, served by Ray Serve LLM (extra ``[anyscale]``).

``lm.finetune(train_data, "chat")`` (or ``dspy.BootstrapFinetune``) with this provider:

1. checks the data (:func:`~._base.check_chat_data`) and writes a working directory: the dataset in
   LLaMA-Factory's OpenAI-messages ("sharegpt") form with its ``dataset_info.json``, a LLaMA-Factory
   ``train.yaml`` (LoRA SFT) and ``copy_adapter.py``;
2. submits it with the Anyscale SDK (``anyscale.job.submit(JobConfig(...))``; the SDK uploads the
   directory): the job runs ``llamafactory-cli train train.yaml``, then copies the adapter to
   ``<dynamic_lora_loading_path>/<adapter>``, where a Ray Serve LLM service with
   ``lora_config.dynamic_lora_loading_path`` loads it on the first request for ``<base>:<adapter>``;
3. follows the job with ``anyscale.job.status`` until it ends (``job.status()`` says where it is);
   a FAILED job's log tail (``anyscale.job.get_logs``) is in the :class:`FinetuneError`;
   ``job.cancel()`` terminates it (``anyscale.job.terminate``);
4. returns ``"<base>:<adapter>"``; :meth:`AnyscaleJobsProvider.bind` makes the LM that asks the service for it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dspy.clients.utils_finetune import TrainingStatus

from .. import _constants as C
from ..errors import ConfigurationError, FinetuneError
from ._base import AdapterProvider, AdapterTrainingJob, check_chat_data, split_model_ref

if TYPE_CHECKING:
    from ..anyscale import Anyscale

__all__ = ["AnyscaleJobsProvider", "build_working_dir", "llamafactory_yaml"]

logger = logging.getLogger(C.LOGGER_NAME)

DATASET = "dspy_train"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_INSTALL = "pip install 'dspy-anyscale[anyscale]'"
# The job's script that puts the trained adapter where the service loads adapters from. pyarrow
# (in every Ray image) writes to s3://, gs://, abfss:// and local paths alike.
_COPY_SCRIPT = '''"""Copy the trained LoRA adapter to the service's dynamic_lora_loading_path (by dspy-anyscale)."""

import sys

from pyarrow import fs

source, destination = sys.argv[1], sys.argv[2]
target, path = fs.FileSystem.from_uri(destination)
fs.copy_files(source, path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=target)
print(f"adapter copied to {destination}")
'''


def _sdk() -> Any:
    try:
        import anyscale
        from anyscale.job.models import JobConfig
    except ImportError:
        raise ConfigurationError(f"AnyscaleJobsProvider needs the Anyscale SDK: {_INSTALL}") from None
    return anyscale, JobConfig


@dataclass(frozen=True)
class _Plan:
    """One job: the adapter's name, where it goes, and what trains it."""

    name: str
    destination: str
    train_args: dict[str, Any]


class AnyscaleJobsProvider(AdapterProvider):
    """Fine-tunes LoRA adapters as Anyscale Jobs (LLaMA-Factory) for a Ray Serve LLM service.

    Args:
        service: the Anyscale Service (Ray Serve LLM) that serves the adapters; the fine-tuned LM
            is ``Anyscale.from_service``-resolved to it. None: the fine-tuned LM keeps the LM's own
            ``api_base`` (a service reached by URL).
        dynamic_lora_loading_path: the service's ``lora_config.dynamic_lora_loading_path``
            (``s3://bucket/lora/``): each adapter is copied to ``<path>/<adapter>``.
        model_source: what the job trains on (a Hugging Face id or a path the cluster reads); default:
            the LM's model, which is right when the service's ``model_id`` is the Hugging Face id.
        template: LLaMA-Factory's chat template for the base model (``llama3``, ``qwen``, ...); default:
            guessed from the model's name, else an error asks for it.
        image_uri, compute_config, cloud, project, requirements, max_retries, **job_options: the
            SDK's ``JobConfig`` fields (checked by the SDK when the provider is made). The image must
            have GPUs' CUDA stack; ``requirements`` installs LLaMA-Factory on top of it. ``cloud`` and
            ``project`` also find the service.
        lora: LLaMA-Factory train arguments overriding ``ANYSCALE_LORA_DEFAULTS`` for every job
            (``train_kwargs`` of one call override them again).
        workdir: where the working directories are written before upload (default: a temporary one).
        poll_s, wait_timeout_s: how often the job is polled, and for how long at most.
    """

    def __init__(
        self,
        service: str | None,
        dynamic_lora_loading_path: str,
        *,
        model_source: str | None = None,
        template: str | None = None,
        image_uri: str | None = None,
        compute_config: Any = None,
        cloud: str | None = None,
        project: str | None = None,
        requirements: Sequence[str] | str | None = C.ANYSCALE_JOB_REQUIREMENTS,
        max_retries: int = 0,
        lora: Mapping[str, Any] | None = None,
        workdir: str | Path | None = None,
        poll_s: float = C.ANYSCALE_JOB_POLL_S,
        wait_timeout_s: float = C.ANYSCALE_JOB_TIMEOUT_S,
        **job_options: Any,
    ) -> None:
        super().__init__()
        if service is not None and (not isinstance(service, str) or not service):
            raise ConfigurationError(f"service must be an Anyscale Service's name or None, got {service!r}")
        if not isinstance(dynamic_lora_loading_path, str) or not dynamic_lora_loading_path.strip("/"):
            raise ConfigurationError(
                "dynamic_lora_loading_path must be the service's lora_config.dynamic_lora_loading_path "
                f"(e.g. 's3://bucket/lora/'), got {dynamic_lora_loading_path!r}"
            )
        self.service = service
        self.loading_path = dynamic_lora_loading_path.rstrip("/")
        self.model_source = model_source
        self.template = template
        self.lora = _train_args(lora, "lora", job=False)
        self.cloud, self.project = cloud, project
        self.poll_s = poll_s
        self.wait_timeout_s = wait_timeout_s
        self.workdir = Path(workdir) if workdir is not None else None
        self.job_options: dict[str, Any] = {
            key: value
            for key, value in {
                "image_uri": image_uri,
                "compute_config": compute_config,
                "cloud": cloud,
                "project": project,
                "requirements": list(requirements)
                if isinstance(requirements, Sequence) and not isinstance(requirements, str)
                else requirements,
                "max_retries": max_retries,
                **job_options,
            }.items()
            if value is not None
        }
        self._job_config("check", "true", ".")  # the SDK's own checks, now rather than at the first job

    # --- DSPy's Provider -------------------------------------------------------------------------

    def finetune(
        self,
        job: AdapterTrainingJob,
        model: str,
        train_data: list[dict[str, Any]],
        train_data_format: Any,
        train_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Submit one LoRA job, follow it to the end, return ``"<model>:<adapter>"``."""
        job.set_status(TrainingStatus.pending, "data")
        examples = check_chat_data(train_data, train_data_format)
        plan = self._plan(model, train_kwargs)
        folder = self._folder(plan.name)
        build_working_dir(folder, examples, plan.train_args, plan.destination)
        job.check_cancelled()
        job.set_status(TrainingStatus.pending, "submit")
        job_id = self._submit(plan, folder)
        job.on_cancel(lambda: self._terminate(job_id))
        self._follow(job, job_id)
        return f"{model}:{plan.name}"

    def bind(self, lm: Anyscale, model_ref: str) -> Anyscale:
        """The LM that asks the service for ``"<base>:<adapter>"`` (Ray Serve LLM's multi-LoRA naming).

        With a ``service``, its current ``query_url`` and token come from the SDK (see
        ``Anyscale.from_service``); otherwise the LM's own endpoint is kept.
        """
        _, adapter = split_model_ref(model_ref)
        if self.service is None:
            return lm.copy(model=model_ref, adapter=adapter)
        from .._services import resolve_service

        target = resolve_service(self.service, cloud=self.cloud, project=self.project)
        key = cast(Any, target.api_key)  # a rotating Secret: the constructor keeps it as it is
        return lm.copy(model=model_ref, adapter=adapter, api_base=target.api_base, api_key=key)

    # --- one job -----------------------------------------------------------------------------------

    def _plan(self, model: str, train_kwargs: Mapping[str, Any] | None) -> _Plan:
        given = dict(train_kwargs or {})
        name = given.pop("name", None) or f"dspy-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise FinetuneError(
                "train_kwargs['name'] (the adapter's name) must be 1-64 letters, digits, '.', '_' or '-', "
                f"got {name!r}",
                stage="data",
            )
        source = self.model_source or model
        args = {
            **C.ANYSCALE_LORA_DEFAULTS,
            **self.lora,
            **_train_args(given, "train_kwargs"),
            "model_name_or_path": source,
            "template": self.template or _template_for(source),
        }
        return _Plan(name, f"{self.loading_path}/{name}", args)

    def _folder(self, name: str) -> Path:
        import tempfile

        base = self.workdir if self.workdir is not None else Path(tempfile.mkdtemp(prefix="dspy-anyscale-job-"))
        folder = base / name
        if folder.exists():
            raise FinetuneError(
                f"{folder} exists already: choose another adapter name (train_kwargs['name'])", stage="data"
            )
        folder.mkdir(parents=True)
        return folder

    def _job_config(self, name: str, entrypoint: str, working_dir: str) -> Any:
        _, job_config = _sdk()
        try:
            return job_config(name=name, entrypoint=entrypoint, working_dir=working_dir, **self.job_options)
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"the Anyscale SDK refused the job options: {error}") from None

    def _submit(self, plan: _Plan, folder: Path) -> str:
        anyscale, _ = _sdk()
        entrypoint = f"llamafactory-cli train train.yaml && python copy_adapter.py output {plan.destination}"
        config = self._job_config(f"dspy-lora-{plan.name}", entrypoint, str(folder))
        try:
            return str(anyscale.job.submit(config))
        except Exception as error:  # the SDK's API and auth errors, in its words
            raise FinetuneError(
                f"the Anyscale SDK could not submit the job: {error} "
                "(check `anyscale login` / ANYSCALE_CLI_TOKEN, the cloud, the compute config and the image)",
                stage="submit",
            ) from error

    def _follow(self, job: AdapterTrainingJob, job_id: str) -> None:
        """Poll until the job ends; ``cancel()`` wakes the wait at once."""
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            job.check_cancelled()
            state = self._state(job_id)
            if state == "SUCCEEDED":
                return
            if state == "FAILED":
                raise FinetuneError(f"the Anyscale job {job_id} FAILED. {self._log_tail(job_id)}", stage="job")
            if state == "TERMINATED":
                job.check_cancelled()
                raise FinetuneError(
                    f"the Anyscale job {job_id} was terminated outside this program: nothing was trained", stage="job"
                )
            job.set_status(TrainingStatus.running if state == "RUNNING" else TrainingStatus.pending, "job")
            if time.monotonic() >= deadline:
                raise FinetuneError(
                    f"the Anyscale job {job_id} is still {state} after {self.wait_timeout_s:g} s; it keeps running "
                    f"(`anyscale job terminate --id {job_id}` stops it; raise wait_timeout_s to wait longer)",
                    stage="job",
                )
            job.cancelled_event.wait(self.poll_s)

    def _state(self, job_id: str) -> str:
        anyscale, _ = _sdk()
        try:
            status = anyscale.job.status(id=job_id)
        except Exception as error:
            raise FinetuneError(f"could not read the Anyscale job {job_id}'s status: {error}", stage="job") from error
        return str(getattr(status.state, "value", status.state))

    def _log_tail(self, job_id: str) -> str:
        anyscale, _ = _sdk()
        try:
            logs = anyscale.job.get_logs(id=job_id, max_lines=C.ANYSCALE_JOB_LOG_TAIL_LINES)
        except Exception as error:  # the failure is the job's: its logs are a bonus
            return f"Its logs could not be read ({error}): `anyscale job logs --id {job_id}`."
        tail = "\n".join(str(logs).rstrip().splitlines()[-C.ANYSCALE_JOB_LOG_TAIL_LINES :])
        return f"The end of its log (`anyscale job logs --id {job_id}` for all of it):\n{tail}"

    def _terminate(self, job_id: str) -> None:
        anyscale, _ = _sdk()
        try:
            anyscale.job.terminate(id=job_id)
        except Exception as error:  # cancel() must not fail: say what to do instead
            logger.warning(
                "could not terminate the Anyscale job %s (%s): `anyscale job terminate --id %s`", job_id, error, job_id
            )


# --- the working directory (pure: no SDK) --------------------------------------------------------


def _train_args(given: Mapping[str, Any] | None, what: str, *, job: bool = True) -> dict[str, Any]:
    """LLaMA-Factory train arguments: names to scalars (the train YAML is flat). A job's are refused
    as its FinetuneError (stage "data"), the provider's own ``lora=`` as a ConfigurationError."""
    args = dict(given or {})
    for key, value in args.items():
        if not isinstance(key, str) or not isinstance(value, str | int | float | bool):
            message = (
                f"{what}[{key!r}] must be a LLaMA-Factory train argument with a string, number or bool "
                f"value, got {value!r}"
            )
            raise FinetuneError(message, stage="data") if job else ConfigurationError(message)
    return args


def _template_for(model: str) -> str:
    lowered = model.lower()
    for word, template in C.ANYSCALE_LORA_TEMPLATES:
        if word in lowered:
            return template
    raise FinetuneError(
        f"no LLaMA-Factory chat template is known for {model!r}: pass "
        "AnyscaleJobsProvider(..., template='llama3' | 'qwen' | 'mistral' | ...) (LLaMA-Factory's names)",
        stage="data",
    )


def llamafactory_yaml(train_args: Mapping[str, Any]) -> str:
    """The LoRA SFT ``train.yaml``: LLaMA-Factory's fixed keys, then the train arguments, one per line.

    Values are YAML scalars: strings double-quoted in JSON's spelling (valid YAML), so a model path
    or template can never be read as another type.
    """
    fixed = {
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": DATASET,
        "dataset_dir": "data",
        "output_dir": "output",
        "overwrite_output_dir": True,
        "report_to": "none",
    }
    lines = ["# LoRA SFT for LLaMA-Factory (llamafactory-cli train train.yaml), written by dspy-anyscale"]
    for key, value in {**fixed, **train_args}.items():
        lines.append(f"{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def dataset_info() -> dict[str, Any]:
    """LLaMA-Factory's ``dataset_info.json`` entry for OpenAI-style messages (its "sharegpt" formatting)."""
    return {
        DATASET: {
            "file_name": f"{DATASET}.json",
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


def build_working_dir(
    folder: Path, examples: list[dict[str, Any]], train_args: Mapping[str, Any], destination: str
) -> None:
    """Write what the job needs into ``folder`` (uploaded by the SDK as the job's working_dir)."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / f"{DATASET}.json").write_text(json.dumps(examples, ensure_ascii=False, indent=1) + "\n")
    (data / "dataset_info.json").write_text(json.dumps(dataset_info(), indent=2) + "\n")
    (folder / "train.yaml").write_text(llamafactory_yaml(train_args))
    (folder / "copy_adapter.py").write_text(_COPY_SCRIPT)
    (folder / "DESTINATION").write_text(destination + "\n")  # for a person reading the uploaded directory
