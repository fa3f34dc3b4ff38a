"""The DSPy boundary as this package uses it, typed: for the type checker only.

DSPy ships no ``py.typed``, so to mypy everything imported from ``dspy`` is ``Any`` (see
``[tool.mypy]`` in pyproject.toml), and so would be every ``Request`` the engine takes and every
``Response`` it builds. This module says what dspy-anyscale reads, builds and raises of DSPy 3.4,
and nothing more:

* ``dspy.lm15``'s values (``Request``, ``Config``, ``Message``, the parts, ``Response``, ``Usage``,
  the stream events) as Protocols of the fields used; the ones this package builds declare their
  constructor too, so ``lm15.Response(...)`` is checked against it;
* :data:`lm15`, the module as used: each class it is asked for, as ``type[<the Protocol>]``, so that
  ``lm15.TextPart(...)``, ``isinstance(part, lm15.TextPart)`` and ``except lm15.LM15Error`` are typed;
* the exception classes (lm15's and ``dspy.utils.exceptions``') and ``dspy.LM``, as classes mirroring
  DSPy's: a Protocol cannot be raised, caught or subclassed, and these are.

Import it only under ``TYPE_CHECKING`` (``tests/test_typing.py`` checks): at run time every name is
DSPy's own, and importing the package does not load this module::

    if TYPE_CHECKING:
        from ._dspy_types import Request, Response, lm15
    else:
        from dspy import lm15

Annotations name the Protocols (``Request``); code that builds, checks or raises DSPy's objects goes
through ``lm15.`` (``lm15.Response(...)``), which is DSPy's module when the code runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import Field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TextIO, TypeAlias, TypedDict, TypeVar

JsonObject: TypeAlias = dict[str, Any]
Role: TypeAlias = Literal["user", "assistant", "tool", "developer"]
FinishReason: TypeAlias = Literal["stop", "length", "tool_call", "content_filter", "error"]


class _Dataclass(Protocol):
    """lm15's values are frozen dataclasses: ``dataclasses.replace`` takes them (typeshed's bound)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]


# --- parts of a message -----------------------------------------------------------------------------
# Each part says what it is in ``type``, so ``part.type == "thinking"`` narrows a ``Part`` as lm15's own
# union does.


class TextPart(Protocol):
    def __init__(self, text: str) -> None: ...
    @property
    def type(self) -> Literal["text"]: ...
    @property
    def text(self) -> str: ...


class ThinkingPart(Protocol):
    def __init__(self, text: str) -> None: ...
    @property
    def type(self) -> Literal["thinking"]: ...
    @property
    def text(self) -> str: ...


class RefusalPart(Protocol):
    def __init__(self, text: str) -> None: ...
    @property
    def type(self) -> Literal["refusal"]: ...
    @property
    def text(self) -> str: ...


class ImagePart(Protocol):
    @property
    def type(self) -> Literal["image"]: ...
    @property
    def url(self) -> str | None: ...
    @property
    def data(self) -> str | None: ...
    @property
    def media_type(self) -> str: ...
    @property
    def detail(self) -> Literal["low", "high", "auto"] | None: ...


class ToolCallPart(Protocol):
    def __init__(self, id: str, name: str, input: JsonObject) -> None: ...
    @property
    def type(self) -> Literal["tool_call"]: ...
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def input(self) -> JsonObject: ...


class ToolResultPart(Protocol):
    @property
    def type(self) -> Literal["tool_result"]: ...
    @property
    def id(self) -> str: ...
    @property
    def content(self) -> tuple[Part, ...]: ...


class OtherPart(Protocol):
    """The parts this package never reads beyond their kind (it refuses to send them)."""

    @property
    def type(self) -> Literal["audio", "video", "document", "binary", "citation", "data"]: ...


Part: TypeAlias = TextPart | ThinkingPart | RefusalPart | ImagePart | ToolCallPart | ToolResultPart | OtherPart


class Message(Protocol):
    def __init__(self, role: Role, parts: tuple[Part, ...]) -> None: ...
    @property
    def role(self) -> Role: ...
    @property
    def parts(self) -> tuple[Part, ...]: ...
    @staticmethod
    def user(content: str) -> Message: ...
    @staticmethod
    def assistant(content: Sequence[Part]) -> Message: ...


# --- a request --------------------------------------------------------------------------------------


class Tool(Protocol):
    """A function tool or a provider built-in one."""

    @property
    def name(self) -> str: ...


