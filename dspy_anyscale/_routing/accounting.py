"""Which member answered, for a Router's own accounting: its ``history`` (each answered call's entries,
which the member recorded with ``endpoint`` = the member's name), its ``usage`` (the members' records)
and a price when every member has the same one.

The members do the recording (history entries, usage records, spans): a routed call runs inside
``routed(name)`` (``_observe.Route``), which names the member and collects the entries it recorded.
"""

from __future__ import annotations

from typing import Any

from dspy.dsp.utils import settings

from .._observe import Route
from .members import leaves
from .shape import RouterParts


def remember(router: RouterParts, entries: list[dict[str, Any]], parent: Route | None) -> None:
    """An answered call's history entries (the member recorded them) go into the Router's history too,
    and up to the Router this one is a member of."""
    if not entries:  # history is off (settings.disable_history): the member recorded nothing
        return
    if parent is not None:
        parent.entries.extend(entries)
    limit = settings.max_history_size
    if not limit:
        return
    history = router.history
    for entry in entries:
        if len(history) >= limit:
            del history[0]
        history.append(entry)


def usage_of(router: RouterParts) -> list[Any]:
    """The usage records of the members' latest calls, oldest first (a record shared by copies, once)."""
    records: dict[int, Any] = {}
    for lm in leaves(router):
        for record in lm.usage:
            records[id(record)] = record
    return sorted(records.values(), key=lambda record: record.timestamp)


def common_cost(router: RouterParts, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
    """USD for these counts when every member has the same prices (None when they differ or are unknown)."""
    costs = {lm.cost_of(prompt_tokens, completion_tokens) for lm in leaves(router)}
    return costs.pop() if len(costs) == 1 else None
