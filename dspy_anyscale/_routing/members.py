"""A Router's members: naming and checking them, and what is known of each (its ``Anyscale`` leaves, its
context window).

A member is an ``Anyscale`` or a ``Router`` (a nested group). A list of members is named
``model@host:port`` each (a second with the same name gets ``#2``), as LiteLLM names deployments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .._config import endpoint_name
from .._validate import fail
from ..anyscale import Anyscale
from ..catalog import model_info
from ..errors import ConfigurationError
from .options import check_name


def named_members(members: Any, router_class: type[Any]) -> dict[str, Any]:
    """``members`` (a dict of name -> LM, or a list of LMs) as a dict of checked, distinct members: each an
    ``Anyscale`` or a ``router_class``."""
    if isinstance(members, Mapping):
        named = {check_name(name, f"members key {name!r}"): lm for name, lm in members.items()}
    elif isinstance(members, Sequence) and not isinstance(members, str | bytes):
        named = {}
        for lm in members:
            named[unique_name(default_name(lm), named)] = lm
    else:
        fail("members", "a dict of name -> Anyscale (or Router), or a list of them", members, show=False)
    if not named:
        raise ConfigurationError("a Router needs at least one member: Router({'primary': Anyscale(...), ...})")
    _check_members(named, router_class)
    return named


def _check_members(named: Mapping[str, Any], router_class: type[Any]) -> None:
    seen: dict[int, str] = {}
    for name, lm in named.items():
        if not isinstance(lm, Anyscale | router_class):
            fail(f"members[{name!r}]", "a dspy_anyscale.Anyscale or Router", lm, show=False)
        if id(lm) in seen:
            raise ConfigurationError(
                f"members {seen[id(lm)]!r} and {name!r} are the same LM object: give each member its own "
                "(lm.copy() shares the connection)"
            )
        seen[id(lm)] = name


def unique_name(base: str, taken: Mapping[str, Any]) -> str:
    """``base``, or ``base#2``, ``base#3``... the first that is not taken."""
    name, count = base, 1
    while name in taken:
        count += 1
        name = f"{base}#{count}"
    return name


def default_name(lm: Any) -> str:
    """``model@host:port`` for an ``Anyscale`` (what the list form names it), a Router's model for a Router."""
    if isinstance(lm, Anyscale):
        return f"{lm.model}@{endpoint_name(lm.api_base)}"
    return str(getattr(lm, "model", type(lm).__name__))


def leaves(lm: Any) -> Iterator[Anyscale]:
    """The ``Anyscale`` members under ``lm`` (itself for an ``Anyscale``; a nested Router's, recursively)."""
    if isinstance(lm, Anyscale):
        yield lm
        return
    for member in lm.members.values():
        yield from leaves(member)


def context_window(lm: Any) -> int | None:
    """A member's known context window (the smallest of a Router's members), from the catalogue."""
    windows = []
    for leaf in leaves(lm):
        info = model_info(leaf.model)
        if info is None:
            return None
        windows.append(info.context_window)
    return min(windows) if windows else None