class FunctionTool(Tool, Protocol):
    @property
    def description(self) -> str | None: ...
    @property
    def parameters(self) -> JsonObject: ...


class ToolChoice(Protocol):
    @property
    def mode(self) -> Literal["auto", "required", "none"]: ...
    @property
    def allowed(self) -> tuple[str, ...]: ...
    @property
    def parallel(self) -> bool | None: ...


class Reasoning(Protocol):
    @property
    def effort(self) -> str: ...
    @property
    def thinking_budget(self) -> int | None: ...
    @property
    def summary(self) -> str | None: ...


class Config(_Dataclass, Protocol):
    def __init__(
        self,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: tuple[str, ...] = (),
        response_format: JsonObject | None = None,
        seed: int | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        user_id: str | None = None,
        logprobs: int | None = None,
        extensions: JsonObject | None = None,
    ) -> None: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def stop(self) -> tuple[str, ...]: ...
    @property
    def response_format(self) -> JsonObject | None: ...
    @property
    def tool_choice(self) -> ToolChoice | None: ...
    @property
    def reasoning(self) -> Reasoning | None: ...
    @property
    def cache(self) -> object | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def frequency_penalty(self) -> float | None: ...
    @property
    def presence_penalty(self) -> float | None: ...
    @property
    def service_tier(self) -> str | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def store(self) -> bool | None: ...
    @property
    def logprobs(self) -> int | None: ...
    @property
    def probabilities(self) -> object | None: ...
    @property
    def extensions(self) -> JsonObject | None: ...


class Request(_Dataclass, Protocol):
    def __init__(
        self,
        model: str,
        messages: tuple[Message, ...],
        system: str | tuple[Part, ...] | None = None,
        tools: tuple[Tool, ...] = (),
        config: Config = ...,
    ) -> None: ...
    @property
    def model(self) -> str: ...
    @property
    def messages(self) -> tuple[Message, ...]: ...
    @property
    def system(self) -> str | tuple[Part, ...] | None: ...
    @property
    def tools(self) -> tuple[Tool, ...]: ...
    @property
    def config(self) -> Config: ...


# --- an answer ----------------------------------------------------------------------------------------


class Usage(Protocol):
    def __init__(
        self,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        total_tokens: int | None = None,
        cache_read_tokens: int | None = None,
    ) -> None: ...
    @property
    def input_tokens(self) -> int | None: ...
    @property
    def output_tokens(self) -> int | None: ...
    @property
    def total_tokens(self) -> int | None: ...
    @property
    def cache_read_tokens(self) -> int | None: ...


class TopLogprob(Protocol):
    def __init__(self, token: str, logprob: float, bytes: tuple[int, ...] | None = None) -> None: ...
    @property
    def token(self) -> str: ...
    @property
    def logprob(self) -> float: ...


class TokenLogprob(Protocol):
    def __init__(
        self,
        token: str,
        logprob: float,
        bytes: tuple[int, ...] | None = None,
        *,
        top: tuple[TopLogprob, ...] = (),
    ) -> None: ...
    @property
    def token(self) -> str: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top(self) -> tuple[TopLogprob, ...]: ...


class Response(Protocol):
    def __init__(
        self,
        *,
        id: str | None,
        model: str,
        message: Message,
        finish_reason: FinishReason,
        usage: Usage,
        logprobs: tuple[TokenLogprob, ...] | None = None,
        provider_data: JsonObject | None = None,
    ) -> None: ...
    @property
    def id(self) -> str | None: ...
    @property
    def model(self) -> str: ...
    @property
    def message(self) -> Message: ...
    @property
    def finish_reason(self) -> FinishReason: ...
    @property
    def usage(self) -> Usage: ...
    @property
    def logprobs(self) -> tuple[TokenLogprob, ...] | None: ...
    @property
    def text(self) -> str | None: ...


# --- a streamed answer ----------------------------------------------------------------------------------


class TextDelta(Protocol):
    def __init__(self, text: str, part_index: int = 0, logprobs: tuple[TokenLogprob, ...] = ()) -> None: ...


class ThinkingDelta(Protocol):
    def __init__(self, text: str, part_index: int = 0) -> None: ...


class ToolCallDelta(Protocol):
    def __init__(self, input: str, part_index: int = 0, id: str | None = None, name: str | None = None) -> None: ...


Delta: TypeAlias = TextDelta | ThinkingDelta | ToolCallDelta


class StreamStartEvent(Protocol):
    def __init__(self, id: str | None = None, model: str | None = None) -> None: ...


