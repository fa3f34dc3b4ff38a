"""A Router's saved state (``dump_state`` / ``load_state``, so ``program.save``/``load``): its members'
own states (never a key: each reads its key from the environment again), its strategy and the
options that differ from the defaults. Error classes and a ``routing_key`` function are saved by
their import path; a lambda cannot be, and is refused with what to do instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import dspy
from dspy.clients.base_lm import LM_CLASS_STATE_KEY

from .. import _constants as C
from ..anyscale import Anyscale
from ..errors import ConfigurationError
from .options import PROMPT_KEY
from .policy import DEFAULT_POLICY
from .shape import RouterParts

ROUTER_CLASS = "dspy_anyscale.router.Router"
_ANYSCALE_CLASS = "dspy_anyscale.anyscale.Anyscale"


def is_router_state(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` (an LM's ``dump_state()``) is a Router's."""
    return state.get(LM_CLASS_STATE_KEY) == ROUTER_CLASS


def sized_state(state: Mapping[str, Any], pool_size: int) -> dict[str, Any]:
    """A Router's saved state with every ``Anyscale`` member's ``pool_size`` set (a Ray worker's threads)."""
    members = {
        name: sized_state(member, pool_size) if is_router_state(member) else {**member, "pool_size": pool_size}
        for name, member in state["members"].items()
    }
    return {**state, "members": members}


def state_of(router: RouterParts) -> dict[str, Any]:
    """What ``router.dump_state()`` returns."""
    state: dict[str, Any] = {
        LM_CLASS_STATE_KEY: ROUTER_CLASS,
        "members": {name: lm.dump_state() for name, lm in router.members.items()},
        "strategy": router._strategy,
    }
    if router._strategy == "weighted":
        state["weights"] = dict(router._weights)
    if router._policy != DEFAULT_POLICY:
        state["fallback_on"] = [
            _class_path(entry) if isinstance(entry, type) else entry for entry in router._policy.describe()
        ]
    if router._allowed_fails != C.ROUTER_ALLOWED_FAILS:
        state["allowed_fails"] = router._allowed_fails
    if router._cooldown_s != C.ROUTER_COOLDOWN_S:
        state["cooldown_s"] = router._cooldown_s
    if router._interval_s is not None:
        state["health_check_interval_s"] = router._interval_s
    if router._routing_key is not None:
        state["routing_key"] = _saved_routing_key(router._routing_key)
    state.update(router._limits.as_kwargs())
    return state


def loaded(
    state: Mapping[str, Any], allow_custom_lm_class: bool, router_class: type[Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The members and the Router's options a saved state describes (members built, a nested Router's with
    ``router_class``; imports resolved)."""
    options = {key: value for key, value in state.items() if key not in (LM_CLASS_STATE_KEY, "members")}
    members = state.get("members")
    if not isinstance(members, Mapping) or not members:
        raise ConfigurationError("a saved Router's state must hold its members: {'members': {name: state}}")
    lms = {name: _load_member(member, allow_custom_lm_class, router_class) for name, member in members.items()}
    if "fallback_on" in options:
        options["fallback_on"] = [
            _import_class(entry) if isinstance(entry, str) else entry for entry in options["fallback_on"]
        ]
    if isinstance(options.get("routing_key"), str) and options["routing_key"] != PROMPT_KEY:
        options["routing_key"] = _import_callable(options["routing_key"])
    return lms, options


def _load_member(state: Any, allow_custom_lm_class: bool, router_class: type[Any]) -> Any:
    if not isinstance(state, Mapping):
        raise ConfigurationError(f"a saved Router member must be an LM's state (a dict), got {type(state).__name__}")
    class_path = state.get(LM_CLASS_STATE_KEY)
    if class_path == ROUTER_CLASS:
        return router_class.load_state(dict(state), allow_custom_lm_class=allow_custom_lm_class)
    if class_path == _ANYSCALE_CLASS:
        return Anyscale.load_state(dict(state))
    return dspy.BaseLM.load_state(dict(state), allow_custom_lm_class=allow_custom_lm_class)


def _class_path(cls: Any) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type[BaseException]:
    value = _import_callable(path)
    if not isinstance(value, type) or not issubclass(value, BaseException):
        raise ConfigurationError(f"fallback_on: {path!r} is not an error class")
    return value


def _import_callable(path: str) -> Any:
    module, _, qualname = path.partition(":")
    try:
        value: Any = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"a saved Router names {path!r}, which cannot be imported here: {exc}") from None
    return value


def _saved_routing_key(key: Any) -> str:
    if key == PROMPT_KEY:
        return PROMPT_KEY
    path = _class_path(key)
    if "<" in path:  # a lambda or a function defined inside another
        raise ConfigurationError(
            f"routing_key={key!r} cannot be saved: pass routing_key='prompt', or a function defined at the top "
            "of a module (saved as its import path)"
        )
    return path
