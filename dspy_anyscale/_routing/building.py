"""``Router.from_config``: the Routers and ``Anyscale`` members a parsed Portkey-style config describes
(:mod:`.config` parses and checks it; this builds). A nested group becomes a member Router; a
member's wrong option is refused naming where in the config it came from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..anyscale import Anyscale
from ..errors import ConfigurationError
from .config import GroupSpec, TargetSpec, weights_of
from .members import default_name, unique_name


def build_group(group: GroupSpec, member_kw: Mapping[str, Any], router_class: type[Any]) -> Any:
    """The Router (of ``router_class``) ``group`` describes, its members built with ``member_kw``."""
    lms: dict[str, Any] = {}
    for target in group.targets:
        lm = (
            build_group(target, member_kw, router_class)
            if isinstance(target, GroupSpec)
            else _build_target(target, member_kw)
        )
        lms[unique_name(target.name or default_name(lm), lms)] = lm
    weights = weights_of(group, list(lms))
    fallback_on = list(group.on_status_codes) if group.on_status_codes is not None else None
    try:
        return router_class(lms, group.strategy, weights=weights, fallback_on=fallback_on)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{group.path}: {exc}") from None


def _build_target(target: TargetSpec, member_kw: Mapping[str, Any]) -> Anyscale:
    options: dict[str, Any] = {**member_kw, **target.params}
    if target.api_base is not None:
        options["api_base"] = target.api_base
    if target.api_key is not None:
        options["api_key"] = target.api_key
    if target.num_retries is not None:
        options["num_retries"] = target.num_retries
    if target.timeout_s is not None:
        options["timeout"] = target.timeout_s
    try:
        return Anyscale(target.model, **options)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{target.path}: {exc}") from None
