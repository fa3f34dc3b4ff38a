"""The DSPy engine pair: one attempt per call, joining the wire mapping and the transport.

DSPy owns everything around an attempt (cache, retries with backoff, ``n`` fan-out, history,
usage, callbacks); an engine turns one ``dspy.lm15.Request`` into one ``Response`` or raises a
``dspy.lm15`` error. Inside its one attempt the engine does four things DSPy cannot:

* tells the observers (usage records, tracing) what each HTTP exchange did;
* speaks the server's JSON-mode dialect (a refusal of the form sent is resent at once in the
  other form and remembered; see :mod:`._dialects`), which is not a DSPy retry;
* refuses to let DSPy wait longer than ``max_retry_wait`` because a server said so;
* takes a permit from the LM's limiter, and from a Router's when one calls it, before sending
  (concurrency, rates, budget; without limits only a 429's shared cool-down) and books the answer's
  real usage against it.

The sync and async engines share all of it; only the I/O differs.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import AbstractContextManager, AsyncExitStack, ExitStack, aclosing
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from dspy.clients.engines.base import validate_request

from . import _constants as C
from ._config import Endpoint, Timeout, resolve_endpoint, resolve_timeout
from ._dialects import MEMO, both_refused, may_be_dialect_refusal, other_style, sent_style
from ._identity import cache_identity
from ._observe import AttemptScope, Observer, attempt, calling_module
from ._params import supported_params
from ._secrets import redacting
from ._server_facts import cooldown_s
from ._sse import aiter_sse, iter_sse
from ._streaming import StreamTranslator
from ._transport import (
    AsyncTransport,
    AwaitableTransport,
    BlockingTransport,
    JsonReply,
    StreamReply,
    SyncTransport,
    Transport,
)
from ._wire import WireCall, WireOptions, build_call, parse_response
from .catalog import Prices
from .errors import RetryWaitTooLongError
from .limits import UNLIMITED, AnyLimiter, AnyPermit
from .limits._outer import aadmit, admit, outer_limiters

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from ._dspy_types import LM15Error, Request, Response, StreamEndEvent, StreamEvent, lm15
    from .limits import Estimate
else:
    from dspy import lm15

_E = TypeVar("_E", bound="_EngineBase")


class _EngineBase:
    """What both engines share: the mapping options, the capabilities DSPy reads, and the policies."""

    # DSPy reads these attributes from a custom engine to decide what adapters send.
    supports_reasoning = False

    transport: Transport

    def __init__(
        self,
        transport: Transport,
        options: WireOptions,
        *,
        observers: tuple[Observer, ...] = (),
        headers: Mapping[str, str] | None = None,
        max_retry_wait: float = C.DEFAULT_MAX_RETRY_WAIT,
        limiter: AnyLimiter = UNLIMITED,
        prices: Prices | None = None,
    ) -> None:
        self.transport = transport
        self.options = options
        self.observers = observers
        self.max_retry_wait = max_retry_wait
        self.limiter = limiter  # shared by the pair and by every copy of the LM: one ledger
        self.prices = prices  # for the worst case a budget reserves
        # What besides the call decides the answer: DSPy's cache key gets it, and the dialect memo is keyed on it.
        self.cache_identity = cache_identity(transport.endpoint.base_url, options, headers or {})

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

    # --- one attempt -----------------------------------------------------------------------------

    def _call(self, request: Request, *, stream: bool = False) -> WireCall:
        validate_request(request)
        style = MEMO.style(self.cache_identity, self.options.response_format_style)
        return build_call(request, self.options, stream=stream, style=style)

    def _estimate(self, call: WireCall, limiter: AnyLimiter | None = None) -> Estimate | None:
        """The request's worst case, when a limit of ``limiter`` (default: the LM's) needs one (a budget,
        a token rate); else, with limits, only the prices, so the ledger prices each answer
        (``lm.spending()``). Either names the DSPy module asking, for ``lm.spending(by="module")``.
        A Router's limiter gets the same estimate, at this LM's prices."""
        limiter = self.limiter if limiter is None else limiter
        if not limiter.enabled:
            return None
        from .limits import Estimate  # only LMs with limits get here

        module = calling_module()  # the ledger counts each module's share (lm.spending(by="module"))
        if not limiter.needs_estimate:
            return Estimate(0, None, self.prices, None, module)
        return Estimate.for_payload(call.payload, self.prices, module)

    def _admit(self, call: WireCall) -> AnyPermit:
        """Block until the LM's limiter, and every limiter a Router counts this request against, admit it."""
        outer = outer_limiters()
        if not outer:  # the common case: one context-variable read
            return self.limiter.acquire(self._estimate(call))
        return admit(self.limiter, outer, lambda limiter: self._estimate(call, limiter))

    async def _aadmit(self, call: WireCall) -> AnyPermit:
        outer = outer_limiters()
        if not outer:
            return await self.limiter.aacquire(self._estimate(call))
        return await aadmit(self.limiter, outer, lambda limiter: self._estimate(call, limiter))

    def _url(self, call: WireCall) -> str:
        return self.transport.endpoint.url(call.path)

    def _observed(
        self, call: WireCall, request: Request, *, stream: bool = False
    ) -> AbstractContextManager[AttemptScope | None]:
        return attempt(
            self.observers,
            endpoint=call.endpoint,
            model=request.model,
            url=self._url(call),
            stream=stream,
            request=request,
        )

    def _resend_for(self, call: WireCall, request: Request, error: LM15Error) -> WireCall:
        """The same call in the other JSON-mode form, when ``error`` is the server refusing the form sent
        and the style is ``auto``; else the error, as DSPy should see it."""
        other = other_style(call)
        if self.options.response_format_style == "auto" and other is not None and may_be_dialect_refusal(call, error):
            return build_call(request, self.options, stream=bool(call.payload.get("stream")), style=other)
        self._raise(error)

    def _learned(self, call: WireCall, refusal: LM15Error) -> None:
        style = sent_style(call)
        if style is not None:
            MEMO.learn(self.cache_identity, style, self._url(call), refusal)

    def _resend_failed(self, resend: WireCall, refusal: LM15Error, error: LM15Error) -> NoReturn:
        """The resend failed too: a second refusal is said once with both texts; anything else as it is."""
        if may_be_dialect_refusal(resend, error):
            raise both_refused(resend, refusal, error) from error
        self._raise(error)

    def _raise(self, error: LM15Error) -> NoReturn:
        """Raise ``error``, unless it asks DSPy to wait longer than ``max_retry_wait``: then fail at once."""
        waits = error.retry_after if isinstance(error, lm15.RateLimitError | lm15.ServerError) else None
        if waits is not None and waits > self.max_retry_wait:
            raise RetryWaitTooLongError(error, limit=self.max_retry_wait) from error
        raise error

    def _answered(
        self, scope: AttemptScope | None, permit: AnyPermit, reply: JsonReply, call: WireCall, request: Request
    ) -> Response:
        if scope is not None:
            scope.replied(reply.status, reply.request_id, reply.rate_limit)
        with redacting(self.transport.secrets):  # a 2xx body may echo the request's headers
            response = parse_response(reply.data, call, request, url=self._url(call), status=reply.status)
        usage = response.usage
        permit.settle(usage.input_tokens, usage.output_tokens)
        self._heed(reply.rate_limit)
        if scope is not None:
            scope.succeeded(
                usage.input_tokens,
                usage.output_tokens,
                response.model,
                response.finish_reason,
                response.text,
                response_id=response.id,
                cached_tokens=usage.cache_read_tokens,
            )
        return response

    def _heed(self, rate_limit: Mapping[str, str] | None) -> None:
        """With limits on, a remaining count of 0 in the answer's headers starts the LM's shared cool-down
        now, for the reset the server gives: every caller holds off instead of earning a 429."""
        if rate_limit and self.limiter.enabled:
            pause = cooldown_s(rate_limit)
            if pause is not None:
                self.limiter.note_rate_limited(pause)

    def _translator(self, call: WireCall, request: Request) -> StreamTranslator:
        return StreamTranslator(call, request, url=self._url(call), secret=self.transport.secrets)

    def _stream_opened(self, scope: AttemptScope | None, reply: StreamReply) -> None:
        if scope is not None:
            scope.replied(reply.status, reply.request_id, reply.rate_limit)
        self._heed(reply.rate_limit)

    @staticmethod
    def _events(scope: AttemptScope | None, permit: AnyPermit, events: list[StreamEvent]) -> list[StreamEvent]:
        if events:
            permit.answer_started()  # from now on a failure may have been billed
            if scope is not None:
                scope.first_token()
        return events

    @staticmethod
    def _ended(scope: AttemptScope | None, permit: AnyPermit, translator: StreamTranslator) -> list[StreamEndEvent]:
        end = translator.finish()
        final = end[-1]
        usage = final.usage or lm15.Usage()
        permit.settle(usage.input_tokens, usage.output_tokens)
        if scope is not None:
            scope.succeeded(
                usage.input_tokens,
                usage.output_tokens,
                translator.model,
                final.finish_reason,
                translator.text,
                response_id=translator.response_id,
                cached_tokens=usage.cache_read_tokens,
            )
        return end

    # --- saving ----------------------------------------------------------------------------------

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


