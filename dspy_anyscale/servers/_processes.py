"""Helpers shared by the test-server managers :mod:`.llama_server`, :mod:`.llama_cpp_python` and :mod:`.portkey`.

Cache directory, progress messages, install lock and work directories, logged
commands, downloads from PyPI, source archives, CMake builds (ISA flags, progress),
and background processes on 127.0.0.1 (spawn, readiness, liveness, termination).
Functions that can fail take the caller's exception class as ``error``, so each
manager keeps raising its own.  Standard library only; nothing happens on import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

HOST = "127.0.0.1"

Say = Callable[[str], None]
T = TypeVar("T")

# Processes started by this process, kept so they are reaped (and not reported by
# subprocess as "still running" when garbage-collected).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- files and output


def cache_dir() -> Path:
    """Return the cache directory: ``$DSPY_ANYSCALE_CACHE`` or ``~/.cache/dspy-anyscale``."""
    env = os.environ.get("DSPY_ANYSCALE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "dspy-anyscale"


def sayer(name: str, quiet: bool) -> Say:
    """Return a function printing ``[name] message`` to stderr (or nothing if quiet)."""
    if quiet:
        return lambda _msg: None
    return lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a text file ('' if unreadable); a bare CR ends a line too."""
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").replace("\r", "\n").splitlines()[-lines:])


def read_json(path: Path) -> Any:
    """Return the JSON content of ``path``, or None if it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prune_logs(logs: Path, pattern: str, max_age: float, keep: tuple[str, ...] = ()) -> None:
    """Delete files in ``logs`` matching ``pattern`` older than ``max_age`` seconds, except those named in ``keep``."""
    cutoff = time.time() - max_age
    for old in logs.glob(pattern):
        with contextlib.suppress(OSError):
            if old.name not in keep and old.stat().st_mtime < cutoff:
                old.unlink()


# --------------------------------------------------------------------------- installing


@contextlib.contextmanager
def install_lock(path: Path, say: Say, *, work_prefix: str, timeout: float, error: type[Exception]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (waiting up to ``timeout`` seconds).

    Creates the lock's directory, and once the lock is held deletes the work
    directories ``<dir>/<work_prefix>*`` that interrupted installs left behind
    (whoever made them held the same lock, so none is in use).
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    say(f"another process is installing; waiting for {path}")
                    waiting = True
                if time.monotonic() > deadline:
                    raise error(f"timed out waiting for install lock {path}") from None
                time.sleep(0.5)
        try:
            for stale in path.parent.glob(f"{work_prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def work_dir(cache: Path, prefix: str) -> Iterator[Path]:
    """A temporary directory inside the cache (same filesystem, so renames are atomic)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir=cache))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``, replacing a previous version (under the install lock)."""
    if final.exists():
        os.replace(final, new.parent / "old")
    os.replace(new, final)


def stage_venv(work: Path, packages: list[str], check: str, log: Path, *, error: type[Exception]) -> Path:
    """``work/stage/venv`` with ``packages`` pip-installed and the Python code ``check`` run in it; the stage.

    Made in a stage folder and moved into the cache once complete (:func:`finish_install`): a venv's
    ``bin/python -m ...`` finds its site-packages relative to itself, so it moves whole. ``log`` (emptied
    first) gets every command's output.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    stage = work / "stage"
    stage.mkdir()
    python = str(stage / "venv" / "bin" / "python")
    run_logged([sys.executable, "-m", "venv", str(stage / "venv")], log, error=error)
    run_logged(
        [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *packages], log, error=error
    )
    run_logged([python, "-c", check], log, error=error)
    return stage


