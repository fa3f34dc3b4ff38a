"""OpenTelemetry traces and metrics for ``Anyscale`` calls, following the GenAI semantic conventions.

Optional: ``pip install 'dspy-anyscale[otel]'``. Without OpenTelemetry installed nothing here
changes anything, and importing ``dspy_anyscale`` never imports OpenTelemetry.

Turn it on for every instance (including ones already made), with your providers or the
global ones::

    from dspy_anyscale import tracing
    tracing.instrument()                                   # global TracerProvider / MeterProvider
    tracing.instrument(tracer_provider=tp, meter_provider=mp, record_content=True)
    tracing.uninstrument()

or for one instance: ``Anyscale(..., tracing=True)`` (always), ``tracing=False`` (never, even
when instrumented), ``tracing=None`` (the default: follow :func:`instrument`). An instance with
``tracing=True`` and no :func:`instrument` call uses the global providers, without content.

Each call makes a ``CLIENT`` span ``chat {model}`` / ``text_completion {model}`` under whatever
span is current when the call starts, with one child span per HTTP attempt (``POST
/v1/chat/completions``: status, retry number, the wait before it, time to first chunk, the
server's request id). A call answered from DSPy's cache is a span with
``dspy_anyscale.cache_hit=true`` and no attempts. Metrics: ``gen_ai.client.operation.duration``,
``gen_ai.client.token.usage`` and, for streams, ``gen_ai.client.operation.time_to_first_chunk``.
Prompt and completion text are recorded only with ``record_content=True``; the API key and
header values never are (the observer never sees a header).

In Ray workers, hand the driver's context to the task and attach it there::

    carrier = tracing.inject()                          # on the driver, inside your span
    @ray.remote
    def work(carrier, question):
        tracing.instrument()                            # once per worker, with its own exporter
        with tracing.attach(carrier):                   # our spans join the driver's trace
            return program(question=question)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from .. import _constants as C
from .._observe import Attempt, AttemptStart, Call, Observer
from ..errors import ConfigurationError

__all__ = [
    "TracingObserver",
    "attach",
    "check_tracing",
    "inject",
    "instrument",
    "is_instrumented",
    "tracing_observer",
    "uninstrument",
]

logger = logging.getLogger(C.LOGGER_NAME)

_INSTALL_HINT = (
    "tracing needs OpenTelemetry: pip install 'dspy-anyscale[otel]' (and an SDK with an exporter, "
    "e.g. opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http, to send the spans somewhere)"
)

# The configuration instrument() set (an ._otel.Telemetry), or None; read on every call, so one
# assignment turns tracing on or off for every instance at once.
_active: Any = None
_default: Any = None  # the global providers without content, for tracing=True without instrument()
_default_lock = threading.Lock()
_hook_failed = False


def _implementation() -> ModuleType:
    """The OpenTelemetry-backed implementation, imported on first use."""
    try:
        from . import _otel as module
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        raise ImportError(_INSTALL_HINT) from exc
    return module


def instrument(tracer_provider: Any = None, meter_provider: Any = None, record_content: bool = False) -> None:
    """Trace every ``Anyscale`` call from now on (instances made before included, unless ``tracing=False``).

    Args:
        tracer_provider / meter_provider: where spans and metric points go; default: the global
            ones (``opentelemetry.trace.set_tracer_provider(...)``), also when set later.
        record_content: also record the prompt (``gen_ai.system_instructions``,
            ``gen_ai.input.messages``), the completion (``gen_ai.output.messages``) and error
            messages, which can quote the server's reply. Off by default.

    Calling it again replaces the configuration; calls already running keep theirs.

    >>> from dspy_anyscale import tracing
    >>> tracing.instrument()             # doctest: +SKIP
    >>> tracing.is_instrumented()        # doctest: +SKIP
    True
    """
    global _active
    _active = _implementation().Telemetry(tracer_provider, meter_provider, record_content)


def uninstrument() -> None:
    """Stop tracing calls of instances that follow :func:`instrument` (``tracing=None``)."""
    global _active
    _active = None


def is_instrumented() -> bool:
    return _active is not None


_UNAVAILABLE = object()  # _default when OpenTelemetry is missing: said once, not retried on every call


def _default_telemetry() -> Any:
    global _default
    with _default_lock:
        if _default is None:
            try:
                _default = _implementation().Telemetry()
            except ImportError:
                _default = _UNAVAILABLE
                logger.warning("tracing=True, but %s; calls are not traced", _INSTALL_HINT)
        return None if _default is _UNAVAILABLE else _default


def check_tracing(value: Any) -> bool | None:
    """The constructor's check of ``tracing=``: True, False or None, and True only with OpenTelemetry installed.

    >>> check_tracing(None) is None
    True
    """
    mode = _mode(value)
    if mode is True:
        try:
            _implementation()
        except ImportError as exc:
            raise ConfigurationError(f"tracing=True: {exc}") from None
    return mode


def _mode(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConfigurationError(f"tracing must be True, False or None (follow tracing.instrument()), got {value!r}")
    return value


def tracing_observer(
    tracing: bool | None = None,
    *,
    base_url: str | None = None,
    endpoint: str = "completions",
    adapter: str | None = None,
) -> TracingObserver:
    """The observer an ``Anyscale`` puts next to its usage recorder, for ``Anyscale(..., tracing=...)``.

    ``base_url`` and ``endpoint`` (``"chat"`` / ``"completions"``) describe a call that makes
    no request (a cache hit); attempts say their own URL and endpoint. It does not check that
    OpenTelemetry is installed (:func:`check_tracing` does, in the constructor): an instance
    rebuilt from a pickle in a worker without it still answers, and says once why it cannot trace.

    >>> observer = tracing_observer(None, base_url="http://127.0.0.1:8000/v1", endpoint="chat")
    >>> observer.mode is None
    True
    """
    return TracingObserver(_mode(tracing), base_url=base_url, endpoint=endpoint, adapter=adapter)


class TracingObserver(Observer):
    """Always present on an instance; each hook returns at once unless this call is traced.

    Whether a call is traced is decided once, when it starts (``mode``, then whether
    :func:`instrument` is on); the call's spans then live in ``call.state[id(self)]``. Every
    hook is exception-safe: tracing never fails a call.
    """

    def __init__(
        self,
        mode: bool | None = None,
        *,
        base_url: str | None = None,
        endpoint: str = "completions",
        adapter: str | None = None,
    ) -> None:
        self.mode = mode
        self.base_url = base_url
        self.endpoint = endpoint
        self.adapter = adapter  # the LoRA adapter of the LM this observes: on its call spans

    def __repr__(self) -> str:
        return f"TracingObserver(mode={self.mode!r})"

    def call_started(self, call: Call) -> None:
        if self.mode is False:
            return
        telemetry = _active
        if telemetry is None:
            if self.mode is None:
                return
            telemetry = _guarded(_default_telemetry)
            if telemetry is None:
                return
        trace = _guarded(telemetry.start_call, call, self.base_url, self.endpoint, self.adapter)
        if trace is not None:
            call.state[id(self)] = trace

    def attempt_started(self, call: Call, attempt: AttemptStart) -> None:
        trace = call.state.get(id(self))
        if trace is not None:
            _guarded(trace.attempt_started, call, attempt)

    def attempt_headers(self, call: Call, attempt: AttemptStart) -> dict[str, str] | None:
        trace = call.state.get(id(self))
        return _guarded(trace.attempt_headers, call, attempt) if trace is not None else None

    def attempt_finished(self, call: Call, attempt: Attempt) -> None:
        trace = call.state.get(id(self))
        if trace is not None:
            _guarded(trace.attempt_finished, call, attempt)

    def call_answered(self, call: Call) -> None:
        trace = call.state.get(id(self))
        if trace is not None:
            _guarded(trace.call_answered, call)

    def call_finished(self, call: Call, error: BaseException | None) -> None:
        trace = call.state.get(id(self))
        if trace is not None:
            _guarded(trace.call_finished, call, error)


def _guarded(hook: Any, *args: Any) -> Any:
    """``hook(*args)``, or None when it raises: the server has answered, a span must not cost the answer."""
    global _hook_failed
    try:
        return hook(*args)
    except Exception:
        level = logging.DEBUG if _hook_failed else logging.WARNING  # once loudly, then quietly
        _hook_failed = True
        logger.log(level, "tracing hook %s failed; the call goes on", getattr(hook, "__name__", hook), exc_info=True)
        return None


# --- trace context across processes (Ray tasks and actors) --------------------------------------


def inject() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``, ``tracestate``, ``baggage``), to pass
    to a Ray task or actor; ``{}`` without OpenTelemetry or outside any span.

    >>> isinstance(inject(), dict)
    True
    """
    try:
        from opentelemetry import propagate
    except ImportError:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def attach(carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Make the context in ``carrier`` (from :func:`inject`) current inside the block, in a worker.

    A no-op for an empty carrier or without OpenTelemetry, so a task can call it unconditionally.
    """
    if not carrier:
        yield
        return
    try:
        from opentelemetry import context, propagate
    except ImportError:
        yield
        return
    token = context.attach(propagate.extract(dict(carrier)))
    try:
        yield
    finally:
        context.detach(token)
