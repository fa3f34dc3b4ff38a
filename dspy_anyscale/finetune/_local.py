"""``LocalLoRAProvider``: LoRA adapters trained on this machine and served by a local llama-server.

A job runs in stages, each checked before the next starts (``job.stage``):

    data     DSPy's training data checked (``check_chat_data``) and written as JSON lines
    train    ``_train_lora.py`` in a child process of the training interpreter (``python=``): PEFT LoRA
             on the base GGUF, loss on the assistant's tokens; its output in ``<job>/train.log``
    convert  llama.cpp's ``convert_lora_to_gguf.py`` -> ``<workdir>/adapters/<name>.gguf``
    serve    the provider's own llama-server restarted with every adapter it holds (adapter k has id k,
             in the order trained: a new one never moves the old ones), checked on ``GET /lora-adapters``

Nothing is registered until all stages passed: a failure or a cancel leaves the adapters and the
server as they were. Jobs run one at a time (training takes the machine's cores).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspy.clients.utils_finetune import TrainingStatus

from .._constants import (
    FINETUNE_DEFAULTS,
    FINETUNE_LOG_TAIL_LINES,
    FINETUNE_SERVER_READY_S,
    FINETUNE_STOP_WAIT_S,
)
from ..errors import ConfigurationError, FinetuneError
from ..servers import _processes, llama_server
from ._base import AdapterProvider, AdapterTrainingJob, check_chat_data, split_model_ref

if TYPE_CHECKING:
    from ..anyscale import Anyscale

__all__ = ["LocalLoRAProvider"]

_TRAIN_SCRIPT = Path(__file__).with_name("_train_lora.py")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The training and conversion children must never reach a model hub: everything they need is local.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_KEY_SHAPES: dict[str, tuple[type, ...]] = {
    "steps": (int,),
    "rank": (int,),
    "alpha": (int, float),
    "dropout": (int, float),
    "learning_rate": (int, float),
    "seed": (int,),
    "max_length": (int,),
    "batch_size": (int,),
    "target_modules": (list, tuple),
    "threads": (int,),
}

StartServer = Callable[..., Any]  # llama_server.start's signature: (port=, api_key=, lora=, ready_timeout=)


@dataclass(frozen=True)
class _Adapter:
    name: str
    path: Path


class LocalLoRAProvider(AdapterProvider):
    """Fine-tune LoRA adapters locally (PEFT) and serve them from a llama-server of its own.

    Args:
        python: the interpreter that trains and converts (it needs the ``[finetune]`` extra: torch,
            transformers, peft, gguf, safetensors). Default: this one. ``dspy_anyscale.finetune._env.
            ensure_env()`` gives a cached venv with pinned versions, as the tests and the example use.
        workdir: where jobs (data, logs, PEFT output) and ``adapters/<name>.gguf`` go (default: a new
            temporary directory, kept: the logs are what explain a failure).
        base_gguf: the base model, a GGUF transformers can load (default: the stand-in's SmolLM2-135M,
            the model the local llama-server serves).
        port: the provider's server port (default: a free one, chosen once and kept across restarts,
            so every LM it bound stays valid).
        api_key: the key the provider's server requires (default: none).

    ``lm.kill()`` (which ``BootstrapFinetune`` calls before fine-tuning) does nothing: the user's LM and
    its server are not the provider's, and the provider's own server keeps serving the adapters
    already trained. ``close()`` (or ``with``) stops the provider's server; an interpreter exit does too.
    """

    def __init__(
        self,
        *,
        python: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        base_gguf: str | os.PathLike[str] | None = None,
        port: int | None = None,
        api_key: str | None = None,
        start_server: StartServer | None = None,
    ) -> None:
        super().__init__()
        self.python = str(python) if python is not None else sys.executable
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dspy-anyscale-lora-"))
        self._base_gguf = Path(base_gguf) if base_gguf is not None else None
        self._port = port
        self._api_key = api_key
        self._start_server: StartServer = start_server or llama_server.start
        self._adapters: list[_Adapter] = []
        self._server: Any = None
        self._lock = threading.RLock()  # adapters + server
        self._jobs = threading.Lock()  # one training at a time
        atexit.register(_stop_at_exit, weakref.ref(self))

    # --- what DSPy calls ------------------------------------------------------------------------

    def finetune(
        self,
        job: AdapterTrainingJob,
        model: str,
        train_data: list[dict[str, Any]],
        train_data_format: Any,
        train_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Train, convert and serve one adapter; return ``"<model>:<adapter name>"``."""
        job.set_status(TrainingStatus.pending, "data")
        options = _options(train_kwargs)
        examples = check_chat_data(train_data, train_data_format)
        with self._jobs:
            job.check_cancelled()
            name = self._new_name(options.pop("name", None), examples)
            folder = self.workdir / "jobs" / name
            folder.mkdir(parents=True, exist_ok=True)
            job.set_status(TrainingStatus.running, "train")
            output = self._train(job, folder, examples, options)
            job.check_cancelled()
            job.set_status(TrainingStatus.running, "convert")
            adapter = self._convert(job, folder, output, name)
            job.check_cancelled()
            job.set_status(TrainingStatus.running, "serve")
            self._serve(job, _Adapter(name, adapter))
        return f"{model}:{name}"

    def bind(self, lm: Anyscale, model_ref: str) -> Anyscale:
        """``lm`` answering through the adapter ``model_ref``: the provider's server, ``lora=[{id: k, scale: 1}]``.

        The list is always explicit: llama-server resets a slot's prompt cache only for a request
        that carries ``lora``, so an LM that sent none could be answered from the other model's cache.
        """
        _, name = split_model_ref(model_ref)
        with self._lock:
            ids = [a.name for a in self._adapters]
            if name not in ids:
                raise ConfigurationError(f"this provider holds no adapter {name!r} (it holds: {ids or 'none'})")
            server = self._ensure_server()
            return lm.copy(
                api_base=server.base_url,
                api_key=self._api_key or "",
                adapter=name,
                lora=[{"id": ids.index(name), "scale": 1.0}],
            )

    def base_lm(self, lm: Anyscale) -> Anyscale:
        """``lm`` answering with the base model on the provider's server (every adapter at scale 0).

        For comparisons and canaries on the same server. ``lora`` is non-empty on purpose: an empty
        list means "the server's default scales" and does not reset the prompt cache.
        """
        with self._lock:
            if not self._adapters:
                raise ConfigurationError("no adapter trained yet: the base model is your LM as it is")
            server = self._ensure_server()
            return lm.copy(
                api_base=server.base_url, api_key=self._api_key or "", adapter=None, lora=[{"id": 0, "scale": 0.0}]
            )

    @property
    def adapters(self) -> list[str]:
        """The adapters served, in id order (adapter k has id k)."""
        with self._lock:
            return [a.name for a in self._adapters]

    @property
    def base_url(self) -> str | None:
        """The provider's server (``http://127.0.0.1:<port>/v1``), or None while it serves nothing."""
        with self._lock:
            return None if self._server is None else str(self._server.base_url)

    def close(self) -> None:
        """Stop the provider's server (the adapters stay on disk; a later ``bind`` starts it again)."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop(FINETUNE_STOP_WAIT_S)

    def __enter__(self) -> LocalLoRAProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- stages ------------------------------------------------------------------------------------

    def _new_name(self, requested: Any, examples: list[dict[str, Any]]) -> str:
        with self._lock:
            taken = {a.name for a in self._adapters}
            if requested is None:
                digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:8]
                requested = f"lora-{len(self._adapters) + 1}-{digest}"
            if not isinstance(requested, str) or not _NAME.match(requested):
                raise FinetuneError(
                    f"train_kwargs['name'] must be 1-64 letters, digits, '.', '_' or '-', got {requested!r}",
                    stage="data",
                )
            if requested in taken:
                raise FinetuneError(f"an adapter named {requested!r} exists already: choose another name", stage="data")
            return str(requested)

    def _base(self) -> Path:
        return self._base_gguf if self._base_gguf is not None else llama_server.ensure_model()

    def _train(
        self, job: AdapterTrainingJob, folder: Path, examples: list[dict[str, Any]], options: dict[str, Any]
    ) -> Path:
        data = folder / "data.jsonl"
        data.write_text("".join(json.dumps(example) + "\n" for example in examples))
        output = folder / "output"
        spec = {**options, "base_gguf": str(self._base()), "data": str(data), "output": str(output)}
        spec["base_cache"] = str(_processes.cache_dir() / "finetune" / "bases")
        spec["target_modules"] = list(spec["target_modules"])
        (folder / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        log = folder / "train.log"
        _run_child(job, [self.python, str(_TRAIN_SCRIPT), str(folder / "spec.json")], log, stage="train")
        for needed in (output / "adapter" / "adapter_model.safetensors", output / "base" / "config.json"):
            if not needed.is_file():
                raise FinetuneError(f"training ended without writing {needed}; see {log}", stage="train")
        return output

    def _convert(self, job: AdapterTrainingJob, folder: Path, output: Path, name: str) -> Path:
        converter = llama_server.ensure_converter()
        target = self.workdir / "adapters" / f"{name}.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = folder / f"{name}.gguf"
        command = [
            self.python,
            str(converter),
            "--base",
            str(output / "base"),
            "--outfile",
            str(staged),
            str(output / "adapter"),
        ]
        log = folder / "convert.log"
        _run_child(job, command, log, stage="convert")
        if not _is_gguf(staged):
            raise FinetuneError(f"the converter wrote no GGUF adapter at {staged}; see {log}", stage="convert")
        os.replace(staged, target)
        return target

    def _serve(self, job: AdapterTrainingJob, adapter: _Adapter) -> None:
        """Restart the server with the adapters plus ``adapter``; on any failure, the old server is back."""
        with self._lock:
            previous = list(self._adapters)
            wanted = [*previous, adapter]
            self._stop_server()
            try:
                self._server = self._launch(wanted)
                self._check_listed(wanted)
                job.check_cancelled()
            except Exception as exc:
                self._stop_server()
                self._server = self._launch(previous) if previous else None
                if isinstance(exc, FinetuneError) and exc.stage == "cancelled":
                    raise
                log = getattr(exc, "log_path", None) or self._log_hint()
                raise FinetuneError(
                    f"llama-server did not take the adapter {adapter.name!r} ({adapter.path}): {exc}"
                    f"{f'; server log: {log}' if log else ''}. The adapter was dropped; the server serves "
                    f"what it served before ({len(previous)} adapter(s)).",
                    stage="serve",
                ) from exc
            self._adapters = wanted

    # --- the server --------------------------------------------------------------------------------

    def _launch(self, adapters: Sequence[_Adapter]) -> Any:
        server = self._start_server(
            port=self._port,
            api_key=self._api_key,
            lora=[a.path for a in adapters],
            ready_timeout=FINETUNE_SERVER_READY_S,
        )
        self._port = server.port  # kept: LMs bound earlier keep their api_base
        return server

    def _ensure_server(self) -> Any:
        if self._server is None:
            self._server = self._launch(self._adapters)
        return self._server

    def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(FINETUNE_STOP_WAIT_S)

    def _check_listed(self, adapters: Sequence[_Adapter]) -> None:
        """``GET /lora-adapters`` must list exactly ``adapters``, adapter k with id k."""
        listed = _get_json(f"http://{_processes.HOST}:{self._server.port}/lora-adapters", self._api_key)
        if not isinstance(listed, list):
            raise FinetuneError(f"GET /lora-adapters answered {listed!r}", stage="serve")
        got = [(item.get("id"), Path(str(item.get("path"))).name) for item in listed if isinstance(item, Mapping)]
        want = [(k, a.path.name) for k, a in enumerate(adapters)]
        if got != want:
            raise FinetuneError(f"GET /lora-adapters lists {got}, expected {want}", stage="serve")

    def _log_hint(self) -> str:
        return str(llama_server._log_path(self._port)) if self._port is not None else ""


# --- helpers ---------------------------------------------------------------------------------------


def _options(train_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``FINETUNE_DEFAULTS`` overridden by ``train_kwargs``; unknown keys and wrong types refused."""
    given = dict(train_kwargs or {})
    unknown = sorted(set(given) - set(FINETUNE_DEFAULTS) - {"name"})
    if unknown:
        raise FinetuneError(
            f"unknown train_kwargs {unknown}: LocalLoRAProvider takes {sorted([*FINETUNE_DEFAULTS, 'name'])}",
            stage="data",
        )
    for key, value in given.items():
        shapes = _KEY_SHAPES.get(key)
        if shapes is not None and (isinstance(value, bool) or not isinstance(value, shapes)):
            raise FinetuneError(
                f"train_kwargs[{key!r}] must be {' or '.join(s.__name__ for s in shapes)}, got {value!r}", stage="data"
            )
    return {**FINETUNE_DEFAULTS, **given}


def _run_child(job: AdapterTrainingJob, command: list[str], log: Path, *, stage: str) -> None:
    """Run one stage's child (its own process group, output in ``log``); cancel() kills the group."""
    env = {**os.environ, **_OFFLINE_ENV}
    with log.open("wb") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        except OSError as exc:
            raise FinetuneError(f"cannot run the {stage} interpreter {command[0]!r}: {exc}", stage=stage) from exc
    job.on_cancel(lambda: _kill_group(proc))
    code = proc.wait()
    job.check_cancelled()
    if code != 0:
        last = _processes.tail(log, FINETUNE_LOG_TAIL_LINES)
        raise FinetuneError(f"{stage} failed (exit {code}); log: {log}\n--- last lines ---\n{last}", stage=stage)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (torch's worker threads and any helper it started)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _get_json(url: str, api_key: str | None) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never through a proxy
    with opener.open(request, timeout=FINETUNE_SERVER_READY_S) as response:
        return json.loads(response.read())


def _stop_at_exit(ref: weakref.ReferenceType[LocalLoRAProvider]) -> None:
    provider = ref()
    if provider is not None:
        provider.close()
