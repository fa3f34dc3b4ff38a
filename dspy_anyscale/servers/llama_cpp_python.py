"""Manage llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) for tests.

A second real server next to :mod:`.llama_server`: the same llama.cpp engine behind a different
HTTP layer (FastAPI + pydantic), with its own dialect: JSON mode is Anyscale's
``{"type": "json_object", "schema": ...}``, streams carry no usage, and every request-validation
error is an HTTP 500.  It serves the same SmolLM2-135M-Instruct GGUF, the same file in
``<cache>/models`` (downloaded by :func:`.llama_server.ensure_model`).

llama-cpp-python (pinned below) comes from its PyPI sdist, which vendors llama.cpp's source
under ``vendor/llama.cpp``.  It is installed once into a virtual environment of its own, in two
steps that together do what ``CMAKE_ARGS=... pip install llama-cpp-python[server]`` does, at
about half the compile work:

1. ``pip install <sdist>[server]`` with ``CMAKE_ARGS=-DLLAMA_BUILD=OFF``: the Python package and
   the server's dependencies (FastAPI, uvicorn, ...), no C++;
2. CMake builds only the shared libraries the bindings load with ctypes (``libllama.so``,
   ``libggml*.so``) from the sdist's vendored tree, with llama-server's ISA flags
   (``-DGGML_NATIVE=OFF`` and AVX/AVX2/FMA/F16C/BMI2 as the CPU has them), and without what
   pip's build adds that the server never loads: ``llama-common`` (whose ``install`` rule the
   package's CMakeLists forces on) and the multimodal ``mtmd`` library; they go into the
   package's ``llama_cpp/lib``, where ``llama_cpp`` looks for them.

Layout under :func:`cache_dir`::

    <cache>/llama-cpp-python/venv/                 Python environment running the server
    <cache>/llama-cpp-python/INSTALL.json          what was built, and how
    <cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf shared with llama-server
    <cache>/logs/llama-cpp-python-<port>.log       output of each started server (pruned after 7 days)
    <cache>/logs/llama-cpp-python-build.log        output of the last install
    <cache>/llama-cpp-python-server.json           state of the server started by the CLI

Python API::

    server = start(api_key="k")      # installs on first use (minutes); later ~3 s
    server.base_url                  # "http://127.0.0.1:<port>/v1"
    server.stop()

Command line (``python -m dspy_anyscale.servers.llama_cpp_python`` or
``scripts/llama-cpp-python-server``)::

    llama-cpp-python-server install              # download + build (idempotent)
    eval "$(llama-cpp-python-server start)"      # exports ANYSCALE_API_BASE / ANYSCALE_API_KEY
    llama-cpp-python-server status
    llama-cpp-python-server stop

Besides the standard library this module imports only :mod:`._processes`,
:mod:`.llama_server` (for the model and the ISA flags) and the package's error root; it does nothing on import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .._constants import STAND_IN_THREADS
from ..errors import AnyscaleError
from . import _processes, llama_server
from ._cli import ServerCli
from ._processes import Say, cache_dir

__all__ = [
    "DEFAULT_ALIAS",
    "PACKAGE",
    "VERSION",
    "LlamaCppPythonError",
    "LlamaCppPythonServer",
    "cache_dir",
    "ensure_installed",
    "load_state",
    "main",
    "start",
    "stop",
]

HOST = _processes.HOST
DEFAULT_ALIAS = llama_server.DEFAULT_ALIAS
PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
EXTRAS = "server"

LOG_MAX_AGE = 7 * 24 * 3600.0  # seconds; server logs older than this are deleted
LOCK_TIMEOUT = 1800.0
# Install work dirs in the cache; must not start with another manager's prefix (".work-", ".portkey-work-"),
# whose lock holders delete their stale work dirs by prefix.
_WORK_PREFIX = ".llama-cpp-python-work-"
_NAME = "llama-cpp-python"

# Step 1: pip builds the package without compiling llama.cpp (its CMakeLists then does nothing).
PIP_CMAKE_ARGS = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
# Step 2: the shared libraries, configured as llama-cpp-python's own CMakeLists configures them
# (shared, no curl), minus llama-common, plus llama-server's ISA flags.  The libraries find each
# other through $ORIGIN, as in the wheel pip would build.
LIB_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",  # as for llama-server: the native build enables AMX kernels that crash on some CPUs
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
)
# What llama_cpp loads from llama_cpp/lib (llama_cpp.py, _ggml.py); ggml-cpu is linked by ggml.
LIBRARIES = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so")
MAX_BUILD_JOBS = 8  # compile units of llama.cpp take up to ~1 GB of memory each

# The server reads any environment variable named like one of its settings (MODEL, PORT, HOST,
# N_CTX, CHAT_FORMAT, CONFIG_FILE, ... case-insensitively; HOST and PORT even override the
# command line), so it gets only these, plus API_KEY when a key is wanted.
_ENV_PASSED = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_READY_PATH = "/openapi.json"  # FastAPI's schema route needs no key; the model is loaded before uvicorn binds
_BIND_MARKER = "address already in use"
_MODULE = "llama_cpp.server"


class LlamaCppPythonError(AnyscaleError, RuntimeError):
    """Installing, starting or stopping llama-cpp-python's server failed."""