def finish_install(stage: Path, record: Mapping[str, Any], final: Path, *, timeout: float) -> None:
    """Write what was installed (with the venv's Python version) as ``INSTALL.json`` and move the stage in place."""
    version = subprocess.run(
        [str(stage / "venv" / "bin" / "python"), "-V"],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    python = (version.stdout or version.stderr).strip() if version.returncode == 0 else ""
    (stage / "INSTALL.json").write_text(json.dumps({**record, "python": python}, indent=2) + "\n")
    replace_dir(stage, final)


def run_logged(
    cmd: list[str],
    log: Path,
    *,
    error: type[Exception],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[bytes], None] | None = None,
) -> None:
    """Run ``cmd`` (in ``env`` if given) appending its output to ``log``, passing each line to ``on_line`` if given.

    Raises ``error`` with the tail of the log when the command fails.
    """
    with log.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        if on_line is None:
            code = subprocess.call(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
            )
        else:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()  # the log stays current for whoever tails it during a long build
                on_line(line)
            code = proc.wait()
    if code != 0:
        raise error(f"command failed (exit {code}): {' '.join(cmd)}\n--- last lines of {log} ---\n{tail(log)}")


def pip_download(requirement: str, dest: Path, log: Path, *extra: str, error: type[Exception]) -> Path:
    """Download one distribution with pip (no dependencies) into ``dest``; return the file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    run_logged([*cmd, *extra, "-d", str(dest), requirement], log, error=error)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise error(f"expected one file from pip download {requirement}, got {files}")
    return files[0]


def unpack(archive: Path, dest: Path, *, error: type[Exception]) -> Path:
    """Extract a source archive (tar or zip) safely into ``dest``; return ``dest``."""
    import tarfile
    import zipfile

    dest.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
        return dest
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # Python without extraction filters: refuse unsafe member names
            for member in tf.getmembers():
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise error(f"unsafe path in {archive.name}: {member.name}")
            tf.extractall(dest)  # members checked above
    return dest


def cpu_flags() -> set[str] | None:
    """Return the CPU feature flags from /proc/cpuinfo, or None if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def isa_cmake_flags(options: Mapping[str, str]) -> list[str]:
    """``-D<option>=ON|OFF`` for each ``{cmake option: cpu flag}``: ON when the CPU has it (or is unknown)."""
    cpu = cpu_flags()
    return [f"-D{option}={'ON' if cpu is None or flag in cpu else 'OFF'}" for option, flag in options.items()]


def check_build_tools(what: str, *, error: type[Exception]) -> None:
    """Fail early, with advice, when no C++ compiler or make is available."""
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    missing = [] if any(c and shutil.which(c) for c in compilers) else ["a C++ compiler"]
    missing += [] if shutil.which("make") else ["make"]
    if missing:
        raise error(
            f"building {what} needs {', '.join(missing)} on PATH (Debian/Ubuntu: apt-get install build-essential cmake)"
        )


def find_cmake(work: Path, log: Path, *, error: type[Exception]) -> str:
    """``cmake`` from PATH, else installed from PyPI into ``work`` (logged to ``log``); return its path."""
    found = shutil.which("cmake")
    if found:
        return found
    target = work / "cmake-pip"
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--target", str(target), "cmake"]
    run_logged(cmd, log, error=error)
    for candidate in target.glob("cmake/data/bin/cmake"):
        return str(candidate)
    raise error(f"no cmake found on PATH nor in the PyPI cmake package; see {log}")


def fmt_duration(seconds: float) -> str:
    """``"4m05s"``, or ``"12.3s"`` under a minute."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


class BuildProgress:
    """Turn build lines (make's ``[ 42%] ...``, ninja's ``[12/70] ...``) into a message every 10 % or 20 s."""

    def __init__(self, say: Say) -> None:
        self.say = say
        self.started = time.monotonic()
        self.last_time = self.started
        self.last_pct = -100

    def update(self, line: bytes) -> None:
        pct = _percent(line)
        if pct is None:
            return
        now = time.monotonic()
        if pct - self.last_pct >= 10 or now - self.last_time >= 20:
            self.say(f"  build {pct:3d}% ({fmt_duration(now - self.started)} elapsed)")
            self.last_pct, self.last_time = pct, now


def _percent(line: bytes) -> int | None:
    """Build progress in percent from one output line, or None if the line shows none."""
    line = line.lstrip()
    if not line.startswith(b"[") or b"]" not in line:
        return None
    inside = line[1 : line.index(b"]")].strip()
    try:
        if inside.endswith(b"%"):
            return int(inside[:-1])
        done, _, total = inside.partition(b"/")
        return int(100 * int(done) / int(total)) if total else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- running


def spawn_detached(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> int:
    """Start ``cmd`` in a new session with its output in ``log_path`` (after a ``$ cmd`` line); return its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def start_on_port(
    port: int | None,
    launch: Callable[[int], T],
    *,
    error: type[Exception],
    bind_error: type[Exception],
    host: str = HOST,
) -> T:
    """Return ``launch(port)``; with ``port=None`` on a free port, tried up to 3 times on ``bind_error``.

    A picked port may be taken by someone else before the process binds it.
    """
    if port is not None and not port_free(port, host):
        raise error(f"port {port} on {host} is already in use")
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        try:
            return launch(port if port is not None else free_port(host))
        except bind_error:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")


