"""Parquet output: part files in a directory (or merged into one ``.parquet`` file when the run
completes), on the local disk, a URI pyarrow opens, or any pyarrow / fsspec filesystem.

``pip install 'dspy-anyscale[parquet]'`` (pyarrow; the ``ray`` extra has it too). See ``output.py``
for what a kill loses and how rows run twice are resolved.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]  # no stubs
import pyarrow.fs as pafs  # type: ignore[import-untyped]  # no stubs
import pyarrow.parquet as pq  # type: ignore[import-untyped]  # no stubs

from .. import _constants as C
from ..errors import ConfigurationError
from .manifest import Manifest
from .rows import PLAIN_DATA, ROW_ID, SCORE, USAGE_BY_MODULE, as_text

logger = logging.getLogger(C.LOGGER_NAME)

PART_PREFIX = "part-"
_TEMPORARY_PREFIX = "_tmp-"
# Columns whose type a run fixes, whatever the first rows hold (all None, say).
_KNOWN_TYPES = {
    ROW_ID: pa.string(),
    "error": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cost_usd": pa.float64(),
    "latency_ms": pa.float64(),
    USAGE_BY_MODULE: pa.string(),  # JSON text: one type whatever the modules (a struct would not be)
    SCORE: pa.float64(),
}
_ARROW_ERRORS = (pa.ArrowException, ValueError, TypeError, OverflowError)


class ParquetStore:
    """A directory of parts, or (``single_file``) a ``.parquet`` file with its parts beside it while written."""

    def __init__(self, output: str | os.PathLike[str], *, single_file: bool, filesystem: Any = None) -> None:
        self.shown = os.fspath(output)
        self.fs, path = resolve_filesystem(self.shown, filesystem)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.file: str | None = path if single_file else None
        self.parts = (path + C.RUNS_PARTS_SUFFIX) if single_file else path.rstrip("/")
        self.manifest_path = f"{self.parts}/{C.RUNS_MANIFEST_NAME}"

    # --- reading ---------------------------------------------------------------------------------

    def read_manifest(self) -> Manifest | None:
        data = self._read_bytes(self.manifest_path)
        if data is None and self.file is not None and self._exists(self.file):
            metadata = pq.read_schema(self.file, filesystem=self.fs).metadata or {}
            data = metadata.get(C.RUNS_PARQUET_METADATA_KEY.encode())
        if data is None:
            return None
        try:
            return Manifest.from_json(data, self.manifest_path)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    def read_rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if self.file is not None and self._exists(self.file):
            rows += pq.read_table(self.file, filesystem=self.fs).to_pylist()
        for part in self._part_paths():
            try:
                rows += pq.read_table(part, filesystem=self.fs).to_pylist()
            except (*_ARROW_ERRORS, OSError) as exc:  # a part cut short on a filesystem without rename
                logger.warning("dspy_anyscale: skipping %s, which cannot be read (%s); its rows run again", part, exc)
        return rows

    # --- writing ---------------------------------------------------------------------------------

    def open(self, manifest: Manifest, *, fresh: bool) -> ParquetPartWriter:
        if fresh:
            self._check_only_ours()
            self._delete(self._part_paths())
            if self.file is not None and self._exists(self.file):
                self.fs.delete_file(self.file)
        self.fs.create_dir(self.parts, recursive=True)
        self._delete(self._paths_starting(_TEMPORARY_PREFIX))  # a part a killed run was writing: never whole
        if fresh or self._read_bytes(self.manifest_path) is None:
            self._write_bytes(self.manifest_path, manifest.to_json())
        return ParquetPartWriter(self, manifest)

    def finish(self, rows: Sequence[Mapping[str, Any]], *, rewrite: bool) -> None:
        old_parts = self._part_paths()
        if self.file is not None:
            if not old_parts and not rewrite:
                return
            manifest = self.read_manifest()
            table = table_of(rows, None)
            if manifest is not None:
                metadata = {**(table.schema.metadata or {}), C.RUNS_PARQUET_METADATA_KEY.encode(): manifest.to_json()}
                table = table.replace_schema_metadata(metadata)
            self._write_table(self.file, table, row_group_size=C.RUNS_PARQUET_PART_ROWS)
            self._delete([*old_parts, self.manifest_path])
            self._delete_dir_if_empty(self.parts)
        elif rewrite:
            writer = ParquetPartWriter(self, None)
            for start in range(0, len(rows), C.RUNS_PARQUET_PART_ROWS):
                writer.write_part(rows[start : start + C.RUNS_PARQUET_PART_ROWS])
            self._delete(old_parts)  # after the new parts exist: a kill in between leaves rows twice, never none

    def write_part(self, name: str, table: Any) -> None:
        self._write_table(f"{self.parts}/{name}", table)

    # --- the filesystem --------------------------------------------------------------------------

    def _part_paths(self) -> list[str]:
        return self._paths_starting(PART_PREFIX)

    def _paths_starting(self, prefix: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.parts, allow_not_found=True))
        names = [info.path for info in infos if info.type == pafs.FileType.File]
        return sorted(path for path in names if _basename(path).startswith(prefix))

    def _check_only_ours(self) -> None:
        """A new run empties its directory of the parts of an earlier one: never of someone else's files."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.parts, allow_not_found=True))
        theirs = [
            _basename(info.path)
            for info in infos
            if not _basename(info.path).startswith((PART_PREFIX, _TEMPORARY_PREFIX, C.RUNS_MANIFEST_NAME))
        ]
        if theirs:
            raise ConfigurationError(
                f"output={self.shown!r} is a directory holding other files ({', '.join(sorted(theirs)[:3])}); "
                "a run writes Parquet parts into a directory of its own: name a new one"
            )

    def _exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type != pafs.FileType.NotFound)

    def _read_bytes(self, path: str) -> bytes | None:
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as stream:
            return bytes(stream.read())

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def _write_table(self, path: str, table: Any, **options: Any) -> None:
        """Whole or not at all: on a local disk under a temporary name, synced, then renamed (an
        object store writes an object whole by itself)."""
        if not self.local:
            pq.write_table(table, path, filesystem=self.fs, **options)
            return
        directory, name = path.rsplit("/", 1)
        temporary = f"{directory}/{_TEMPORARY_PREFIX}{name}"
        with open(temporary, "wb") as file:
            pq.write_table(table, file, **options)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)

    def _delete(self, paths: Sequence[str]) -> None:
        for path in paths:
            if self._exists(path):
                self.fs.delete_file(path)

    def _delete_dir_if_empty(self, path: str) -> None:
        if not self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            self.fs.delete_dir(path)