# --------------------------------------------------------------------------- paths


def _install_dir() -> Path:
    return cache_dir() / _NAME


def _venv_python(root: Path | None = None) -> Path:
    return (root or _install_dir()) / "venv" / "bin" / "python"


def _state_path() -> Path:
    return cache_dir() / f"{_NAME}-server.json"


def _log_path(port: int) -> Path:
    return cache_dir() / "logs" / f"{_NAME}-{port}.log"


def _build_log() -> Path:
    return cache_dir() / "logs" / f"{_NAME}-build.log"


# --------------------------------------------------------------------------- install


def _cmake_flags() -> list[str]:
    """CMake flags of the library build: the fixed ones plus llama-server's ISA flags for this CPU."""
    return [*LIB_CMAKE_FLAGS, *llama_server.isa_cmake_flags()]


def _install_record() -> dict[str, object]:
    """Describe the install we want; a different INSTALL.json means reinstall."""
    return {
        "package": f"{PACKAGE}[{EXTRAS}]=={VERSION}",
        "pip_cmake_args": PIP_CMAKE_ARGS,
        "cmake_flags": _cmake_flags(),
    }


def _installed() -> bool:
    record = _processes.read_json(_install_dir() / "INSTALL.json")
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in _install_record().items()):
        return False
    # The venv's python is a symlink to the interpreter that made it: gone if that Python was removed.
    return os.access(_venv_python(), os.X_OK)


def ensure_installed(*, quiet: bool = False) -> tuple[Path, Path]:
    """Install what is missing; return ``(the venv's python, model gguf)``.

    Idempotent and safe to call concurrently: a lock file serialises installs, and the
    environment is prepared in a temporary directory inside the cache, then moved into place
    only when complete.  Progress goes to stderr unless ``quiet``.  The first install takes
    minutes (a C++ build).
    """
    model = llama_server.ensure_model(quiet=quiet, name=_NAME)
    if _installed():
        return _venv_python(), model
    say = _processes.sayer(_NAME, quiet)
    cache = cache_dir()
    lock = cache / f".{_NAME}.lock"
    with _processes.install_lock(lock, say, work_prefix=_WORK_PREFIX, timeout=LOCK_TIMEOUT, error=LlamaCppPythonError):
        if not _installed():
            with _processes.work_dir(cache, _WORK_PREFIX) as work:
                _install(work, say)
    return _venv_python(), model


def _install(work: Path, say: Say) -> None:
    """Download the sdist, make the venv, build the libraries, check, and move it all into the cache."""
    _processes.check_build_tools(_NAME, error=LlamaCppPythonError)
    started = time.monotonic()
    log = _build_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    requirement = f"{PACKAGE}=={VERSION}"
    with _step(say, f"downloading {requirement} source from PyPI (75 MB; log: {log})"):
        sdist = _processes.pip_download(
            requirement, work / "dl", log, "--no-binary", PACKAGE, error=LlamaCppPythonError
        )
    stage = work / "stage"
    with _step(say, "creating a virtual environment with the Python part and its dependencies (no C++ yet)"):
        _install_python_part(sdist, stage, log)
    source = _vendored_tree(_processes.unpack(sdist, work / "src", error=LlamaCppPythonError))
    libs = _build_libraries(source, work / "build", log, say)
    _copy_libraries(libs, _package_lib_dir(stage))
    _check(stage, log)
    record = {**_install_record(), "python": _python_version(_venv_python(stage)), "resolved": _freeze(stage)}
    (stage / "INSTALL.json").write_text(json.dumps(record, indent=2) + "\n")
    _processes.replace_dir(stage, _install_dir())
    say(f"llama-cpp-python installed: {_install_dir()} ({_processes.fmt_duration(time.monotonic() - started)})")


