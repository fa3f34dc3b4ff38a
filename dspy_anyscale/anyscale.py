"""``Anyscale``: DSPy's LM for Anyscale-style OpenAI-compatible endpoints.

Anyscale Services (Ray Serve LLM), vLLM's OpenAI server, llama.cpp's ``llama-server`` and gateways
in front of them all speak ``POST /completions`` and ``POST /chat/completions``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, overload

from dspy.clients.base_lm import LM_CLASS_STATE_KEY

from . import _constants as C
from ._config import Timeout, endpoint_name, resolve_endpoint, resolve_timeout, resolve_usage_log
from ._engine import AnyscaleEngine, AsyncAnyscaleEngine, make_engines
from ._observe import Observer
from ._params import PARAMETERS, split_constructor_kwargs
from ._secrets import Secret, is_secret_header, restore_secret_headers
from ._spending import spending_by
from ._validate import (
    check_choice,
    check_count,
    check_flag,
    check_generation_defaults,
    check_headers,
    check_limits_fit,
    check_lora_adapter,
    check_model,
    check_provider,
    check_seconds,
    check_template,
    check_text,
)
from ._wire import EndpointKind, WireOptions
from .catalog import Prices
from .hf_model import HFModel
from .limits import AnyLimiter, Limits
from .limits._config import LIMIT_NAMES, limits_from
from .limits._cooling import CoolingLimiter
from .tracing import check_tracing, tracing_observer
from .usage import CostTable, UsageRecord, UsageRecorder

if TYPE_CHECKING:
    from .limits import SpendReport

# The limiter's constructor options (Limits' fields, in its order).
LIMIT_OPTIONS = LIMIT_NAMES
# Constructor settings that change the connection or the wire: copy() builds new engines for them.
_REBUILD_KEYS = frozenset(
    {
        "api_base",
        "api_key",
        "use_chat_api",
        "timeout",
        "system_prompt",
        "prompt_template",
        "response_format_style",
        "supports_tools",
        "supports_response_schema",
        "headers",
        "pool_size",
        "prices",
        "usage_log",
        "max_retry_wait",
        "tracing",
        "limits",
        "adapter",
        *LIMIT_OPTIONS,
    }
)
# Settings that give a copy limits of its own (a new ledger), instead of sharing this LM's.
_LIMIT_SETTINGS = frozenset({"limits", *LIMIT_OPTIONS})
# In saved state: names of headers whose secret values were not saved (restored from the environment).
_SECRET_HEADERS_KEY = "secret_headers"


@dataclass(frozen=True)
class _Settings:
    """Everything about the connection and the wire that is not DSPy's, minus the key."""

    api_base: str | None  # None: resolved from the environment each time the LM is rebuilt
    timeout: Timeout
    options: WireOptions
    headers: Mapping[str, str] = field(default_factory=dict)
    pool_size: int = C.DEFAULT_POOL_SIZE
    prices: Prices | None = None
    usage_log: str | None = None
    max_retry_wait: float = C.DEFAULT_MAX_RETRY_WAIT
    limits: Limits = field(default_factory=Limits)
    tracing: bool | None = None  # None: follow dspy_anyscale.tracing.instrument()
    # Names of secret headers left out of a saved or pickled copy, to be read back from the environment.
    dropped_headers: tuple[str, ...] = ()

    def portable(self) -> _Settings:
        """The settings a saved or pickled LM keeps: secret-looking header values are dropped."""
        secret = tuple(name for name, value in self.headers.items() if is_secret_header(name, value))
        kept = {name: value for name, value in self.headers.items() if name not in secret}
        return replace(self, headers=kept, dropped_headers=self.dropped_headers + secret)

    def restored(self) -> _Settings:
        """After unpickling: secret headers read back from the environment where possible."""
        headers = {**restore_secret_headers(self.dropped_headers), **self.headers}
        return replace(self, headers=headers, dropped_headers=())


def _as_secret(api_key: Any) -> Any:
    """The key wrapped (its repr says ***); other values as they are, for the checks to refuse."""
    return Secret(api_key) if isinstance(api_key, str) else api_key


_STYLES = ("auto", "openai", "anyscale")


def _limiter_for(limits: Limits) -> AnyLimiter:
    if not limits.enabled:
        return CoolingLimiter()  # nothing to count: only a 429's cool-down, shared by this LM's callers
    from .limits import Limiter

    return Limiter(limits)


