"""``Anyscale.finetune``: DSPy's fine-tuning flow, with the result bound to the adapter it trained.

DSPy's ``LM.finetune`` starts ``provider.finetune`` in a thread and sets the job's result to
``lm.copy(model=<returned name>)`` (or to the exception). For an adapter on a served base model a
new name is not enough: the server must also be told to apply the adapter (a body key on
llama-server, ``<base>:<adapter>`` on Ray Serve LLM), and the LM must carry the adapter in its
identity. The providers of :mod:`dspy_anyscale.finetune` know how: ``provider.bind(lm, ref)``.
Loaded on the first ``finetune`` call only.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from . import _constants as C
from .errors import FinetuneError, UnsupportedParameterError

logger = logging.getLogger(C.LOGGER_NAME)


class Finetunable(Protocol):
    """What fine-tuning uses of an ``Anyscale`` (typed here so that this module need not import it)."""

    provider: Any
    model: str
    finetuning_model: str | None
    train_kwargs: dict[str, Any]

    def copy(self, **kwargs: Any) -> Any: ...


def start_finetune(
    lm: Finetunable, train_data: Any, train_data_format: Any, train_kwargs: dict[str, Any] | None
) -> Any:
    """The running job (DSPy's ``TrainingJob`` future); its result is the bound LM or the exception."""
    provider = lm.provider
    if not getattr(provider, "finetunable", False):
        raise UnsupportedParameterError(
            f"{type(provider).__name__} does not fine-tune: give the LM a provider that does, e.g. "
            "Anyscale(..., provider=dspy_anyscale.finetune.LocalLoRAProvider())",
            features=["finetuning"],
        )
    if not isinstance(train_data, list):
        raise FinetuneError(f"train_data must be a list of examples, got {type(train_data).__name__}", stage="data")
    thread = threading.Thread(target=lambda: _run(lm, job), name="dspy-anyscale-finetune", daemon=True)
    job = provider.TrainingJob(
        thread=thread,
        model=lm.finetuning_model or lm.model,
        train_data=train_data,
        train_data_format=train_data_format,
        train_kwargs=train_kwargs or lm.train_kwargs,
    )
    thread.start()
    return job


def _run(lm: Finetunable, job: Any) -> None:
    try:
        model_ref = lm.provider.finetune(
            job=job,
            model=job.model,
            train_data=job.train_data,
            train_data_format=job.train_data_format,
            train_kwargs=job.train_kwargs,
        )
        bind = getattr(lm.provider, "bind", None)
        result = bind(lm, model_ref) if callable(bind) else lm.copy(model=model_ref)
    except Exception as exc:  # DSPy's convention: the job's result is the exception
        logger.error("fine-tuning %s failed: %s", job.model, exc)
        _set_status(job, "failed", exc)
        job.set_result(exc)
        return
    _set_status(job, "succeeded", None)
    job.set_result(result)


def _set_status(job: Any, outcome: str, exc: BaseException | None) -> None:
    """Our jobs keep a status; a cancelled one stays cancelled (set_status ignores an ended job)."""
    set_status = getattr(job, "set_status", None)
    if not callable(set_status):
        return
    from dspy.clients.utils_finetune import TrainingStatus

    if isinstance(exc, FinetuneError) and exc.stage == "cancelled":
        set_status(TrainingStatus.cancelled)
    else:
        set_status(TrainingStatus(outcome))