class ParquetPartWriter:
    """Buffers finished rows and writes them as a part every ``RUNS_PARQUET_PART_ROWS`` rows or
    ``RUNS_PARQUET_PART_SECONDS`` seconds; every part of a run has the columns' first types."""

    def __init__(self, store: ParquetStore, manifest: Manifest | None) -> None:
        self.store = store
        self.session = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + os.urandom(3).hex()
        self.count = 0
        self.schema: Any = None
        self.buffer: list[Mapping[str, Any]] = []
        self.since: float | None = None  # when the buffer's first row came

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if self.since is None:
            self.since = time.monotonic()
        self.buffer.extend(rows)
        if len(self.buffer) >= C.RUNS_PARQUET_PART_ROWS:
            self._flush()
        else:
            self.tick()

    def tick(self) -> None:
        if self.since is not None and time.monotonic() - self.since >= C.RUNS_PARQUET_PART_SECONDS:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        rows, self.buffer, self.since = self.buffer, [], None
        if rows:
            self.write_part(rows)

    def write_part(self, rows: Sequence[Mapping[str, Any]]) -> None:
        table = table_of(rows, self.schema)
        self.schema = table.schema if self.schema is None else self.schema
        self.count += 1
        self.store.write_part(f"{PART_PREFIX}{self.session}-{self.count:06d}.parquet", table)


def table_of(rows: Sequence[Mapping[str, Any]], schema: Any) -> Any:
    """The rows as an Arrow table: with ``schema`` (the run's first part's, grown by new columns) when
    they fit it, else with types of their own; a column mixing types becomes text, never an error."""
    if schema is not None:
        missing = sorted({key for row in rows for key in row} - set(schema.names))
        if missing:
            extra = _settled(pa.Table.from_pylist([{key: row.get(key) for key in missing} for row in rows]).schema)
            schema = pa.schema([*schema, *extra])
        try:
            return pa.Table.from_pylist(list(rows), schema=schema)
        except _ARROW_ERRORS as exc:
            logger.warning("dspy_anyscale: rows that do not fit the output's first types (%s): stored as they are", exc)
    mixed = mixed_columns(rows)
    plain = as_text([dict(row) for row in rows], mixed) if mixed else list(rows)
    # Every row's columns (from_pylist would take the first row's only: a failed row has no pred_
    # columns, a row of an older output no usage_by_module), in the order they first appear.
    names = list(dict.fromkeys(key for row in plain for key in row))
    inferred = pa.Table.from_pydict({name: [row.get(name) for row in plain] for name in names})
    return inferred.cast(_settled(inferred.schema))


def _settled(schema: Any) -> Any:
    """The run's own columns with their fixed types; a column of Nones (so far) as text."""
    fields = []
    for field in schema:
        kind = _KNOWN_TYPES.get(field.name, pa.string() if pa.types.is_null(field.type) else field.type)
        fields.append(pa.field(field.name, kind))
    return pa.schema(fields, metadata=schema.metadata)


def mixed_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Columns of plain data (str, numbers, lists, dicts) that Arrow cannot hold as one type, each
    with the type names it mixes. Columns of other Python objects are left alone."""
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for name, value in row.items():
            if value is not None:
                columns.setdefault(name, []).append(value)
    mixed = {}
    for name, values in columns.items():
        if not all(isinstance(value, PLAIN_DATA) for value in values):
            continue
        try:
            pa.array(values)
        except _ARROW_ERRORS:
            mixed[name] = sorted({type(value).__name__ for value in values})
    return mixed


def resolve_filesystem(output: str, filesystem: Any) -> tuple[Any, str]:
    """(a pyarrow filesystem, the path on it): the one given (an fsspec one wrapped), the one a URI
    names, or the local disk."""
    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
        return filesystem, output
    if "://" not in output:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(output)).replace(os.sep, "/")
    try:
        resolved, path = pafs.FileSystem.from_uri(output)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise ConfigurationError(
            f"output={output!r}: pyarrow cannot open this URI ({exc}); pass filesystem=... (a pyarrow or "
            "fsspec filesystem) with the path on it"
        ) from None
    return resolved, str(path)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
