"""A server-sent-events decoder that follows the WHATWG spec, fed with arbitrary byte chunks.

Lines end in CR, LF or CRLF (a CR at the end of one chunk may pair with an LF at the start of the
next); ``:`` starts a comment; several ``data:`` lines form one event joined by ``\\n``; a blank
line dispatches; an event that is not finished when the stream ends is discarded. UTF-8 is
decoded incrementally, so a character cut between chunks is not mangled.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the events completed by that chunk.

    Linear in the bytes fed, however the stream is cut: each chunk is scanned once, and a line
    that spans many chunks is kept as its pieces and joined once, when it ends (re-joining and
    re-scanning a growing buffer on every chunk made one 20 MB event take seconds).
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []  # the unfinished line, as received
        self._held_cr = False  # the text so far ends in a CR: the line has ended, unless an LF follows
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None
        self.bytes_seen = 0

    @property
    def pending(self) -> str:
        """Text received after the last dispatched event (diagnostics for truncated streams)."""
        return "\n".join(self._data) + "".join(self._pieces)

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        self.bytes_seen += len(chunk)
        text = self._utf8.decode(chunk)
        events: list[ServerSentEvent] = []
        if not text:
            return events
        start = 0
        if self._held_cr:  # the CR that ended the last chunk ended a line; a LF here is its other half
            self._held_cr = False
            self._end_line(events, "")
            start = 1 if text[0] == "\n" else 0
        for match in _LINE_END.finditer(text, start):
            if match.end() == len(text) and match.group() == "\r":
                self._pieces.append(text[start : match.start()])
                self._held_cr = True  # maybe the first half of a CRLF split across chunks
                return events
            self._end_line(events, text[start : match.start()])
            start = match.end()
        if start < len(text):
            self._pieces.append(text[start:])
        return events

    def close(self) -> list[ServerSentEvent]:
        """End of stream: a pending CR still ends a line; an undispatched event is discarded."""
        events: list[ServerSentEvent] = []
        if self._held_cr:
            self._held_cr = False
            self._end_line(events, "")
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self._pieces.append(tail)
        return events

    def _end_line(self, events: list[ServerSentEvent], last_piece: str) -> None:
        """The current line ended with ``last_piece``: read it, and collect the event it dispatches."""
        if self._pieces:
            self._pieces.append(last_piece)
            line = "".join(self._pieces)
            self._pieces = []
        else:
            line = last_piece
        event = self._line(line)
        if event is not None:
            events.append(event)

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent("\n".join(self._data), self._event or "message", self._last_id, self._retry)
        self._data, self._event = [], ""
        return event


def iter_sse(chunks: Iterable[bytes], decoder: SSEDecoder | None = None) -> Iterator[ServerSentEvent]:
    decoder = decoder or SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.close()


async def aiter_sse(chunks: AsyncIterable[bytes], decoder: SSEDecoder | None = None) -> AsyncIterator[ServerSentEvent]:
    decoder = decoder or SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.close():
        yield event