@contextlib.contextmanager
def _step(say: Say, what: str) -> Iterator[None]:
    """Say what starts, and how long it took once done."""
    started = time.monotonic()
    say(f"{what}...")
    yield
    say(f"  done in {_processes.fmt_duration(time.monotonic() - started)}")


def _install_python_part(sdist: Path, stage: Path, log: Path) -> None:
    """A venv with the package and the server's dependencies; llama.cpp itself is not compiled here."""
    # The venv is made here and moved later: `venv/bin/python -m ...` finds its site-packages
    # relative to itself (pyvenv.cfg), so only the unused console scripts keep the old path.
    _run([sys.executable, "-m", "venv", str(stage / "venv")], log)
    env = {**os.environ, "CMAKE_ARGS": PIP_CMAKE_ARGS}
    pip = [str(_venv_python(stage)), "-m", "pip", "install", "--disable-pip-version-check"]
    _processes.run_logged([*pip, f"{sdist}[{EXTRAS}]"], log, error=LlamaCppPythonError, env=env)


def _vendored_tree(root: Path) -> Path:
    """The llama.cpp source tree vendored in the unpacked sdist."""
    for top in sorted(root.glob("*/vendor/llama.cpp/CMakeLists.txt")):
        if (top.parent / "ggml").is_dir():
            return top.parent
    raise LlamaCppPythonError(f"no vendor/llama.cpp source tree found under {root}")


def _build_jobs() -> int:
    return max(2, min(MAX_BUILD_JOBS, os.cpu_count() or 2))


def _build_libraries(source: Path, build: Path, log: Path, say: Say) -> Path:
    """Configure and build the shared libraries; return the directory holding them."""
    cmake = _processes.find_cmake(build.parent, log, error=LlamaCppPythonError)
    with _step(say, "configuring llama.cpp (vendored in the sdist) with CMake"):
        _run([cmake, "-S", str(source), "-B", str(build), *_cmake_flags()], log)
    jobs = _build_jobs()
    with _step(say, f"building libllama and ggml with {jobs} jobs; this takes a few minutes"):
        progress = _processes.BuildProgress(say).update
        cmd = [cmake, "--build", str(build), "-j", str(jobs)]
        _processes.run_logged(cmd, log, error=LlamaCppPythonError, on_line=progress)
    out = build / "bin"  # llama.cpp puts every library and binary there
    missing = [name for name in LIBRARIES if not (out / name).exists()]
    if missing:
        raise LlamaCppPythonError(f"build finished but {', '.join(missing)} missing in {out}; see {log}")
    return out


def _package_lib_dir(stage: Path) -> Path:
    hits = sorted(stage.glob("venv/lib/python*/site-packages/llama_cpp/__init__.py"))
    if not hits:
        raise LlamaCppPythonError(f"pip install finished but no llama_cpp package in {stage / 'venv'}")
    return hits[0].parent / "lib"


