"""Sorting the keyword arguments users pass: what DSPy carries, what goes to the wire as a
provider-specific extra, and what is refused. Pure: no I/O.

DSPy's own call path (``lm(messages=...)`` from adapters) accepts only the OpenAI chat parameter
names; any other key it refuses. So provider-specific parameters (``repetition_penalty``,
``min_p``, ...) are taken by the constructor and sent on every request, or per call inside a
``dspy.lm15.Request``'s ``config.extensions`` or through the direct ``_generate`` path.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dspy.lm15 import Config, Request

from .errors import UnsupportedParameterError

# Generation options DSPy's chat-body ingestion maps (typed fields or verbatim extensions).
DSPY_GENERATION_KEYS = frozenset(
    {
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "logit_bias",
        "metadata",
        "n",
    }
)
# Call controls that DSPy owns (cache lookup, cache-busting id), never sent to the server.
DSPY_CALL_KEYS = frozenset({"cache", "rollout_id"})
# Other keys DSPy's messages path takes; the engine maps them or refuses them with the field's name.
_DSPY_OTHER_KEYS = frozenset({"service_tier", "store", "reasoning_effort", "prompt_cache", "safety_identifier"})
# Settings of the connection, which the engine owns: DSPy refuses them on a custom-engine LM.
CONNECTION_KEYS = frozenset({"api_key", "api_base", "base_url", "headers", "extra_headers", "timeout"})
_SAMPLING = ("temperature", "max_tokens", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty")
_WELL_KNOWN = sorted(DSPY_GENERATION_KEYS | DSPY_CALL_KEYS)
_WELL_KNOWN_SET = frozenset(_WELL_KNOWN)


def _guard_typo(key: str) -> None:
    """Refuse a key that looks like a misspelt standard parameter instead of sending it as an extra."""
    if key in _WELL_KNOWN_SET:
        return
    close = difflib.get_close_matches(key, _WELL_KNOWN, n=1, cutoff=0.8)
    if close and close[0] != key:
        raise UnsupportedParameterError(
            f"Unknown parameter {key!r}: did you mean {close[0]!r}? (Unknown names are sent to the server as "
            "provider-specific parameters, so a misspelling would be silently ignored by it.)",
            features=[key],
        )


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
        if key in DSPY_GENERATION_KEYS or key in DSPY_CALL_KEYS:
            carried[key] = value
        else:
            _guard_typo(key)
            extras[key] = value
    if "tools" in carried or "tool_choice" in carried:
        raise UnsupportedParameterError(
            "tools are per call, not per model: use a DSPy program (dspy.ReAct, dspy.ToolCalls) or a "
            "dspy.lm15.Request with tools=...",
            features=["tools"],
        )
    return carried, extras


def check_program_call_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse, with a useful message, per-call keys DSPy's messages path cannot carry."""
    for key in kwargs:
        if key in DSPY_GENERATION_KEYS or key in DSPY_CALL_KEYS or key in _DSPY_OTHER_KEYS:
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
        from dspy.lm15 import Message

        return Request(model=model, messages=(Message.user(prompt),), config=self.config)

    def candidate_kwargs(self, index: int) -> dict[str, Any]:
        """DSPy call controls for candidate ``index``: each candidate gets its own cache entry."""
        kwargs = dict(self.call_kwargs)
        if index:
            base = kwargs.get("rollout_id")
            kwargs["rollout_id"] = [base, index] if base is not None else index
        return kwargs


def plan_direct_call(options: Mapping[str, Any], extensions: Mapping[str, Any]) -> DirectPlan:
    """Sort merged keyword options of a direct call into a :class:`DirectPlan`.

    ``extensions`` are request-body extras already decided by the caller (the constructor's
    provider-specific parameters, this package's endpoint directive).
    """
    options = dict(options)
    extras = dict(extensions)
    call_kwargs = {key: options.pop(key) for key in DSPY_CALL_KEYS if key in options}
    n = _positive_int(options.pop("n", 1), "n")
    for key in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"):
        if options.get(key) is not None:
            raise UnsupportedParameterError(
                f"{key}: a direct prompt call carries no tools; use a DSPy program (dspy.ReAct, dspy.ToolCalls) or "
                "lm(dspy.lm15.Request(..., tools=...))",
                features=[key],
            )
        options.pop(key, None)
    fields = _typed_fields(options)
    for key, value in options.items():
        if value is None:
            continue
        _guard_typo(key)
        extras[key] = value
    config = _config(fields, extras)
    return DirectPlan(config, n, call_kwargs, logprobs=config.logprobs is not None)


def _config(fields: dict[str, Any], extensions: dict[str, Any] | None = None) -> Config:
    try:
        return Config(**fields, extensions=extensions or None)
    except (TypeError, ValueError) as exc:
        raise UnsupportedParameterError(f"Invalid generation parameter: {exc}") from exc


def _typed_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Pop every option that has a typed Config field, spelled as Config wants it."""
    fields: dict[str, Any] = {name: options.pop(name) for name in _SAMPLING if name in options}
    fields = {name: value for name, value in fields.items() if value is not None}
    alias = options.pop("max_completion_tokens", None)
    if alias is not None and fields.setdefault("max_tokens", alias) != alias:
        raise UnsupportedParameterError(
            "max_tokens and max_completion_tokens disagree; pass one", features=["max_tokens"]
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


def _logprobs(logprobs: Any, top_logprobs: Any) -> int | None:
    """OpenAI chat spelling (``logprobs=True, top_logprobs=k``) or completions spelling (``logprobs=k``)."""
    if logprobs is None or logprobs is False:
        if top_logprobs:
            raise UnsupportedParameterError("top_logprobs requires logprobs=True", features=["top_logprobs"])
        return None
    if logprobs is True:
        return _non_negative_int(top_logprobs or 0, "top_logprobs")
    return _non_negative_int(logprobs, "logprobs")


def normalize_response_format(spec: Any) -> dict[str, Any]:
    """A response format in any common spelling → lm15's ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "schema": ..., "name"?, "strict"?}``.

    Accepts a pydantic model class, OpenAI's ``{"type": "json_schema", "json_schema": {...}}``,
    Anyscale's ``{"type": "json_object", "schema": {...}}`` and lm15's own form.
    """
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
        return {"type": "json_schema", "name": spec.__name__, "schema": spec.model_json_schema()}
    if not isinstance(spec, Mapping) or spec.get("type") not in ("json_object", "json_schema"):
        raise UnsupportedParameterError(
            "response_format must be {'type': 'json_object'}, {'type': 'json_schema', 'json_schema': {...}}, "
            f"{{'type': 'json_object', 'schema': {{...}}}} or a pydantic model class; got {spec!r}",
            features=["response_format"],
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


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedParameterError(f"{name} must be a positive integer, got {value!r}", features=[name])
    return value


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedParameterError(f"{name} must be a non-negative integer, got {value!r}", features=[name])
    return value
