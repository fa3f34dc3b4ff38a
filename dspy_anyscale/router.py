"""``Router``: several services as one DSPy LM, with fallback, weighted canary, least-busy and latency
routing, and a circuit breaker per member.

    from dspy_anyscale import Anyscale, Router

    lm = Router({"primary": Anyscale("llama-3-70b", api_base=A), "backup": Anyscale("llama-3-8b", api_base=B)})
    dspy.configure(lm=lm)

A call is routed first, then made by the member it is routed to, in full: the member's DSPy cache
(keyed on its own service, so an answer the backup gave is never served for the primary), its
dialect memo, limits, retries, history, usage records and spans. A member that is not the last one
a call may try is called without DSPy's retries, so a failure moves on at once: a fallback adds no
wait beyond the failed attempt itself. The Router keeps its own ``history`` (each answered call's
entry, whose ``endpoint`` names the member) and may hold limits over all its members.

This module is the DSPy ``BaseLM`` surface (what DSPy calls and reads of an LM, copies, saving,
pickling); the work is in :mod:`._routing`: ``calling`` (one call's plan and the fallback loop),
``streaming`` (direct streams), ``health`` (breakers), ``policy`` (which errors move on),
``strategies`` (the order of members), ``members``, ``limits``, ``accounting``, ``saving``,
``config`` and ``building`` (Portkey configs), ``options`` (checks), ``probes`` (active health checks).
"""

from __future__ import annotations

import copy as copy_module
import random
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import dspy

from . import _constants as C
from ._routing import calling, streaming
from ._routing.accounting import common_cost, usage_of
from ._routing.adapter import as_adapter_call, from_adapter
from ._routing.building import build_group
from ._routing.config import parse_config
from ._routing.health import Breaker, MemberHealth
from ._routing.limits import LIMIT_KEYS, candidates, changed_limits, checked_limits, limiter_for
from ._routing.members import named_members
from ._routing.options import (
    PROMPT_KEY,
    check_allowed_fails,
    check_call_routing_key,
    check_cooldown,
    check_fallback_on,
    check_health_check_interval,
    check_routing_key,
    check_strategy,
    check_weights,
    routing_point,
)
from ._routing.probes import Prober, ProbeThread
from ._routing.saving import is_router_state, loaded, sized_state, state_of
from ._routing.strategies import Strategy
from .limits import AnyLimiter, Limits
from .limits._config import limits_from

__all__ = ["MemberHealth", "Router", "is_router_state", "sized_state"]