class Anyscale(HFModel):
    """A DSPy LM for a model served behind an Anyscale-style, OpenAI-compatible endpoint.

    >>> lm = Anyscale("meta-llama/Llama-2-70b-chat-hf", use_chat_api=True)   # doctest: +SKIP
    >>> dspy.configure(lm=lm)                                                 # doctest: +SKIP

    Args:
        model: the model id the server serves (``GET {api_base}/models`` lists them).
        api_base: base URL ending in ``/v1``; else ``ANYSCALE_API_BASE`` / ``ANYSCALE_BASE_URL`` from
            the environment or a ``.env`` file.
        api_key: bearer token; else ``ANYSCALE_API_KEY``. ``""`` sends no Authorization header.
        use_chat_api: ``True`` sends ``/chat/completions``; ``False`` (the old client's default)
            sends ``/completions``, rendering DSPy's turns into one prompt. Per direct call too:
            ``lm._generate(prompt, use_chat_api=True)``.
        timeout: seconds for connect and read, or a ``(connect, read)`` pair. Always on.
        num_retries: DSPy's retries of transient failures (429, 5xx, timeouts, connection errors),
            with exponential backoff that honours ``Retry-After``.
        system_prompt: a system message sent with every chat request, joined with the system
            message DSPy's adapters send into one (Anyscale refuses a second system message);
            on ``/completions`` it is the first block of the prompt.
        prompt_template: wraps every ``/completions`` prompt, e.g. ``"[INST]{prompt}[/INST]"``.
        response_format_style: ``"auto"`` (default) sends OpenAI's ``{"type": "json_schema",
            "json_schema": ...}`` (vLLM, Ray Serve LLM, llama.cpp) and, when a server refuses it,
            resends at once in Anyscale's ``{"type": "json_object", "schema": ...}`` (llama-cpp-python,
            Anyscale Endpoints) and remembers that for the server (relearned the same way if the
            server behind the URL changes); ``"openai"`` / ``"anyscale"`` force one form.
        supports_tools / supports_response_schema: declare ``False`` for servers or models without
            tool calling / schema-constrained JSON; DSPy's adapters then do not ask for them.
        headers: extra HTTP headers on every request (e.g. ``portkey_headers(...)`` for a gateway).
        pool_size: connections kept open per pool; at least your thread count.
        prices: ``{"input": ..., "output": ...}`` in USD per million tokens, for the cost of each
            call; default: the legacy Anyscale catalogue (``model_info``), else unknown. An optional
            ``"cached_input"`` prices the prompt tokens the server reports as cached
            (``prompt_tokens_details.cached_tokens``); budgets still reserve them at ``"input"``.
        usage_log: a JSON-lines file that gets one usage record per call; else ``ANYSCALE_USAGE_LOG``.
        max_retry_wait: the longest ``Retry-After`` (seconds) DSPy may wait before a retry; a 429 or 5xx
            asking for more fails the call at once (``LMRateLimitError`` / ``LMServerError``).
        max_concurrency: at most this many requests of this LM (and its copies) in flight at once;
            more callers queue in order.
        requests_per_minute, tokens_per_minute: client-side rate limits (token buckets holding one
            second's worth); tokens are reserved as prompt estimate + ``max_tokens`` and corrected
            with the server's counts.
        budget_usd: a hard cap on spend: a request whose worst case could take the total over it is
            refused with ``BudgetExceededError`` before it is sent. Needs prices (``prices=`` or the
            catalogue). ``max_requests``: the same cap counted in requests. ``lm.spending()`` reports
            the ledger. With limits or without, a 429's ``Retry-After`` holds every caller of this LM.
        limits: the same five limits as one value, ``limits=Limits(budget_usd=5.0, max_concurrency=8)``
            (``from dspy_anyscale.limits import Limits``), as the Ray entry points take them; give
            either ``limits=`` or the keywords, not both.
        tracing: OpenTelemetry GenAI spans and metrics for this instance's calls (the ``otel`` extra):
            ``True`` always, ``False`` never, ``None`` (default) while ``dspy_anyscale.tracing.instrument()``
            is on.
        adapter: the LoRA adapter this LM is bound to, by the name the server lists it under (``None``:
            the base model). Part of the cache identity, usage records, history and spans, and kept when
            saved; it sends nothing by itself: the server picks the adapter from the model name (Ray
            Serve LLM: ``model="<base>:<adapter>"``) or a body key (llama-server: ``lora=[...]``), which
            the fine-tuning providers set (``dspy_anyscale.finetune``).
        provider: a DSPy ``Provider`` for ``lm.finetune(...)`` and ``dspy.BootstrapFinetune``
            (``dspy_anyscale.finetune.LocalLoRAProvider()``, ``AnyscaleJobsProvider(...)``); the
            fine-tuned result is an ``Anyscale`` bound to the new adapter.
        temperature, max_tokens, cache, callbacks: as for ``dspy.LM``.
        **kwargs: default generation parameters. The OpenAI ones (top_p, stop, seed, n, ...) are
            DSPy's; any other (``repetition_penalty``, ``min_p``, ...) is sent in every request body.
    """

    def __init__(
        self,
        model: str,
        api_base: str | None = None,
        api_key: str | None = None,
        use_chat_api: bool = False,
        timeout: float | tuple[float, float] = (C.DEFAULT_CONNECT_TIMEOUT, C.DEFAULT_READ_TIMEOUT),
        num_retries: int = C.DEFAULT_NUM_RETRIES,
        *,
        system_prompt: str | None = None,
        prompt_template: str | None = None,
        response_format_style: Literal["auto", "openai", "anyscale"] = C.DEFAULT_RESPONSE_FORMAT_STYLE,
        supports_tools: bool = True,
        supports_response_schema: bool = True,
        headers: Mapping[str, str] | None = None,
        pool_size: int = C.DEFAULT_POOL_SIZE,
        prices: Mapping[str, float] | Prices | None = None,
        usage_log: str | os.PathLike[str] | None = None,
        max_retry_wait: float = C.DEFAULT_MAX_RETRY_WAIT,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        budget_usd: float | None = None,
        max_requests: int | None = None,
        limits: Limits | None = None,
        tracing: bool | None = None,
        adapter: str | None = None,
        provider: Any = None,
        temperature: float | None = C.DEFAULT_TEMPERATURE,
        max_tokens: int | None = C.DEFAULT_MAX_TOKENS,
        cache: bool = True,
        callbacks: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # First: a traceback that captures locals (Sentry) must never find the key in this frame.
        key = _as_secret(api_key)
        del api_key
        check_model(model)
        carried, extras = split_constructor_kwargs(kwargs)
        # Before DSPy's LM sees them (it would refuse some in its own words): checked as every call sends them.
        check_generation_defaults({"temperature": temperature, "max_tokens": max_tokens, "cache": cache, **carried})
        chat = check_flag("use_chat_api", use_chat_api)
        options = WireOptions(
            endpoint="chat" if chat else "completions",
            system_prompt=check_text("system_prompt", system_prompt),
            prompt_template=check_template(prompt_template),
            extra_body=extras,
            response_format_style=check_choice("response_format_style", response_format_style, _STYLES),
            supports_tools=check_flag("supports_tools", supports_tools),
            supports_response_schema=check_flag("supports_response_schema", supports_response_schema),
            adapter=check_lora_adapter(adapter),
        )
        limit_keywords = {
            "max_concurrency": max_concurrency,
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "budget_usd": budget_usd,
            "max_requests": max_requests,
        }
        settings = _Settings(
            api_base,
            resolve_timeout(timeout),
            options,
            check_headers(headers),
            check_count("pool_size", pool_size, 1),
            prices=Prices.parse(prices) if prices is not None else None,
            usage_log=resolve_usage_log(usage_log),
            max_retry_wait=check_seconds("max_retry_wait", max_retry_wait),
            limits=limits_from(limits, limit_keywords),
            tracing=check_tracing(tracing),
        )
        check_count("num_retries", num_retries, 0)
        check_limits_fit(
            named=", ".join(settings.limits.as_kwargs()),
            budget=settings.limits.budget_usd is not None,
            token_rate=settings.limits.tokens_per_minute is not None,
            model=model,
            priced=CostTable(settings.prices).price(model) is not None,
            max_tokens=max_tokens,
        )
        self._limiter = _limiter_for(settings.limits)
        engine, async_engine, self._recorder = self._connect(settings, key, model, self._limiter)
        self._settings = settings
        super().__init__(
            model,
            engine=engine,
            async_engine=async_engine,
            model_type="chat" if chat else "text",
            temperature=temperature,
            max_tokens=max_tokens,
            cache=cache,
            callbacks=callbacks,
            num_retries=num_retries,
            provider=check_provider(provider),
            **carried,
        )

    @staticmethod
    def _connect(
        settings: _Settings, api_key: str | Secret | None, model: str, limiter: AnyLimiter
    ) -> tuple[AnyscaleEngine, AsyncAnyscaleEngine, UsageRecorder]:
        """The engine pair for the endpoint the settings resolve to, and the usage recorder observing it."""
        endpoint = resolve_endpoint(settings.api_base, api_key)
        adapter = settings.options.adapter
        recorder = UsageRecorder(
            prices=settings.prices,
            log_path=settings.usage_log,
            endpoint=endpoint_name(endpoint.base_url),
            adapter=adapter,
        )
        engine, async_engine = make_engines(
            endpoint,
            settings.timeout,
            settings.options,
            headers=settings.headers,
            pool_size=settings.pool_size,
            observers=(
                recorder,
                tracing_observer(
                    settings.tracing, base_url=endpoint.base_url, endpoint=settings.options.endpoint, adapter=adapter
                ),
            ),
            max_retry_wait=settings.max_retry_wait,
            limiter=limiter,
            prices=recorder.costs.price(model),
        )
        return engine, async_engine, recorder

    # --- what the instance is ---------------------------------------------------------------------

    if TYPE_CHECKING:
        # DSPy keeps the engine pair it was given (``engine`` is the sync one): the pair _connect builds.
        _engine_spec: AnyscaleEngine
        _async_engine_spec: AsyncAnyscaleEngine

        @property
        def engine(self) -> AnyscaleEngine: ...

    @property
    def api_base(self) -> str:
        return self.engine.transport.endpoint.base_url

    @property
    def use_chat_api(self) -> bool:
        return self._settings.options.endpoint == "chat"

    @property
    def timeout(self) -> Timeout:
        return self._settings.timeout

    @property
    def system_prompt(self) -> str | None:
        return self._settings.options.system_prompt

    @property
    def prompt_template(self) -> str | None:
        return self._settings.options.prompt_template

    @property
    def adapter(self) -> str | None:
        """The LoRA adapter this LM is bound to (None: the base model)."""
        return self._settings.options.adapter

    @property
    def usage(self) -> list[UsageRecord]:
        """The usage records of the latest calls (this LM and the copies sharing its connection)."""
        return list(self._recorder.records)

    @property
    def extra_body(self) -> Mapping[str, Any]:
        """Provider-specific parameters sent in every request body (read-only)."""
        return MappingProxyType(self._settings.options.extra_body)

    def __repr__(self) -> str:
        # Safe at any stage: a traceback that captures locals may repr a half-built instance.
        model = getattr(self, "model", None)
        settings = getattr(self, "_settings", None)
        if settings is None or "_engine_spec" not in vars(self):
            return f"<Anyscale model={model!r} (not fully constructed)>"
        adapter = f", adapter={self.adapter!r}" if self.adapter is not None else ""
        return f"Anyscale(model={model!r}, api_base={self.api_base!r}, use_chat_api={self.use_chat_api}{adapter})"

    def _cache_identity(self) -> str:
        return self.engine.cache_identity

    def _endpoint_name(self) -> str | None:
        return self._recorder.endpoint  # its host:port, named once when the connection was made

    def _adapter_name(self) -> str | None:
        return self.adapter

    def _observers(self) -> tuple[Observer, ...]:
        return self.engine.observers

    def _priced(self, usage: Mapping[str, Any]) -> tuple[float | None, dict[str, Any]]:
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        return self._recorder.costs.estimate(
            self.model, usage.get("prompt_tokens"), usage.get("completion_tokens"), cached
        )

    @property
    def limiter(self) -> AnyLimiter:
        """The limits ledger this LM and its copies share (``Limiter.disabled()`` when no limit is set)."""
        return self._limiter

    @overload
    def spending(self, by: None = None) -> SpendReport: ...
    @overload
    def spending(self, by: Literal["module"]) -> dict[str | None, SpendReport]: ...

    def spending(self, by: Literal["module"] | None = None) -> SpendReport | dict[str | None, SpendReport]:
        """What this LM and its copies have spent, reserved and have left: USD, requests, tokens, refusals.

        ``by="module"``: the same, per DSPy module that made the requests (``generate_query.predict``;
        ``None`` for direct calls), from the same ledger, so their ``spent_usd`` add up to the total's.
        Empty for an LM without limits, which keeps no ledger (``summarize(lm.usage, by="module")``
        reads its usage records instead).
        """
        if by is None:
            return self._limiter.report()
        return spending_by(self._limiter, by)

    def cost_of(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """USD for these token counts at this LM's prices (``prices=``, else the catalogue); None if unknown."""
        return self._recorder.cost(self.model, prompt_tokens, completion_tokens)

    @classmethod
    def models(
        cls,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout: float | tuple[float, float] = (C.DEFAULT_CONNECT_TIMEOUT, C.DEFAULT_MODELS_READ_TIMEOUT),
        headers: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """The models the endpoint serves (``GET {api_base}/models``), configured like the constructor.

        Each entry has ``id`` and ``owned_by``, plus ``model_type`` from Ray Serve LLM's
        ``rayllm_metadata`` when the server sends it.
        """
        from ._models import list_models

        key = _as_secret(api_key)
        del api_key  # out of this frame's locals
        return list_models(resolve_endpoint(api_base, key), resolve_timeout(timeout), check_headers(headers))

    @classmethod
    def from_service(cls, name: str, *, model: str, version: str | None = None, **kwargs: Any) -> Anyscale:
        """An LM for the Anyscale Service ``name`` (extra ``[anyscale]``): its ``query_url`` and bearer
        token come from the Anyscale SDK (``anyscale.service.status``), a rotated token is fetched again
        on a 401, and ``version="primary"`` / ``"canary"`` pins one version. ``kwargs`` as for ``Anyscale``."""
        from ._services import from_service

        lm: Anyscale = from_service(cls, name, model=model, version=version, **kwargs)
        return lm

    # --- fine-tuning -------------------------------------------------------------------------------

    def finetune(
        self,
        train_data: list[dict[str, Any]],
        train_data_format: Any,
        train_kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Start fine-tuning with this LM's ``provider`` (DSPy's ``lm.finetune``): a ``TrainingJob``
        (a future) whose result is the fine-tuned ``Anyscale``, bound to the new adapter, or the exception.

        As ``dspy.LM.finetune``, with one difference: a provider of ``dspy_anyscale.finetune`` turns what
        it trained into an LM that answers through it (``provider.bind``), where DSPy would only rename
        the model. Another DSPy provider gets DSPy's ``lm.copy(model=<what finetune returned>)``.
        """
        from ._finetuning import start_finetune

        return start_finetune(self, train_data, train_data_format, train_kwargs)

    # --- direct calls ------------------------------------------------------------------------------

    def _generate(self, prompt: str, use_chat_api: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        """``{"prompt": prompt, "choices": [{"text": ...}, ...]}`` from ``/completions`` or, with
        ``use_chat_api=True`` (``None``: the instance default), ``/chat/completions``."""
        return super()._generate(prompt, use_chat_api=use_chat_api, **kwargs)

    def _direct_extensions(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        use_chat_api = kwargs.pop("use_chat_api", None)
        endpoint: EndpointKind = self._settings.options.endpoint
        if use_chat_api is not None:
            endpoint = "chat" if check_flag("use_chat_api", use_chat_api) else "completions"
        # The endpoint and the cache identity travel in the request (DSPy's cache key sees them);
        # the engine takes them off before the wire.
        return {C.ENGINE_EXTENSION_KEY: {"endpoint": endpoint, "identity": self.engine.cache_identity}}

    # --- copies, saving, pickling ---------------------------------------------------------------

    def _init_args(self, settings: _Settings, *, keep_limits: bool = True) -> dict[str, Any]:
        """Constructor arguments that rebuild this LM (``keep_limits=False``: without its limits)."""
        options = settings.options
        args: dict[str, Any] = {
            "model": self.model,
            "use_chat_api": options.endpoint == "chat",
            "timeout": list(settings.timeout.as_tuple()),
            "num_retries": self.num_retries,
            "system_prompt": options.system_prompt,
            "prompt_template": options.prompt_template,
            "response_format_style": options.response_format_style,
            "supports_tools": options.supports_tools,
            "supports_response_schema": options.supports_response_schema,
            "pool_size": settings.pool_size,
            "cache": self.cache,
            **self.kwargs,
            **options.extra_body,
        }
        if settings.api_base is not None:
            args["api_base"] = settings.api_base
        if settings.headers:
            args["headers"] = dict(settings.headers)
        if settings.prices is not None:
            args["prices"] = settings.prices.as_dict()
        if settings.max_retry_wait != C.DEFAULT_MAX_RETRY_WAIT:
            args["max_retry_wait"] = settings.max_retry_wait
        if keep_limits:
            args.update(settings.limits.as_kwargs())  # a loaded program starts a ledger of its own
        if settings.tracing is not None:
            args["tracing"] = settings.tracing
        if settings.usage_log is not None:
            args["usage_log"] = settings.usage_log
        if options.adapter is not None:
            args["adapter"] = options.adapter
        return args

    def dump_state(self) -> dict[str, Any]:
        """State for ``program.save``: constructor arguments, never the key or secret header values.

        ``api_base`` is saved only when it was passed explicitly; DSPy drops it on load unless
        ``allow_unsafe_lm_state=True`` (needed for this class anyway), else the environment decides.
        """
        portable = self._settings.portable()
        state = self._init_args(portable)
        state.pop("tracing", None)  # a saved program leaves tracing to the environment that loads it
        if portable.dropped_headers:
            state[_SECRET_HEADERS_KEY] = list(portable.dropped_headers)
        return {LM_CLASS_STATE_KEY: f"{type(self).__module__}.{type(self).__qualname__}", **state}

    @classmethod
    def load_state(cls, state: dict[str, Any], *, allow_custom_lm_class: bool = False) -> Anyscale:
        state = {key: value for key, value in state.items() if key != LM_CLASS_STATE_KEY}
        if isinstance(state.get("timeout"), list):
            state["timeout"] = tuple(state["timeout"])
        secret = tuple(state.pop(_SECRET_HEADERS_KEY, ()))
        if secret:
            state["headers"] = {**restore_secret_headers(secret), **(state.get("headers") or {})}
        return cls(**state)

    def copy(self, **kwargs: Any) -> Anyscale:
        """A copy with changed settings. DSPy-level changes (temperature, rollout_id, ...) share the
        connection pools; connection or wire changes (use_chat_api, api_base, extras, ...) build
        new ones. The key carries over unless ``api_key=`` is given."""
        rebuild = {key: kwargs.pop(key) for key in list(kwargs) if self._is_connection_setting(key)}
        if not rebuild:
            return super().copy(**kwargs)
        args = {**self._init_args(self._settings, keep_limits="limits" not in rebuild), **rebuild}
        args.setdefault("api_key", self.engine.transport.endpoint.api_key)  # a Secret (empty: no key)
        args.setdefault("provider", getattr(self, "provider", None))  # the live provider, never saved
        new = type(self)(**args)
        new.callbacks = list(self.callbacks)
        if not set(rebuild) & _LIMIT_SETTINGS:
            new._share_limiter(self._limiter)  # a copy counts against the same ledger
        return new.copy(**kwargs) if kwargs else new

    def _share_limiter(self, limiter: AnyLimiter) -> None:
        self._limiter = limiter
        for engine in (self._engine_spec, self._async_engine_spec):
            engine.limiter = limiter

    def _is_connection_setting(self, key: str) -> bool:
        """True for constructor settings DSPy's copy() cannot apply: ours, and provider extras."""
        if key in _REBUILD_KEYS:
            return True
        return key not in PARAMETERS and not hasattr(self, key)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # The engines hold the key: they are rebuilt from the environment on unpickling (with a new recorder).
        for name in ("_engine_spec", "_async_engine_spec", "_recorder", "_default_plan"):
            state.pop(name, None)
        # A provider holds live jobs and servers: it stays with the process that fine-tunes.
        state.pop("provider", None)
        state["_settings"] = self._settings.portable()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "provider" not in vars(self):
            self.provider = self.infer_provider()
        self._settings = self._settings.restored()
        # The limiter came through the pickle: a shared (Ray) ledger's handle, or a detached local one
        # that refuses to send until attached; never a fresh budget of its own.
        self._engine_spec, self._async_engine_spec, self._recorder = self._connect(
            self._settings, None, self.model, self._limiter
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Anyscale:
        # A deep copy is a new LM on the same connection (like copy()), not a re-read of the
        # environment, which a pickle round trip would be.
        new = copy.copy(self)
        new.kwargs = copy.deepcopy(self.kwargs, memo)
        new.history = copy.deepcopy(self.history, memo)
        new.callbacks = list(self.callbacks)
        return new
