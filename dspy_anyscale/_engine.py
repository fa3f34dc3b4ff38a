"""The DSPy engine pair: one attempt per call, joining the wire mapping and the transport.

DSPy owns everything around an attempt (cache, retries with backoff, ``n`` fan-out, history,
usage, callbacks); an engine turns one ``dspy.lm15.Request`` into one ``Response`` or raises a
``dspy.lm15`` error. The sync and async engines share the mapping; only the I/O differs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict
from typing import Any

from dspy import lm15
from dspy.clients.engines.base import validate_request
from dspy.lm15 import Request, Response

from . import _constants as C
from ._config import Endpoint, Timeout, resolve_endpoint, resolve_timeout
from ._observe import report_attempt
from ._params import supported_params
from ._sse import aiter_sse, iter_sse
from ._streaming import StreamTranslator
from ._transport import AsyncTransport, JsonReply, SyncTransport
from ._wire import WireCall, WireOptions, build_call, parse_response
from .usage import Attempt, UsageRecorder


class _EngineBase:
    """What both engines share: the mapping options and the capabilities DSPy reads."""

    # DSPy reads these attributes from a custom engine to decide what adapters send.
    supports_reasoning = False

    def __init__(
        self, transport: SyncTransport | AsyncTransport, options: WireOptions, recorder: UsageRecorder | None = None
    ) -> None:
        self.transport = transport
        self.options = options
        self.recorder = recorder

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.transport.endpoint.base_url!r}, endpoint={self.options.endpoint!r})"
        )

    @property
    def _chat(self) -> bool:
        return self.options.endpoint == "chat"

    @property
    def supports_function_calling(self) -> bool:
        return self._chat and self.options.supports_tools

    @property
    def supports_response_schema(self) -> bool:
        return self._chat and self.options.supports_response_schema

    @property
    def supported_params(self) -> frozenset[str]:
        return supported_params(chat=self._chat, tools=self.options.supports_tools)

    def _call(self, request: Request, *, stream: bool = False) -> WireCall:
        validate_request(request)
        return build_call(request, self.options, stream=stream)

    def _url(self, call: WireCall) -> str:
        return self.transport.endpoint.url(call.path)

    def _parse(self, reply: JsonReply, call: WireCall, request: Request) -> Response:
        return parse_response(reply.data, call, request, url=self._url(call), status=reply.status)

    def dump_state(self) -> dict[str, Any]:
        """Reconstruction state for DSPy's save of custom engines: no key, no header values."""
        transport = self.transport
        options = asdict(self.options)
        options["extra_body"] = dict(self.options.extra_body)
        return {
            "base_url": transport.endpoint.base_url,
            "timeout": list(transport.timeout.as_tuple()),
            "pool_size": transport.pool_size,
            "options": options,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> _EngineBase:
        """Rebuild from :meth:`dump_state`; the key is read again from the environment."""
        endpoint = resolve_endpoint(api_base=state["base_url"])
        transport_cls = AsyncTransport if cls is AsyncAnyscaleEngine else SyncTransport
        transport = transport_cls(endpoint, resolve_timeout(tuple(state["timeout"])), pool_size=state["pool_size"])
        return cls(transport, WireOptions(**state["options"]))


class _AttemptClock:
    """Times one attempt (and its first token) and reports it to the usage recorder."""

    def __init__(self, engine: _EngineBase, call: WireCall, request: Request, *, stream: bool = False) -> None:
        self._recorder = engine.recorder
        self._call = call
        self._model = request.model
        self._stream = stream
        self._started = time.perf_counter()
        self.ttft: float | None = None
        self.request_id: str | None = None
        self._reported = False

    def __enter__(self) -> _AttemptClock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not self._reported:  # a failed attempt (or a stream closed early)
            self._report(False, type(exc).__name__, None, None)

    def timed(self, events: list[Any]) -> list[Any]:
        """Stream events as they arrive; the first one stops the time-to-first-token clock."""
        if events and self.ttft is None:
            self.ttft = time.perf_counter() - self._started
        return events

    def succeeded(self, response: Response) -> Response:
        self._report(True, None, response.usage.input_tokens, response.usage.output_tokens)
        return response

    def finished(self, end: list[Any]) -> list[Any]:
        """A stream's final events (its usage is on the end event)."""
        usage = end[-1].usage or lm15.Usage()
        self._report(True, None, usage.input_tokens, usage.output_tokens)
        return end

    def _report(self, ok: bool, error: str | None, prompt: int | None, completion: int | None) -> None:
        self._reported = True
        report_attempt(
            self._recorder,
            Attempt(
                endpoint=self._call.endpoint,
                model=self._model,
                ok=ok,
                error=error,
                latency_s=time.perf_counter() - self._started,
                ttft_s=self.ttft,
                prompt_tokens=prompt,
                completion_tokens=completion,
                request_id=self.request_id,
                stream=self._stream,
            ),
        )


class AnyscaleEngine(_EngineBase):
    """Synchronous engine: ``complete`` and ``stream`` over a pooled ``requests`` adapter."""

    transport: SyncTransport

    def complete(self, request: Request) -> Response:
        call = self._call(request)
        with _AttemptClock(self, call, request) as clock:
            reply = self.transport.request_json("POST", call.path, call.payload)
            clock.request_id = reply.request_id
            return clock.succeeded(self._parse(reply, call, request))

    def stream(self, request: Request) -> Iterator[Any]:
        call = self._call(request, stream=True)
        translator = StreamTranslator(call, request, url=self._url(call))
        with _AttemptClock(self, call, request, stream=True) as clock:
            with self.transport.stream(call.path, call.payload) as reply, translator.interruptions():
                clock.request_id = reply.request_id
                for event in iter_sse(reply.chunks):
                    yield from clock.timed(translator.feed(event))
            end = clock.finished(translator.finish())
        yield from end

    def close(self) -> None:
        self.transport.close()


class AsyncAnyscaleEngine(_EngineBase):
    """Async engine on httpx: awaits I/O on the caller's event loop, no thread pool."""

    transport: AsyncTransport

    async def complete(self, request: Request) -> Response:
        call = self._call(request)
        with _AttemptClock(self, call, request) as clock:
            reply = await self.transport.request_json("POST", call.path, call.payload)
            clock.request_id = reply.request_id
            return clock.succeeded(self._parse(reply, call, request))

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        call = self._call(request, stream=True)
        translator = StreamTranslator(call, request, url=self._url(call))
        with _AttemptClock(self, call, request, stream=True) as clock:
            async with self.transport.stream(call.path, call.payload) as reply:
                clock.request_id = reply.request_id
                with translator.interruptions():
                    async for event in aiter_sse(reply.chunks):
                        for item in clock.timed(translator.feed(event)):
                            yield item
            end = clock.finished(translator.finish())
        for item in end:
            yield item

    async def aclose(self) -> None:
        await self.transport.aclose()


def make_engines(
    endpoint: Endpoint,
    timeout: Timeout,
    options: WireOptions,
    *,
    headers: Mapping[str, str] | None = None,
    pool_size: int = C.DEFAULT_POOL_SIZE,
    recorder: UsageRecorder | None = None,
) -> tuple[AnyscaleEngine, AsyncAnyscaleEngine]:
    """The sync/async engine pair for one endpoint, each with its own connection pool, one recorder."""
    sync = AnyscaleEngine(SyncTransport(endpoint, timeout, headers=headers, pool_size=pool_size), options, recorder)
    async_ = AsyncAnyscaleEngine(
        AsyncTransport(endpoint, timeout, headers=headers, pool_size=pool_size), options, recorder
    )
    return sync, async_