class Router(dspy.BaseLM):  # type: ignore[misc]  # DSPy ships no types: BaseLM is Any to mypy
    """Several services as one DSPy LM.

    Args:
        members: ``{"name": Anyscale(...) or Router(...), ...}`` in the order to try them, or a list
            (each named ``model@host:port``; a second one with the same name gets ``#2``).
        strategy: ``"fallback"`` (in order), ``"weighted"`` (drawn by ``weights``, then the others by
            weight), ``"least_busy"`` (fewest calls in flight) or ``"latency"`` (lowest moving p50; a
            member never measured first). Every strategy skips cooling members, and moves a failed
            call on to the next member.
        weights: ``{"primary": 0.95, "canary": 0.05}`` for ``"weighted"`` (shares; equal if omitted).
        fallback_on: the errors that move a call on (classes and/or HTTP statuses); default: rate
            limits, 5xx, timeouts, transport errors and context-length errors (to a member whose
            context window is larger). A connection that could not be made always moves on.
        allowed_fails: consecutive failures after which a member cools for ``cooldown_s``; then one
            trial call closes its breaker again (or reopens it). A 429 cools it for its Retry-After,
            a refused connection marks it down at once.
        health_check_interval_s: probe cooling members (``GET /models``) this often, in a daemon
            thread; None (default): no probes, the trial call after the cool-down decides.
        routing_key: for ``"weighted"``: ``"prompt"`` or a callable(prompt, messages or Request) -> str;
            the same key always draws the same member (one example stays on one member). A call may
            give its own: ``lm(messages=..., routing_key="example-17")``.
        max_concurrency, requests_per_minute, tokens_per_minute, budget_usd, max_requests, limits:
            ``Anyscale``'s limits, over all members together (each member's own still hold).
    """

    supports_decision_requests = False

    def __init__(
        self,
        members: Mapping[str, Any] | Sequence[Any],
        strategy: str = C.ROUTER_DEFAULT_STRATEGY,
        *,
        weights: Mapping[str, float] | None = None,
        fallback_on: Sequence[type[BaseException] | int] | None = None,
        allowed_fails: int = C.ROUTER_ALLOWED_FAILS,
        cooldown_s: float = C.ROUTER_COOLDOWN_S,
        health_check_interval_s: float | None = None,
        routing_key: str | Callable[[Any], Any] | None = None,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        budget_usd: float | None = None,
        max_requests: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        lms = named_members(members, Router)
        self._strategy: Strategy = check_strategy(strategy)
        self._weights = check_weights(weights, lms, self._strategy)
        self._policy = check_fallback_on(fallback_on)
        self._allowed_fails = check_allowed_fails(allowed_fails)
        self._cooldown_s = check_cooldown(cooldown_s)
        self._interval_s = check_health_check_interval(health_check_interval_s)
        self._routing_key = check_routing_key(routing_key, self._strategy)
        keywords = {
            "max_concurrency": max_concurrency,
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "budget_usd": budget_usd,
            "max_requests": max_requests,
        }
        self._limits = checked_limits(limits_from(limits, keywords), lms)
        self._limiter: AnyLimiter = limiter_for(self._limits)
        self._lms = lms
        self._breakers = {name: self._new_breaker() for name in lms}
        self._setup()

    def _new_breaker(self) -> Breaker:
        return Breaker(allowed_fails=self._allowed_fails, cooldown_s=self._cooldown_s)

    def _setup(self) -> None:
        """What a Router holds besides its configuration: rebuilt the same way after unpickling."""
        self._quick: dict[str, Any] = {}  # each member's copy without DSPy's retries
        self._random = random.Random()
        self.model = f"router({', '.join(self._lms)})"
        types = {getattr(lm, "model_type", "chat") for lm in self._lms.values()}
        self.model_type = types.pop() if len(types) == 1 else "chat"
        self.callbacks: list[Any] = []
        self.history: list[dict[str, Any]] = []
        self._warned_zero_temp_rollout = False
        self._prober = Prober(dict(self._breakers), dict(self._lms))
        self._probes = ProbeThread(self._prober, self._interval_s) if self._interval_s else None

    # --- what it is (what DSPy reads of an LM) ------------------------------------------------------------

    @property
    def members(self) -> Mapping[str, Any]:
        """The members by name, in the order given (read-only)."""
        return MappingProxyType(self._lms)

    @property
    def strategy(self) -> Strategy:
        """``"fallback"``, ``"weighted"``, ``"least_busy"`` or ``"latency"``."""
        return self._strategy

    @property
    def kwargs(self) -> dict[str, Any]:
        """The first member's generation defaults (DSPy reads ``temperature``, ``n``, ... here)."""
        kwargs: dict[str, Any] = self._first.kwargs
        return kwargs

    @kwargs.setter
    def kwargs(self, value: Mapping[str, Any]) -> None:
        for lm in self._lms.values():
            lm.kwargs = dict(value)

    @property
    def cache(self) -> bool:
        """True when every member uses DSPy's cache; setting it sets every member's."""
        return all(getattr(lm, "cache", False) for lm in self._lms.values())

    @cache.setter
    def cache(self, value: bool) -> None:
        for lm in self._lms.values():
            lm.cache = value

    @property
    def num_retries(self) -> int:
        """The first member's (each member keeps its own; a member that is not a call's last try gets none)."""
        retries: int = self._first.num_retries
        return retries

    @property
    def supports_function_calling(self) -> bool:
        return all(lm.supports_function_calling for lm in self._lms.values())

    @property
    def supports_response_schema(self) -> bool:
        return all(lm.supports_response_schema for lm in self._lms.values())

    @property
    def supports_reasoning(self) -> bool:
        return all(lm.supports_reasoning for lm in self._lms.values())

    @property
    def supported_params(self) -> set[str]:
        """What every member supports: a parameter one of them would refuse is not offered."""
        params = [set(lm.supported_params) for lm in self._lms.values()]
        return set.intersection(*params)

    @property
    def _first(self) -> Any:
        return next(iter(self._lms.values()))

    def __repr__(self) -> str:
        members = ", ".join(f"{name!r}: {lm!r}" for name, lm in getattr(self, "_lms", {}).items())
        return f"Router({{{members}}}, strategy={getattr(self, '_strategy', None)!r})"

    # --- health, limits, usage ----------------------------------------------------------------------------

    def health(self) -> dict[str, MemberHealth]:
        """Each member's state (``healthy``, ``cooling``, ``down``), calls in flight, consecutive failures,
        moving p50 latency and, when not healthy, when it may be tried again (``time.time()``)."""
        return {name: breaker.snapshot() for name, breaker in self._breakers.items()}

    @property
    def limiter(self) -> AnyLimiter:
        """The Router's own limits over all members (``Limiter.disabled()`` when none is set)."""
        return self._limiter

    def spending(self) -> Any:
        """The Router's own ledger (its limits over all members); each member's: ``lm.members[name].spending()``."""
        return self._limiter.report()

    def _share_limiter(self, limiter: AnyLimiter) -> None:
        """Count against ``limiter`` from now on (a Ray job's one ledger)."""
        self._limiter = limiter

    @property
    def usage(self) -> list[Any]:
        """The usage records of the members' latest calls, oldest first; ``endpoint`` names the member."""
        return usage_of(self)

    def cost_of(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """USD for these counts when every member has the same prices (None when they differ or are unknown)."""
        return common_cost(self, prompt_tokens, completion_tokens)

    # --- calls ---------------------------------------------------------------------------------------------

    def __call__(self, prompt: Any = None, *args: Any, **kwargs: Any) -> Any:
        """As the members' ``__call__``: ``lm("text")``, ``lm(messages=[...])``, ``lm(Request)``."""
        key = self._key(prompt, kwargs)
        messages = kwargs.get("messages")
        if not from_adapter(self, messages):
            return self._route(lambda lm: lm(prompt, *args, **kwargs), key, kwargs)

        def call(lm: Any) -> Any:
            with as_adapter_call(lm, messages):
                return lm(prompt, *args, **kwargs)

        return self._route(call, key, kwargs)

    async def acall(self, prompt: Any = None, *args: Any, **kwargs: Any) -> Any:
        key = self._key(prompt, kwargs)
        messages = kwargs.get("messages")
        if not from_adapter(self, messages):
            return await self._aroute(lambda lm: lm.acall(prompt, *args, **kwargs), key, kwargs)

        async def call(lm: Any) -> Any:
            with as_adapter_call(lm, messages):
                return await lm.acall(prompt, *args, **kwargs)

        return await self._aroute(call, key, kwargs)

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        """The members' ``forward`` (DSPy's own, through their engines), routed."""
        key = self._key(prompt if messages is None else messages, kwargs)
        return self._route(lambda lm: lm.forward(prompt, messages, **kwargs), key, kwargs)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        key = self._key(prompt if messages is None else messages, kwargs)
        return await self._aroute(lambda lm: lm.aforward(prompt, messages, **kwargs), key, kwargs)

    def _generate(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        """``{"prompt", "choices"}`` from the member the call is routed to (the old direct surface)."""
        key = self._key(prompt, kwargs)
        result: dict[str, Any] = self._route(lambda lm: lm._generate(prompt, **kwargs), key, kwargs)
        return result

    def request(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        return self.basic_request(prompt, **kwargs)

    def basic_request(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        return self._generate(prompt, **kwargs)

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str]:
        """The completion's text as it arrives, from the first member that starts answering: a member that
        fails before its first chunk moves the stream on; after it, a failure is the caller's (no text twice)."""
        key = self._key(prompt, kwargs)
        return streaming.stream(self, prompt, kwargs, key)

    def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        """Async :meth:`stream`."""
        key = self._key(prompt, kwargs)
        return streaming.astream(self, prompt, kwargs, key)

    # --- routing --------------------------------------------------------------------------------------------

    def _route(self, call: Callable[[Any], Any], key: str | None, kwargs: Mapping[str, Any]) -> Any:
        if not self._limiter.enabled:
            return calling.run(self, call, key)
        with candidates(self._limiter, kwargs["n"] if "n" in kwargs else self.kwargs.get("n")):
            return calling.run(self, call, key)

    async def _aroute(self, call: Callable[[Any], Any], key: str | None, kwargs: Mapping[str, Any]) -> Any:
        if not self._limiter.enabled:
            return await calling.arun(self, call, key)
        with candidates(self._limiter, kwargs["n"] if "n" in kwargs else self.kwargs.get("n")):
            return await calling.arun(self, call, key)

    def _key(self, prompt: Any, kwargs: dict[str, Any]) -> str | None:
        """The call's routing key (taken out of ``kwargs``): its own ``routing_key=``, else the Router's."""
        if self._routing_key is None and "routing_key" not in kwargs:
            return None
        key = check_call_routing_key(kwargs.pop("routing_key", None))
        if key is not None or self._routing_key is None:
            return key
        subject = kwargs.get("messages", kwargs.get("request", prompt))
        if self._routing_key == PROMPT_KEY:
            return routing_point(subject)
        assert callable(self._routing_key)
        return routing_point(self._routing_key(subject))

    # --- copies, saving, pickling, closing --------------------------------------------------------------

    def copy(self, **kwargs: Any) -> Router:
        """A copy whose members are copied with ``kwargs`` (``temperature``, ``rollout_id``, ``cache``, ...);
        the limit options (``budget_usd=``, ``limits=``, ...) change the Router's own limits instead. A copy
        shares the members' health and, unless its limits change, the Router's ledger."""
        limit_changes = {key: kwargs.pop(key) for key in list(kwargs) if key in LIMIT_KEYS}
        return self._copy_with({name: lm.copy(**kwargs) for name, lm in self._lms.items()}, limit_changes)

    def __deepcopy__(self, memo: dict[int, Any]) -> Router:
        return self._copy_with({name: copy_module.deepcopy(lm, memo) for name, lm in self._lms.items()}, {})

    def _copy_with(self, lms: dict[str, Any], limit_changes: Mapping[str, Any]) -> Router:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)  # breakers, ledger and probes shared (not __getstate__'s fresh ones)
        new._lms = lms
        new._quick = {}
        new.history = []
        new.callbacks = list(self.callbacks)
        if limit_changes:
            new._limits = checked_limits(changed_limits(self._limits, limit_changes), lms)
            new._limiter = limiter_for(new._limits)
        return new

    def dump_state(self) -> dict[str, Any]:
        """State for ``program.save``: each member's own (never a key), the strategy and options."""
        return state_of(self)

    @classmethod
    def load_state(cls, state: dict[str, Any], *, allow_custom_lm_class: bool = False) -> Router:
        """Rebuild from :meth:`dump_state`; each member reads its key from the environment again."""
        lms, options = loaded(state, allow_custom_lm_class, cls)
        return cls(lms, **options)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_breakers", "_quick", "_prober", "_probes", "_random"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        history = state.pop("history", [])
        self.__dict__.update(state)
        self._breakers = {name: self._new_breaker() for name in self._lms}  # health is this process's to learn
        self._setup()
        self.history = history

    def close(self) -> None:
        """Stop the probes and close every member's connection pools."""
        if self._probes is not None:
            self._probes.stop()
        for lm in self._lms.values():
            lm.close()

    async def aclose(self) -> None:
        if self._probes is not None:
            self._probes.stop()
        for lm in self._lms.values():
            await lm.aclose()

    # --- building from a Portkey-style config -------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **member_kw: Any) -> Router:
        """A Router from a Portkey-style config (``strategy.mode`` fallback | loadbalance, ``targets`` with
        ``custom_host``, ``override_params.model``, ``weight``, ``api_key``, ``on_status_codes``; nested
        groups become member Routers). ``member_kw`` (``use_chat_api=True``, ``cache=False``, ...) goes to
        every member built; a target's own settings win."""
        router: Router = build_group(parse_config(config), member_kw, cls)
        return router

    @classmethod
    def from_service(
        cls,
        name: str,
        *,
        model: str,
        cloud: str | None = None,
        project: str | None = None,
        router_kwargs: Mapping[str, Any] | None = None,
        **member_kw: Any,
    ) -> Router:
        """A ``"weighted"`` Router over an Anyscale Service's versions (extra ``[anyscale]``): members
        ``"primary"`` and, during a rollout, ``"canary"``, each an ``Anyscale.from_service(name,
        version=...)`` pinned to its version, weighted by the service's own traffic split (the SDK's
        ``anyscale.service.status``). ``member_kw`` goes to every member; ``router_kwargs`` to the Router
        (``routing_key=``, limits, ...). The weights are read once: build it again after a rollout moves."""
        from ._services import router_from_service
        from .anyscale import Anyscale

        return router_from_service(
            cls, Anyscale, name, model=model, cloud=cloud, project=project, router_kwargs=router_kwargs, **member_kw
        )
