"""Every keyword parameter a user can pass, in one table, and the sorting of what they pass.

:data:`PARAMETERS` is the single source of truth: what each standard generation parameter is,
what value it takes, and which endpoints carry it. Every other set of names in the package
(what DSPy carries, what the engine declares to DSPy's adapters, which Config fields go to the
wire under their own name) is derived from it here. Adding a parameter is one row.

Any other keyword given to the constructor is a provider-specific extra (``repetition_penalty``,
``min_p``, ...) sent verbatim in every request body; DSPy's own call path (``lm(messages=...)``)
refuses unknown names, so extras travel per call only inside a ``dspy.lm15.Request``'s
``config.extensions`` or through the direct ``_generate`` path. Pure: no I/O.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import orjson

from .errors import InvalidParameterError, UnsupportedParameterError

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from ._dspy_types import Config, Request, lm15
else:
    from dspy import lm15

Kind = Literal["sampling", "generation", "tools", "call"]


# --- value checks: each returns True when the value is acceptable ------------------------------


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _in_range(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: _is_number(value) and low <= value <= high


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _is_stop(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list | tuple) and all(isinstance(item, str) and item for item in value)


def _is_logit_bias(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(token, str | int) and not isinstance(token, bool) and _in_range(-100, 100)(bias)
        for token, bias in value.items()
    )


def _is_logprobs(value: Any) -> bool:
    return isinstance(value, bool) or (_is_int(value) and value >= 0)


def _is_response_format(value: Any) -> bool:
    return isinstance(value, Mapping) or (isinstance(value, type) and hasattr(value, "model_json_schema"))


def _is_metadata(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(key, str) for key in value)


def _is_tool_choice(value: Any) -> bool:
    return value in ("auto", "none", "required") or isinstance(value, Mapping)


def _is_rollout_id(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | list | tuple)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


@dataclass(frozen=True)
class Param:
    """One standard parameter: its kind, the value it takes, and the endpoints that carry it.

    kind: ``sampling`` (a typed lm15 Config field sent under its own name), ``generation``
    (another knob DSPy carries), ``tools`` (per call only, chat only), ``call`` (DSPy's own
    control of the call, never sent).
    """

    name: str
    kind: Kind
    expects: str  # completes "must be ..." in an error message
    check: Callable[[Any], bool] = field(repr=False)
    chat_only: bool = False


PARAMETERS: Mapping[str, Param] = MappingProxyType(
    {
        p.name: p
        for p in (
            Param("temperature", "sampling", "a number from 0 to 2", _in_range(0, 2)),
            Param("max_tokens", "sampling", "a positive integer", _is_positive_int),
            Param("top_p", "sampling", "a number from 0 to 1", _in_range(0, 1)),
            Param("top_k", "sampling", "a positive integer", _is_positive_int),
            Param("seed", "sampling", "an integer", _is_int),
            Param("frequency_penalty", "sampling", "a number from -2 to 2", _in_range(-2, 2)),
            Param("presence_penalty", "sampling", "a number from -2 to 2", _in_range(-2, 2)),
            Param("max_completion_tokens", "generation", "a positive integer", _is_positive_int),
            Param("stop", "generation", "a non-empty string or a list of them", _is_stop),
            Param("logit_bias", "generation", "a dict of token id to a number from -100 to 100", _is_logit_bias),
            Param("logprobs", "generation", "True, False, or a non-negative integer", _is_logprobs),
            Param("top_logprobs", "generation", "an integer from 0 to 20", lambda v: _is_int(v) and 0 <= v <= 20),
            Param("user", "generation", "a non-empty string", _is_text),
            Param("metadata", "generation", "a dict with string keys", _is_metadata),
            Param("n", "generation", "a positive integer", _is_positive_int),
            Param(
                "response_format", "generation", "a dict or a pydantic model class", _is_response_format, chat_only=True
            ),
            Param("tools", "tools", "a list of tools", lambda v: isinstance(v, list | tuple), chat_only=True),
            Param("tool_choice", "tools", "'auto', 'none', 'required' or a dict", _is_tool_choice, chat_only=True),
            Param("parallel_tool_calls", "tools", "True or False", lambda v: isinstance(v, bool), chat_only=True),
            Param("cache", "call", "True or False", lambda v: isinstance(v, bool)),
            Param("rollout_id", "call", "an int, a string or None", _is_rollout_id),
        )
    }
)

# --- sets derived from the table --------------------------------------------------------------

# What DSPy's messages path carries (typed fields or verbatim extensions).
DSPY_GENERATION_KEYS = frozenset(name for name, p in PARAMETERS.items() if p.kind != "call")
# Call controls DSPy owns (cache lookup, cache-busting id), never sent to the server.
DSPY_CALL_KEYS = frozenset(name for name, p in PARAMETERS.items() if p.kind == "call")
# Typed lm15 Config fields that reach the wire under their own name, on both endpoints.
SAMPLING_FIELDS = tuple(name for name, p in PARAMETERS.items() if p.kind == "sampling")
TOOL_KEYS = frozenset(name for name, p in PARAMETERS.items() if p.kind == "tools")


def supported_params(*, chat: bool, tools: bool) -> frozenset[str]:
    """The parameter names an endpoint maps, as DSPy's adapters read them from the LM."""
    names = {
        name
        for name, p in PARAMETERS.items()
        if p.kind != "call" and (chat or not p.chat_only) and (tools or p.kind != "tools")
    }
    return frozenset(names | {"stream"})