def _copy_libraries(built: Path, dest: Path) -> None:
    """Copy ``lib*.so*`` (files and their version symlinks) into the package's ``lib`` directory."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(built.glob("lib*.so*")):
        target = dest / path.name
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, target)


def _check(stage: Path, log: Path) -> None:
    """Import the bindings and the server app in the new venv: the libraries load, the dependencies fit."""
    code = "import llama_cpp, llama_cpp.server.app; print('llama_cpp', llama_cpp.__version__)"
    _run([str(_venv_python(stage)), "-c", code], log)


def _python_version(python: Path) -> str:
    return _output([str(python), "-c", "import platform; print(platform.python_version())"])


def _freeze(stage: Path) -> list[str]:
    """What pip resolved (for the record only: the server's dependencies are not pinned)."""
    out = _output([str(_venv_python(stage)), "-m", "pip", "freeze", "--disable-pip-version-check"])
    return [line for line in out.splitlines() if " @ file:" not in line]  # the sdist itself: in "package"


def _output(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def _run(cmd: list[str], log: Path) -> None:
    _processes.run_logged(cmd, log, error=LlamaCppPythonError)


# --------------------------------------------------------------------------- running


class LlamaCppPythonServer(_processes.ModelServer):
    """A running llama-cpp-python server on 127.0.0.1."""

    error = LlamaCppPythonError


def start(
    *,
    port: int | None = None,
    api_key: str | None = None,
    alias: str = DEFAULT_ALIAS,
    ctx_size: int = 2048,
    threads: int = STAND_IN_THREADS,
    ready_timeout: float = 120.0,
) -> LlamaCppPythonServer:
    """Start ``python -m llama_cpp.server`` in the background and wait until it answers.

    Installs it and the model first if needed.  ``port=None`` picks a free port.  The server
    runs in its own session with a minimal environment and logs (llama.cpp's and uvicorn's
    output, one access-log line per request) to ``<cache>/logs/llama-cpp-python-<port>.log``.
    With ``api_key`` every API route needs ``Authorization: Bearer <key>``.
    """
    python, model = ensure_installed()

    def launch(chosen: int) -> LlamaCppPythonServer:
        cmd = _server_command(python, model, chosen, alias, ctx_size, threads)
        server = _spawn(cmd, chosen, alias, api_key)
        _wait_ready(server, ready_timeout)
        return server

    return _processes.start_on_port(port, launch, error=LlamaCppPythonError, bind_error=_BindError)


def stop(pid: int, timeout: float = 5.0) -> None:
    """Stop the process ``pid``: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    _processes.terminate(pid, timeout, error=LlamaCppPythonError)


def _server_command(python: Path, model: Path, port: int, alias: str, ctx_size: int, threads: int) -> list[str]:
    return [
        str(python),
        "-m",
        _MODULE,
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--host",
        HOST,
        "--port",
        str(port),
        "--n_ctx",
        str(ctx_size),
        "--n_threads",
        str(threads),
        # the prompt's threads too: the server's default for those is every core
        "--n_threads_batch",
        str(threads),
    ]


def _server_env(api_key: str | None) -> dict[str, str]:
    """Child environment: a minimal one (see _ENV_PASSED); the key travels here, not on argv or in the log."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_PASSED or k.startswith("LC_")}
    env["PYTHONUNBUFFERED"] = "1"  # uvicorn's access log goes to stdout: unbuffered, it reaches the log at once
    if api_key:
        env["API_KEY"] = api_key
    return env


def _spawn(cmd: list[str], port: int, alias: str, api_key: str | None) -> LlamaCppPythonServer:
    log_path = _log_path(port)
    # Delete server logs older than LOG_MAX_AGE (one log is kept per port used), not the build log.
    _processes.prune_logs(log_path.parent, f"{_NAME}-*.log", LOG_MAX_AGE, keep=(_build_log().name,))
    pid = _processes.spawn_detached(cmd, log_path, _server_env(api_key), cwd=_install_dir())
    return LlamaCppPythonServer(pid=pid, port=port, alias=alias, log_path=log_path)


class _BindError(LlamaCppPythonError):
    """The server could not listen on its port."""


def _wait_ready(server: LlamaCppPythonServer, timeout: float) -> None:
    """Wait until uvicorn reports listening on our port and the app answers; else stop it and raise."""
    _processes.wait_ready(
        server.pid,
        server.log_path,
        lambda: _has_bound(server) and _status(server.port) == 200,
        timeout,
        what="llama-cpp-python server",
        error=LlamaCppPythonError,
        bind_error=_BindError,
        bind_marker=_BIND_MARKER,
    )


def _has_bound(server: LlamaCppPythonServer) -> bool:
    """True once uvicorn has logged that it runs on our port: this process, not another, answers there."""
    marker = f"Uvicorn running on http://{HOST}:{server.port}".encode()
    try:
        with server.log_path.open("rb") as log:
            return marker in log.read()
    except OSError:
        return False


def _status(port: int, timeout: float = 2.0) -> int | None:
    return _processes.http_status(port, _READY_PATH, host=HOST, timeout=timeout)


def _is_our_server(pid: int) -> bool:
    """True if ``pid`` is alive and runs ``-m llama_cpp.server`` (guards against PID reuse)."""
    if not _processes.is_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the state file
    return _MODULE.encode() in argv


# --------------------------------------------------------------------------- CLI


def _cli_install(quiet: bool) -> dict[str, Path]:
    python, model = ensure_installed(quiet=quiet)
    return {"python": python, "model": model}


_CLI = ServerCli(
    prog="llama-cpp-python-server",
    description="Local llama-cpp-python test server for dspy-anyscale.",
    label="llama-cpp-python server",
    state_path=_state_path,
    is_ours=_is_our_server,
    installed=_installed,
    healthy=lambda port: _status(port) == 200,
    install=_cli_install,
    start=lambda **options: start(**options),
    error=LlamaCppPythonError,
    default_alias=DEFAULT_ALIAS,
    ready_timeout=120.0,
)
load_state = _CLI.load_state
main = _CLI.main


if __name__ == "__main__":
    sys.exit(main())
