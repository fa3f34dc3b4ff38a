"""Manage a local Arize Phoenix (``phoenix serve``), an OpenTelemetry trace receiver, for tests.

Phoenix receives OTLP over HTTP at ``/v1/traces`` and serves what it stored through a REST API
(``GET /v1/projects/{project}/spans``), so a test can export the spans of a real call and read
them back from a real receiver.  It comes from PyPI (``arize-phoenix``, pinned below) and is
installed once into a virtual environment of its own (about 80 s and 850 MB): never into the
package's environment, whose dependencies it would pull around.

Layout under :func:`cache_dir`::

    <cache>/phoenix/venv/                     Python environment running the server
    <cache>/phoenix/template/phoenix.db       an empty, migrated database, copied for each server
    <cache>/phoenix/INSTALL.json              what was installed
    <cache>/logs/phoenix-<port>.log           output of each started server (pruned after 7 days)
    <cache>/logs/phoenix-install.log          output of the last install
    <cache>/phoenix-server.json               state of the server started by the CLI

Each server gets a fresh working directory, removed when it stops, holding a copy of a database
migrated once at install (so starting skips Phoenix's schema migrations), and starts with
Phoenix's usage telemetry off and no ``OTEL_*`` or ``PHOENIX_*`` variables of the caller's.

Python API::

    with start() as phoenix:              # installs on first use (~80 s); later ~20 s to start
        phoenix.otlp_traces_url           # "http://127.0.0.1:<port>/v1/traces"
        phoenix.spans(trace_id="...")     # what Phoenix stored, as its REST API returns it

Command line (``python -m dspy_anyscale.servers.phoenix``)::

    phoenix install | start | status | stop

Besides the standard library this module imports only :mod:`._processes` and the package's error
root; it does nothing on import.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AnyscaleError
from . import _processes
from ._processes import Say, cache_dir

__all__ = [
    "PACKAGE",
    "VERSION",
    "PhoenixError",
    "PhoenixServer",
    "cache_dir",
    "ensure_installed",
    "load_state",
    "main",
    "start",
    "stop",
]

HOST = _processes.HOST
PACKAGE = "arize-phoenix"
VERSION = "20.26.1"
DEFAULT_PROJECT = "default"  # where Phoenix puts spans whose resource names no project

LOG_MAX_AGE = 7 * 24 * 3600.0  # seconds; server logs older than this are deleted
LOCK_TIMEOUT = 1800.0
PYTHON_VERSION_TIMEOUT_S = 120.0  # asking the installed venv its Python version
# Must not start with another manager's prefix (".work-", ".portkey-work-", ...): lock holders
# delete their stale work dirs by prefix.
_WORK_PREFIX = ".phoenix-work-"
_NAME = "phoenix"
_DATABASE = "phoenix.db"  # what Phoenix makes in PHOENIX_WORKING_DIR when no database URL is set
_READY_PATH = "/healthz"
# What the `phoenix` console script runs; called through the venv's python because the venv was
# built elsewhere and moved, and its console scripts' shebangs still name the old place.
_MODULE = "phoenix.server.main"
_BIND_MARKER = "address already in use"
# Phoenix reads the exporter variables for its own instrumentation: the caller's must not leak in.
_SCRUBBED_ENV_PREFIXES = ("OTEL_", "PHOENIX_")


class PhoenixError(AnyscaleError, RuntimeError):
    """Installing, starting, querying or stopping Phoenix failed."""


# --------------------------------------------------------------------------- paths


def _install_dir() -> Path:
    return cache_dir() / _NAME


def _venv_python(root: Path | None = None) -> Path:
    return (root or _install_dir()) / "venv" / "bin" / "python"


def _template_db(root: Path | None = None) -> Path:
    return (root or _install_dir()) / "template" / _DATABASE


def _state_path() -> Path:
    return cache_dir() / f"{_NAME}-server.json"


def _log_path(port: int) -> Path:
    return cache_dir() / "logs" / f"{_NAME}-{port}.log"


def _install_log() -> Path:
    return cache_dir() / "logs" / f"{_NAME}-install.log"


# --------------------------------------------------------------------------- install


def _install_record() -> dict[str, object]:
    """Describe the install we want; a different INSTALL.json means reinstall."""
    return {"package": f"{PACKAGE}=={VERSION}", "template_db": _DATABASE}


def _installed() -> bool:
    record = _processes.read_json(_install_dir() / "INSTALL.json")
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in _install_record().items()):
        return False
    # The venv's python is a symlink to the interpreter that made it: gone if that Python was removed.
    return os.access(_venv_python(), os.X_OK) and _template_db().is_file()


def ensure_installed(*, quiet: bool = False) -> Path:
    """Install Phoenix if missing; return the venv's python.

    Idempotent and safe to call concurrently: a lock file serialises installs, and the
    environment is built in a temporary directory inside the cache, then moved into place
    only when complete.  Progress goes to stderr unless ``quiet``.
    """
    if _installed():
        return _venv_python()
    say = _processes.sayer(_NAME, quiet)
    cache = cache_dir()
    lock = cache / f".{_NAME}.lock"
    with _processes.install_lock(lock, say, work_prefix=_WORK_PREFIX, timeout=LOCK_TIMEOUT, error=PhoenixError):
        if not _installed():
            with _processes.work_dir(cache, _WORK_PREFIX) as work:
                _install(work, say)
    return _venv_python()


def _install(work: Path, say: Say) -> None:
    """Make a venv, pip-install the pinned Phoenix into it, check it, move it into the cache."""
    started = time.monotonic()
    log = _install_log()
    say(f"installing {PACKAGE}=={VERSION} from PyPI into its own environment (~80 s, ~850 MB; log: {log})...")
    stage = _processes.stage_venv(work, [f"{PACKAGE}=={VERSION}"], f"import {_MODULE}", log, error=PhoenixError)
    say("creating an empty database with Phoenix's schema (copied for every server started)...")
    template = _template_db(stage).parent
    template.mkdir()
    env = _server_env(0, 0, template)
    _processes.run_logged([str(_venv_python(stage)), "-m", _MODULE, "db", "migrate"], log, error=PhoenixError, env=env)
    _processes.finish_install(stage, _install_record(), _install_dir(), timeout=PYTHON_VERSION_TIMEOUT_S)
    say(f"Phoenix installed: {_install_dir()} ({_processes.fmt_duration(time.monotonic() - started)})")


# --------------------------------------------------------------------------- running


@dataclass(frozen=True, kw_only=True)
class PhoenixServer(_processes.RunningServer):
    """A running Phoenix on 127.0.0.1, its data in ``working_dir`` (removed by :meth:`stop`)."""

    grpc_port: int
    working_dir: Path

    error = PhoenixError
    stop_timeout = 10.0

    @property
    def url(self) -> str:
        """The UI and REST API, e.g. ``http://127.0.0.1:6006``."""
        return f"http://{HOST}:{self.port}"

    @property
    def otlp_traces_url(self) -> str:
        """Where an OTLP/HTTP span exporter sends: ``<url>/v1/traces``."""
        return f"{self.url}/v1/traces"

    def spans(
        self, *, project: str = DEFAULT_PROJECT, trace_id: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """The spans Phoenix stored (``GET /v1/projects/{project}/spans``), newest first.

        Each is a dict with ``name``, ``context`` (``trace_id``, ``span_id``), ``parent_id``,
        ``span_kind``, ``start_time``, ``end_time``, ``status_code``, ``status_message``,
        ``attributes`` (nested by the dots of their names) and ``events``.
        """
        query: dict[str, Any] = {"limit": limit}
        if trace_id is not None:
            query["trace_id"] = trace_id
        path = f"/v1/projects/{urllib.parse.quote(project, safe='')}/spans?{urllib.parse.urlencode(query)}"
        return list(_get_json(self.url + path)["data"])

    def wait_for_spans(self, count: int, *, trace_id: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
        """:meth:`spans` once at least ``count`` have arrived (Phoenix inserts in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.spans(trace_id=trace_id)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds) and remove its data."""
        super().stop(timeout)
        shutil.rmtree(self.working_dir, ignore_errors=True)


def _get_json(url: str, timeout: float = 10.0) -> Any:
    # No proxies: the server is on loopback, and a proxy from the environment would not reach it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise PhoenixError(f"GET {url} failed: {exc}") from exc


def start(*, port: int | None = None, ready_timeout: float = 120.0) -> PhoenixServer:
    """Start ``phoenix serve`` in the background and wait until ``/healthz`` answers.

    Installs Phoenix first if needed.  ``port=None`` picks a free port (the gRPC receiver
    always gets a free one, so several servers can run at once).  Output goes to
    ``<cache>/logs/phoenix-<port>.log``.
    """
    ensure_installed()

    def launch(chosen: int) -> PhoenixServer:
        server = _spawn(chosen, _processes.free_port(HOST))
        _wait_ready(server, ready_timeout)
        return server

    return _processes.start_on_port(port, launch, error=PhoenixError, bind_error=_BindError)


def stop(pid: int, timeout: float = 10.0) -> None:
    """Stop the process ``pid``: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    _processes.terminate(pid, timeout, error=PhoenixError)


def _server_env(port: int, grpc_port: int, working_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
    env.update(
        PHOENIX_HOST=HOST,
        PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(grpc_port),
        PHOENIX_WORKING_DIR=str(working_dir),
        PHOENIX_TELEMETRY_ENABLED="false",  # no usage reports to the internet from a test server
        PHOENIX_LOG_MIGRATIONS="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _spawn(port: int, grpc_port: int) -> PhoenixServer:
    log_path = _log_path(port)
    _processes.prune_logs(log_path.parent, f"{_NAME}-*.log", LOG_MAX_AGE, keep=(_install_log().name,))
    working_dir = Path(tempfile.mkdtemp(prefix=f"{_NAME}-{port}-", dir=cache_dir()))
    shutil.copyfile(_template_db(), working_dir / _DATABASE)  # already migrated: no schema work at start
    env = _server_env(port, grpc_port, working_dir)
    cmd = [str(_venv_python()), "-m", _MODULE, "serve"]  # `phoenix serve`
    pid = _processes.spawn_detached(cmd, log_path, env, cwd=working_dir)
    return PhoenixServer(pid=pid, port=port, grpc_port=grpc_port, working_dir=working_dir, log_path=log_path)


class _BindError(PhoenixError):
    """The server could not listen on its port."""


def _wait_ready(server: PhoenixServer, timeout: float) -> None:
    """Poll ``GET /healthz`` until 200; on failure stop the server, remove its data and raise."""
    try:
        _processes.wait_ready(
            server.pid,
            server.log_path,
            lambda: _processes.http_status(server.port, _READY_PATH, host=HOST) == 200,
            timeout,
            what="phoenix",
            error=PhoenixError,
            bind_error=_BindError,
            bind_marker=_BIND_MARKER,
        )
    except BaseException:
        shutil.rmtree(server.working_dir, ignore_errors=True)
        raise


def _is_phoenix(pid: int) -> bool:
    """True if ``pid`` is alive and runs ``phoenix serve`` (guards against PID reuse)."""
    if not _processes.is_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the state file
    return _MODULE.encode() in argv


# --------------------------------------------------------------------------- state file and CLI


def _save_state(server: PhoenixServer) -> None:
    state = {
        "pid": server.pid,
        "port": server.port,
        "url": server.url,
        "otlp_traces_url": server.otlp_traces_url,
        "working_dir": str(server.working_dir),
        "log_path": str(server.log_path),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _processes.write_atomic(_state_path(), (json.dumps(state, indent=2) + "\n").encode())


def load_state() -> dict[str, Any] | None:
    """Return the state of the server started by the CLI, or None if there is none."""
    state = _processes.read_json(_state_path())
    return state if isinstance(state, dict) else None


def _cmd_install(args: argparse.Namespace) -> int:
    print(f"python: {ensure_installed(quiet=args.quiet)}")
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    state = load_state()
    if state and _is_phoenix(int(state["pid"])):
        running = f"pid {state['pid']}, {state['url']}"
        print(f"error: Phoenix is already running ({running}); run 'stop' first", file=sys.stderr)
        return 1
    server = start(port=args.port, ready_timeout=args.ready_timeout)
    _save_state(server)
    print(f"export OTEL_EXPORTER_OTLP_TRACES_ENDPOINT={server.otlp_traces_url}")
    print(f"# ui={server.url} pid={server.pid} log={server.log_path}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    state = load_state()
    if state is None:
        print("no server recorded; nothing to stop", file=sys.stderr)
        return 0
    pid = int(state["pid"])
    if _is_phoenix(pid):
        _processes.terminate(pid, args.timeout, error=PhoenixError)
        print(f"stopped Phoenix pid {pid}", file=sys.stderr)
    else:
        print(f"Phoenix pid {pid} was not running", file=sys.stderr)
    shutil.rmtree(state.get("working_dir") or "", ignore_errors=True)
    _state_path().unlink(missing_ok=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    state = load_state()
    if state is None:
        print(json.dumps({"running": False, "installed": _installed()}))
        return 1
    running = _is_phoenix(int(state["pid"]))
    healthy = running and _processes.http_status(int(state["port"]), _READY_PATH, host=HOST) == 200
    print(json.dumps({**state, "running": running, "healthy": healthy, "installed": _installed()}))
    return 0 if healthy else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phoenix", description="Local Arize Phoenix trace receiver for tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="install into its own environment (idempotent)")
    install.add_argument("--quiet", action="store_true", help="no progress messages")
    install.set_defaults(func=_cmd_install)
    run = sub.add_parser("start", help="start in the background; print the OTLP endpoint")
    run.add_argument("--port", type=int, default=None, help="default: a free port")
    run.add_argument("--ready-timeout", type=float, default=120.0)
    run.set_defaults(func=_cmd_start)
    halt = sub.add_parser("stop", help="stop the server started by 'start' and remove its data")
    halt.add_argument("--timeout", type=float, default=10.0)
    halt.set_defaults(func=_cmd_stop)
    status = sub.add_parser("status", help="print state as JSON; exit 0 if healthy")
    status.set_defaults(func=_cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    return _processes.run_cli(lambda: args.func(args), PhoenixError)


if __name__ == "__main__":
    sys.exit(main())
