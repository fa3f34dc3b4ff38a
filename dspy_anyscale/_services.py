"""Anyscale Services by name (extra ``[anyscale]``): ``Anyscale.from_service`` and ``Router.from_service``.

The service's ``query_url`` and bearer token (``query_auth_token``) come from the Anyscale SDK's
``anyscale.service.status`` (which finds the control plane from ``ANYSCALE_HOST`` and the user's
token from ``ANYSCALE_CLI_TOKEN`` or ``~/.anyscale/credentials.json``), so nobody copies them by
hand. The token is a :class:`~dspy_anyscale._secrets.RotatingSecret`: when the service refuses it
(401) the transport asks for the current one once, and sends the request again with it.

One version of a rolling-out service is pinned with Anyscale's ``X-ANYSCALE-VERSION`` header
(documented by Anyscale; the SDK itself only reports each version's name and traffic weight).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from . import _constants as C
from ._secrets import RotatingSecret, Secret
from .errors import ConfigurationError, ServiceError

# The classes are passed in (``Anyscale.from_service`` passes ``cls``): this module sits below both
# ``anyscale.py`` and ``router.py`` and imports neither.
_LM = TypeVar("_LM")
_R = TypeVar("_R")

__all__ = ["ServiceTarget", "from_service", "resolve_service", "router_from_service", "service_status"]

_INSTALL = "pip install 'dspy-anyscale[anyscale]'"


@dataclass(frozen=True)
class ServiceTarget:
    """Where an LM for a service sends: base URL, key (a rotating Secret; empty: no auth) and headers."""

    api_base: str
    api_key: Secret
    headers: Mapping[str, str]
    weights: Mapping[str, int]  # each existing version ("primary", "canary") -> its traffic percent


def _sdk() -> Any:
    try:
        import anyscale
    except ImportError:
        raise ServiceError(f"Anyscale Services by name need the Anyscale SDK: {_INSTALL}") from None
    return anyscale


def service_status(name: str, *, cloud: str | None = None, project: str | None = None) -> Any:
    """The SDK's ``ServiceStatus`` of ``name``, or a ServiceError that says what to do."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"the service name must be a non-empty string, got {name!r}")
    anyscale = _sdk()
    try:
        return anyscale.service.status(name=name, cloud=cloud, project=project)
    except Exception as error:  # the SDK raises RuntimeError, click errors, API errors: say which and why
        raise ServiceError(_status_failure(name, cloud, project, error)) from error


def _status_failure(name: str, cloud: str | None, project: str | None, error: Exception) -> str:
    where = "".join(f", {label}={value!r}" for label, value in (("cloud", cloud), ("project", project)) if value)
    text = str(getattr(error, "message", None) or error).strip() or type(error).__name__
    if "was not found" in text:
        hint = "check the name with `anyscale service list`, or pass cloud= / project= if it lives elsewhere"
    elif "redential" in text or "token" in text.lower():
        hint = "log in with `anyscale login`, or set ANYSCALE_CLI_TOKEN (and ANYSCALE_HOST for a non-default host)"
    else:
        hint = "check that `anyscale service status --name <name>` works from this environment"
    return f"could not resolve the Anyscale Service {name!r}{where}: {text} ({hint})"


def _state(status: Any) -> str:
    state = getattr(status, "state", None)
    return str(getattr(state, "value", state))


def _check_serving(name: str, status: Any) -> None:
    state = _state(status)
    if state not in C.SERVICE_SERVING_STATES:
        raise ServiceError(
            f"the Anyscale Service {name!r} is {state}, not serving: wait until it is RUNNING "
            f"(`anyscale service wait --name {name}`), or deploy it (`anyscale service deploy`)"
        )
    if not getattr(status, "query_url", None):
        raise ServiceError(f"the Anyscale Service {name!r} has no query_url yet: wait until it is RUNNING")


def _weights(status: Any) -> dict[str, int]:
    found = {}
    for label in C.SERVICE_VERSIONS:
        version = getattr(status, f"{label}_version", None)
        if version is not None:
            found[label] = int(getattr(version, "weight", None) or 0)
    return found


