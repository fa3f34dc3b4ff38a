"""Run the open-source Portkey AI gateway on 127.0.0.1 for tests.

The gateway is the npm package ``@portkey-ai/gateway`` (pinned below), installed
with ``npm`` from the npm registry, so this works on machines whose only network
access is a package registry.  It needs ``node`` (>= 18) and ``npm`` on PATH.
Put it in front of the local llama.cpp server (:mod:`dspy_anyscale.servers.llama_server`)
to exercise the client against a real Portkey gateway::

    <cache>/portkey-gateway/node_modules/@portkey-ai/gateway/build/start-server.js   entry point
    <cache>/portkey-gateway/dspy-anyscale-preload.cjs   written by this module (see below)
    <cache>/portkey-gateway/INSTALL.json                what was installed, and how
    <cache>/logs/portkey-gateway-<port>.log             output of each started gateway (pruned after 7 days)
    <cache>/logs/portkey-gateway-install.log            output of the last ``npm install``

``<cache>`` is :func:`dspy_anyscale.servers._processes.cache_dir`.  The gateway itself
only takes ``--port=N`` and ``--headless`` and listens on all interfaces, and on
Node 20 its streaming path fails with ``TypeError: immutable``.  So it is started
as ``node --require <preload> <entry> --port=N --headless`` where the preload
(``portkey_preload.cjs`` next to this module, :data:`PRELOAD_SOURCE`):

* makes every TCP ``net.Server.listen`` bind 127.0.0.1, whatever the caller asked;
* makes ``fetch`` return responses with mutable headers: the gateway wraps the
  upstream response in ``new Response(stream, upstreamResponse)``, which with
  ``@hono/node-server``'s lightweight global ``Response`` keeps the upstream's
  immutable ``Headers`` object; appending ``x-portkey-*`` headers to it throws
  (upstream issues #1389, #1550); the copy also drops the upstream's hop-by-hop
  headers (``Connection``, ``Keep-Alive``), which the gateway would forward.
  ``start(fix_streaming=False)`` leaves this out;
* makes ``fetch`` open a new upstream connection per request: llama-server closes
  the connection after a streamed response although it announced keep-alive, and
  a request the gateway sends on such a connection fails with HTTP 500 ("other
  side closed").  ``DSPY_ANYSCALE_GATEWAY_KEEP_ALIVE=1`` in the environment of
  :func:`start` restores connection reuse;
* notes on stderr (the log) any outgoing connection to a non-loopback host.

Python API::

    gateway = start()                # installs on first use (~3 s); later ~0.3 s
    gateway.url                      # "http://127.0.0.1:<port>/v1"
    gateway.stop()

Route a request to an OpenAI-compatible server with the headers
``x-portkey-provider: openai``, ``x-portkey-custom-host: <server base url>`` and
``Authorization: Bearer <server key>`` (or one ``x-portkey-config`` JSON header).

Command line (``python -m dspy_anyscale.servers.portkey``)::

    portkey-gateway install          # npm install (idempotent)
    portkey-gateway run [--port N]   # run in the foreground until interrupted

Besides the standard library this module imports only :mod:`dspy_anyscale.servers._processes`
(helpers shared with :mod:`dspy_anyscale.servers.llama_server`) and the package's error root; it does nothing on import.
As part of the package it is run with ``python -m``, which imports the package (and so dspy) first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ..errors import AnyscaleError
from . import _processes
from ._processes import Say

__all__ = [
    "GATEWAY_PACKAGE",
    "GATEWAY_VERSION",
    "PRELOAD_SOURCE",
    "GatewayError",
    "PortkeyGateway",
    "ensure_installed",
    "main",
    "start",
]

HOST = _processes.HOST
GATEWAY_PACKAGE = "@portkey-ai/gateway"
GATEWAY_VERSION = "1.15.2"
ENTRY_POINT = ("node_modules", "@portkey-ai", "gateway", "build", "start-server.js")  # package.json "bin"
PRELOAD_FILE = "dspy-anyscale-preload.cjs"

# --ignore-scripts: the package's only install script is ``patch-package``, which
# has no patches to apply in the published package (npm >= 11 skips it anyway).
NPM_FLAGS = (
    "--no-audit",
    "--no-fund",
    "--no-update-notifier",
    "--ignore-scripts",
    "--save-exact",
    "--omit=dev",
)

LOG_MAX_AGE = 7 * 24 * 3600.0  # seconds; gateway logs older than this are deleted
LOCK_TIMEOUT = 900.0
_WORK_PREFIX = ".portkey-work-"  # install work dirs in the cache; llama_server's (".work-") have their own lock
READY_PATH = "/"  # answers 200 "AI Gateway says hey!" as soon as the server listens

# The gateway reads dozens of variables (REDIS_CONNECTION_STRING, TRUSTED_CUSTOM_HOSTS,
# ALBUS_BASEPATH, AWS_*, AZURE_*, *_PROXY, ...) and node reads NODE_OPTIONS; it gets only these.
_KEEP_ALIVE_ENV = "DSPY_ANYSCALE_GATEWAY_KEEP_ALIVE"  # "1": the preload lets fetch reuse upstream connections
_ENV_PASSED = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "NODE_EXTRA_CA_CERTS",
    _KEEP_ALIVE_ENV,
)
_NO_FETCH_FIX_ENV = "DSPY_ANYSCALE_GATEWAY_NO_FETCH_FIX"
_PRELOAD_TAG = "[dspy-anyscale preload]"  # prefix of the preload's log lines (TAG in the preload)

# The preload (a CommonJS file next to this module), copied next to the installed gateway.
PRELOAD_SOURCE = Path(__file__).with_name("portkey_preload.cjs")


def _preload_bytes() -> bytes:
    return PRELOAD_SOURCE.read_bytes()


class GatewayError(AnyscaleError, RuntimeError):
    """Installing, starting or stopping the Portkey gateway failed."""


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Return the cache directory shared with :mod:`dspy_anyscale.servers.llama_server`."""
    return _processes.cache_dir()


