"""The rows of an in-memory dataset (a list of dicts or ``dspy.Example`` s) and the program's input columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dspy

from .._validate import check_dataset_items, check_input_keys, require_input_keys


def read_rows(dataset: Any, input_keys: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows as dicts, input keys): ``input_keys`` as given, else the examples' ``with_inputs`` keys."""
    items = check_dataset_items(dataset)
    rows = [dict(item.toDict() if isinstance(item, dspy.Example) else item) for item in items]
    keys = input_keys if input_keys is not None else declared_inputs(items)
    columns: set[str] | None = set().union(*(row.keys() for row in rows)) if rows else None
    return rows, check_input_keys(keys, columns)


def declared_inputs(items: Sequence[Any]) -> list[str]:
    declared = [set(item.inputs().keys()) for item in items if isinstance(item, dspy.Example) and item._input_keys]
    if not declared:
        require_input_keys()
    return sorted(set.union(*declared))
