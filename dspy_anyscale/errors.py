"""The exceptions dspy-anyscale raises, and the DSPy ones it raises through.

Everything this package raises itself is an :class:`AnyscaleError`. Each class also keeps the
Python or DSPy base that says what kind of failure it is (``except ValueError`` and DSPy's retry
loop go on reading those), named in brackets below. The tree is checked against the code
(``tests/test_errors.py``)::

    AnyscaleError                        the root: ``except AnyscaleError`` catches every class below
    ├── ConfigurationError               something you passed cannot work, refused before any request
    │   │                                (a setting, a limit, an argument of a Ray entry point)
    │   │                                [ValueError, DSPy's LMConfigurationError: never retried]
    │   ├── MissingConfigurationError    no base URL / API key found anywhere [LMNotConfiguredError]
    │   ├── InvalidParameterError        a generation parameter of the wrong type or out of range; names
    │   │                                it in ``parameter``, says what it takes in ``expected`` [TypeError]
    │   └── UnsupportedParameterError    a parameter this endpoint cannot carry, refused instead of
    │                                    dropped [DSPy's LMUnsupportedFeatureError]
    ├── BudgetExceededError              refused by the LM's own limits before it was sent: its worst case
    │                                    does not fit budget_usd or max_requests [DSPy's LMError: not retried]
    ├── LimiterTimeoutError              a caller's own wait limit passed while queued for a slot or a rate
    │   │                                bucket; nothing was sent [DSPy's LMError, TimeoutError: not retried]
    │   └── LimiterDeadlockError         a plain (sync) call on an event loop's thread would wait for that
    │                                    same loop's tasks, which cannot run while it blocks: refused at once
    ├── UnexpectedResponseError          a 2xx body that is not the JSON an OpenAI-compatible server sends
    │                                    [lm15's ProviderError: DSPy re-raises it as LMProviderError, not retried]
    ├── RetryWaitTooLongError            internal to the engine: a 429/5xx asked to wait longer than
    │                                    max_retry_wait [lm15's ProviderError]; you catch the public error
    │                                    it stands for, LMRateLimitError / LMServerError (see the table below)
    ├── PoolError                        a dspy_anyscale.ray.ProgramPool cannot run: closed, its workers did
    │                                    not start, or all died [RuntimeError]
    ├── FinetuneError                    dspy_anyscale.finetune: a fine-tuning job failed (training crashed,
    │                                    the adapter could not be converted or served, the job was cancelled
    │                                    or ended FAILED); names the stage and the log to read [RuntimeError]
    ├── ServiceError                     an Anyscale Service could not be resolved by name (unknown, not
    │                                    running, no such version, the SDK refused) [RuntimeError]
    ├── LocalServerError                 dspy_anyscale.servers.llama_server: installing, starting or stopping
    │                                    llama.cpp's llama-server failed [RuntimeError]
    ├── LlamaCppPythonError              dspy_anyscale.servers.llama_cpp_python: the same for
    │                                    llama-cpp-python's server [RuntimeError]
    ├── GatewayError                     dspy_anyscale.servers.portkey: the same for the Portkey gateway
    │                                    [RuntimeError]
    └── PhoenixError                     dspy_anyscale.servers.phoenix: the same for Arize Phoenix [RuntimeError]

"You passed something wrong" is one family: a wrong value is a ``ConfigurationError`` wherever it
is given (``Anyscale(...)``, ``Anyscale.models``, ``Limits(...)``, a call's options, the Ray entry
points), found before any request and before any Ray work, with a message that names what was
wrong and what it takes. A keyword a function does not take is Python's own ``TypeError``, as for
any function.

Found while talking to the server, the engine raises ``dspy.lm15`` errors, the contract DSPy's
retry loop reads; every DSPy call (``lm(...)``, ``await lm.acall(...)``, any module) re-raises
them as DSPy's public errors, with the lm15 error as ``__cause__``::

    HTTP / transport failure              engine raises (dspy.lm15)    you catch (dspy.utils.exceptions)
    401, 403                              AuthError                    LMAuthError              not retried
    402                                   BillingError                 LMBillingError           not retried
    429 (Retry-After honoured)            RateLimitError               LMRateLimitError         retried
    400 prompt too long                   ContextLengthError           ContextWindowExceededError  not retried
    404 unknown model                     UnsupportedModelError        LMUnsupportedModelError  not retried
    other 4xx                             InvalidRequestError          LMInvalidRequestError    not retried
    408, 504, connect/read timeout        TimeoutError                 LMTimeoutError           retried
    5xx                                   ServerError                  LMServerError            retried
    connection refused/reset, DNS, TLS    TransportError               LMTransportError         retried
    2xx body that is not the JSON an      UnexpectedResponseError      LMProviderError          not retried
      OpenAI-compatible server sends
    a field the wire cannot carry         UnsupportedFeatureError      LMUnsupportedFeatureError  not retried
    429/5xx asking to wait longer than    RetryWaitTooLongError        LMRateLimitError /       failed at once
      max_retry_wait (default 60 s)                                    LMServerError

All of DSPy's classes are re-exported here, so ``from dspy_anyscale.errors import LMRateLimitError``
works. No message ever contains the API key. Every class pickles (Ray sends errors between
processes) with its attributes.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # DSPy's classes as typed views (DSPy ships no types); at run time, DSPy's own
    from ._dspy_types import (
        ContextWindowExceededError,
        LM15Error,
        LMAuthError,
        LMBillingError,
        LMConfigurationError,
        LMError,
        LMInvalidRequestError,
        LMNotConfiguredError,
        LMProviderError,
        LMRateLimitError,
        LMServerError,
        LMTimeoutError,
        LMTransportError,
        LMUnexpectedError,
        LMUnsupportedFeatureError,
        LMUnsupportedModelError,
        ProviderError,
        RateLimitError,
    )
else:
    from dspy.lm15 import LM15Error, ProviderError, RateLimitError
    from dspy.utils.exceptions import (
        ContextWindowExceededError,
        LMAuthError,
        LMBillingError,
        LMConfigurationError,
        LMError,
        LMInvalidRequestError,
        LMNotConfiguredError,
        LMProviderError,
        LMRateLimitError,
        LMServerError,
        LMTimeoutError,
        LMTransportError,
        LMUnexpectedError,
        LMUnsupportedFeatureError,
        LMUnsupportedModelError,
    )

__all__ = [
    "AnyscaleError",
    "BudgetExceededError",
    "ConfigurationError",
    "ContextWindowExceededError",
    "FinetuneError",
    "InvalidParameterError",
    "LMAuthError",
    "LMBillingError",
    "LMConfigurationError",
    "LMError",
    "LMInvalidRequestError",
    "LMNotConfiguredError",
    "LMProviderError",
    "LMRateLimitError",
    "LMServerError",
    "LMTimeoutError",
    "LMTransportError",
    "LMUnexpectedError",
    "LMUnsupportedFeatureError",
    "LMUnsupportedModelError",
    "LimiterDeadlockError",
    "LimiterTimeoutError",
    "MissingConfigurationError",
    "PoolError",
    "ServiceError",
    "UnexpectedResponseError",
    "UnsupportedParameterError",
]


class AnyscaleError(Exception):
    """Base class of every exception raised by dspy-anyscale itself."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its class, args and attributes, rebuilt without calling __init__: the default
        # (``cls(*args)``) would drop the keyword-only arguments our classes and DSPy's and lm15's
        # bases take (``parameter=``, ``limit=``, ``provider=`` ...) and fail to rebuild some of them.
        # Read-only mappings (lm15 freezes ``rate_limit_headers``), which pickle refuses, travel as
        # dicts and are frozen again. Ray sends a worker's errors to the driver this way.
        frozen = tuple(name for name, value in vars(self).items() if isinstance(value, MappingProxyType))
        state = {name: dict(value) if name in frozen else value for name, value in vars(self).items()}
        return (_rebuild, (type(self), self.args, state, frozen))