def wait_ready(
    pid: int,
    log_path: Path,
    ready: Callable[[], bool],
    timeout: float,
    *,
    what: str,
    error: type[Exception],
    bind_error: type[Exception],
    bind_marker: str,
) -> None:
    """Poll ``ready()`` until it is true; on failure or interruption stop ``pid`` and raise.

    If the process exits first, raises ``bind_error`` when its log tail contains
    ``bind_marker``, else ``error``; both with the log tail.
    """
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not is_alive(pid):
                last = tail(log_path)
                exc = bind_error if bind_marker in last else error
                raise exc(f"{what} exited during startup; last lines of {log_path}:\n{last}")
            if ready():
                return
            time.sleep(0.05)
    except BaseException:  # e.g. KeyboardInterrupt: do not leave the process behind
        terminate(pid, 2.0, error=error)
        raise
    terminate(pid, 2.0, error=error)
    raise error(f"{what} not ready after {timeout:g}s; last lines of {log_path}:\n{tail(log_path)}")


def http_status(port: int, path: str, *, host: str = HOST, timeout: float = 2.0) -> int | None:
    """HTTP status of ``GET path`` on ``host`` (no proxies involved), or None if unreachable."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(port: int, host: str = HOST) -> bool:
    """True if no socket listens on ``port`` on ``host``, so a server can bind it now.

    SO_REUSEADDR, as every server here sets it: a port whose last server was killed keeps its closed
    connections in TIME_WAIT for a minute, which a plain bind counts as "in use" but a server does not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def is_alive(pid: int) -> bool:
    """True if ``pid`` runs (our own exited children are reaped here; zombies count as dead)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie whose parent does not reap it counts as dead
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def terminate(pid: int, timeout: float, *, error: type[Exception]) -> None:
    """SIGTERM ``pid``, wait up to ``timeout`` s, then SIGKILL; no error if already gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_alive(pid):
                return
            time.sleep(0.05)
    raise error(f"process {pid} did not exit after SIGKILL")


# --------------------------------------------------------------------------- CLI


def run_cli(func: Callable[[], int], error: type[Exception]) -> int:
    """Return ``func()``; print ``error: <message>`` to stderr and return 1 if it raises ``error``."""
    try:
        return int(func())
    except error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


@dataclass(frozen=True, kw_only=True)
class RunningServer:
    """A server process running on 127.0.0.1 in its own session; subclasses name their error class."""

    pid: int
    port: int
    log_path: Path

    error: ClassVar[type[Exception]] = RuntimeError
    stop_timeout: ClassVar[float] = 5.0  # seconds between SIGTERM and SIGKILL

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds; default ``stop_timeout``)."""
        terminate(self.pid, self.stop_timeout if timeout is None else timeout, error=self.error)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True, kw_only=True)
class ModelServer(RunningServer):
    """An OpenAI-compatible model server: its API base and the model name it serves."""

    alias: str

    @property
    def base_url(self) -> str:
        """OpenAI-style API base, e.g. ``http://127.0.0.1:8080/v1``."""
        return f"http://{HOST}:{self.port}/v1"