class AnyscaleEngine(_EngineBase):
    """Synchronous engine: ``complete`` and ``stream`` over a pooled ``requests`` adapter."""

    transport: BlockingTransport

    def complete(self, request: Request) -> Response:
        call = self._call(request)
        # The permit first: time queued behind the limiter is not the server's latency.
        with ExitStack() as permits:
            permit = permits.enter_context(self._admit(call))
            with self._observed(call, request) as scope:
                headers = _sent_headers(scope)
                try:
                    reply = self.transport.request_json("POST", call.path, call.payload, headers=headers)
                except lm15.LM15Error as refusal:
                    resend = self._resend_for(call, request, refusal)
                    permit = self._resend_permit(permits, permit, refusal, resend)
                    reply, call = self._send_or_raise(resend, refusal, headers), resend
                    self._learned(call, refusal)
                return self._answered(scope, permit, reply, call, request)

    def _resend_permit(self, permits: ExitStack, refused: AnyPermit, refusal: LM15Error, resend: WireCall) -> AnyPermit:
        """The refused request counts (it was sent); the resend is a request of its own, admitted by the limits."""
        refused.release_failed(refusal)
        return permits.enter_context(self._admit(resend))

    def _send_or_raise(self, call: WireCall, refusal: LM15Error, headers: Mapping[str, str] | None) -> JsonReply:
        try:
            return self.transport.request_json("POST", call.path, call.payload, headers=headers)
        except lm15.LM15Error as error:
            self._resend_failed(call, refusal, error)

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        call = self._call(request, stream=True)
        with ExitStack() as permits:
            permit = permits.enter_context(self._admit(call))
            yield from self._stream_under(permits, permit, call, request)

    def _stream_under(
        self, permits: ExitStack, permit: AnyPermit, call: WireCall, request: Request
    ) -> Iterator[StreamEvent]:
        with self._observed(call, request, stream=True) as scope, ExitStack() as stack:
            headers = _sent_headers(scope)
            try:
                reply = stack.enter_context(self.transport.stream(call.path, call.payload, headers=headers))
            except lm15.LM15Error as refusal:
                resend = self._resend_for(call, request, refusal)
                permit = self._resend_permit(permits, permit, refusal, resend)
                reply, call = self._open_or_raise(stack, resend, refusal, headers), resend
                self._learned(call, refusal)
            self._stream_opened(scope, reply)
            translator = self._translator(call, request)
            with translator.interruptions():
                for event in iter_sse(reply.chunks):
                    yield from self._events(scope, permit, translator.feed(event))
            end = self._ended(scope, permit, translator)
        yield from end

    def _open_or_raise(
        self, stack: ExitStack, call: WireCall, refusal: LM15Error, headers: Mapping[str, str] | None
    ) -> StreamReply:
        try:
            return stack.enter_context(self.transport.stream(call.path, call.payload, headers=headers))
        except lm15.LM15Error as error:
            self._resend_failed(call, refusal, error)

    def close(self) -> None:
        self.transport.close()