def _rebuild(
    cls: type[AnyscaleError], args: tuple[Any, ...], state: dict[str, Any], frozen: tuple[str, ...]
) -> AnyscaleError:
    error = cls.__new__(cls)
    error.args = args
    vars(error).update(state)
    for name in frozen:
        setattr(error, name, MappingProxyType(state[name]))
    return error


class ConfigurationError(AnyscaleError, LMConfigurationError, ValueError):
    """Something you passed (argument, environment or ``.env``) cannot work; says what and how to fix it.

    The one family of "you passed something wrong": settings, limits and the Ray entry points'
    arguments raise it, and the parameter errors below are kinds of it. Found before any request.
    """


class MissingConfigurationError(ConfigurationError, LMNotConfiguredError):
    """A required setting (base URL, API key) was found nowhere; names the variable to set."""


class InvalidParameterError(ConfigurationError, TypeError):
    """A generation parameter of the wrong type or value; ``parameter`` names it, ``expected`` says what it takes.

    Raised before any request, wherever the parameter was given (constructor default, direct call,
    program call). A ``ConfigurationError`` (so a ``ValueError``), and a ``TypeError`` too, as
    Python raises for an argument of the wrong type: ``except ValueError`` and ``except TypeError``
    both catch it, as they would DSPy's own argument errors.
    """

    def __init__(self, message: str, *, parameter: str, expected: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.expected = expected


class UnsupportedParameterError(ConfigurationError, LMUnsupportedFeatureError):
    """A generation parameter this endpoint cannot carry; refused instead of being dropped."""

    def __init__(self, message: str, *, features: list[str] | None = None) -> None:
        LMUnsupportedFeatureError.__init__(self, message, features=features)


class PoolError(AnyscaleError, RuntimeError):
    """A :class:`dspy_anyscale.ray.ProgramPool` cannot run: it is closed, its workers did not start, or all died."""


class FinetuneError(AnyscaleError, RuntimeError):
    """A fine-tuning job of :mod:`dspy_anyscale.finetune` failed; ``stage`` names where
    (``"data"``, ``"train"``, ``"convert"``, ``"serve"``, ``"submit"``, ``"job"``, ``"cancelled"``)."""

    def __init__(self, message: str, *, stage: str = "job") -> None:
        super().__init__(message)
        self.stage = stage


class ServiceError(AnyscaleError, RuntimeError):
    """An Anyscale Service could not be resolved by name (``Anyscale.from_service``)."""


class UnexpectedResponseError(ProviderError, AnyscaleError):
    """The server answered 2xx with something that is not an OpenAI-compatible JSON body.

    Raised by the engine (an lm15 ``ProviderError``, so DSPy does not retry it and re-raises it as
    ``LMProviderError``). The message names the URL, the status and what came back.
    """

    default_code = "unexpected_response"

    def __init__(self, message: str = "", **details: Any) -> None:
        # ``details``: lm15's (provider, status, request_id, ...). Named here: the type checker sees
        # AnyscaleError's constructor otherwise, lm15 being untyped for it.
        ProviderError.__init__(self, message, **details)


class BudgetExceededError(AnyscaleError, LMError):
    """A request was refused before it was sent: its worst case could take spending over a cap.

    ``limit`` is ``"budget_usd"`` or ``"max_requests"``. The USD figures are what the ledger held
    when it refused: ``spent_usd`` (answered requests), ``reserved_usd`` (worst cases of the
    requests in flight), ``request_usd`` (this request's worst case) and ``budget_usd``.
    """

    default_code = "budget_exceeded"

    def __init__(
        self,
        message: str = "",
        *,
        limit: str = "budget_usd",
        spent_usd: float = 0.0,
        reserved_usd: float = 0.0,
        request_usd: float = 0.0,
        budget_usd: float | None = None,
        requests: int = 0,
        reserved_requests: int = 0,
        max_requests: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.limit = limit
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.request_usd = request_usd
        self.budget_usd = budget_usd
        self.requests = requests
        self.reserved_requests = reserved_requests
        self.max_requests = max_requests
        super().__init__(message, **kwargs)


class LimiterTimeoutError(AnyscaleError, LMError, TimeoutError):
    """A caller's ``timeout`` passed while it waited for a slot, a rate bucket or a cool-down.

    Nothing was sent and nothing was reserved. Not retried by DSPy: the caller chose the limit.
    """

    default_code = "limiter_timeout"


class LimiterDeadlockError(LimiterTimeoutError):
    """A synchronous call on the thread of a running event loop would have to wait for a slot that
    only tasks of that same loop can free (or behind such tasks in the queue): they cannot run while
    the call blocks their loop, so it would wait forever. Refused at once; nothing was sent.

    Inside ``async def`` code use ``await lm.acall(...)``, or run the plain call in a thread
    (``await asyncio.to_thread(lm, ...)``). A ``LimiterTimeoutError``: caught where a limiter
    timeout is, and never retried by DSPy.
    """

    default_code = "limiter_deadlock"


class RetryWaitTooLongError(ProviderError, AnyscaleError):
    """Engine-internal: the server asked to wait longer than ``max_retry_wait`` before retrying.

    DSPy would wait whatever an error's ``retry_after`` says (27 hours for ``Retry-After: 99999``), so
    the engine raises this instead, which DSPy does not retry; the LM's entry points then raise the
    public error the status means (``LMRateLimitError`` for 429, ``LMServerError`` for 5xx) at once,
    saying what the server asked for. Users never catch this class.
    """

    default_code = "retry_wait_too_long"

    def __init__(self, refused: LM15Error, *, limit: float) -> None:
        asked = refused.retry_after if refused.retry_after is not None else float("inf")
        shown = "an unbounded time" if asked == float("inf") else f"{asked:g} s"
        ProviderError.__init__(
            self,
            f"The server asked to wait {shown} before retrying (Retry-After), more than max_retry_wait={limit:g} s: "
            f"not retried. {refused.message}",
            provider=refused.provider,
            status=refused.status,
            request_id=refused.request_id,
            provider_code=refused.provider_code,
            retry_after=refused.retry_after,
        )
        self.public = LMRateLimitError if isinstance(refused, RateLimitError) else LMServerError

    def public_error(self, model: str) -> LMError:
        return self.public(
            self.message,
            model=model,
            provider=self.provider,
            provider_code=self.provider_code,
            status=self.status,
            request_id=self.request_id,
            retry_after=self.retry_after,
        )


def public_error(exc: BaseException, model: str) -> BaseException:
    """The error a user should see for ``exc`` raised out of DSPy's call (see :class:`RetryWaitTooLongError`)."""
    cause = exc.__cause__
    if isinstance(exc, LMProviderError) and isinstance(cause, RetryWaitTooLongError):
        return cause.public_error(model)
    return exc
