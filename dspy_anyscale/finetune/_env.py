"""A cached virtual environment with the ``[finetune]`` packages, for training in a child process.

:class:`~dspy_anyscale.finetune.LocalLoRAProvider` trains in a child interpreter (``python=``,
default: this one). Tests, CI and the example use this one instead: torch, transformers, peft and
gguf pinned (``_constants.FINETUNE_ENV_PACKAGES``), installed once (~80 s, ~1 GB) next to the test
servers, never into the package's own environment, whose dependencies they would pull around.

Layout under :func:`~dspy_anyscale.servers._processes.cache_dir`::

    <cache>/finetune/venv/            the training interpreter: <cache>/finetune/venv/bin/python
    <cache>/finetune/INSTALL.json     what was installed (another pin list means reinstall)
    <cache>/logs/finetune-install.log output of the last install

Python API: ``ensure_env() -> Path`` (the venv's python; installs on first use).
Command line: ``python -m dspy_anyscale.finetune._env install`` (idempotent; what CI runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .._constants import FINETUNE_ENV_CHECK_TIMEOUT_S, FINETUNE_ENV_LOCK_TIMEOUT_S, FINETUNE_ENV_PACKAGES
from ..errors import FinetuneError
from ..servers import _processes
from ..servers._processes import Say, cache_dir

__all__ = ["ensure_env", "main"]

_NAME = "finetune"
# Must not start with another manager's prefix: lock holders delete stale work dirs by prefix.
_WORK_PREFIX = ".finetune-work-"
# What the training script and llama.cpp's converter import: a broken install fails here, not mid-job.
_CHECK_IMPORTS = "import torch, transformers, peft, gguf, safetensors"


def _install_dir() -> Path:
    return cache_dir() / _NAME


def _venv_python(root: Path | None = None) -> Path:
    return (root or _install_dir()) / "venv" / "bin" / "python"


def _install_log() -> Path:
    return cache_dir() / "logs" / f"{_NAME}-install.log"


def _install_record() -> dict[str, object]:
    """Describe the install we want; a different INSTALL.json means reinstall."""
    return {"packages": list(FINETUNE_ENV_PACKAGES)}


def installed() -> bool:
    record = _processes.read_json(_install_dir() / "INSTALL.json")
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in _install_record().items()):
        return False
    # The venv's python is a symlink to the interpreter that made it: gone if that Python was removed.
    return os.access(_venv_python(), os.X_OK)


def ensure_env(*, quiet: bool = False) -> Path:
    """The training environment's python, installed first if missing (~80 s; progress on stderr).

    Idempotent and safe to call concurrently: a lock file serialises installs, and the venv is
    built in a temporary directory inside the cache, then moved into place only when complete.
    """
    if installed():
        return _venv_python()
    say = _processes.sayer(_NAME, quiet)
    cache = cache_dir()
    lock = cache / f".{_NAME}.lock"
    with _processes.install_lock(
        lock, say, work_prefix=_WORK_PREFIX, timeout=FINETUNE_ENV_LOCK_TIMEOUT_S, error=FinetuneError
    ):
        if not installed():
            with _processes.work_dir(cache, _WORK_PREFIX) as work:
                _install(work, say)
    return _venv_python()


def _install(work: Path, say: Say) -> None:
    started = time.monotonic()
    log = _install_log()
    say(f"installing {', '.join(FINETUNE_ENV_PACKAGES)} into their own environment (~80 s, ~1 GB; log: {log})...")
    stage = _processes.stage_venv(work, list(FINETUNE_ENV_PACKAGES), _CHECK_IMPORTS, log, error=FinetuneError)
    _processes.finish_install(stage, _install_record(), _install_dir(), timeout=FINETUNE_ENV_CHECK_TIMEOUT_S)
    say(f"training environment installed: {_install_dir()} ({_processes.fmt_duration(time.monotonic() - started)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dspy_anyscale.finetune._env",
        description="The cached training environment of dspy_anyscale.finetune.LocalLoRAProvider.",
    )
    parser.add_argument("command", choices=["install", "path"], help="install it (idempotent), or print its python")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "path" and not installed():
        print("not installed: run `python -m dspy_anyscale.finetune._env install`", file=sys.stderr)
        return 1
    try:
        python = ensure_env(quiet=args.quiet)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