# Other keys DSPy's messages path takes; the engine maps them or refuses them with the field's name.
_DSPY_OTHER_KEYS = frozenset({"service_tier", "store", "reasoning_effort", "prompt_cache", "safety_identifier"})
# Settings of the connection, which the engine owns: DSPy refuses them on a custom-engine LM.
CONNECTION_KEYS = frozenset({"api_key", "api_base", "base_url", "headers", "extra_headers", "timeout"})
# Old names of the direct surface that no server takes.
_DIRECT_TOOL_KEYS = (*sorted(TOOL_KEYS), "functions", "function_call")
_WELL_KNOWN = sorted(PARAMETERS)


# --- checks ----------------------------------------------------------------------------------


def check_value(name: str, value: Any) -> None:
    """Refuse a standard parameter whose value has the wrong type or range, naming both."""
    param = PARAMETERS.get(name)
    if param is None or value is None or param.check(value):
        return
    raise InvalidParameterError(
        f"{name} must be {param.expects}, got {_shown(value)}", parameter=name, expected=param.expects
    )


def check_values(options: Mapping[str, Any]) -> None:
    for name, value in options.items():
        check_value(name, value)


def check_extra(name: str, value: Any) -> None:
    """A provider-specific extra goes on the wire verbatim, so it must be JSON."""
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise InvalidParameterError(
            f"{name} is sent to the server verbatim, so it must be JSON (a string, number, bool, None, "
            f"list or dict of them), got {_shown(value)}: {exc}",
            parameter=name,
            expected="a JSON value",
        ) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:60] + '…'}"


def _guard_typo(key: str) -> None:
    """Refuse a key that looks like a misspelt standard parameter instead of sending it as an extra."""
    if key in PARAMETERS:
        return
    close = difflib.get_close_matches(key, _WELL_KNOWN, n=1, cutoff=0.8)
    if close:
        raise UnsupportedParameterError(
            f"Unknown parameter {key!r}: did you mean {close[0]!r}? (Unknown names are sent to the server as "
            "provider-specific parameters, so a misspelling would be silently ignored by it.)",
            features=[key],
        )


# --- sorting ---------------------------------------------------------------------------------


def split_constructor_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options DSPy carries on every call, provider-specific extras for the request body)."""
    carried: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in CONNECTION_KEYS:
            raise UnsupportedParameterError(
                f"{key} is not a generation parameter; pass it as the named argument of Anyscale(...)"
                + (" (headers=...)" if key == "extra_headers" else ""),
                features=[key],
            )
        if key in TOOL_KEYS:
            raise UnsupportedParameterError(
                "tools are per call, not per model: use a DSPy program (dspy.ReAct, dspy.ToolCalls) or a "
                "dspy.lm15.Request with tools=...",
                features=[key],
            )
        if key in PARAMETERS:
            carried[key] = value  # checked with the other defaults (_validate.check_generation_defaults)
        else:
            _guard_typo(key)
            check_extra(key, value)
            extras[key] = value
    return carried, extras


def check_program_call_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse, with a useful message, per-call keys DSPy's messages path cannot carry or values it would
    choke on."""
    for key, value in kwargs.items():
        if key in PARAMETERS:
            check_value(key, value)
            continue
        if key in _DSPY_OTHER_KEYS:
            continue
        _guard_typo(key)
        raise UnsupportedParameterError(
            f"{key!r} is a provider-specific parameter, which DSPy cannot carry per call. Set it once on the "
            f"constructor (Anyscale(..., {key}=...)), call lm._generate(prompt, {key}=...), or send a "
            f"dspy.lm15.Request with config=Config(extensions={{{key!r}: ...}}).",
            features=[key],
        )