def _install_dir() -> Path:
    return cache_dir() / "portkey-gateway"


def _entry_point() -> Path:
    return _install_dir().joinpath(*ENTRY_POINT)


def _preload_path() -> Path:
    return _install_dir() / PRELOAD_FILE


def _log_path(port: int) -> Path:
    return cache_dir() / "logs" / f"portkey-gateway-{port}.log"


# --------------------------------------------------------------------------- install


def _install_record() -> dict[str, object]:
    """Describe the install we want; a different INSTALL.json means reinstall."""
    return {"package": f"{GATEWAY_PACKAGE}@{GATEWAY_VERSION}", "npm_flags": list(NPM_FLAGS)}


def _gateway_installed() -> bool:
    record = _processes.read_json(_install_dir() / "INSTALL.json")
    return record == _install_record() and _entry_point().is_file()


def _preload_current() -> bool:
    try:
        return _preload_path().read_bytes() == _preload_bytes()
    except OSError:
        return False


def ensure_installed(*, quiet: bool = False) -> Path:
    """Install the gateway with npm if missing; return its entry script (``start-server.js``).

    Idempotent and safe to call concurrently: a lock file serialises installs,
    ``npm install`` runs in a temporary directory inside the cache that is moved
    into place only when complete, and the preload script is replaced
    atomically.  Progress goes to stderr unless ``quiet``.  Takes a few seconds.
    """
    if _gateway_installed() and _preload_current():
        return _entry_point()
    say = _processes.sayer("portkey-gateway", quiet)
    cache = cache_dir()
    lock = cache / ".portkey-gateway.lock"
    with _processes.install_lock(lock, say, work_prefix=_WORK_PREFIX, timeout=LOCK_TIMEOUT, error=GatewayError):
        if not _gateway_installed():
            with _processes.work_dir(cache, _WORK_PREFIX) as work:
                _install_gateway(work, say)
        if not _preload_current():
            _processes.write_atomic(_preload_path(), _preload_bytes())
    return _entry_point()


def _install_gateway(work: Path, say: Say) -> None:
    """``npm install`` the pinned gateway into ``work/stage`` and move it into the cache."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise GatewayError(
            "the Portkey gateway needs node (>= 18) and npm on PATH (Debian/Ubuntu: apt-get install nodejs npm)"
        )
    started = time.monotonic()
    log = cache_dir() / "logs" / "portkey-gateway-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    stage = work / "stage"
    stage.mkdir()
    spec = f"{GATEWAY_PACKAGE}@{GATEWAY_VERSION}"
    say(f"installing {spec} from the npm registry (log: {log})...")
    cmd = [npm, "install", "--prefix", str(stage), *NPM_FLAGS, spec]
    _processes.run_logged(cmd, log, error=GatewayError, cwd=stage)
    if not stage.joinpath(*ENTRY_POINT).is_file():
        raise GatewayError(f"npm install finished but {'/'.join(ENTRY_POINT)} is missing; see {log}")
    (stage / PRELOAD_FILE).write_bytes(_preload_bytes())
    (stage / "INSTALL.json").write_text(json.dumps(_install_record(), indent=2) + "\n")
    _processes.replace_dir(stage, _install_dir())
    say(f"gateway installed: {_entry_point()} ({time.monotonic() - started:.1f}s)")


# --------------------------------------------------------------------------- running


class PortkeyGateway(_processes.RunningServer):
    """A running Portkey gateway on 127.0.0.1."""

    error = GatewayError

    @property
    def url(self) -> str:
        """OpenAI-style API base of the gateway, e.g. ``http://127.0.0.1:8787/v1``."""
        return f"http://{HOST}:{self.port}/v1"


