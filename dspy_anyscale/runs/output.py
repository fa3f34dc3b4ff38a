"""Where a run's rows go as they finish, and reading them back for a resumed run.

Three kinds of output, chosen by the path (``_validate.check_output``):

* ``results.jsonl`` (or ``.ndjson``), a file on this machine: one JSON object per line, appended as
  rows finish. Each write is flushed to the operating system at once, so a killed process (SIGKILL,
  the OOM killer, a closed laptop, Ctrl-C) loses only the rows in flight; ``fsync`` (for a machine
  that loses power) runs at most once a second (``RUNS_FSYNC_INTERVAL_S``) and when the run ends.
  A line cut short by a kill is dropped when the run is resumed. The manifest sits beside the
  file, ``results.jsonl.manifest.json``.
* ``results/`` (a path without a suffix), on any filesystem pyarrow or fsspec can write: a
  directory of Parquet part files, one row group each, written every ``RUNS_PARQUET_PART_ROWS``
  rows or ``RUNS_PARQUET_PART_SECONDS`` seconds. A part is whole or absent (written under a
  temporary name and renamed on a local disk; an object store writes objects whole), so a kill
  loses the rows in flight and those of the part being filled. The manifest is
  ``results/_manifest.json`` (readers of Parquet datasets skip names that start with ``_``).
* ``results.parquet``: the same parts, in ``results.parquet.parts/`` while the run goes on, merged
  into the one file (one row group per part) when the run completes.

A row that was run again (``retry_errors=True``, or a row a budget refused) is appended again; the
later one wins when an output is read, and a run that completes rewrites its output with each row
once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from .. import _constants as C
from ..errors import ConfigurationError
from .manifest import Manifest
from .rows import ROW_ID

logger = logging.getLogger(C.LOGGER_NAME)

_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY


class RowWriter(Protocol):
    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Make these rows durable against a killed process before returning."""

    def tick(self) -> None:
        """Called when nothing else happens: time-based flushes."""

    def close(self) -> None: ...


class Store(Protocol):
    """One output: its manifest, its rows, a writer that appends to it, and the rewrite at the end."""

    shown: str  # the output as the user named it, for messages

    def read_manifest(self) -> Manifest | None: ...

    def read_rows(self) -> list[dict[str, Any]]:
        """Every row written so far, in the order written (a row run twice appears twice)."""

    def open(self, manifest: Manifest, *, fresh: bool) -> RowWriter:
        """A writer; ``fresh``: start the output over (with this manifest), else append to it."""

    def finish(self, rows: Sequence[Mapping[str, Any]], *, rewrite: bool) -> None:
        """The run completed: ``rows`` are its output, each row once. ``rewrite``: the output holds
        rows twice (run again), so it is rewritten with ``rows``."""


def open_store(output: str | os.PathLike[str], kind: str, filesystem: Any = None) -> Store:
    """The store for a checked ``output`` of ``kind`` (see ``_validate.check_output``)."""
    if kind == "jsonl":
        return JsonlStore(output)
    try:
        from .parquet import ParquetStore  # pyarrow: only for a Parquet output
    except ImportError as exc:
        if not (exc.name or "").startswith("pyarrow"):
            raise
        raise ConfigurationError(
            f"output={os.fspath(output)!r} is written as Parquet, which needs pyarrow: "
            "pip install 'dspy-anyscale[parquet]', or name a .jsonl file"
        ) from None
    return ParquetStore(output, single_file=kind == "parquet_file", filesystem=filesystem)


def latest_by_id(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``row_id`` -> the last row written with it (a row run again supersedes the earlier one)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        row_id = row.get(ROW_ID)
        if row_id is not None:
            latest.pop(str(row_id), None)  # keeps the order of last writes
            latest[str(row_id)] = dict(row)
    return latest


def json_default(value: Any) -> Any:
    """What orjson cannot write itself (bytes, a model, any object): a model as its fields, the rest as text."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def json_lines(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(row, default=json_default, option=_JSON_OPTIONS) for row in rows)


# --- JSONL ---------------------------------------------------------------------------------------


class JsonlStore:
    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.shown = os.fspath(output)
        self.path = os.path.abspath(os.path.expanduser(self.shown.removeprefix("file://")))
        self.manifest_path = self.path + C.RUNS_MANIFEST_SUFFIX

    def read_manifest(self) -> Manifest | None:
        try:
            with open(self.manifest_path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        try:
            return Manifest.from_json(data, self.manifest_path)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    def read_rows(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        rows = []
        for number, line in enumerate(lines[:-1], start=1):  # the last piece has no newline: cut by a kill
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ConfigurationError(
                    f"{self.shown}:{number} is not a JSON row ({exc}); this output cannot be resumed as it is"
                ) from None
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def open(self, manifest: Manifest, *, fresh: bool) -> JsonlWriter:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if fresh:
            _replace_file(self.manifest_path, manifest.to_json())
            open(self.path, "wb").close()  # truncate: nothing of an earlier run is kept
        else:
            _drop_cut_line(self.path)
        return JsonlWriter(self.path)

    def finish(self, rows: Sequence[Mapping[str, Any]], *, rewrite: bool) -> None:
        if rewrite:
            _replace_file(self.path, json_lines(rows))


class JsonlWriter:
    def __init__(self, path: str) -> None:
        self._file = open(path, "ab")  # noqa: SIM115  # kept open for the run; closed by close()
        self._synced = time.monotonic()
        self._dirty = False

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._file.write(json_lines(rows))
        self._file.flush()  # in the operating system's hands: a killed process loses nothing written
        self._dirty = True
        self.tick()

    def tick(self) -> None:
        if self._dirty and time.monotonic() - self._synced >= C.RUNS_FSYNC_INTERVAL_S:
            self._sync()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            if self._dirty:
                self._sync()
        finally:
            self._file.close()

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced = time.monotonic()
        self._dirty = False


def _drop_cut_line(path: str) -> None:
    """Cut a last line that a killed writer left without its newline, so that appending goes on from a
    whole line (the rows in it were never written: the resumed run runs them again)."""
    try:
        with open(path, "rb+") as file:
            size = file.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                start = max(0, end - C.RUNS_TAIL_READ_BYTES)
                file.seek(start)
                chunk = file.read(end - start)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end != size:
                file.truncate(end)
    except FileNotFoundError:
        open(path, "wb").close()


def _replace_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file, synced, renamed over it."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
