"""``Anyscale``: DSPy's LM for Anyscale-style OpenAI-compatible endpoints.

Anyscale Services (Ray Serve LLM), vLLM's OpenAI server, llama.cpp's ``llama-server`` and gateways
in front of them all speak ``POST /completions`` and ``POST /chat/completions``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from dspy.clients.base_lm import LM_CLASS_STATE_KEY

from . import _constants as C
from ._config import Timeout, check_headers, resolve_endpoint, resolve_timeout, resolve_usage_log
from ._engine import AnyscaleEngine, AsyncAnyscaleEngine, make_engines
from ._observe import Observer
from ._params import PARAMETERS, check_value, plan_direct_call, split_constructor_kwargs
from ._secrets import Secret, is_secret_header, restore_secret_headers
from ._wire import EndpointKind, WireOptions
from .catalog import Prices
from .errors import ConfigurationError
from .hf_model import HFModel
from .limits import UNLIMITED, Limits, UnlimitedLimiter
from .tracing import check_tracing, tracing_observer

if TYPE_CHECKING:
    from .limits import Limiter, SpendReport
from .usage import CostTable, UsageRecord, UsageRecorder

# The limiter's constructor options (Limits' fields, in its order).
LIMIT_OPTIONS = tuple(f.name for f in fields(Limits))
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
        *LIMIT_OPTIONS,
    }
)
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


def _check_template(template: str | None) -> str | None:
    if template is not None and (not isinstance(template, str) or template.count("{prompt}") != 1):
        raise ConfigurationError(
            f"prompt_template must contain '{{prompt}}' exactly once, e.g. '[INST]{{prompt}}[/INST]'; got {template!r}"
        )
    return template


def _as_secret(api_key: Any) -> Any:
    """The key wrapped (its repr says ***); other values as they are, for the checks to refuse."""
    return Secret(api_key) if isinstance(api_key, str) else api_key


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def _check_text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string or None, got {type(value).__name__}")
    return value


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip() or model != model.strip():
        raise ConfigurationError(
            f"model must be a non-empty string without surrounding spaces, e.g. 'meta-llama/Llama-2-70b-chat-hf'; "
            f"got {model!r}"
        )
    return model


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


_STYLES = ("auto", "openai", "anyscale")


def _limiter_for(limits: Limits) -> Limiter | UnlimitedLimiter:
    if not limits.enabled:
        return UNLIMITED  # an LM without limits pays for nothing
    from .limits import Limiter

    return Limiter(limits)


def _check_limits(settings: _Settings, model: str, max_tokens: int | None) -> None:
    """What a budget or a token rate needs to know a request's worst case: prices and max_tokens."""
    limits = settings.limits
    if limits.budget_usd is not None and CostTable(settings.prices).price(model) is None:
        raise ConfigurationError(
            f"budget_usd needs prices to know what a request can cost: pass prices={{'input': ..., 'output': ...}} "
            f"(USD per million tokens); {model!r} is not in the built-in catalogue"
        )
    if (limits.budget_usd is not None or limits.tokens_per_minute is not None) and max_tokens is None:
        raise ConfigurationError(
            "budget_usd and tokens_per_minute reserve each request's worst case, prompt + max_tokens: "
            "set max_tokens (not None)"
        )


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= C.MAX_TIMEOUT:
        raise ConfigurationError(f"{name} must be a number of seconds from 0 to {C.MAX_TIMEOUT:g}, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


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
            call; default: the legacy Anyscale catalogue (``model_info``), else unknown.
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
            catalogue). ``max_requests``: the same cap counted in requests. With any limit set, a
            429's ``Retry-After`` holds every caller of this LM. ``lm.spending()`` reports the ledger.
        tracing: OpenTelemetry GenAI spans and metrics for this instance's calls (the ``otel`` extra):
            ``True`` always, ``False`` never, ``None`` (default) while ``dspy_anyscale.tracing.instrument()``
            is on.
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
        response_format_style: Literal["auto", "openai", "anyscale"] = "auto",
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
        tracing: bool | None = None,
        temperature: float | None = C.DEFAULT_TEMPERATURE,
        max_tokens: int | None = C.DEFAULT_MAX_TOKENS,
        cache: bool = True,
        callbacks: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # First: a traceback that captures locals (Sentry) must never find the key in this frame.
        key = _as_secret(api_key)
        del api_key
        _check_model(model)
        carried, extras = split_constructor_kwargs(kwargs)
        check_value("temperature", temperature)
        check_value("max_tokens", max_tokens)
        chat = _check_flag("use_chat_api", use_chat_api)
        options = WireOptions(
            endpoint="chat" if chat else "completions",
            system_prompt=_check_text("system_prompt", system_prompt),
            prompt_template=_check_template(prompt_template),
            extra_body=extras,
            response_format_style=_check_choice("response_format_style", response_format_style, _STYLES),
            supports_tools=_check_flag("supports_tools", supports_tools),
            supports_response_schema=_check_flag("supports_response_schema", supports_response_schema),
        )
        settings = _Settings(
            api_base,
            resolve_timeout(timeout),
            options,
            check_headers(headers),
            _check_count("pool_size", pool_size, 1),
            prices=Prices.parse(prices) if prices is not None else None,
            usage_log=resolve_usage_log(usage_log),
            max_retry_wait=_check_seconds("max_retry_wait", max_retry_wait),
            limits=Limits(max_concurrency, requests_per_minute, tokens_per_minute, budget_usd, max_requests),
            tracing=check_tracing(tracing),
        )
        _check_count("num_retries", num_retries, 0)
        check_value("cache", cache)
        _check_limits(settings, model, max_tokens)
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
            **carried,
        )
        plan_direct_call(self.kwargs, {})  # refuse invalid defaults now, not on the first call

    @staticmethod
    def _connect(
        settings: _Settings, api_key: str | Secret | None, model: str, limiter: Limiter | UnlimitedLimiter
    ) -> tuple[AnyscaleEngine, AsyncAnyscaleEngine, UsageRecorder]:
        """The engine pair for the endpoint the settings resolve to, and the usage recorder observing it."""
        endpoint = resolve_endpoint(settings.api_base, api_key)
        recorder = UsageRecorder(prices=settings.prices, log_path=settings.usage_log)
        engine, async_engine = make_engines(
            endpoint,
            settings.timeout,
            settings.options,
            headers=settings.headers,
            pool_size=settings.pool_size,
            observers=(
                recorder,
                tracing_observer(settings.tracing, base_url=endpoint.base_url, endpoint=settings.options.endpoint),
            ),
            max_retry_wait=settings.max_retry_wait,
            limiter=limiter,
            prices=recorder.costs.price(model),
        )
        return engine, async_engine, recorder

    # --- what the instance is ---------------------------------------------------------------------

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
        return f"Anyscale(model={model!r}, api_base={self.api_base!r}, use_chat_api={self.use_chat_api})"

    def _cache_identity(self) -> str:
        return self.engine.cache_identity

    def _observers(self) -> tuple[Observer, ...]:
        return self.engine.observers

    def _priced(self, usage: Mapping[str, Any]) -> tuple[float | None, dict[str, Any]]:
        return self._recorder.costs.estimate(self.model, usage.get("prompt_tokens"), usage.get("completion_tokens"))

    @property
    def limiter(self) -> Limiter | UnlimitedLimiter:
        """The limits ledger this LM and its copies share (``Limiter.disabled()`` when no limit is set)."""
        return self._limiter

    def spending(self) -> SpendReport:
        """What this LM and its copies have spent, reserved and have left: USD, requests, tokens, refusals."""
        return self._limiter.report()

    def cost_of(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """USD for these token counts at this LM's prices (``prices=``, else the catalogue); None if unknown."""
        return self._recorder.cost(self.model, prompt_tokens, completion_tokens)

    @classmethod
    def models(
        cls,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout: float | tuple[float, float] = (C.DEFAULT_CONNECT_TIMEOUT, 30.0),
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

    # --- direct calls ------------------------------------------------------------------------------

    def _generate(self, prompt: str, use_chat_api: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        """``{"prompt": prompt, "choices": [{"text": ...}, ...]}`` from ``/completions`` or, with
        ``use_chat_api=True`` (``None``: the instance default), ``/chat/completions``."""
        return super()._generate(prompt, use_chat_api=use_chat_api, **kwargs)

    def _direct_extensions(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        use_chat_api = kwargs.pop("use_chat_api", None)
        endpoint: EndpointKind = self._settings.options.endpoint
        if use_chat_api is not None:
            endpoint = "chat" if _check_flag("use_chat_api", use_chat_api) else "completions"
        # The endpoint and the cache identity travel in the request (DSPy's cache key sees them);
        # the engine takes them off before the wire.
        return {C.ENGINE_EXTENSION_KEY: {"endpoint": endpoint, "identity": self.engine.cache_identity}}

    # --- copies, saving, pickling ---------------------------------------------------------------

    def _init_args(self, settings: _Settings) -> dict[str, Any]:
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
            args["prices"] = {"input": settings.prices.input, "output": settings.prices.output}
        if settings.max_retry_wait != C.DEFAULT_MAX_RETRY_WAIT:
            args["max_retry_wait"] = settings.max_retry_wait
        args.update(settings.limits.as_kwargs())  # a loaded program starts a ledger of its own
        if settings.tracing is not None:
            args["tracing"] = settings.tracing
        if settings.usage_log is not None:
            args["usage_log"] = settings.usage_log
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
        args = {**self._init_args(self._settings), **rebuild}
        args.setdefault("api_key", Secret(self.engine.transport.endpoint.api_key or ""))
        new = type(self)(**args)
        new.callbacks = list(self.callbacks)
        if not set(rebuild) & set(LIMIT_OPTIONS):
            new._share_limiter(self._limiter)  # a copy counts against the same ledger
        return new.copy(**kwargs) if kwargs else new

    def _share_limiter(self, limiter: Limiter | UnlimitedLimiter) -> None:
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
        state["_settings"] = self._settings.portable()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
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