def start(*, port: int | None = None, ready_timeout: float = 30.0, fix_streaming: bool = True) -> PortkeyGateway:
    """Start the gateway in the background and wait until it answers on 127.0.0.1.

    Installs it first if needed.  ``port=None`` picks a free port.  The gateway
    runs in its own session with a minimal environment and logs to
    ``<cache>/logs/portkey-gateway-<port>.log``.  ``fix_streaming=False``
    starts it without the preload's mutable-headers fix, i.e. with the
    upstream streaming bug (``TypeError: immutable``, HTTP 500).
    """
    entry = ensure_installed()
    node = shutil.which("node")
    if node is None:
        raise GatewayError("node is not on PATH")

    def launch(chosen: int) -> PortkeyGateway:
        cmd = [node, "--require", str(_preload_path()), str(entry), f"--port={chosen}", "--headless"]
        gateway = _spawn(cmd, chosen, fix_streaming)
        _wait_ready(gateway, ready_timeout)
        return gateway

    return _processes.start_on_port(port, launch, error=GatewayError, bind_error=_BindError)


def _gateway_env(fix_streaming: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_PASSED or k.startswith("LC_")}
    if not fix_streaming:
        env[_NO_FETCH_FIX_ENV] = "1"
    return env


def _spawn(cmd: list[str], port: int, fix_streaming: bool) -> PortkeyGateway:
    """Start the gateway detached (new session), output to its log file."""
    log_path = _log_path(port)
    # Delete gateway logs older than LOG_MAX_AGE (one log is kept per port used), not the install log.
    _processes.prune_logs(log_path.parent, "portkey-gateway-*.log", LOG_MAX_AGE, keep=("portkey-gateway-install.log",))
    pid = _processes.spawn_detached(cmd, log_path, _gateway_env(fix_streaming), cwd=_install_dir())
    return PortkeyGateway(pid=pid, port=port, log_path=log_path)


class _BindError(GatewayError):
    """The gateway could not listen on its port."""


def _wait_ready(gateway: PortkeyGateway, timeout: float) -> None:
    """Wait until the gateway has bound its port and ``GET /`` answers 200; else stop it and raise.

    The preload's "listening on" line in the log shows that this process (not
    another one holding the port) is the one answering.
    """
    _processes.wait_ready(
        gateway.pid,
        gateway.log_path,
        lambda: _has_bound(gateway) and _processes.http_status(gateway.port, READY_PATH, host=HOST) == 200,
        timeout,
        what="gateway",
        error=GatewayError,
        bind_error=_BindError,
        bind_marker="EADDRINUSE",
    )


def _has_bound(gateway: PortkeyGateway) -> bool:
    """True once the preload has logged that the gateway listens on its port on 127.0.0.1."""
    marker = f'{_PRELOAD_TAG} listening on {{"address":"{HOST}","family":"IPv4","port":{gateway.port}}}'
    try:
        with gateway.log_path.open("rb") as log:
            return marker.encode() in log.read(65536)
    except OSError:
        return False


def _content_hash() -> str:
    """Short hash of the preload script (shown by the CLI)."""
    return hashlib.sha256(_preload_bytes()).hexdigest()[:12]


# --------------------------------------------------------------------------- CLI


def _cmd_install(args: argparse.Namespace) -> int:
    entry = ensure_installed(quiet=args.quiet)
    print(f"entry:   {entry}\npreload: {_preload_path()} (sha256 {_content_hash()}...)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    gateway = start(port=args.port, ready_timeout=args.ready_timeout, fix_streaming=not args.no_fix_streaming)
    print(f"{gateway.url}  (pid {gateway.pid}, log {gateway.log_path}); Ctrl-C stops it", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while _processes.is_alive(gateway.pid):
            time.sleep(0.5)
        last = _processes.tail(gateway.log_path)
        print(f"gateway exited; last lines of {gateway.log_path}:\n{last}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        gateway.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portkey-gateway", description="Local Portkey AI gateway for dspy-anyscale.")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="npm install the gateway (idempotent)")
    install.add_argument("--quiet", action="store_true", help="no progress messages")
    install.set_defaults(func=_cmd_install)
    run = sub.add_parser("run", help="run on 127.0.0.1 in the foreground until interrupted")
    run.add_argument("--port", type=int, default=None, help="default: a free port")
    run.add_argument("--ready-timeout", type=float, default=30.0)
    run.add_argument("--no-fix-streaming", action="store_true", help="keep the upstream 'TypeError: immutable' bug")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    return _processes.run_cli(lambda: args.func(args), GatewayError)


if __name__ == "__main__":
    sys.exit(main())