class StreamDeltaEvent(Protocol):
    def __init__(self, delta: Delta) -> None: ...


class StreamEndEvent(Protocol):
    def __init__(self, finish_reason: FinishReason | None = None, usage: Usage | None = None) -> None: ...
    @property
    def finish_reason(self) -> FinishReason | None: ...
    @property
    def usage(self) -> Usage | None: ...


StreamEvent: TypeAlias = StreamStartEvent | StreamDeltaEvent | StreamEndEvent


if TYPE_CHECKING:
    _Copied = TypeVar("_Copied", bound="LM")  # typing.Self is 3.11+

    # --- errors: classes, as DSPy's are (raised, caught and subclassed here) ---------------------------

    class LM15Error(Exception):
        """``dspy.lm15``'s error root: what the engine raises, with what DSPy's retry loop reads."""

        default_code: str | None
        message: str
        code: str | None
        provider: str | None
        provider_code: str | None
        status: int | None
        request_id: str | None
        retry_after: float | None

        def __init__(
            self,
            message: str = "",
            *,
            code: str | None = None,
            provider: str | None = None,
            provider_code: str | None = None,
            status: int | None = None,
            request_id: str | None = None,
            retry_after: float | None = None,
            rate_limit_headers: Mapping[str, Sequence[str]] | None = None,
        ) -> None: ...

    class ErrorDetails(TypedDict, total=False):
        """The keyword arguments every lm15 error takes besides its message (what one error passes on)."""

        provider: str | None
        provider_code: str | None
        status: int | None
        request_id: str | None

    class TransportError(LM15Error): ...

    class LM15ConfigurationError(LM15Error): ...  # lm15's ConfigurationError (see LM15Module)

    class CapabilityError(LM15Error):
        feature: str | None

        def __init__(self, message: str = "", *, feature: str | None = None, **kwargs: Any) -> None: ...

    class UnsupportedFeatureError(CapabilityError): ...

    class ProviderError(LM15Error): ...

    class AuthError(ProviderError):
        credential_hint: str | None

        def __init__(self, message: str = "", *, credential_hint: str | None = None, **kwargs: Any) -> None: ...

    class BillingError(ProviderError): ...

    class RateLimitError(ProviderError): ...

    class InvalidRequestError(ProviderError): ...

    class ContextLengthError(InvalidRequestError): ...

    class UnsupportedModelError(InvalidRequestError): ...

    class LM15TimeoutError(ProviderError, TimeoutError): ...  # lm15's TimeoutError (see LM15Module)

    class ServerError(ProviderError): ...

    class DSPyError(Exception):
        """``dspy.utils.exceptions``' root: what DSPy's calls raise."""

        default_code: str | None
        message: str
        code: str | None
        model: str | None
        provider: str | None
        provider_code: str | None
        status: int | None
        request_id: str | None
        retry_after: float | None

        def __init__(
            self,
            message: str = "",
            *,
            code: str | None = None,
            model: str | None = None,
            provider: str | None = None,
            provider_code: str | None = None,
            status: int | None = None,
            request_id: str | None = None,
            retry_after: float | None = None,
        ) -> None: ...

    class LMError(DSPyError): ...

    class LMTransportError(LMError): ...

    class LMConfigurationError(LMError): ...

    class LMNotConfiguredError(LMConfigurationError): ...

    class LMUnsupportedFeatureError(LMError):
        feature: str | None
        features: list[str]
        issues: list[str]

        def __init__(
            self,
            message: str = "",
            *,
            features: list[str] | None = None,
            feature: str | None = None,
            issues: list[str] | None = None,
            **kwargs: Any,
        ) -> None: ...

    class LMProviderError(LMError): ...

    class LMUnexpectedError(LMError): ...

    class LMAuthError(LMProviderError): ...

    class LMBillingError(LMProviderError): ...

    class LMRateLimitError(LMProviderError): ...

    class LMInvalidRequestError(LMProviderError): ...

    class ContextWindowExceededError(LMInvalidRequestError):
        def __init__(self, *, model: str | None = None, message: str = "", **kwargs: Any) -> None: ...

    class LMUnsupportedModelError(LMInvalidRequestError): ...

    class LMTimeoutError(LMProviderError): ...

    class LMServerError(LMProviderError): ...

    # --- dspy.LM: a class, as HFModel subclasses it (a Protocol's members would be abstract there) ------

    class LM:
        """What ``HFModel`` and ``Anyscale`` use of ``dspy.LM`` (and its base, ``dspy.BaseLM``)."""

        model: str
        model_type: str
        cache: bool
        callbacks: list[Any]
        num_retries: int
        kwargs: dict[str, Any]
        history: list[dict[str, Any]]
        # Fine-tuning (dspy.clients.provider): the Provider, and what DSPy's finetune reads.
        provider: Any
        finetuning_model: str | None
        train_kwargs: dict[str, Any]
        _engine_spec: Any
        _async_engine_spec: Any

        def __init__(
            self,
            model: str,
            model_type: str = "chat",
            temperature: float | None = None,
            max_tokens: int | None = None,
            cache: bool = True,
            callbacks: list[Any] | None = None,
            num_retries: int = ...,
            *,
            engine: Any = ...,
            async_engine: Any = None,
            **kwargs: Any,
        ) -> None: ...
        @property
        def engine(self) -> Any: ...
        # Outputs: a list of strings or dicts for ``prompt=``/``messages=``, a Response for a Request.
        def __call__(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any: ...
        async def acall(self, prompt: Any = None, *, messages: Any = None, **kwargs: Any) -> Any: ...
        def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any: ...
        async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any: ...
        def update_history(self, entry: dict[str, Any]) -> None: ...
        def inspect_history(self, n: int = 1, file: TextIO | None = None) -> None: ...
        def copy(self: _Copied, **kwargs: Any) -> _Copied: ...
        def dump_state(self) -> dict[str, Any]: ...
        def infer_provider(self) -> Any: ...
        @classmethod
        def load_state(cls, state: dict[str, Any], *, allow_custom_lm_class: bool = False) -> LM: ...
        def close(self) -> None: ...
        async def aclose(self) -> None: ...
        def __getstate__(self) -> dict[str, Any]: ...
        def __setstate__(self, state: dict[str, Any]) -> None: ...


class LM15Module(Protocol):
    """``dspy.lm15`` as this package uses it: the classes it builds, checks and raises."""

    @property
    def Request(self) -> type[Request]: ...
    @property
    def Config(self) -> type[Config]: ...
    @property
    def Message(self) -> type[Message]: ...
    @property
    def TextPart(self) -> type[TextPart]: ...
    @property
    def ThinkingPart(self) -> type[ThinkingPart]: ...
    @property
    def RefusalPart(self) -> type[RefusalPart]: ...
    @property
    def ImagePart(self) -> type[ImagePart]: ...
    @property
    def ToolCallPart(self) -> type[ToolCallPart]: ...
    @property
    def ToolResultPart(self) -> type[ToolResultPart]: ...
    @property
    def FunctionTool(self) -> type[FunctionTool]: ...
    @property
    def Response(self) -> type[Response]: ...
    @property
    def Usage(self) -> type[Usage]: ...
    @property
    def TokenLogprob(self) -> type[TokenLogprob]: ...
    @property
    def TopLogprob(self) -> type[TopLogprob]: ...
    @property
    def StreamStartEvent(self) -> type[StreamStartEvent]: ...
    @property
    def StreamDeltaEvent(self) -> type[StreamDeltaEvent]: ...
    @property
    def StreamEndEvent(self) -> type[StreamEndEvent]: ...
    @property
    def TextDelta(self) -> type[TextDelta]: ...
    @property
    def ThinkingDelta(self) -> type[ThinkingDelta]: ...
    @property
    def ToolCallDelta(self) -> type[ToolCallDelta]: ...
    @property
    def LM15Error(self) -> type[LM15Error]: ...
    @property
    def TransportError(self) -> type[TransportError]: ...
    @property
    def ConfigurationError(self) -> type[LM15ConfigurationError]: ...
    @property
    def UnsupportedFeatureError(self) -> type[UnsupportedFeatureError]: ...
    @property
    def ProviderError(self) -> type[ProviderError]: ...
    @property
    def AuthError(self) -> type[AuthError]: ...
    @property
    def BillingError(self) -> type[BillingError]: ...
    @property
    def RateLimitError(self) -> type[RateLimitError]: ...
    @property
    def InvalidRequestError(self) -> type[InvalidRequestError]: ...
    @property
    def ContextLengthError(self) -> type[ContextLengthError]: ...
    @property
    def UnsupportedModelError(self) -> type[UnsupportedModelError]: ...
    @property
    def TimeoutError(self) -> type[LM15TimeoutError]: ...
    @property
    def ServerError(self) -> type[ServerError]: ...


lm15: LM15Module  # declared, never assigned: at run time ``lm15`` is ``from dspy import lm15``
