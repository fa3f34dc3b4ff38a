"""The command line both model servers share: ``install | start | stop | status``, and the state file
that remembers the server ``start`` left running (never its key). Standard library only."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._constants import STAND_IN_THREADS
from . import _processes


@dataclass(frozen=True)
class ServerCli:
    """What differs between two model servers' command lines; the rest is here once."""

    prog: str
    description: str
    label: str  # "llama-server", "llama-cpp-python server": how messages name it
    state_path: Callable[[], Path]
    is_ours: Callable[[int], bool]  # whether a pid is still our server (not a recycled pid)
    installed: Callable[[], bool]
    healthy: Callable[[int], bool]  # by port
    install: Callable[[bool], Mapping[str, Path]]  # quiet -> what was installed, by label
    start: Callable[..., Any]  # returns an object with pid, port, base_url, alias, log_path
    error: type[Exception]
    default_alias: str
    ready_timeout: float

    # --- state file --------------------------------------------------------------------------------

    def save_state(self, server: Any, api_key: str | None) -> None:
        state = {
            "pid": server.pid,
            "port": server.port,
            "url": server.base_url,
            "alias": server.alias,
            "api_key_set": bool(api_key),
            "log_path": str(server.log_path),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _processes.write_atomic(self.state_path(), (json.dumps(state, indent=2) + "\n").encode())

    def load_state(self) -> dict[str, Any] | None:
        """The state of the server started by the CLI, or None if there is none."""
        state = _processes.read_json(self.state_path())
        return state if isinstance(state, dict) else None

    # --- commands --------------------------------------------------------------------------------

    def _install(self, args: argparse.Namespace) -> int:
        for label, path in self.install(args.quiet).items():
            print(f"{label + ':':8}{path}")
        return 0

    def _start(self, args: argparse.Namespace) -> int:
        state = self.load_state()
        if state and self.is_ours(int(state["pid"])):
            print(
                f"error: a server is already running (pid {state['pid']}, {state['url']}); run 'stop' first",
                file=sys.stderr,
            )
            return 1
        server = self.start(
            port=args.port,
            api_key=args.api_key,
            alias=args.alias,
            ctx_size=args.ctx_size,
            threads=args.threads,
            ready_timeout=args.ready_timeout,
        )
        self.save_state(server, args.api_key)
        print(f"export ANYSCALE_API_BASE={server.base_url}")
        print(f"export ANYSCALE_API_KEY={shlex.quote(args.api_key or 'local')}")
        print(f"# model={server.alias} pid={server.pid} log={server.log_path}")
        return 0

    def _stop(self, args: argparse.Namespace) -> int:
        state = self.load_state()
        if state is None:
            print("no server recorded; nothing to stop", file=sys.stderr)
            return 0
        pid = int(state["pid"])
        if self.is_ours(pid):
            _processes.terminate(pid, args.timeout, error=self.error)
            print(f"stopped {self.label} pid {pid}", file=sys.stderr)
        else:
            print(f"{self.label} pid {pid} was not running", file=sys.stderr)
        self.state_path().unlink(missing_ok=True)
        return 0

    def _status(self, args: argparse.Namespace) -> int:
        state = self.load_state()
        installed = self.installed()
        if state is None:
            print(json.dumps({"running": False, "installed": installed}))
            return 1
        running = self.is_ours(int(state["pid"]))
        healthy = running and self.healthy(int(state["port"]))
        print(json.dumps({**state, "running": running, "healthy": healthy, "installed": installed}))
        return 0 if healthy else 1

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        sub = parser.add_subparsers(dest="command", required=True)
        install = sub.add_parser("install", help="download and build server and model (idempotent)")
        install.add_argument("--quiet", action="store_true", help="no progress messages")
        install.set_defaults(func=self._install)
        run = sub.add_parser("start", help="start in the background; print export lines")
        run.add_argument("--port", type=int, default=None, help="default: a free port")
        run.add_argument("--api-key", default=None, help="require this key (default: none)")
        run.add_argument("--alias", default=self.default_alias, help="model name served")
        run.add_argument("--ctx-size", type=int, default=2048)
        run.add_argument("--threads", type=int, default=STAND_IN_THREADS)
        run.add_argument("--ready-timeout", type=float, default=self.ready_timeout)
        run.set_defaults(func=self._start)
        halt = sub.add_parser("stop", help="stop the server started by 'start'")
        halt.add_argument("--timeout", type=float, default=5.0)
        halt.set_defaults(func=self._stop)
        status = sub.add_parser("status", help="print state as JSON; exit 0 if healthy")
        status.set_defaults(func=self._status)
        return parser

    def main(self, argv: list[str] | None = None) -> int:
        """Command-line entry point."""
        args = self.parser().parse_args(argv)
        return _processes.run_cli(lambda: args.func(args), self.error)
