"""What every provider of :mod:`dspy_anyscale.finetune` shares: the job, the data check, the binding.

DSPy's contract (``dspy.clients.provider``): ``lm.finetune(train_data, train_data_format,
train_kwargs)`` makes ``provider.TrainingJob(...)``, runs ``provider.finetune(job=..., model=...,
...)`` in a thread, and the job's result is the fine-tuned LM (or the exception). The providers
here return a *model reference* (``"<base>:<adapter>"``) from ``finetune`` and know how to turn it
into an ``Anyscale`` bound to the adapter (:meth:`AdapterProvider.bind`); ``Anyscale.finetune``
asks them to, so the result answers through the new adapter and not merely under a new name.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat, TrainingStatus

from ..errors import ConfigurationError, FinetuneError

if TYPE_CHECKING:
    from ..anyscale import Anyscale

__all__ = ["AdapterProvider", "AdapterTrainingJob", "check_chat_data", "split_model_ref"]

_ROLES = frozenset({"system", "user", "assistant"})
_TERMINAL = frozenset({TrainingStatus.succeeded, TrainingStatus.failed, TrainingStatus.cancelled})


class AdapterTrainingJob(TrainingJob):  # type: ignore[misc]  # DSPy's class is untyped (Any)
    """A fine-tuning job: a ``concurrent.futures.Future`` with ``status()`` and ``cancel()``.

    ``status()`` is DSPy's ``TrainingStatus`` (``not_started``, ``pending``, ``running``,
    ``succeeded``, ``failed``, ``cancelled``); ``stage`` says more (``"train"``, ``"convert"``, ...).
    ``cancel()`` stops the work wherever it is (a training process is killed, a remote job is
    terminated) and the job ends ``cancelled`` with a :class:`~dspy_anyscale.errors.FinetuneError`
    as its result; it returns False once the job has ended.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._status = TrainingStatus.not_started
        self.stage: str | None = None
        self.cancelled_event = threading.Event()
        self._on_cancel: list[Any] = []

    def status(self) -> TrainingStatus:
        with self._lock:
            return self._status

    def set_status(self, status: TrainingStatus, stage: str | None = None) -> None:
        """Move the job on (providers call this); a cancelled or ended job stays as it ended."""
        with self._lock:
            if self._status in _TERMINAL:
                return
            self._status = status
            if stage is not None:
                self.stage = stage

    def on_cancel(self, stop: Any) -> None:
        """Register a callable that stops the current work (kill a process, terminate a remote job)."""
        with self._lock:
            if self._status == TrainingStatus.cancelled:
                run_now = True
            else:
                self._on_cancel.append(stop)
                run_now = False
        if run_now:
            stop()

    def check_cancelled(self) -> None:
        """Raise between stages once the job was cancelled, so nothing half-done is registered."""
        if self.cancelled_event.is_set():
            raise FinetuneError("the fine-tuning job was cancelled", stage="cancelled")

    def cancel(self) -> bool:
        with self._lock:
            if self._status in _TERMINAL:
                return False
            self._status = TrainingStatus.cancelled
            stops, self._on_cancel = self._on_cancel, []
        self.cancelled_event.set()
        for stop in stops:
            stop()
        # The Future is RUNNING (DSPy's thread runs the job), so Future.cancel() would refuse: the
        # thread ends the future with a FinetuneError instead, as DSPy's jobs end with an exception.
        return True


class AdapterProvider(Provider):  # type: ignore[misc]  # DSPy's class is untyped (Any)
    """A DSPy ``Provider`` whose fine-tuned models are LoRA adapters on a served base model."""

    def __init__(self) -> None:
        super().__init__()
        self.finetunable = True
        self.TrainingJob = AdapterTrainingJob

    @staticmethod
    def launch(lm: Any, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Nothing to launch: a served base model runs on its own (a provider's own server starts when it
        has an adapter to serve)."""

    @staticmethod
    def kill(lm: Any, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Nothing is stopped: ``BootstrapFinetune`` calls this before training, and the LM being tuned,
        its server and the adapters already served keep answering."""

    def bind(self, lm: Anyscale, model_ref: str) -> Anyscale:
        """The LM that answers through the adapter ``model_ref`` (what :meth:`finetune` returned)."""
        raise NotImplementedError


def split_model_ref(model_ref: str) -> tuple[str, str]:
    """``"<base>:<adapter>"`` -> (base, adapter); the adapter is after the last colon."""
    base, sep, adapter = model_ref.rpartition(":")
    if not sep or not base or not adapter:
        raise ConfigurationError(f"expected a model reference '<base>:<adapter>', got {model_ref!r}")
    return base, adapter


def check_chat_data(train_data: Iterable[Mapping[str, Any]], data_format: Any) -> list[dict[str, Any]]:
    """DSPy's training data as chat conversations, checked before any work starts.

    ``chat``: ``{"messages": [{"role", "content"}, ...]}`` ending with the assistant's answer (what
    ``BootstrapFinetune`` writes). ``completion``: ``{"prompt", "completion"}``, taken as one user
    turn and its answer. Anything else is refused with the example's index.
    """
    fmt = _data_format(data_format)
    examples: list[dict[str, Any]] = []
    for index, item in enumerate(train_data):
        messages = _as_messages(item, fmt, index)
        examples.append({"messages": messages})
    if not examples:
        raise FinetuneError("no training data: the job needs at least one example", stage="data")
    return examples


def _data_format(data_format: Any) -> TrainDataFormat:
    try:
        fmt = TrainDataFormat(data_format if data_format is not None else TrainDataFormat.CHAT)
    except ValueError:
        raise ConfigurationError(f"train_data_format must be 'chat' or 'completion', got {data_format!r}") from None
    if fmt == TrainDataFormat.GRPO_CHAT:
        raise ConfigurationError("train_data_format 'grpo_chat' is reinforcement learning: LoRA SFT takes 'chat'")
    return fmt


def _as_messages(item: Mapping[str, Any], fmt: TrainDataFormat, index: int) -> list[dict[str, str]]:
    if fmt == TrainDataFormat.COMPLETION:
        prompt, completion = item.get("prompt"), item.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise FinetuneError(
                f"example {index}: a completion example needs 'prompt' and 'completion' strings", stage="data"
            )
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    messages = item.get("messages") if isinstance(item, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise FinetuneError(f"example {index}: a chat example needs a non-empty 'messages' list", stage="data")
    checked = []
    for turn in messages:
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, Mapping) else (None, None)
        if role not in _ROLES or not isinstance(content, str):
            raise FinetuneError(
                f"example {index}: each message needs a role (system/user/assistant) and string content, got {turn!r}",
                stage="data",
            )
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "assistant":
        raise FinetuneError(f"example {index}: the last message must be the assistant's answer", stage="data")
    return checked
