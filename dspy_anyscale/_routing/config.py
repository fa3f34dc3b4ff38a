"""A Portkey-style config as the members a Router builds and the strategy it uses. Pure: nothing is built here.

    {"strategy": {"mode": "fallback" | "loadbalance", "on_status_codes": [429, 500, 503]},
     "targets": [{"provider": "openai", "custom_host": "http://10.0.0.5:8000/v1", "api_key": "...",
                  "override_params": {"model": "meta-llama/Llama-3-70b", "temperature": 0.2},
                  "weight": 0.9},
                 {"strategy": {...}, "targets": [...]}]}      # a nested group: a Router as a member

What each key becomes:

* ``strategy.mode``: ``fallback`` → ``strategy="fallback"``; ``loadbalance`` → ``strategy="weighted"``
  with the targets' ``weight`` (default 1, as Portkey's). ``on_status_codes`` → ``fallback_on=[...]``.
* a target's ``custom_host`` → ``api_base``, ``api_key`` → ``api_key``, ``override_params.model`` →
  the model; the other ``override_params`` must be generation parameters (``temperature``,
  ``max_tokens``, ...) and become the member's defaults. ``retry.attempts`` → ``num_retries``,
  ``request_timeout`` (milliseconds, as Portkey's) → ``timeout``. ``provider`` is ``openai`` or
  ``anyscale`` (OpenAI-compatible servers); ``name`` (not Portkey's) names the member.
* ``override_params``, ``retry`` and ``request_timeout`` at a group's level apply to every target
  below it (a target's own win).

Anything else (``virtual_key``, ``cache``, ``conditional`` mode, a typo) is refused with a
``ConfigurationError`` that names its path, e.g. ``targets[1].override_params.temprature``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _constants as C
from .._params import PARAMETERS
from ..errors import ConfigurationError
from .strategies import Strategy

_MODES: dict[str, Strategy] = {"fallback": "fallback", "loadbalance": "weighted"}
_PROVIDERS = ("openai", "anyscale")
_INHERITED = ("override_params", "retry", "request_timeout")
_GROUP_KEYS = frozenset({"strategy", "targets", "name", "weight", *_INHERITED})
_TARGET_KEYS = frozenset({"provider", "api_key", "custom_host", "name", "weight", *_INHERITED})
_STRATEGY_KEYS = frozenset({"mode", "on_status_codes"})
# Portkey keys this package cannot honour, and what to do instead.
_NOT_HERE = {
    "virtual_key": "a virtual key lives in Portkey's hosted gateway: point an Anyscale at it instead "
    "(Anyscale(api_base=PORTKEY_GATEWAY_URL, headers=portkey_headers(...)), see the gateway docs)",
    "cache": "DSPy caches answers itself: pass cache=True/False to Router.from_config(config, cache=...)",
    "conditions": "conditional routing is not supported: use mode 'fallback' or 'loadbalance'",
    "default": "conditional routing is not supported: use mode 'fallback' or 'loadbalance'",
}
# A generation parameter in override_params that is not a default of a member (it is per call).
_PER_CALL = frozenset({"cache", "rollout_id", "metadata"})


@dataclass(frozen=True)
class TargetSpec:
    """One service to build an ``Anyscale`` for."""

    path: str  # where it is in the config, for messages
    model: str
    name: str | None = None
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)
    params: Mapping[str, Any] = field(default_factory=dict)  # generation defaults
    num_retries: int | None = None
    timeout_s: float | None = None
    weight: float | None = None


@dataclass(frozen=True)
class GroupSpec:
    """A group of targets: the Router (nested: a member Router) to build."""

    path: str
    strategy: Strategy
    targets: tuple[TargetSpec | GroupSpec, ...]
    on_status_codes: tuple[int, ...] | None = None
    name: str | None = None
    weight: float | None = None


def parse_config(config: Any) -> GroupSpec:
    """The group a Portkey-style config describes, every key checked."""
    if not isinstance(config, Mapping):
        raise ConfigurationError(
            f"config must be a dict (a Portkey config: {{'strategy': {{'mode': ...}}, 'targets': [...]}}), "
            f"got {type(config).__name__}"
        )
    return _group(config, "config", {})


def _group(node: Mapping[str, Any], path: str, inherited: Mapping[str, Any]) -> GroupSpec:
    _check_keys(node, path, _GROUP_KEYS)
    strategy, codes = _strategy(node.get("strategy"), f"{path}.strategy")
    targets = node.get("targets")
    if not isinstance(targets, Sequence) or isinstance(targets, str | bytes) or not targets:
        raise ConfigurationError(f"{path}.targets must be a non-empty list of targets, got {_shown(targets)}")
    below = _inherit(inherited, node, path)
    members = tuple(_member(target, f"{path}.targets[{index}]", below) for index, target in enumerate(targets))
    return GroupSpec(
        path=path,
        strategy=strategy,
        targets=members,
        on_status_codes=codes,
        name=_optional_text(node, "name", path),
        weight=_weight(node, path),
    )


def _member(node: Any, path: str, inherited: Mapping[str, Any]) -> TargetSpec | GroupSpec:
    if not isinstance(node, Mapping):
        raise ConfigurationError(f"{path} must be a dict (a target), got {_shown(node)}")
    if "targets" in node or "strategy" in node:
        return _group(node, path, inherited)
    return _target(node, path, inherited)


def _target(node: Mapping[str, Any], path: str, inherited: Mapping[str, Any]) -> TargetSpec:
    _check_keys(node, path, _TARGET_KEYS)
    provider = node.get("provider", "openai")
    if provider not in _PROVIDERS:
        raise ConfigurationError(
            f"{path}.provider must be one of {', '.join(map(repr, _PROVIDERS))} (an OpenAI-compatible server); "
            f"got {provider!r}"
        )
    merged = _inherit(inherited, node, path)
    params = dict(merged.get("override_params") or {})
    model = params.pop("model", None)
    if not isinstance(model, str) or not model.strip():
        raise ConfigurationError(f"{path}.override_params.model must name the model the target serves, got {model!r}")
    for name in params:
        if name not in PARAMETERS or name in _PER_CALL:
            raise ConfigurationError(
                f"{path}.override_params.{name}: not a generation parameter a member can default to (they are: "
                f"{', '.join(sorted(set(PARAMETERS) - _PER_CALL))}); pass other options to "
                "Router.from_config(config, **member_kw)"
            )
    return TargetSpec(
        path=path,
        model=model,
        name=_optional_text(node, "name", path),
        api_base=_optional_text(node, "custom_host", path),
        api_key=_optional_text(node, "api_key", path),
        params=params,
        num_retries=_attempts(merged.get("retry"), path),
        timeout_s=_timeout(merged.get("request_timeout"), path),
        weight=_weight(node, path),
    )


def _inherit(inherited: Mapping[str, Any], node: Mapping[str, Any], path: str) -> dict[str, Any]:
    """What a group passes down, with ``node``'s own settings over it (``override_params`` merged key by key)."""
    merged = dict(inherited)
    for key in _INHERITED:
        if key not in node:
            continue
        value = node[key]
        if key == "override_params":
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"{path}.override_params must be a dict, got {_shown(value)}")
            merged[key] = {**(merged.get(key) or {}), **value}
        elif key == "retry":
            if not isinstance(value, Mapping) or set(value) != {"attempts"}:
                raise ConfigurationError(
                    f"{path}.retry must be {{'attempts': N}} (DSPy retries 429s, 5xx, timeouts and connection "
                    f"errors with backoff: which statuses is not a setting), got {_shown(value)}"
                )
            merged[key] = value
        else:
            merged[key] = value
    return merged