@dataclass(frozen=True)
class DirectPlan:
    """A direct prompt call, sorted: the lm15 Config, how many candidates, DSPy's call controls."""

    config: Config
    n: int = 1
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    logprobs: bool = False

    def request(self, model: str, prompt: str) -> Request:
        return lm15.Request(model=model, messages=(lm15.Message.user(prompt),), config=self.config)

    def candidate_kwargs(self, index: int) -> dict[str, Any]:
        """DSPy call controls for candidate ``index``: each candidate gets its own cache entry."""
        kwargs = dict(self.call_kwargs)
        if index:
            base = kwargs.get("rollout_id")
            kwargs["rollout_id"] = [base, index] if base is not None else index
        return kwargs


def plan_direct_call(options: Mapping[str, Any], extensions: Mapping[str, Any]) -> DirectPlan:
    """Sort merged keyword options of a direct call into a :class:`DirectPlan`.

    ``extensions`` are ``config.extensions`` entries already decided by the caller (this
    package's directive: endpoint and cache identity).
    """
    options = dict(options)
    extras = dict(extensions)
    for key in _DIRECT_TOOL_KEYS:
        if options.pop(key, None) is not None:
            raise UnsupportedParameterError(
                f"{key}: a direct prompt call carries no tools; use a DSPy program (dspy.ReAct, dspy.ToolCalls) or "
                "lm(dspy.lm15.Request(..., tools=...))",
                features=[key],
            )
    check_values(options)
    call_kwargs = {key: options.pop(key) for key in DSPY_CALL_KEYS if key in options}
    n = options.pop("n", None) or 1
    fields = _typed_fields(options)
    for key, value in options.items():
        if value is None:
            continue
        _guard_typo(key)
        check_extra(key, value)
        extras[key] = value
    config = lm15.Config(**fields, extensions=extras or None)
    return DirectPlan(config, n, call_kwargs, logprobs=config.logprobs is not None)


def _typed_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Pop every option that has a typed Config field, spelled as Config wants it."""
    fields: dict[str, Any] = {name: options.pop(name) for name in SAMPLING_FIELDS if name in options}
    fields = {name: value for name, value in fields.items() if value is not None}
    alias = options.pop("max_completion_tokens", None)
    if alias is not None and fields.setdefault("max_tokens", alias) != alias:
        raise InvalidParameterError(
            "max_tokens and max_completion_tokens disagree; pass one", parameter="max_tokens", expected="one value"
        )
    stop = options.pop("stop", None)
    if stop:
        fields["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    user = options.pop("user", None)
    if user is not None:
        fields["user_id"] = user
    logprobs = _logprobs(options.pop("logprobs", None), options.pop("top_logprobs", None))
    if logprobs is not None:
        fields["logprobs"] = logprobs
    response_format = options.pop("response_format", None)
    if response_format is not None:
        fields["response_format"] = normalize_response_format(response_format)
    return fields


def _logprobs(logprobs: bool | int | None, top_logprobs: int | None) -> int | None:
    """OpenAI chat spelling (``logprobs=True, top_logprobs=k``) or completions spelling (``logprobs=k``)."""
    if logprobs is None or logprobs is False:
        if top_logprobs:
            raise InvalidParameterError(
                "top_logprobs requires logprobs=True", parameter="top_logprobs", expected="logprobs=True"
            )
        return None
    if logprobs is True:
        return top_logprobs or 0
    return logprobs


def normalize_response_format(spec: Any) -> dict[str, Any]:
    """A response format in any common spelling → lm15's ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "schema": ..., "name"?, "strict"?}``.

    Accepts a pydantic model class, OpenAI's ``{"type": "json_schema", "json_schema": {...}}``,
    Anyscale's ``{"type": "json_object", "schema": {...}}`` and lm15's own form.
    """
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
        return {"type": "json_schema", "name": spec.__name__, "schema": spec.model_json_schema()}
    if not isinstance(spec, Mapping) or spec.get("type") not in ("json_object", "json_schema"):
        raise InvalidParameterError(
            "response_format must be {'type': 'json_object'}, {'type': 'json_schema', 'json_schema': {...}}, "
            f"{{'type': 'json_object', 'schema': {{...}}}} or a pydantic model class; got {spec!r}",
            parameter="response_format",
            expected="a JSON-mode spec",
        )
    if spec["type"] == "json_object":
        schema = spec.get("schema")
        return {"type": "json_schema", "schema": schema} if isinstance(schema, Mapping) else {"type": "json_object"}
    nested = spec.get("json_schema")
    if isinstance(nested, Mapping):
        out = {"type": "json_schema", "schema": nested.get("schema", {})}
        out.update({key: nested[key] for key in ("name", "strict") if key in nested})
        return out
    return dict(spec)
