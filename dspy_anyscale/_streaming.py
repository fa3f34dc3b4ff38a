"""OpenAI-style stream chunks (chat ``delta`` and completions ``text``) → ``dspy.lm15`` stream events.

Events are produced as chunks arrive, never buffered. The stream is complete when ``[DONE]`` or
a finish reason has arrived; a stream that stops with neither is an error, never a short answer.
An ``{"error": ...}`` payload inside the stream raises the mapped lm15 error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import orjson
from requests.structures import CaseInsensitiveDict

from . import _constants as C
from ._http_errors import error_for_status
from ._secrets import Secrets, redact
from ._sse import ServerSentEvent
from ._text import preview
from ._wire import WireCall, chat_logprobs, completions_logprobs, finish_reason, usage_from
from .errors import UnexpectedResponseError

if TYPE_CHECKING:  # DSPy's types as this package uses them (DSPy ships none); at run time, DSPy's own
    from ._dspy_types import LM15Error, Request, StreamDeltaEvent, StreamEndEvent, StreamEvent, Usage, lm15
else:
    from dspy import lm15

_DONE = "[DONE]"


class StreamTranslator:
    """Stateful translation of one streamed response. ``feed`` each SSE event, then ``finish``."""

    def __init__(self, call: WireCall, request: Request, *, url: str, secret: Secrets | None = None) -> None:
        self._secret = secret  # a server may quote the request's Authorization or secret headers in an error event
        self._chat = call.endpoint == "chat"
        self._model = request.model
        self._url = url
        self._started = False
        self._done = False
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._parts: dict[tuple[Any, ...], int] = {}
        self._texts: list[str] = []
        self.characters = 0
        self.model: str | None = None  # what the server says answered
        self.response_id: str | None = None  # the answer's id (its chunks' "id")

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return "".join(self._texts)

    def feed(self, sse: ServerSentEvent) -> list[StreamEvent]:
        if self._done:
            return []
        if sse.data.strip() == _DONE:
            self._done = True
            return []
        chunk = self._parse(sse.data)
        events: list[StreamEvent] = []
        if not self._started:
            self._started = True
            self.model = str(chunk["model"]) if chunk.get("model") else None
            self.response_id = str(chunk["id"]) if chunk.get("id") else None
            events.append(lm15.StreamStartEvent(id=chunk.get("id") or None, model=self.model or self._model))
        if isinstance(chunk.get("usage"), Mapping):
            self._usage = usage_from(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if isinstance(choice, Mapping) and choice.get("index", 0) == 0:
                events.extend(self._choice(choice))
        return events

    def finish(self) -> list[StreamEndEvent]:
        if not self._done and self._finish is None:
            got = f"after {self.characters} characters" if self._started else "before any data"
            raise lm15.TransportError(
                f"The stream from POST {self._url} ended {got} without [DONE] or a finish reason; "
                "the answer is incomplete",
                provider=C.PROVIDER,
            )
        if not self._started:
            raise UnexpectedResponseError(
                f"The stream from POST {self._url} ended with [DONE] but carried no data", provider=C.PROVIDER
            )
        return [lm15.StreamEndEvent(finish_reason=finish_reason(self._finish), usage=self._usage or lm15.Usage())]

    @contextmanager
    def interruptions(self) -> Iterator[None]:
        """A connection that fails midway raises an error saying how far the stream got."""
        try:
            yield
        except (lm15.TransportError, lm15.TimeoutError) as exc:
            if self._done or self._finish is not None:
                raise
            got = f"after {self.characters} characters" if self._started else "before any data"
            raise type(exc)(
                f"The stream from POST {self._url} broke {got}: {exc.message}; the answer is incomplete",
                provider=C.PROVIDER,
            ) from exc

    def _parse(self, data: str) -> dict[str, Any]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UnexpectedResponseError(
                redact(f"A stream event from POST {self._url} is not JSON: {preview(data)}", self._secret),
                provider=C.PROVIDER,
            ) from None
        if not isinstance(chunk, dict):
            raise UnexpectedResponseError(
                redact(f"A stream event from POST {self._url} is not a JSON object: {preview(data)}", self._secret),
                provider=C.PROVIDER,
            )
        if "error" in chunk:
            raise self._error(chunk)
        return chunk

    def _error(self, chunk: dict[str, Any]) -> LM15Error:
        error = chunk["error"]
        code = error.get("code") if isinstance(error, Mapping) else None
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        return error_for_status(status, orjson.dumps(chunk), CaseInsensitiveDict(), url=self._url, secret=self._secret)

    def _index(self, *key: Any) -> int:
        return self._parts.setdefault(key, len(self._parts))

    def _choice(self, choice: Mapping[str, Any]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._chat:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                events.append(
                    lm15.StreamDeltaEvent(lm15.ThinkingDelta(text=str(reasoning), part_index=self._index("thinking")))
                )
            text = delta.get("content")
            logprobs = chat_logprobs(choice.get("logprobs")) or ()
            for call in delta.get("tool_calls") or ():
                events.append(self._tool_delta(call))
        else:
            text = choice.get("text")
            logprobs = completions_logprobs(choice.get("logprobs")) or ()
        if text:
            self.characters += len(text)
            self._texts.append(text)
            events.append(
                lm15.StreamDeltaEvent(lm15.TextDelta(text=text, part_index=self._index("text"), logprobs=logprobs))
            )
        if choice.get("finish_reason"):
            self._finish = str(choice["finish_reason"])
        return events

    def _tool_delta(self, call: Mapping[str, Any]) -> StreamDeltaEvent:
        function = call.get("function") or {}
        return lm15.StreamDeltaEvent(
            lm15.ToolCallDelta(
                input=function.get("arguments") or "",
                part_index=self._index("tool", call.get("index", 0)),
                id=call.get("id"),
                name=function.get("name"),
            )
        )