def _check_version(name: str, status: Any, version: str | None) -> None:
    if version is None:
        return
    if not isinstance(version, str) or not version:
        raise ConfigurationError(f"version must be 'primary', 'canary' or a version's name, got {version!r}")
    existing = {label: getattr(status, f"{label}_version", None) for label in C.SERVICE_VERSIONS}
    names = {getattr(v, "name", None) for v in existing.values() if v is not None}
    if version in C.SERVICE_VERSIONS and existing[version] is None:
        raise ServiceError(
            f"the Anyscale Service {name!r} has no {version} version"
            + (" (no rollout is in progress)" if version == "canary" else "")
            + ": drop version=, or pin one that exists"
        )
    if version not in C.SERVICE_VERSIONS and version not in names:
        listed = ", ".join(sorted(str(n) for n in names if n)) or "none"
        raise ServiceError(
            f"the Anyscale Service {name!r} has no version {version!r}: "
            f"pass 'primary', 'canary' or one of its versions' names ({listed})"
        )


def _token_fetcher(name: str, cloud: str | None, project: str | None) -> Any:
    """What a rotating key calls after a 401: the service's current token (the SDK again)."""

    def fetch() -> str:
        token = service_status(name, cloud=cloud, project=project).query_auth_token
        return str(token or "")

    return fetch


def resolve_service(
    name: str, *, version: str | None = None, cloud: str | None = None, project: str | None = None
) -> ServiceTarget:
    """Ask the SDK for the service and turn its status into where an LM sends."""
    status = service_status(name, cloud=cloud, project=project)
    _check_serving(name, status)
    return _target(name, status, version, cloud, project)


def _target(name: str, status: Any, version: str | None, cloud: str | None, project: str | None) -> ServiceTarget:
    """Where an LM for one version (None: the service's own split) of a checked status sends."""
    _check_version(name, status, version)
    token = status.query_auth_token
    key: Secret = RotatingSecret(token, _token_fetcher(name, cloud, project)) if token else Secret("")
    headers = {C.SERVICE_VERSION_HEADER: version} if version is not None else {}
    api_base = str(status.query_url).rstrip("/") + C.SERVICE_API_PATH
    return ServiceTarget(api_base, key, headers, _weights(status))


def from_service(
    cls: Callable[..., _LM],
    name: str,
    *,
    model: str,
    version: str | None = None,
    cloud: str | None = None,
    project: str | None = None,
    **kwargs: Any,
) -> _LM:
    """An ``Anyscale`` for the service ``name`` (see ``Anyscale.from_service``).

    ``cloud`` / ``project`` find a service whose name is not unique in the organization (the SDK's
    own arguments); ``headers=`` and every other keyword are the constructor's.
    """
    _refuse_connection_kwargs(kwargs)
    return _lm_for(cls, resolve_service(name, version=version, cloud=cloud, project=project), model, kwargs)


def _refuse_connection_kwargs(kwargs: Mapping[str, Any]) -> None:
    if "api_base" in kwargs or "api_key" in kwargs:
        raise ConfigurationError(
            "from_service finds api_base and api_key itself (the service's query_url and token): drop them, "
            "or build Anyscale(model, api_base=..., api_key=...) directly"
        )


def _lm_for(cls: Callable[..., _LM], target: ServiceTarget, model: str, kwargs: dict[str, Any]) -> _LM:
    headers = {**dict(kwargs.pop("headers", None) or {}), **target.headers}
    # The constructor takes a Secret as api_key unchanged (its annotation says str for users).
    key = cast(Any, target.api_key)
    return cls(model, api_base=target.api_base, api_key=key, headers=headers or None, **kwargs)


def router_from_service(
    cls: Callable[..., _R],
    member_cls: Callable[..., Any],
    name: str,
    *,
    model: str,
    cloud: str | None = None,
    project: str | None = None,
    router_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> _R:
    """A weighted ``Router`` (``cls``) over the service's versions, each an ``member_cls`` pinned to its
    version, at the service's own weights."""
    _refuse_connection_kwargs(kwargs)
    status = service_status(name, cloud=cloud, project=project)  # once: every member is built from it
    _check_serving(name, status)
    target = _target(name, status, None, cloud, project)
    if not target.weights:
        raise ServiceError(f"the Anyscale Service {name!r} reports no primary version: is it deployed?")
    members = {
        label: _lm_for(member_cls, _target(name, status, label, cloud, project), model, dict(kwargs))
        for label in target.weights
    }
    weights = dict(target.weights)
    if not any(weights.values()):  # a version at 0 % only: still answer, from the primary
        weights["primary"] = 100
    return cls(members, "weighted", weights=weights, **dict(router_kwargs or {}))