class AsyncAnyscaleEngine(_EngineBase):
    """Async engine on aiohttp: awaits I/O on the caller's event loop (one session per loop), no thread pool."""

    transport: AwaitableTransport

    async def complete(self, request: Request) -> Response:
        call = self._call(request)
        with ExitStack() as permits:
            # Nothing awaited between the grant and the stack taking it: the permit is always freed.
            permit = permits.enter_context(await self._aadmit(call))
            with self._observed(call, request) as scope:
                headers = _sent_headers(scope)
                try:
                    reply = await self.transport.request_json("POST", call.path, call.payload, headers=headers)
                except lm15.LM15Error as refusal:
                    resend = self._resend_for(call, request, refusal)
                    permit = await self._resend_permit(permits, permit, refusal, resend)
                    reply, call = await self._send_or_raise(resend, refusal, headers), resend
                    self._learned(call, refusal)
                return self._answered(scope, permit, reply, call, request)

    async def _resend_permit(
        self, permits: ExitStack, refused: AnyPermit, refusal: LM15Error, resend: WireCall
    ) -> AnyPermit:
        """The refused request counts (it was sent); the resend is a request of its own, admitted by the limits."""
        refused.release_failed(refusal)
        return permits.enter_context(await self._aadmit(resend))

    async def _send_or_raise(self, call: WireCall, refusal: LM15Error, headers: Mapping[str, str] | None) -> JsonReply:
        try:
            return await self.transport.request_json("POST", call.path, call.payload, headers=headers)
        except lm15.LM15Error as error:
            self._resend_failed(call, refusal, error)

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        call = self._call(request, stream=True)
        with ExitStack() as permits:
            permit = permits.enter_context(await self._aadmit(call))
            # Closed with this generator (not when collected): a stream stopped early stops its request now.
            async with aclosing(self._stream_under(permits, permit, call, request)) as items:
                async for item in items:
                    yield item

    async def _stream_under(
        self, permits: ExitStack, permit: AnyPermit, call: WireCall, request: Request
    ) -> AsyncGenerator[StreamEvent, None]:
        with self._observed(call, request, stream=True) as scope:
            async with AsyncExitStack() as stack:
                headers = _sent_headers(scope)
                try:
                    reply = await stack.enter_async_context(
                        self.transport.stream(call.path, call.payload, headers=headers)
                    )
                except lm15.LM15Error as refusal:
                    resend = self._resend_for(call, request, refusal)
                    permit = await self._resend_permit(permits, permit, refusal, resend)
                    reply, call = await self._open_or_raise(stack, resend, refusal, headers), resend
                    self._learned(call, refusal)
                self._stream_opened(scope, reply)
                translator = self._translator(call, request)
                with translator.interruptions():
                    async for event in aiter_sse(reply.chunks):
                        for item in self._events(scope, permit, translator.feed(event)):
                            yield item
                end = self._ended(scope, permit, translator)
        for item in end:
            yield item

    async def _open_or_raise(
        self, stack: AsyncExitStack, call: WireCall, refusal: LM15Error, headers: Mapping[str, str] | None
    ) -> StreamReply:
        try:
            return await stack.enter_async_context(self.transport.stream(call.path, call.payload, headers=headers))
        except lm15.LM15Error as error:
            self._resend_failed(call, refusal, error)

    async def aclose(self) -> None:
        await self.transport.aclose()