def _strategy(node: Any, path: str) -> tuple[Strategy, tuple[int, ...] | None]:
    if node is None:
        return "fallback", None
    if not isinstance(node, Mapping):
        raise ConfigurationError(f"{path} must be a dict such as {{'mode': 'fallback'}}, got {_shown(node)}")
    _check_keys(node, path, _STRATEGY_KEYS)
    mode = node.get("mode")
    if mode not in _MODES:
        hint = " (conditional routing is not supported)" if mode == "conditional" else ""
        raise ConfigurationError(f"{path}.mode must be 'fallback' or 'loadbalance'{hint}; got {mode!r}")
    codes = node.get("on_status_codes")
    if codes is None:
        return _MODES[mode], None
    if isinstance(codes, str | bytes) or not isinstance(codes, Sequence) or not codes:
        raise ConfigurationError(f"{path}.on_status_codes must be a non-empty list of HTTP statuses, got {codes!r}")
    for index, code in enumerate(codes):
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise ConfigurationError(f"{path}.on_status_codes[{index}] must be an HTTP status (100-599), got {code!r}")
    return _MODES[mode], tuple(codes)


def _check_keys(node: Mapping[str, Any], path: str, known: frozenset[str]) -> None:
    for key in node:
        if key in _NOT_HERE:
            raise ConfigurationError(f"{path}.{key}: {_NOT_HERE[key]}")
        if key not in known:
            raise ConfigurationError(f"{path}.{key}: unknown key here; this level takes {', '.join(sorted(known))}")


def _optional_text(node: Mapping[str, Any], key: str, path: str) -> str | None:
    value = node.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(f"{path}.{key} must be a non-empty string, got {type(value).__name__}")
    return value


def _weight(node: Mapping[str, Any], path: str) -> float | None:
    weight = node.get("weight")
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
        raise ConfigurationError(f"{path}.weight must be a number >= 0, got {weight!r}")
    return float(weight)


def _attempts(retry: Any, path: str) -> int | None:
    if retry is None or "attempts" not in retry:
        return None
    attempts = retry["attempts"]
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ConfigurationError(f"{path}.retry.attempts must be an integer >= 0, got {attempts!r}")
    return attempts


def _timeout(milliseconds: Any, path: str) -> float | None:
    if milliseconds is None:
        return None
    if (
        isinstance(milliseconds, bool)
        or not isinstance(milliseconds, int | float)
        or not math.isfinite(milliseconds)
        or milliseconds <= 0
    ):
        raise ConfigurationError(f"{path}.request_timeout must be a number of milliseconds > 0, got {milliseconds!r}")
    return milliseconds / 1000


def weights_of(group: GroupSpec, names: Sequence[str]) -> dict[str, float] | None:
    """The weights of a loadbalance group's members (Portkey's default weight for a target without one)."""
    if group.strategy != "weighted":
        return None
    return {
        name: C.ROUTER_DEFAULT_WEIGHT if target.weight is None else target.weight
        for name, target in zip(names, group.targets, strict=True)
    }


def _shown(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, str | int | float | type(None)) else repr(value)
