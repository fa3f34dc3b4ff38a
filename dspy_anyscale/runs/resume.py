"""Going on from an output: what is there, which rows are done, and whether they belong to this run.

A row is done when its ``error`` is None, or when it failed and ``retry_errors`` is False. A row a
budget refused (``error`` starting ``BudgetExceededError:``) was not run, or not all of it: it is
run again whatever ``retry_errors`` says, so that a resumed run with a bigger budget finishes the
job. An output whose manifest differs from this run's (signatures, input columns, id column,
metric) is refused before anything runs; an output that holds rows and no manifest too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .. import _constants as C
from ..errors import ConfigurationError
from .budget import is_budget_error
from .manifest import Manifest, differences
from .output import RowWriter, Store, latest_by_id

logger = logging.getLogger(C.LOGGER_NAME)


@dataclass
class Earlier:
    """The rows an output held when the run started: the last one written for each ``row_id``."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: int = 0  # rows in the output, a row written twice counted twice

    def done(self, row_id: str, *, retry_errors: bool) -> dict[str, Any] | None:
        """The earlier row if it needs no new run, else None."""
        row = self.rows.get(row_id)
        if row is None:
            return None
        error = row.get("error")
        if error is None:
            return row
        if is_budget_error(error) or retry_errors:
            return None
        return row


def prepare(store: Store, manifest: Manifest, *, resume: bool) -> tuple[Earlier, RowWriter]:
    """Read the output, check that it belongs to this run, and open it for appending (or start it)."""
    rows = store.read_rows()
    if not rows:  # nothing to keep: a new output (a manifest left by a run killed before its first row goes)
        return Earlier(), store.open(manifest, fresh=True)
    if not resume:
        raise ConfigurationError(
            f"output={store.shown!r} already holds {len(rows)} rows of an earlier run: pass resume=True to go on "
            "from them (retry_errors=True to run its error rows again too), or name another output (or delete "
            "this one) to start over"
        )
    check_belongs(store, manifest)
    return Earlier(latest_by_id(rows), len(rows)), store.open(manifest, fresh=False)


def check_belongs(store: Store, manifest: Manifest) -> None:
    old = store.read_manifest()
    if old is None:
        raise ConfigurationError(
            f"output={store.shown!r} holds rows but no manifest (what run wrote them): it was not written by "
            "a dspy_anyscale run, or its manifest was deleted; name another output to start over"
        )
    changes = differences(old, manifest)
    if changes:
        raise ConfigurationError(
            f"output={store.shown!r} holds rows of another run, which do not belong to this one: "
            f"{'; '.join(changes)}. Name another output (or delete this one) to start over"
        )
    if old.prompts != manifest.prompts:
        logger.warning(
            "dspy_anyscale: the program's instructions or demos changed since %s was started: its earlier rows "
            "were made by the earlier program (the signatures are the same, so they are kept)",
            store.shown,
        )