def _sent_headers(scope: AttemptScope | None) -> Mapping[str, str] | None:
    """What the observers add to the attempt's request (the trace context when tracing is on), else None."""
    return scope.headers if scope is not None else None


def make_engines(
    endpoint: Endpoint,
    timeout: Timeout,
    options: WireOptions,
    *,
    headers: Mapping[str, str] | None = None,
    pool_size: int = C.DEFAULT_POOL_SIZE,
    observers: tuple[Observer, ...] = (),
    max_retry_wait: float = C.DEFAULT_MAX_RETRY_WAIT,
    limiter: AnyLimiter = UNLIMITED,
    prices: Prices | None = None,
) -> tuple[AnyscaleEngine, AsyncAnyscaleEngine]:
    """The sync/async engine pair for one endpoint, each with its own connection pool, sharing the
    observers and the limiter (sync calls, async calls and streams count together)."""

    def engine(cls: type[_E], transport: Transport) -> _E:
        return cls(
            transport,
            options,
            observers=observers,
            headers=headers,
            max_retry_wait=max_retry_wait,
            limiter=limiter,
            prices=prices,
        )

    # Annotated with the protocols so that mypy checks each transport against its side's.
    blocking: BlockingTransport = SyncTransport(endpoint, timeout, headers=headers, pool_size=pool_size)
    awaitable: AwaitableTransport = AsyncTransport(endpoint, timeout, headers=headers, pool_size=pool_size)
    return engine(AnyscaleEngine, blocking), engine(AsyncAnyscaleEngine, awaitable)
