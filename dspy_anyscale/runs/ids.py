"""A row's stable id (``row_id``): what a resumed run matches finished rows by.

Either the value of an id column the user names (``id_column="id"``), as text, or a digest of the
program's input fields: the first ``RUNS_ROW_ID_DIGITS`` hex digits of the SHA-256 of their JSON
(keys sorted, so the order of the columns does not matter). The same inputs give the same digest in
every process and on every machine, so a run resumed elsewhere finds its rows. Rows whose inputs are
identical get ``<digest>-2``, ``<digest>-3``, ... in the order they come: any two of them are the
same question to the program, so which is which does not change what it answers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .. import _constants as C
from .._validate import check_row_ids
from .rows import ROW_ID

_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def row_ids(rows: Sequence[Mapping[str, Any]], input_keys: Sequence[str], id_column: str | None) -> list[str]:
    """One id per row, in order; refused (``ConfigurationError``) when the id column has a missing
    or repeated value, since a resumed run could then not tell its rows apart."""
    if id_column is not None:
        ids = [id_text(row.get(id_column)) for row in rows]
        check_row_ids(ids, [row.get(id_column) for row in rows], id_column)
        return ids
    seen: dict[str, int] = {}
    ids = []
    for row in rows:
        digest = input_digest(row, input_keys)
        count = seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if count == 1 else f"{digest}-{count}")
    return ids


def id_text(value: Any) -> str:
    """An id column's value as the ``row_id`` text: 7 and "7" are the same row (JSON and Parquet
    may give a number back as either); None stays missing (``check_row_ids`` refuses it)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def input_digest(row: Mapping[str, Any], input_keys: Sequence[str]) -> str:
    payload = orjson.dumps({key: row.get(key) for key in input_keys}, default=str, option=_JSON_OPTIONS)
    return hashlib.sha256(payload).hexdigest()[: C.RUNS_ROW_ID_DIGITS]


def with_row_ids(rows: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    """The rows, each with its ``row_id`` column (it travels with the row to the workers and back)."""
    return [{**row, ROW_ID: row_id} for row, row_id in zip(rows, ids, strict=True)]
